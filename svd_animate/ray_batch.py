"""The Ray backend of `svd-animate batch --ray [ADDRESS]`: the same jobs, skips, records and report as the local
batch (svd_animate/batch.py), run by workers on a Ray cluster.

- One worker (a Ray actor) per GPU, or CPU workers where the cluster has none; each loads the models once.
- Jobs are handed out as workers become free (one job in flight per worker), not split up front.
- A worker that dies in a job (process killed, node gone) is restarted by Ray, and its job is run again on the
  first free worker, up to `retries` times; the record counts the retries. Outputs appear whole or not at all
  (the writer's temporary name, then a rename), so a lost job leaves at most a part file, which the next writer or
  the next run removes.
- Outputs go to a folder every worker reaches (a shared filesystem: NFS, a mounted bucket).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from tqdm import tqdm

from svd_common.errors import InputError

from .batch import (BatchOptions, Job, Record, animate_job, announce, execute, new_record, print_report,
                    remove_leftovers, settled, write_report)

logger = logging.getLogger(__name__)

RAY_MISSING = "the Ray backend needs Ray: pip install 'svd-animate[ray]'"


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError(RAY_MISSING) from None
    return ray


def connect(address: str | None = None):
    """Join the Ray cluster at ADDRESS (None: RAY_ADDRESS's, a cluster started on this machine, or a new local
    one); a driver that has joined one already stays on it. One line when it cannot be reached."""
    ray = import_ray()
    if not ray.is_initialized():
        where = address or os.environ.get("RAY_ADDRESS") or "a local cluster"
        check_reachable(address or os.environ.get("RAY_ADDRESS"), where)
        on_sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=address or None)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise InputError(f"--ray: cannot connect to {where} ({' '.join(str(e).split())})") from None
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, on_sigterm)  # ray.init replaces it: SIGTERM unwinds as Ctrl-C does
    return ray


def check_reachable(address: str | None, where: str, seconds: float = 5.0) -> None:
    """A HOST:PORT that does not answer: one line in seconds (ray.init would wait for it for minutes)."""
    host, _, port = (address or "").rpartition("://")[2].rpartition(":")
    if not host or not port.isdigit():
        return  # none, "auto", "local": Ray finds or starts the cluster itself
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except OSError as e:
        raise InputError(f"--ray: cannot connect to {where} ({e.strerror or e})") from None


class AnimatorWorker:
    """One worker process: an `Animator` made on its first job (so a setup error fails that job with the local
    batch's one line) and kept for the next ones."""

    def __init__(self, config, run, side_by_side: bool):
        self.config, self.run, self.side_by_side = config, run, side_by_side
        self.animator = None

    def run_job(self, job: Job, worker: int) -> Record:
        return execute(job, self._animate, worker)

    def _animate(self, job: Job) -> int:
        from .animate import Animator

        if self.animator is None:
            self.animator = Animator(self.config, self.run)
        return animate_job(self.animator, job, self.side_by_side)


def start_workers(ray, config, options: BatchOptions, count: int | None) -> list:
    """One actor per GPU of the cluster (or `count`); where it has no GPU (or the device is the CPU), one per node
    (or `count`), each with an equal share of the CPUs, which Ray makes its thread count. Ray restarts an actor
    whose process dies; the job it ran is the driver's to run again."""
    on_cpu = (options.run.device or "").startswith("cpu")
    if options.run.device not in (None, "cuda") and not on_cpu:
        raise InputError(f"--device {options.run.device}: with --ray, Ray gives each worker its GPU; leave --device "
                         "out (or give cpu)")
    gpus = 0 if on_cpu else int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if count is not None and count > (gpus or cpus):
        raise InputError(f"--num-processes {count}: the Ray cluster has {gpus or cpus} {'GPUs' if gpus else 'CPUs'}")
    count = count or gpus or sum(node["Alive"] for node in ray.nodes())
    resources = {"num_gpus": 1} if gpus else {"num_cpus": max(1, cpus // count)}
    actor = ray.remote(AnimatorWorker).options(max_restarts=-1, max_task_retries=0, **resources)
    run = dataclasses.replace(options.run, progress=False)  # the driver shows the jobs' progress
    return [actor.remote(config, run, options.side_by_side) for _ in range(count)]


def absolute(job: Job) -> Job:
    """The job as a worker with another working folder reads it."""
    return dataclasses.replace(job, ref=job.ref.absolute(), pose=job.pose.absolute(), output=job.output.absolute())


def outcome(ray, ref, job: Job, worker: int, lost: collections.Counter, retries: int) -> Record | None:
    """The job's record with the user's paths and its retries, or None when its worker was lost and it runs again."""
    try:
        record = ray.get(ref)
    except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError) as e:
        lost[job.number] += 1
        reason = " ".join(str(e).split())[:300]
        if lost[job.number] <= retries:
            logger.warning("job %d (%s): its worker was lost, running it again (%s)", job.number, job.name, reason)
            return None
        record = new_record(job, worker, "failed", f"its worker was lost {lost[job.number]} times ({reason})")
    except ray.exceptions.RayError as e:
        record = new_record(job, worker, "failed", " ".join(str(e).split())[:300])
    return dataclasses.replace(record, ref=str(job.ref), pose=str(job.pose), output=str(job.output),
                               retries=min(lost[job.number], retries))


def dispatch(ray, actors: list, jobs: list[Job], retries: int, records: list[Record], progress: bool) -> None:
    """Keep one job in flight per worker and hand the next job to whichever finishes first; a job whose worker was
    lost goes to the front of the queue. Each record is added to `records` as it comes (kept on Ctrl-C)."""
    queue, running, lost = collections.deque(jobs), {}, collections.Counter()
    free = list(range(len(actors)))
    with tqdm(total=len(jobs), desc="jobs (ray)", unit="job", disable=not progress, position=0) as bar:
        while queue or running:
            while queue and free:
                worker, job = free.pop(0), queue.popleft()
                running[actors[worker].run_job.remote(absolute(job), worker)] = (job, worker)
            [ref], _ = ray.wait(list(running), num_returns=1)
            job, worker = running.pop(ref)
            free.append(worker)
            record = outcome(ray, ref, job, worker, lost, retries)
            if record is None:
                queue.appendleft(job)
                continue
            announce(record)
            records.append(record)
            bar.update()


def run_batch_on_ray(jobs: list[Job], config, options: BatchOptions, unreadable: dict[Path, str],
                     address: str | None = None, workers: int | None = None, retries: int = 2, label: str = "") -> int:
    """The batch on Ray workers; report.json as the local batch writes it, plus each job's retries. Ctrl-C stops
    the workers and writes the report of the jobs that finished (a rerun skips them)."""
    ray = connect(address)
    started = time.perf_counter()
    remove_leftovers(options.outdir)
    decided = [settled(job, options.overwrite, unreadable) for job in jobs]
    records = [record for record in decided if record is not None]
    for record in records:
        announce(record)
    to_run = [job for job, record in zip(jobs, decided) if record is None]
    actors = start_workers(ray, config, options, workers) if to_run else []
    try:
        dispatch(ray, actors, to_run, retries, records, options.run.progress)
    except KeyboardInterrupt:
        write_ray_report(options.outdir, records, len(actors), started, interrupted=True)
        raise
    finally:
        for actor in actors:
            ray.kill(actor)
    return print_report(write_ray_report(options.outdir, records, len(actors), started), options.outdir, label)


def write_ray_report(outdir: Path, records: list[Record], workers: int, started: float, **summary) -> dict:
    return write_report(outdir, [dataclasses.asdict(r) for r in records], workers, time.perf_counter() - started,
                        backend="ray", retries=sum(r.retries for r in records), **summary)
