"""``python -m backend batch SHOTS.toml``: decompose many shots, resumably, with a live table.

The shot list (TOML; relative paths are relative to the file's folder)::

    [defaults]                      # optional, for every shot
    preset = "fast"
    output_root = "atlases"         # a shot without ``output`` writes to output_root/<name>
    overrides = { train = { iterations = 3000 } }

    [[shot]]
    name = "sh010"
    clip = "plates/sh010"           # frames folder, seed layout or video file
    masks = ["plates/sh010/masks/player"]
    frames = "0:70"                 # or [0, 70]; stop exclusive
    preset = "quality"              # or config = "sh010.toml" (a configuration file)
    overrides = { train = { iterations = 5000 } }
    output = "atlases/sh010"

Each shot becomes a job of the service's job lifecycle (``backend.service.lifecycle``:
the same ``JobRunner``, executors and worker process as ``serve``; no sockets): the
local executor (``--concurrency N`` jobs at once, spread over the visible GPUs) or Ray
(``--executor ray``). The batch's own job store (``--workspace``, default
``<shot list>.batch/`` next to the file) makes it resumable: run the same command again
and finished shots are kept, interrupted ones continue from their checkpoints and failed
ones are tried again. A shot whose clip, masks or settings are wrong is reported at once
and the others run. At the end ``summary.json`` and ``summary.txt`` (PSNR, time, device,
state per shot) are written to the workspace.

Exit codes: 0 every shot done, 1 a shot failed, 2 the shot list or a shot is invalid,
130 interrupted (checkpoints saved: run the same command again).
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

from .errors import NeuralAtlasError

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
SHOT_KEYS = {"name", "clip", "masks", "frames", "preset", "config", "overrides", "output"}
DEFAULT_KEYS = {"preset", "config", "overrides", "output_root"}


class ShotListError(NeuralAtlasError):
    """The shot list cannot be read at all."""


@dataclass
class Shot:
    name: str
    spec: dict[str, Any] = field(default_factory=dict)  # the job spec (source, masks, config, out_dir)
    error: str = ""  # why this shot cannot be submitted

    @property
    def token(self) -> str:
        """Same shot, same settings -> same job (what makes a re-run resume)."""
        blob = json.dumps({"name": self.name, **self.spec}, sort_keys=True, default=str)
        return "batch-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


# ---------------------------------------------------------------- shot list
def _path(base: Path, p: Any, what: str) -> Path:
    if not isinstance(p, str) or not p:
        raise ValueError(f"{what} must be a path string")
    q = Path(p).expanduser()
    return (q if q.is_absolute() else base / q).resolve()


def _frames(v: Any) -> Optional[list]:
    if v is None:
        return None
    from .clip import parse_frame_range
    if isinstance(v, str):
        a, b = parse_frame_range(v)
        return [a, b]
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v) \
            and 0 <= v[0] < v[1]:
        return list(v)
    raise ValueError(f"frames must be \"START:STOP\" or [start, stop] with 0 <= start < stop, got {v!r}")


def _merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in a.items()}
    for k, v in b.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_shots(path: str | Path) -> list[Shot]:
    """Read and check a shot list. Raises ShotListError when the file itself is unusable;
    a bad shot comes back with its ``error`` set (the others are unaffected)."""
    from .errors import ConfigError
    from .service.kinds import config_dict
    from neural_atlas.core.protocol import ProtocolError
    path = Path(path).expanduser().resolve()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShotListError(f"shot list {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ShotListError(f"cannot read the shot list {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ShotListError(f"shot list {path} is not valid TOML: {e}") from None
    base = path.parent
    defaults = data.get("defaults") or {}
    extra = set(data) - {"defaults", "shot"}
    if extra or not isinstance(defaults, dict) or set(defaults) - DEFAULT_KEYS:
        raise ShotListError(f"{path}: unknown keys {sorted(extra | (set(defaults) - DEFAULT_KEYS))}; a shot list "
                            f"has [defaults] ({', '.join(sorted(DEFAULT_KEYS))}) and [[shot]] tables")
    rows = data.get("shot")
    if not isinstance(rows, list) or not rows:
        raise ShotListError(f"{path} lists no shots: add [[shot]] tables with name, clip and output")
    out_root = _path(base, defaults["output_root"], "defaults.output_root") if defaults.get("output_root") else None
    shots: list[Shot] = []
    names: set[str] = set()
    outputs: dict[Path, str] = {}
    for i, row in enumerate(rows):
        name = row.get("name") if isinstance(row, dict) else None
        if not isinstance(name, str) or not name or len(name) > 100 or any(c in name for c in "/\\\0"):
            name = f"shot #{i + 1}"
            shots.append(Shot(name, error="needs a name (a short string without slashes)"))
            continue
        shot = Shot(name)
        shots.append(shot)
        try:
            if name in names:
                raise ValueError("another shot has the same name")
            names.add(name)
            unknown = set(row) - SHOT_KEYS
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)} (a shot has {', '.join(sorted(SHOT_KEYS))})")
            if "clip" not in row:
                raise ValueError("needs a clip")
            clip = _path(base, row["clip"], "clip")
            if not clip.exists():
                raise ValueError(f"clip {clip} does not exist")
            masks = row.get("masks") or []
            if not isinstance(masks, list):
                raise ValueError("masks must be a list of folders")
            mask_paths = [_path(base, m, "a mask") for m in masks]
            for m in mask_paths:
                if not m.is_dir():
                    raise ValueError(f"mask folder {m} does not exist")
            if "output" in row:
                output = _path(base, row["output"], "output")
            elif out_root is not None:
                output = out_root / name
            else:
                raise ValueError("needs an output folder (or [defaults] output_root)")
            if output in outputs:
                raise ValueError(f"writes to {output}, as shot {outputs[output]!r} does")
            outputs[output] = name
            if output.exists() and not output.is_dir():
                raise ValueError(f"output {output} is a file")
            s = _merge({k: defaults[k] for k in ("preset", "config", "overrides") if k in defaults},
                       {k: row[k] for k in ("preset", "config", "overrides") if k in row})
            if "config" in row and "preset" not in row:
                s.pop("preset", None)
            overrides = s.get("overrides")
            if overrides is not None and not isinstance(overrides, dict):
                raise ValueError("overrides must be a table of sections")
            config_file = _path(base, s["config"], "config") if s.get("config") else None
            try:
                config = config_dict(s.get("preset"), overrides, config_file)
            except ProtocolError as e:
                raise ValueError(e.message) from None
            shot.spec = {"source": str(clip), "masks": [str(m) for m in mask_paths] or None,
                         "frame_range": _frames(row.get("frames")), "config": config,
                         "preset": s.get("preset") or ("file" if config_file else "seed"), "out_dir": str(output)}
        except (ValueError, ConfigError, NeuralAtlasError) as e:
            shot.error = str(e)
    return shots


# ----------------------------------------------------------- progress table
COLUMNS = ("shot", "state", "phase", "iteration", "PSNR", "elapsed", "ETA", "where")


def _fmt_s(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _where(job: dict[str, Any]) -> str:
    p = job.get("placement") or {}
    if p.get("executor") == "ray":
        gpus = ",".join(p.get("gpus") or [])
        return f"ray {p.get('ip', '?')}" + (f" gpu {gpus}" if gpus else "")
    if p.get("executor") == "local":
        return f"gpu {p['gpu']}" if p.get("gpu") is not None else f"slot {p.get('slot', 0)}"
    return ""


class ProgressTable:
    """The lifecycle's ``Notify`` for the batch: a redrawn table on a terminal, one line per
    change (state, phase, each tenth of training) otherwise."""

    def __init__(self, names: dict[str, str], stream: TextIO, tty: bool) -> None:
        self.names, self.stream, self.tty = names, stream, tty
        self.order: list[str] = []  # shot names in the list's order
        self.jobs: dict[str, dict[str, Any]] = {}
        self.extra: dict[str, dict[str, Any]] = {}  # shots without a job (invalid, skipped)
        self._dirty = True
        self._drawn_lines = 0
        self._last_draw = float("-inf")
        self._said: dict[str, tuple] = {}

    # Notify
    def job(self, job: dict[str, Any]) -> None:
        self.progress(job, True)

    def progress(self, job: dict[str, Any], urgent: bool) -> None:
        if job["job_id"] not in self.names:
            return
        self.jobs[job["job_id"]] = job
        self._dirty = True
        if not self.tty:
            self._line(job)

    def _row(self, name: str, job: dict[str, Any]) -> tuple[str, ...]:
        it, its = job.get("iteration"), job.get("iterations")
        psnr = job.get("psnr")
        elapsed = job.get("elapsed_s")
        if job.get("state") in ("done", "failed", "cancelled") and job.get("started_at") and job.get("ended_at"):
            elapsed = job["ended_at"] - job["started_at"]
        return (name, str(job.get("state", "")), str(job.get("phase", "")),
                f"{it}/{its}" if its else "-", f"{psnr:.2f}" if isinstance(psnr, (int, float)) else "-",
                _fmt_s(elapsed), _fmt_s(job.get("eta_s")) if job.get("state") == "running" else "-", _where(job))

    def _line(self, job: dict[str, Any]) -> None:
        frac = job.get("fraction") or 0.0
        key = (job.get("state"), job.get("phase"), int(frac * 10) if job.get("phase") == "train" else 0)
        if self._said.get(job["job_id"]) == key:
            return
        self._said[job["job_id"]] = key
        name, state, phase, its, psnr, _, eta, where = self._row(self.names[job["job_id"]], job)
        if state == "running":
            text = phase + (f" {its}" if its != "-" and phase in ("train", "pretrain") else "")
            text += (f", {psnr} dB" if psnr != "-" else "") + (f", ETA {eta}" if eta != "-" else "")
            text += f" ({where})" if where else ""
        else:
            text = state + (f": {job['message']}" if job.get("message") else "")
        print(f"[{name}] {text}", file=self.stream, flush=True)

    def rows(self) -> list[tuple[str, ...]]:
        out = [self._row(self.names[j], job) for j, job in self.jobs.items()]
        out += [self._row(n, info) for n, info in self.extra.items()]
        order = {n: i for i, n in enumerate(self.order)}
        return sorted(out, key=lambda r: order.get(r[0], len(order)))

    def draw(self, now: float, force: bool = False) -> None:
        if not self.tty or not (self._dirty or force) or (now - self._last_draw < 0.25 and not force):
            return
        self._dirty, self._last_draw = False, now
        text = format_table(COLUMNS, self.rows())
        up = f"\x1b[{self._drawn_lines}F\x1b[J" if self._drawn_lines else ""
        self.stream.write(up + text + "\n")
        self.stream.flush()
        self._drawn_lines = text.count("\n") + 1


def format_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ summary
def _report(out_dir: str | None) -> dict[str, Any]:
    try:
        return json.loads((Path(out_dir) / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return {}


def summarize(shots: list[Shot], jobs: dict[str, dict[str, Any]], executor: dict[str, Any],
              started: float) -> dict[str, Any]:
    rows = []
    for shot in shots:
        job = jobs.get(shot.name)
        if job is None:
            rows.append({"name": shot.name, "state": "invalid", "error": shot.error, "output": None})
            continue
        rep = _report(shot.spec.get("out_dir")) if job["state"] == "done" else {}
        err = job.get("error") or {}
        rows.append({
            "name": shot.name, "state": job["state"], "job_id": job["job_id"],
            "psnr": rep.get("psnr"), "psnr_no_residual": rep.get("psnr_no_residual"),
            "iterations": rep.get("iterations", job.get("iterations")),
            "seconds": rep.get("total_seconds") or rep.get("seconds"),
            "train_seconds": rep.get("seconds"),
            "wall_seconds": (job["ended_at"] - job["started_at"]) if job.get("ended_at") and job.get("started_at")
            else None,
            "device": rep.get("device"), "placement": job.get("placement"), "attempts": job.get("attempts"),
            "resumed_from": job.get("resumed_from"), "output": shot.spec.get("out_dir"),
            "error": err.get("message") if err else None,
        })
    wall = time.time() - started
    done = sum(1 for r in rows if r["state"] == "done")
    return {"shots": rows, "executor": executor, "wall_seconds": wall, "done": done, "total": len(rows),
            "shots_per_hour": done / wall * 3600.0 if wall > 0 else None}


def summary_table(summary: dict[str, Any]) -> str:
    cols = ("shot", "state", "PSNR (dB)", "time (s)", "device", "where", "output / error")
    rows = []
    for r in summary["shots"]:
        psnr = f"{r['psnr']:.2f}" if isinstance(r.get("psnr"), (int, float)) else "-"
        secs = r.get("seconds") if r.get("seconds") is not None else r.get("wall_seconds")
        rows.append((r["name"], r["state"], psnr, f"{secs:.1f}" if isinstance(secs, (int, float)) else "-",
                     str(r.get("device") or "-"), _where(r) or "-",
                     (r.get("error") if r["state"] != "done" else r.get("output")) or "-"))
    return format_table(cols, rows)


# ---------------------------------------------------------------------- run
def run_batch(shot_list: str | Path, executor_opts, workspace: str | Path | None = None, *,
              stream: TextIO | None = None, tty: bool | None = None, retry_failed: bool = True) -> int:
    from .service.executors import ExecutorError, Mailbox, make_executor
    from .service.lifecycle import JobRunner
    from .service.store import FileLock, JobStore, atomic_write_json
    stream = stream or sys.stderr
    tty = stream.isatty() if tty is None else tty
    shot_list = Path(shot_list).expanduser().resolve()
    shots = load_shots(shot_list)
    ws = Path(workspace).expanduser().resolve() if workspace else shot_list.with_name(shot_list.stem + ".batch")
    ws.mkdir(parents=True, exist_ok=True)
    lock = FileLock(ws / "batch.lock")
    if not lock.acquire():
        raise ShotListError(f"another batch is running in {ws}; wait for it or use another --workspace")
    started = time.time()
    mailbox = Mailbox()
    executor = None
    try:
        for s in shots:
            if s.error:
                print(f"error: shot {s.name}: {s.error}; the other shots run", file=stream, flush=True)
        executor = make_executor(executor_opts)
        try:
            executor.start(mailbox, ws)
        except ExecutorError as e:
            raise ShotListError(str(e)) from None
        store = JobStore(ws)
        names: dict[str, str] = {}
        table = ProgressTable(names, stream, tty)
        table.order = [s.name for s in shots]
        runner = JobRunner(store, executor, table)
        runner.recover()
        ours: dict[str, dict[str, Any]] = {}
        for s in shots:
            if s.error:
                table.extra[s.name] = {"state": "invalid", "phase": "-", "message": s.error}
                continue
            job = store.by_token(s.token)
            if job is None or (job["state"] in ("failed", "cancelled") and retry_failed):
                job = store.create("decompose", dict(s.spec), token=s.token, name=s.name)
            ours[s.name] = job
            names[job["job_id"]] = s.name
            table.job(job)
        keep = {j["job_id"] for j in ours.values()}
        for job in list(store.jobs.values()):  # older settings of a shot, shots no longer listed
            if job["job_id"] not in keep and job["state"] == "queued":
                runner.cancel(job)

        interrupted = _signals(runner)
        try:
            while not all(j["state"] in ("done", "failed", "cancelled") for j in ours.values()):
                for job_id, ev in mailbox.wait(0.2):
                    runner.on_event(job_id, ev)
                runner.tick()
                table.draw(time.monotonic())
                if runner.stopping and runner.idle():
                    break
            while not runner.idle():  # finished jobs whose worker is still exiting
                for job_id, ev in mailbox.wait(0.2):
                    runner.on_event(job_id, ev)
                runner.tick()
        finally:
            _signals(None)
        table.draw(time.monotonic(), force=True)
        summary = summarize(shots, {n: j for n, j in ours.items()}, executor.describe(), started)
        summary["shot_list"] = str(shot_list)
        summary["interrupted"] = bool(interrupted)
        atomic_write_json(ws / "summary.json", summary)
        text = summary_table(summary)
        (ws / "summary.txt").write_text(text + "\n", encoding="utf-8")
        print(text, file=stream, flush=True)
        print(f"summary: {ws / 'summary.json'}", file=stream, flush=True)
        if interrupted:
            print("interrupted: checkpoints saved; run the same command again to resume", file=stream, flush=True)
            return EXIT_INTERRUPTED
        states = [r["state"] for r in summary["shots"]]
        if "invalid" in states:
            return EXIT_INPUT
        return EXIT_OK if all(s == "done" for s in states) else EXIT_FAILED
    finally:
        if executor is not None:
            executor.close()
        mailbox.close()
        lock.release()


def _signals(runner) -> list:
    """Ctrl-C or SIGTERM: stop the running jobs at their next step (checkpoints saved) and
    requeue them for the next run; a second one kills the workers."""
    said: list = []
    if runner is None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL if s == signal.SIGTERM else signal.default_int_handler)
        return said

    def handler(signum, frame):  # noqa: ARG001
        if said and time.monotonic() - said[0] > 1.0:
            for jid in runner.running():
                runner.executor.kill(jid)
        if not said:
            said.append(time.monotonic())
            print("\nstopping: the running shots save a checkpoint (Ctrl-C again to kill them)",
                  file=sys.stderr, flush=True)
            runner.stop()

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
    return said


# ----------------------------------------------------------------------- CLI
def add_command(subparsers) -> None:
    from .service.cli import add_executor_arguments
    p = subparsers.add_parser("batch", help="decompose many shots from a shot list (resumable)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("shots", type=Path, help="the shot list (TOML: [defaults] and [[shot]] tables)")
    p.add_argument("--workspace", type=Path, default=None,
                   help="the batch's job store and summary (default: SHOTS.batch/ next to the list)")
    p.add_argument("--no-retry-failed", action="store_true", help="keep failed shots failed on a re-run")
    add_executor_arguments(p)
    p.set_defaults(func=cmd_batch)


def cmd_batch(args) -> int:
    from .service.cli import executor_options
    try:
        opts = executor_options(args)
    except ValueError as e:
        raise NeuralAtlasError(str(e)) from None
    return run_batch(args.shots, opts, args.workspace, retry_failed=not args.no_retry_failed)
