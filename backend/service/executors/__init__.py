"""What runs the service's jobs (``base.Executor``): ``local`` child processes on this
machine (the default: nothing to install or start) or ``ray`` actors on a Ray cluster
(``pip install neural-atlas[ray]``; imported only when chosen)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import Executor, ExecutorError, Mailbox

EXECUTORS = ("local", "ray")


@dataclass
class ExecutorOptions:
    kind: str = "local"  # local | ray
    concurrency: int = 1  # local: jobs at once; ray: jobs handed to Ray at once (0 = no limit)
    ray_address: str = "auto"  # ray: "auto" starts a local Ray on this machine, else host:port
    gpus_per_job: float | None = None  # ray: each job's GPU share (None: 1 where the cluster has GPUs)
    cpus_per_job: float = 1.0
    resources: dict[str, float] = field(default_factory=dict)  # ray: custom resources per job
    max_lost: int = 2  # retries of a job whose Ray worker or node died


def make_executor(opts: ExecutorOptions) -> Executor:
    if opts.kind == "local":
        from .local import LocalExecutor
        return LocalExecutor(concurrency=opts.concurrency)
    if opts.kind == "ray":
        from .ray import RayExecutor
        return RayExecutor(address=opts.ray_address, concurrency=opts.concurrency,
                           gpus_per_job=opts.gpus_per_job, cpus_per_job=opts.cpus_per_job,
                           resources=opts.resources)
    raise ExecutorError(f"unknown executor {opts.kind!r}: choose one of {', '.join(EXECUTORS)}")


__all__ = ["EXECUTORS", "Executor", "ExecutorError", "ExecutorOptions", "Mailbox", "make_executor"]
