"""Job kinds, as data: what a request that creates a job must name and check, and how the
worker runs it. Adding a kind is one ``JobKind`` here, its request's schema in
``addon/core/protocol.py`` and the engine function it calls.

Service side (no torch): ``settings`` checks the request's settings before anything is
created (raise ``ProtocolError``), ``sources`` names the paths or uploads the request
refers to (each is checked against the allowed roots, uploads are moved into the job),
``place`` writes the resolved paths into the spec. A kind with ``parent`` is created from
a finished job of that kind (the request's ``job_id``); its spec gets ``parent_out``.

Worker side: ``run(engine, spec, out_dir, progress, cancel) -> result`` (JSON);
``resumable`` kinds report the checkpoint they resume from in the ``start`` event.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from neural_atlas.core.protocol import ProtocolError

Body = dict[str, Any]


@dataclass(frozen=True)
class JobKind:
    name: str  # JobInfo.kind
    request: str  # the protocol request that creates it
    settings: Callable[[Body], dict[str, Any]]
    sources: Callable[[Body], dict[str, Any]]
    place: Callable[[dict[str, Any], Body, dict[str, str]], None]
    default_name: Callable[[Body, dict[str, Any] | None], str]
    run: Callable[..., dict[str, Any]]
    parent: str | None = None
    resumable: bool = False


def config_dict(preset_name: str | None, overrides: dict[str, Any] | None,
                config_file: str | Path | None = None) -> dict[str, Any]:
    """A validated configuration (``Config.to_dict()``) from a preset (or a config TOML)
    and overrides."""
    from backend.config import Config, preset
    from backend.errors import ConfigError
    try:
        cfg = Config.load(config_file) if config_file else preset(preset_name or "seed")
        if overrides:
            cfg = cfg.replace(**overrides)
        return cfg.validate().to_dict()
    except ConfigError as e:
        raise ProtocolError("invalid_config", str(e)) from None
    except (TypeError, ValueError) as e:
        raise ProtocolError("invalid_config", f"invalid settings: {e}") from None


def _range(spec: dict[str, Any]) -> tuple[int, int] | None:
    return tuple(spec["frame_range"]) if spec.get("frame_range") else None


def source_name(src: Any) -> str:
    if isinstance(src, str):
        return os.path.basename(src.rstrip("/\\"))[:200]
    return (src.get("path") or f"upload {src['upload']}")[:200]


# ------------------------------------------------------------------ decompose
def _decompose_settings(b: Body) -> dict[str, Any]:
    return {"config": config_dict(b.get("preset"), b.get("overrides")),
            "frame_range": b.get("frame_range"), "preset": b.get("preset") or "seed"}


def _decompose_sources(b: Body) -> dict[str, Any]:
    return {"source": b["source"], **{f"mask {i}": m for i, m in enumerate(b.get("masks") or [])}}


def _decompose_place(spec: dict[str, Any], b: Body, paths: dict[str, str]) -> None:
    spec["source"] = paths["source"]
    spec["masks"] = [paths[f"mask {i}"] for i in range(len(b.get("masks") or []))] or None


def _decompose_run(engine, spec: dict[str, Any], out_dir: Path, progress, cancel) -> dict[str, Any]:
    from backend.config import Config
    config = Config.from_dict(spec["config"]).validate()
    engine.decompose(spec["source"], out_dir, config, masks=spec.get("masks"), frame_range=_range(spec),
                     progress=progress, cancel=cancel, resume=True)
    return {"out_dir": str(out_dir)}


# --------------------------------------------------------------------- render
def _render_settings(b: Body) -> dict[str, Any]:
    return {"mode": b.get("mode", "delta"), "frame_range": b.get("frame_range"),
            "formats": b.get("formats") or ["png", "mp4"], "opacity": b.get("opacity")}


def _render_place(spec: dict[str, Any], b: Body, paths: dict[str, str]) -> None:
    spec["edits"] = {k: paths[f"edit {k}"] for k in b["edits"]}


def _render_run(engine, spec: dict[str, Any], out_dir: Path, progress, cancel) -> dict[str, Any]:
    edits = {int(k): v for k, v in spec["edits"].items()}
    extra = {"opacity": spec["opacity"]} if spec.get("opacity") else {}
    res = engine.render_edit(spec["parent_out"], edits, mode=spec.get("mode", "delta"),
                             frame_range=_range(spec), out=out_dir,
                             formats=tuple(spec.get("formats") or ("png", "mp4")),
                             progress=progress, cancel=cancel, **extra)
    return {"out_dir": str(out_dir), **(res if isinstance(res, dict) else {})}


# ---------------------------------------------------------------- paint_frame
# paint on one frame of a done decomposition: the image goes into the layers' edit images
# (painted over ``edits`` when given); the job's out/edits/ holds the result
def _paint_sources(b: Body) -> dict[str, Any]:
    return {"image": b["image"], **{f"edit {k}": v for k, v in (b.get("edits") or {}).items()}}


def _paint_place(spec: dict[str, Any], b: Body, paths: dict[str, str]) -> None:
    spec["image"] = paths["image"]
    spec["edits"] = {k: paths[f"edit {k}"] for k in (b.get("edits") or {})}


def _paint_run(engine, spec: dict[str, Any], out_dir: Path, progress, cancel) -> dict[str, Any]:
    res = engine.paint_frame(spec["parent_out"], spec["frame"], spec["image"], layer=spec.get("layer"),
                             out_edits=out_dir / "edits",
                             base_edits={int(k): v for k, v in (spec.get("edits") or {}).items()},
                             progress=progress)
    return {"out_dir": str(out_dir), **res}


KINDS: dict[str, JobKind] = {k.name: k for k in (
    JobKind("decompose", "submit", _decompose_settings, _decompose_sources, _decompose_place,
            lambda b, parent: source_name(b["source"]), _decompose_run, resumable=True),
    JobKind("render", "render", _render_settings, lambda b: {f"edit {k}": v for k, v in b["edits"].items()},
            _render_place, lambda b, parent: f"render of {parent.get('name') or parent['job_id']}",
            _render_run, parent="decompose"),
    JobKind("paint_frame", "paint_frame", lambda b: {"frame": b["frame"], "layer": b.get("layer")},
            _paint_sources, _paint_place,
            lambda b, parent: f"paint on frame {b['frame']} of {parent.get('name') or parent['job_id']}",
            _paint_run, parent="decompose"),
)}
