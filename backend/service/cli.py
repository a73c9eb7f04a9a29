"""Command line for the service: ``serve``, ``keys`` and ``client``.

``add_commands(subparsers)`` registers them on the lead's ``backend/cli.py``;
``main()`` runs them alone (``python -m backend.service ...``).

Exit codes of ``client``: 0 the backend answered (and, for ``wait``, the job is
done), 2 bad arguments, 3 backend unreachable, 4 the backend answered with an
error or the job failed, 5 the job was cancelled or ``wait`` timed out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from neural_atlas.core import protocol as P

from ..cli_options import shared_options, sub_parsers

EXIT_OK, EXIT_ARGS, EXIT_UNREACHABLE, EXIT_ERROR, EXIT_CANCELLED = 0, 2, 3, 4, 5


def _bytes(text: str) -> int:
    """'20G', '512M', '1000000' -> bytes (K/M/G/T are powers of 1024)."""
    t = text.strip().upper().rstrip("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        n = float(t[:-1] if mult > 1 else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 20G, 512M)") from None
    if n < 0:
        raise argparse.ArgumentTypeError("a size is >= 0")
    return int(n * mult)


def add_commands(subparsers) -> None:
    # ------------------------------------------------------------------ serve
    s = subparsers.add_parser("serve", help="run the job server (ZeroMQ ROUTER)",
                              description="Run the backend job server. Loopback only unless CURVE "
                                          "keys are configured (see `keys`).")
    s.add_argument("--endpoint", default=os.environ.get("NEURAL_ATLAS_ENDPOINT", P.DEFAULT_ENDPOINT),
                   help=f"ZeroMQ endpoint to bind (default {P.DEFAULT_ENDPOINT}; "
                        "tcp://127.0.0.1:* picks a free port, written to WORKSPACE/server.json)")
    s.add_argument("--workspace", type=Path, default=Path(os.environ.get(
        "NEURAL_ATLAS_WORKSPACE", Path.home() / "neural-atlas-workspace")),
        help="folder for jobs, uploads and server.json (default ~/neural-atlas-workspace)")
    s.add_argument("--keys", type=Path, default=None, help="keys folder (default: the user config dir)")
    s.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits (Blender)")
    s.add_argument("--allow-root", type=Path, action="append", default=[],
                   help="a folder clients may read clips/edits from (repeatable); default on "
                        "loopback: the workspace and your home folder; otherwise only the workspace")
    s.add_argument("--curve", action="store_true", help="require CURVE encryption even on loopback")
    s.add_argument("--job-quota", type=_bytes, default=0, metavar="SIZE",
                   help="most bytes one job's uploaded files may take, e.g. 20G (default: no quota)")
    s.add_argument("--store-quota", type=_bytes, default=0, metavar="SIZE",
                   help="most bytes the store of uploaded content may keep, e.g. 200G (default: the disk)")
    s.add_argument("--no-device-probe", action="store_true", help="do not query torch for the device")
    s.add_argument("--log-level", default="INFO")
    add_executor_arguments(s)
    s.set_defaults(func=_serve)

    # ------------------------------------------------------------------- keys
    # options of a command group go before or after its sub-command (backend/cli_options.py)
    k = subparsers.add_parser("keys", help="create the signing key and CURVE certificates")
    kadd = sub_parsers(k.add_subparsers(dest="keys_cmd", required=True), shared_options(k, _keys_options))
    ki = kadd("init", help="create signing.key and the server certificate")
    ki.add_argument("--force", action="store_true", help="replace the server certificate")
    ki.set_defaults(func=_keys_init)
    ka = kadd("add-client", help="make a client certificate and allow it")
    ka.add_argument("name")
    ka.set_defaults(func=_keys_add)
    ks = kadd("show", help="print where the keys are")
    ks.set_defaults(func=_keys_show)

    # ----------------------------------------------------------------- client
    c = subparsers.add_parser("client", help="talk to a running backend")
    cadd = sub_parsers(c.add_subparsers(dest="client_cmd", required=True), shared_options(c, _client_options))
    cadd("hello", help="backend, protocol and device information")
    st = cadd("status", help="one job, or all jobs without JOB")
    st.add_argument("job_id", nargs="?")
    cadd("list", help="all jobs")
    sb = cadd("submit", help="queue a decomposition")
    sb.add_argument("source", help="frames folder, seed layout or video")
    sb.add_argument("--mask", action="append", default=[], help="mask folder (repeatable)")
    sb.add_argument("--preset", default=None)
    sb.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override a setting, e.g. train.iterations=200 (value parsed as JSON)")
    sb.add_argument("--frames", default=None, metavar="START:STOP")
    sb.add_argument("--token", default=None, help="idempotency token (resubmitting returns the same job)")
    sb.add_argument("--name", default=None)
    sb.add_argument("--upload", action="store_true", help="send the clip over the wire (remote backend)")
    sb.add_argument("--wait", action="store_true", help="wait for the job and print its final state")
    rd = cadd("render", help="re-render a finished decomposition with edited atlases")
    rd.add_argument("job_id", help="the decomposition job")
    rd.add_argument("--edit", action="append", default=[], required=True, metavar="LAYER=PNG",
                    help="an edited atlas (RGBA PNG) for a layer (repeatable)")
    rd.add_argument("--mode", choices=("delta", "replace"), default="delta")
    rd.add_argument("--frames", default=None, metavar="START:STOP")
    rd.add_argument("--format", action="append", default=[], choices=("png", "mp4", "exr"),
                    help="output format (repeatable; default png)")
    rd.add_argument("--token", default=None, help="idempotency token (resubmitting returns the same job)")
    rd.add_argument("--name", default=None)
    rd.add_argument("--upload", action="store_true",
                    help="send the edit images over the wire (remote backend; only what the backend lacks)")
    rd.add_argument("--download", type=Path, default=None,
                    help="wait, then fetch the rendered frames into this folder (resumable)")
    rd.add_argument("--wait", action="store_true", help="wait for the job and print its final state")
    cc = cadd("cancel", help="cancel a job")
    cc.add_argument("job_id")
    w = cadd("wait", help="wait until a job finishes")
    w.add_argument("job_id")
    w.add_argument("--wait-timeout", type=float, default=None)
    r = cadd("result", help="output files of a finished job")
    r.add_argument("job_id")
    r.add_argument("--download", type=Path, default=None, help="fetch atlases/report into this folder")
    r.add_argument("--files", action="append", default=[], metavar="PREFIX",
                   help="with --download: paths starting with PREFIX (repeatable; default atlas/, "
                        "report.json, config.toml; '' for everything, e.g. maps/ for the live preview)")
    d = cadd("delete", help="delete a finished or queued job and its files")
    d.add_argument("job_id")
    cadd("shutdown", help="stop the backend (a running job resumes on restart)")
    c.set_defaults(func=_client)


def _keys_options(p) -> None:
    p.add_argument("--keys", type=Path, default=None, help="keys folder (default: the user config dir)")


def _client_options(p) -> None:
    p.add_argument("--endpoint", default=None, help=f"default: WORKSPACE/server.json, else {P.DEFAULT_ENDPOINT}")
    p.add_argument("--workspace", type=Path, default=None, help="find the endpoint in its server.json")
    p.add_argument("--keys", type=Path, default=None, help="keys folder (signing.key, CURVE certificates)")
    p.add_argument("--curve", action="store_true", help="use CURVE (server.key, client.key_secret in --keys)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per attempt (default 5)")
    p.add_argument("--retries", type=int, default=2, help="attempts after the first (default 2)")


def add_executor_arguments(p: argparse.ArgumentParser) -> None:
    """What runs the jobs: ``serve`` and ``batch`` take the same options."""
    g = p.add_argument_group("executor (what runs the jobs; docs/protocol.md section 9)")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: child processes on this machine (default); ray: Ray actors "
                        "(pip install neural-atlas[ray])")
    g.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="local: jobs at once (default 1), spread over the visible GPUs, several per GPU "
                        "when N exceeds them; ray: jobs handed to Ray at once (default: as many as the "
                        "cluster's resources hold at once)")
    g.add_argument("--ray-address", default="auto", metavar="ADDR",
                   help="ray: host:port of a running cluster (`ray start --head`), or auto (default): "
                        "start a local Ray with this machine's GPUs. The workspace must be a shared "
                        "filesystem at the same path on every node (checked at start)")
    g.add_argument("--gpus-per-job", type=float, default=None, metavar="F",
                   help="ray: each job's GPU share, e.g. 0.5 packs two small shots per GPU (default 1 "
                        "where the cluster has GPUs, else 0)")
    g.add_argument("--cpus-per-job", type=float, default=1.0, metavar="F", help="ray: each job's CPUs")
    g.add_argument("--ray-resource", action="append", default=[], metavar="NAME=AMOUNT",
                   help="ray: a custom resource each job needs (repeatable)")
    g.add_argument("--max-lost", type=int, default=2, metavar="N",
                   help="ray: retries of a job whose Ray worker or node died, from its last checkpoint "
                        "(default 2)")


def executor_options(args: argparse.Namespace):
    from .executors import ExecutorOptions
    resources = {}
    for item in args.ray_resource:
        name, sep, amount = item.partition("=")
        try:
            resources[name.strip()] = float(amount)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"--ray-resource {item!r}: expected NAME=AMOUNT, e.g. gpu_slot=0.5")
    if args.executor == "local" and (args.gpus_per_job is not None or resources):
        raise ValueError("--gpus-per-job and --ray-resource need --executor ray")
    concurrency = args.concurrency if args.concurrency is not None else (1 if args.executor == "local" else 0)
    if concurrency < (1 if args.executor == "local" else 0):
        raise ValueError(f"--concurrency {concurrency}: must be at least 1")
    return ExecutorOptions(kind=args.executor, concurrency=concurrency, ray_address=args.ray_address,
                           gpus_per_job=args.gpus_per_job, cpus_per_job=args.cpus_per_job,
                           resources=resources, max_lost=max(0, args.max_lost))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.service")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------------- serve
def _serve(args: argparse.Namespace) -> int:
    from .server import ServerOptions, serve
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        executor = executor_options(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ARGS
    return serve(ServerOptions(
        workspace=args.workspace, endpoint=args.endpoint, keys_dir=args.keys,
        parent_pid=args.parent_pid, allow_roots=list(args.allow_root), curve=args.curve,
        probe_device=not args.no_device_probe, executor=executor,
        job_quota=args.job_quota, store_quota=args.store_quota))


# ----------------------------------------------------------------------- keys
def _keys_dir(args: argparse.Namespace) -> Path:
    from neural_atlas.core.signing import default_keys_dir
    return Path(args.keys).expanduser() if getattr(args, "keys", None) else default_keys_dir()


def _keys_init(args: argparse.Namespace) -> int:
    from . import keys
    print(json.dumps(keys.init(_keys_dir(args), force=args.force), indent=1))
    return 0


def _keys_add(args: argparse.Namespace) -> int:
    from . import keys
    try:
        info = keys.add_client(_keys_dir(args), args.name)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ARGS
    print(json.dumps(info, indent=1))
    print(f"copy {info['signing']}, {info['server_public']} and {info['client_secret']} "
          f"(renamed client.key_secret) into the client's keys folder, then delete "
          f"{info['client_secret']} here", file=sys.stderr)
    return 0


def _keys_show(args: argparse.Namespace) -> int:
    d = _keys_dir(args)
    files = {p.name: str(p) for p in sorted(d.glob("*")) if p.is_file()} if d.is_dir() else {}
    clients = sorted(p.stem for p in (d / "clients").glob("*.key")) if (d / "clients").is_dir() else []
    print(json.dumps({"keys_dir": str(d), "files": files, "allowed_clients": clients}, indent=1))
    return 0


# --------------------------------------------------------------------- client
def _endpoint(args: argparse.Namespace) -> str:
    if args.endpoint:
        return args.endpoint
    ws = args.workspace or Path(os.environ.get("NEURAL_ATLAS_WORKSPACE", Path.home() / "neural-atlas-workspace"))
    try:
        return json.loads((Path(ws) / "server.json").read_text(encoding="utf-8"))["endpoint"]
    except (OSError, ValueError, KeyError):
        return os.environ.get("NEURAL_ATLAS_ENDPOINT", P.DEFAULT_ENDPOINT)


def _parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2:
            raise ValueError(f"--set {item!r}: expected SECTION.FIELD=VALUE")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        d = out.setdefault(parts[0], {})
        for p in parts[1:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    return out


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True, default=str))


def _client(args: argparse.Namespace) -> int:
    from neural_atlas.core.client import Client, CurveKeys, ServiceError
    from neural_atlas.core.signing import KeyFileError, default_keys_dir
    try:
        curve = CurveKeys.from_dir(args.keys or default_keys_dir()) if args.curve else None
        client = Client(_endpoint(args), keys_dir=args.keys, curve=curve, timeout=args.timeout,
                        retries=args.retries)
    except (KeyFileError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ARGS
    try:
        return _run_client(client, args)
    except ServiceError as e:
        _print({"error": e.to_dict()})
        if e.code == "unreachable":
            print(f"error: {e.message}. {e.detail}", file=sys.stderr)
            return EXIT_UNREACHABLE
        return EXIT_CANCELLED if e.code == "timeout" else EXIT_ERROR
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ARGS
    finally:
        client.close()


def _final(info: dict[str, Any]) -> int:
    _print({"job": info})
    return {"done": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(info.get("state"), EXIT_ERROR)


def _run_client(client, args: argparse.Namespace) -> int:
    cmd = args.client_cmd
    if cmd == "hello":
        _print(client.hello())
    elif cmd == "status" and args.job_id:
        _print({"job": client.status(args.job_id)})
    elif cmd in ("status", "list"):
        _print({"jobs": client.list_jobs()})
    elif cmd == "submit":
        fr = None
        if args.frames:
            a, _, b = args.frames.partition(":")
            fr = (int(a), int(b))
        source = args.source if args.upload else os.path.abspath(args.source)
        job_id = client.submit(source, masks=args.mask or None, preset=args.preset,
                               overrides=_parse_set(args.set) or None, frame_range=fr,
                               token=args.token, name=args.name, upload=args.upload)
        if args.wait:
            return _final(client.wait(job_id, on_event=_progress_line))
        _print({"job_id": job_id})
    elif cmd == "render":
        edits = {}
        for item in args.edit:
            layer, sep, path = item.partition("=")
            if not sep or not layer.strip().isdigit() or not path:
                raise ValueError(f"--edit takes LAYER=PNG, got {item!r}")
            edits[int(layer)] = path if args.upload else os.path.abspath(path)
        fr = None
        if args.frames:
            a, _, b = args.frames.partition(":")
            fr = (int(a), int(b))
        job_id = client.render(args.job_id, edits, mode=args.mode, frame_range=fr,
                               formats=args.format or ["png"], token=args.token, name=args.name,
                               upload=args.upload)
        if args.wait or args.download:
            info = client.wait(job_id, on_event=_progress_line)
            if info.get("state") == "done" and args.download:
                got = client.download_result(job_id, args.download, prefixes=("",))
                _print({"downloaded": len(got), "folder": str(args.download)})
            return _final(info)
        _print({"job_id": job_id})
    elif cmd == "cancel":
        _print({"job_id": args.job_id, "state": client.cancel(args.job_id)})
    elif cmd == "wait":
        return _final(client.wait(args.job_id, timeout=args.wait_timeout, on_event=_progress_line))
    elif cmd == "result":
        res = client.result(args.job_id)
        if args.download:
            kw = {"prefixes": tuple(args.files)} if args.files else {}
            res["downloaded"] = [str(p) for p in client.download_result(args.job_id, args.download, **kw)]
        _print(res)
    elif cmd == "delete":
        client.delete(args.job_id)
        _print({"job_id": args.job_id, "deleted": True})
    elif cmd == "shutdown":
        _print(client.shutdown())
    return EXIT_OK


def _progress_line(e) -> None:
    if e.kind == "progress":
        b = e.body
        print(f"[{b.get('job_id')}] {b.get('phase')} {b.get('iteration')}/{b.get('iterations')} "
              f"{100 * float(b.get('fraction') or 0):.0f}%", file=sys.stderr, flush=True)
    elif e.kind in ("restarted", "disconnected", "reconnected"):
        print(f"backend {e.kind}", file=sys.stderr, flush=True)
