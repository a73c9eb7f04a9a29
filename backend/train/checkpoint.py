"""Checkpoints: tensors in safetensors, state in JSON; never pickle.

Layout of ``checkpoints/``:
  ckpt_<iteration>.safetensors   model weights, Adam moments and steps, sampler RNG state
  latest.json                    iteration, train state, config, and the tensors file name

The tensors file is written first (to a temporary name, then renamed); ``latest.json`` is
replaced atomically afterwards and older tensor files are removed last, so a crash at any
point leaves a consistent checkpoint. Resuming restores everything needed to continue
bit-for-bit on the same device and software.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..clip.writers import replacing, write_json
from ..errors import CheckpointError

FORMAT = 1
# config sections that must match to resume (iterations may be extended)
_MATCH = ("model", "losses", "clip")
_EXECUTION_FLAGS = ("fused", "foreach", "capturable", "differentiable")
_MATCH_TRAIN = ("batch_size", "grid_lr", "mlp_lr", "mapping_lr", "lr_schedule", "lr_decay_start",
                "lr_final_factor", "pretrain_iterations", "pretrain_batch_size", "seed")


def save_checkpoint(folder: Path, trainer) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    st = trainer.state
    tensors: dict[str, torch.Tensor] = {}
    for k, v in trainer.model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().contiguous().cpu()
    opt = trainer.optimizer.state_dict()
    for pid, pstate in opt["state"].items():
        for key, val in pstate.items():
            t = val if torch.is_tensor(val) else torch.tensor(val)
            tensors[f"optim.{pid}.{key}"] = t.detach().contiguous().cpu()
    tensors["rng.sampler"] = trainer.gen.get_state().contiguous().cpu()
    name = f"ckpt_{st.iteration:07d}.safetensors"
    with replacing(folder / name, "checkpoint") as tmp:
        save_file(tensors, str(tmp))
    meta: dict[str, Any] = {
        "format": FORMAT,
        "tensors": name,
        "iteration": st.iteration,
        "pretrained": st.pretrained,
        "seconds": st.seconds,
        "pretrain_seconds": st.pretrain_seconds,
        "history": st.history,
        "evals": st.evals,
        "n_layers": trainer.n_layers,
        "uv_scales": [float(v) for v in trainer.model.uv_scales],  # set by pretraining (model.uv_init)
        "geometry": [trainer.geom.width, trainer.geom.height, trainer.geom.n_frames],
        "param_groups": [{k: (float(v) if torch.is_tensor(v) else v) for k, v in g.items() if k != "params"}
                         | {"params": g["params"]} for g in opt["param_groups"]],
        "config": trainer.cfg.to_dict(),
        "schedule": trainer.plan.to_dict(),  # the chosen plan (backend/train/schedule.py): resume keeps it
    }
    write_json(folder / "latest.json", meta)
    for old in folder.glob("ckpt_*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder / name


def read_meta(folder: Path) -> dict | None:
    p = Path(folder) / "latest.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {p} is unreadable: {e}") from None


# fields that change how a step is computed, not what it computes: a run resumes across them
_EXECUTION_ONLY = {"model": ("mlp_backend",)}


# fields added since checkpoints were first written, with the value an older checkpoint trained with
_ADDED = {"model": {"uv_init": "seed", "grids_from_shot": False}}


def _comparable(section, name: str):
    if not isinstance(section, dict):
        return section
    section = {**_ADDED.get(name, {}), **section}
    return {k: v for k, v in section.items() if k not in _EXECUTION_ONLY.get(name, ())}


def compatible(meta: dict, trainer) -> str | None:
    """None if the checkpoint can be resumed by this trainer, else the reason."""
    cfg = trainer.cfg.to_dict()
    if meta.get("format") != FORMAT:
        return f"checkpoint format {meta.get('format')} (expected {FORMAT})"
    if meta.get("n_layers") != trainer.n_layers:
        return f"checkpoint has {meta.get('n_layers')} layers, this clip {trainer.n_layers}"
    if meta.get("geometry") != [trainer.geom.width, trainer.geom.height, trainer.geom.n_frames]:
        return "checkpoint was trained on a different clip size"
    for sec in _MATCH:
        if _comparable(meta["config"].get(sec), sec) != _comparable(cfg[sec], sec):
            return f"config section [{sec}] differs from the checkpoint's"
    for k in _MATCH_TRAIN:
        if meta["config"]["train"].get(k) != cfg["train"][k]:
            return f"config train.{k} differs from the checkpoint's"
    return None


def load_checkpoint(folder: Path, trainer) -> int:
    """Restore a trainer from ``folder``; returns the iteration. Raises CheckpointError."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta is None:
        raise CheckpointError(f"no checkpoint in {folder}")
    why = compatible(meta, trainer)
    if why:
        raise CheckpointError(f"cannot resume from {folder}: {why}")
    try:
        tensors = load_file(str(folder / meta["tensors"]))
    except Exception as e:  # safetensors raises several types for damaged files
        raise CheckpointError(f"checkpoint tensors {folder / meta['tensors']} are unreadable: {e}") from None
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    trainer.model.load_state_dict(model_sd)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    # execution flags (fused, foreach, capturable, ...) belong to this machine, not the checkpoint
    groups = []
    for saved, current in zip(meta["param_groups"], trainer.optimizer.param_groups):
        g = dict(saved)
        for flag in _EXECUTION_FLAGS:
            if flag in current:
                g[flag] = current[flag]
        groups.append(g)
    trainer.optimizer.load_state_dict({"state": state, "param_groups": groups})
    if meta.get("schedule"):  # the plan this run chose (a budget's measurement is not repeated)
        from .schedule import Plan
        plan = Plan.from_dict(meta["schedule"])
        plan.final = plan.final or plan.step_ms is not None or plan.budget_s <= 0
        trainer.plan = plan
    trainer.restore_lr(int(meta["iteration"]))  # saved as floats; a graphed schedule reads tensors
    trainer.gen.set_state(tensors["rng.sampler"])
    st = trainer.state
    st.iteration = int(meta["iteration"])
    st.pretrained = bool(meta["pretrained"])
    if meta.get("uv_scales") is not None and len(meta["uv_scales"]) == trainer.n_layers:
        trainer.model.uv_scales = [float(v) for v in meta["uv_scales"]]
    st.seconds = float(meta["seconds"])
    st.pretrain_seconds = float(meta.get("pretrain_seconds", 0.0))
    st.history = list(meta.get("history", []))
    st.evals = list(meta.get("evals", []))
    return st.iteration
