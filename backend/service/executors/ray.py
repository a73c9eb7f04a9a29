"""The Ray executor: each job is a Ray actor with its share of a GPU (``serve --executor ray``).

Ray (``pip install neural-atlas[ray]``) is imported only here, and only when this
executor is chosen. An actor (``JobHost``) is created per attempt of a job, detached and
named ``neural-atlas-<job id>-<attempt>`` in the namespace ``neural-atlas``, with the
job's resources: ``num_gpus`` (1, or a fraction such as 0.5 to pack two small shots on
one GPU), ``num_cpus`` and any custom resources. Ray decides where and when it runs.

On its node the actor starts the same worker process the local executor starts
(``python -m backend.service.worker JOB_DIR``, with the GPU Ray assigned in
``CUDA_VISIBLE_DEVICES``) and keeps its event stream; the service's reader thread
long-polls the actor (``poll``) and posts the events to the mailbox, so progress and
cancel travel exactly as for local jobs. Cancel writes ``cancel`` to the worker's stdin.

* A dead actor (its process or node died) ends the attempt with ``lost``: the lifecycle
  retries the job from its last checkpoint (``max_lost`` times).
* The workspace must be one filesystem that every Ray node sees at the same path
  (NFS, a cluster filesystem; on one machine any local folder). ``start`` checks it: it
  writes a token file and has a task on every node read it back by path.
* Re-attach: an actor outlives the service that created it when the cluster does (an
  external cluster, ``--ray-address``); a restarted service follows it again by name.
  With ``auto`` the local Ray ends with the service and its jobs are requeued instead.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from .base import Executor, ExecutorError, Mailbox, child_env, read_events, worker_command

NAMESPACE = "neural-atlas"
ACTOR_PREFIX = "neural-atlas-"
POLL_S = 1.0  # one long-poll of the actor's events
# environment of the service forwarded to the Ray workers (test and threading knobs)
FORWARD_ENV = ("NEURAL_ATLAS_ENGINE", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class JobHost:
    """Runs one job's worker process on a Ray node and keeps its events for the service.

    Events are kept in order with increasing indices; a progress event replaces the
    progress event before it (a progress event is a snapshot), so the list stays short
    and a service that re-attaches gets the start, the latest progress and the end.
    """

    def __init__(self, job_dir: str, env: dict[str, str]) -> None:
        self.job_dir, self.env = Path(job_dir), env
        self._cond = threading.Condition()
        self._events: list[tuple[int, dict[str, Any]]] = []
        self._next = 0
        self._proc: subprocess.Popen | None = None
        self._placement: dict[str, Any] | None = None

    def begin(self) -> dict[str, Any]:
        """Start the worker (once; later calls return the same placement)."""
        with self._cond:
            if self._placement is not None:
                return self._placement
            import ray
            ctx = ray.get_runtime_context()
            self._placement = {"node": ctx.get_node_id()[:12], "host": socket.gethostname(),
                               "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                               "gpus": [str(g) for g in ray.get_gpu_ids()],
                               "resources": {k: v for k, v in ctx.get_assigned_resources().items()}}
            if not (self.job_dir / "job.json").is_file():
                self._post({"event": "error", "error": {
                    "code": "internal", "message":
                    f"the workspace is not visible on Ray node {self._placement['ip']}: "
                    f"{self.job_dir / 'job.json'} does not exist there",
                    "detail": "put the workspace on a filesystem every node mounts at the same path"}})
                self._post({"event": "exit", "code": None, "lost": False, "reason": ""})
                return self._placement
            extra = dict(self.env)
            if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # the GPU(s) Ray assigned
                extra["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
            with open(self.job_dir / "worker.log", "ab") as logf:
                self._proc = subprocess.Popen(worker_command(self.job_dir), stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=logf, env=child_env(extra),
                                              cwd=str(self.job_dir))
            self._placement["worker_pid"] = self._proc.pid
            threading.Thread(target=self._read, daemon=True, name="worker-events").start()
            return self._placement

    def _post(self, ev: dict[str, Any]) -> None:
        with self._cond:
            if ev.get("event") == "progress" and self._events and self._events[-1][1].get("event") == "progress":
                self._events[-1] = (self._next, ev)
            else:
                self._events.append((self._next, ev))
            self._next += 1
            self._cond.notify_all()

    def _read(self) -> None:
        proc = self._proc

        def post(ev: dict[str, Any]) -> None:
            if ev.get("event") == "start":
                ev["placement"] = self._placement
            self._post(ev)
        read_events(proc.stdout, post)
        code = proc.wait()
        self._post({"event": "exit", "code": code, "lost": False, "reason": ""})

    def poll(self, since: int, timeout: float) -> tuple[list[dict[str, Any]], int]:
        """The events with index >= since (waiting up to ``timeout`` s for one), and the
        index to ask from next."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._next <= since and time.monotonic() < end:
                self._cond.wait(max(0.0, end - time.monotonic()))
            return [ev for i, ev in self._events if i >= since], self._next

    def cancel(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.write(b"cancel\n")
                proc.stdin.flush()
            except (OSError, ValueError):
                pass

    def terminate(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()


def _read_token(path: str) -> dict[str, Any]:
    """On one node: the token file's text (or why not), and whether the backend imports."""
    import importlib.util
    import socket as _socket
    out: dict[str, Any] = {"host": _socket.gethostname()}
    try:
        with open(path, encoding="utf-8") as f:
            out["token"] = f.read()
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e.strerror or e}"
    out["backend"] = importlib.util.find_spec("backend.service.worker") is not None
    return out


def _reachable(address: str, timeout: float = 5.0) -> str:
    """'' when host:port accepts a TCP connection, else why not."""
    host, sep, port = address.rpartition(":")
    if address.startswith("ray://"):
        host, sep, port = address[len("ray://"):].rpartition(":")
    if not sep or not port.isdigit():
        return f"{address!r} is not host:port"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return ""
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__


class _RayJob:
    def __init__(self, job_id: str, actor: Any, name: str) -> None:
        self.job_id, self.actor, self.name = job_id, actor, name
        self.begun = False
        self.cancelled = False


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, address: str = "auto", concurrency: int = 0, gpus_per_job: float | None = None,
                 cpus_per_job: float = 1.0, resources: dict[str, float] | None = None) -> None:
        self.address = address or "auto"
        self.concurrency = concurrency
        self.gpus_per_job = gpus_per_job
        self.cpus_per_job = cpus_per_job
        self.resources = dict(resources or {})
        self._jobs: dict[str, _RayJob] = {}
        self._capacity = (0, 0.0)  # (jobs the cluster holds at once, when computed)
        self.mailbox: Mailbox | None = None
        self._ray = None
        self._host_cls = None

    # ------------------------------------------------------------- start
    def start(self, mailbox: Mailbox, workspace: Path) -> None:
        self.mailbox = mailbox
        try:
            import ray
        except ImportError:
            raise ExecutorError("--executor ray needs Ray, which is not installed: "
                                "pip install 'neural-atlas[ray]' (or pip install ray)") from None
        self._ray = ray
        if self.address != "auto":
            why = _reachable(self.address)
            if why:
                raise ExecutorError(f"cannot reach the Ray cluster at {self.address} ({why}). Start one "
                                    f"there with `ray start --head`, check --ray-address (host:port of "
                                    f"the head's GCS, printed by `ray start`), or use --ray-address auto "
                                    f"to start a local Ray")
        env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
        env["PYTHONPATH"] = child_env()["PYTHONPATH"]
        kw: dict[str, Any] = dict(namespace=NAMESPACE, runtime_env={"env_vars": env}, log_to_driver=False,
                                  configure_logging=False)
        try:
            if self.address == "auto":
                ray.init(include_dashboard=False, **kw)
            else:
                ray.init(address=self.address, **kw)
        except Exception as e:  # noqa: BLE001 - Ray raises many kinds; all mean "cannot start"
            raise ExecutorError(f"cannot start or join Ray at {self.address}: {type(e).__name__}: {e}") from None
        total = ray.cluster_resources()
        if self.gpus_per_job is None:
            self.gpus_per_job = 1.0 if total.get("GPU", 0) > 0 else 0.0
        for name, amount in self._needs().items():
            if total.get(name, 0) < amount:
                ray.shutdown()
                raise ExecutorError(f"no Ray node has {amount:g} {name} for a job (the cluster has "
                                    f"{total.get(name, 0):g}); lower --gpus-per-job/--cpus-per-job or add "
                                    f"nodes that have it")
        try:
            self._check_workspace(workspace)
        except ExecutorError:
            ray.shutdown()
            raise
        self._host_cls = ray.remote(JobHost)

    def _needs(self) -> dict[str, float]:
        needs = {"CPU": self.cpus_per_job, "GPU": self.gpus_per_job or 0.0, **self.resources}
        return {k: v for k, v in needs.items() if v}

    def _check_workspace(self, workspace: Path) -> None:
        """Every alive node must read the token file the service wrote, by the same path."""
        ray = self._ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        token = secrets.token_hex(16)
        path = workspace / f".ray-check-{token[:8]}"
        path.write_text(token, encoding="utf-8")
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            read = ray.remote(num_cpus=0)(_read_token)
            refs = {n["NodeManagerAddress"]: read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                n["NodeID"], soft=False)).remote(str(path)) for n in nodes}
            bad = []
            for ip, ref in refs.items():
                try:
                    got = ray.get(ref, timeout=120)
                except Exception as e:  # noqa: BLE001
                    bad.append(f"{ip}: the check task failed ({type(e).__name__}: {e})")
                    continue
                if got.get("token") != token:
                    bad.append(f"{ip} ({got.get('host')}): {got.get('error') or 'a different file is there'}")
                elif not got.get("backend"):
                    bad.append(f"{ip} ({got.get('host')}): the backend is not importable there "
                               f"(install neural-atlas on every node)")
        finally:
            path.unlink(missing_ok=True)
        if bad:
            raise ExecutorError(f"the workspace {workspace} is not usable on every Ray node; it must be a "
                                f"shared filesystem mounted at the same path on each node (and the backend "
                                f"installed there): " + "; ".join(bad))

    # ------------------------------------------------------------- slots
    def free_slots(self) -> int:
        limit = self.concurrency or self._cluster_capacity()
        return limit - len(self._jobs)

    def _cluster_capacity(self) -> int:
        """How many jobs the cluster's resources hold at once (refreshed every 5 s: nodes join)."""
        n, when = self._capacity
        now = time.monotonic()
        if now - when > 5.0:
            total = self._ray.cluster_resources()
            needs = self._needs()
            n = min((int(total.get(k, 0) / v + 1e-9) for k, v in needs.items()), default=len(self._jobs) + 1)
            self._capacity = (n, now)
        return n

    # -------------------------------------------------------------- jobs
    def launch(self, job: dict[str, Any], job_dir: Path) -> dict[str, Any]:
        jid = job["job_id"]
        name = f"{ACTOR_PREFIX}{jid}-{int(job.get('attempts') or 0)}"
        opts: dict[str, Any] = dict(name=name, namespace=NAMESPACE, lifetime="detached", max_restarts=0,
                                    max_concurrency=4, num_cpus=self.cpus_per_job,
                                    num_gpus=self.gpus_per_job or 0)
        if self.resources:
            opts["resources"] = dict(self.resources)
        env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
        try:
            actor = self._host_cls.options(**opts).remote(str(job_dir), env)
        except Exception as e:  # noqa: BLE001
            raise ExecutorError(f"Ray refused the job: {type(e).__name__}: {e}") from None
        rj = self._jobs[jid] = _RayJob(jid, actor, name)
        threading.Thread(target=self._follow, args=(rj,), daemon=True, name=f"ray-{jid}").start()
        share = ", ".join(f"{v:g} {k}" for k, v in self._needs().items())
        return {"executor": self.name, "actor": name, "share": self._needs(),
                "waiting": f"a Ray worker with {share}"}

    def _follow(self, rj: _RayJob) -> None:
        """Reader thread: wait until the actor runs, then long-poll its events into the mailbox."""
        ray = self._ray
        since = 0
        try:
            ray.get(rj.actor.begin.remote())  # returns once Ray has placed and started the actor
            rj.begun = True
            while True:
                events, since = ray.get(rj.actor.poll.remote(since, POLL_S), timeout=POLL_S + 60)
                for ev in events:
                    self.mailbox.put(rj.job_id, ev)
                    if ev.get("event") == "exit":
                        return
        except Exception as e:  # noqa: BLE001 - RayActorError, ActorDiedError, GetTimeoutError, ...
            why = ("cancelled before Ray started it" if rj.cancelled and not rj.begun
                   else f"the Ray worker running the job died ({type(e).__name__})")
            self.mailbox.put(rj.job_id, {"event": "exit", "code": None, "lost": True, "reason": why,
                                         "detail": str(e)[:4000]})

    def cancel(self, job_id: str) -> None:
        rj = self._jobs.get(job_id)
        if rj is None:
            return
        rj.cancelled = True
        if rj.begun:
            rj.actor.cancel.remote()
        else:  # still waiting for resources: nothing to save, drop it
            self._ray.kill(rj.actor, no_restart=True)

    def kill(self, job_id: str) -> None:
        rj = self._jobs.get(job_id)
        if rj is not None:
            rj.actor.terminate.remote()

    def reattach(self, job: dict[str, Any], job_dir: Path) -> bool:
        name = (job.get("placement") or {}).get("actor")
        if not name:
            return False
        try:
            actor = self._ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return False  # gone (a local Ray that ended with the old service, or the actor died)
        rj = self._jobs[job["job_id"]] = _RayJob(job["job_id"], actor, name)
        threading.Thread(target=self._follow, args=(rj,), daemon=True, name=f"ray-{job['job_id']}").start()
        return True

    def recovered(self) -> None:
        """After recovery: end the actors of this namespace that no job follows (leftovers of a
        service that died between a job's end and the actor's release)."""
        followed = {rj.name for rj in self._jobs.values()}
        for name in self._ray.util.list_named_actors():
            if name.startswith(ACTOR_PREFIX) and name not in followed:
                try:
                    self._ray.kill(self._ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
                except ValueError:
                    pass

    def release(self, job_id: str) -> None:
        rj = self._jobs.pop(job_id, None)
        if rj is not None:
            try:
                self._ray.kill(rj.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def running(self) -> list[str]:
        return list(self._jobs)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "concurrency": self.concurrency,
                "per_job": self._needs()}

    def close(self) -> None:
        if self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()
