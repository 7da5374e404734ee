"""``run_cohort``: one job over many scans on dask.distributed, a LocalCluster or an existing scheduler.

The client sends one task per scan and collects rows; workers load the model once each (``worker_model``)
and write masks and done markers into the output folder, which every worker must be able to reach (a
shared file system on a cluster). A scan is never lost to a dying worker: dask sends the scan to
another worker, and the half-written mask stays out of ``masks/``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
import uuid
from dataclasses import asdict
from typing import Callable, Iterable
from urllib.parse import urlparse

from ..engine.predictor import Cancelled
from .output import CohortOutput
from .scans import Scan, with_scan_ids
from .settings import CohortSettings
from .worker import WorkerOptions, describe_model, process_scan, usable_cpus

WORKER_MEMORY_BYTES = 4 << 30  # a worker holding a large CT, its embeddings and the model stays under this
POLL_SECONDS = 0.25  # how often the client looks for finished scans and for a cancel request

Progress = Callable[[int, int], None]
Report = Callable[[str], None]


def default_worker_count() -> int:
    """Workers for a LocalCluster on this machine: one per GPU, else one per core that memory allows."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        memory = WORKER_MEMORY_BYTES * usable_cpus()
    return max(1, min(usable_cpus(), memory // WORKER_MEMORY_BYTES))


@contextlib.contextmanager
def cohort_client(scheduler: str | None = None, workers: int | None = None, report: Report | None = None,
                  resources: dict[str, float] | None = None):
    """A dask ``Client`` on ``scheduler``, or on a new LocalCluster of ``workers`` single-threaded processes
    (each offering ``resources``, so that tasks asking for them run there)."""
    from distributed import Client, LocalCluster

    say = report or (lambda _message: None)
    cluster = None
    if scheduler:
        client = Client(scheduler, set_as_default=False)
        say(f"connected to the dask scheduler at {scheduler} ({len(cluster_workers(client))} workers)")
        dashboard = client.dashboard_link if "dashboard" in client.scheduler_info().get("services", {}) else None
    else:
        count = workers or default_worker_count()
        if count < 1:
            raise ValueError(f"--workers must be at least 1, not {count}")
        # Processes, one thread each: every scan gets its own interpreter (no GIL contention between scans),
        # and a crash or an out-of-memory kill costs one scan's progress, which dask then retries elsewhere.
        cluster = LocalCluster(n_workers=count, threads_per_worker=1, processes=True, silence_logs=logging.ERROR,
                               dashboard_address=":0", resources=resources)
        client = Client(cluster, set_as_default=False)
        say(f"started a local dask cluster: {count} worker process{'es' if count > 1 else ''}, "
            f"{max(1, usable_cpus() // count)} torch thread{'s' if usable_cpus() // count > 1 else ''} each")
        dashboard = client.dashboard_link if importlib.util.find_spec("bokeh") is not None else None
    say(f"dask dashboard: {dashboard}" if dashboard else "no dask dashboard (pip install 'bokeh>=3.1' for one)")
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_cohort(scans: Iterable[Scan | str | os.PathLike], output_dir: str | os.PathLike,
               settings: CohortSettings | None = None, *, scheduler: str | None = None, workers: int | None = None,
               client=None, resources: dict[str, float] | None = None, overwrite: bool = False,
               cache_dir: str | None = None, disk_cache: bool = True, progress: Progress | None = None,
               should_cancel: Callable[[], bool] | None = None, report: Report | None = None):
    """Run ``settings.mode`` on every scan, one dask task per scan; returns the results table (pandas).

    Runs on ``client``, or on the cluster at ``scheduler`` (``tcp://host:8786``), or on a new LocalCluster of
    ``workers`` processes (default: ``default_worker_count()``). ``resources`` (e.g. ``{"GPU": 1}``) places
    each task on a worker started with those resources. Scans finished by an earlier run with the same
    settings are skipped unless ``overwrite``. Embeddings are cached in ``cache_dir`` or on each worker's local
    disk (``disk_cache`` False: in memory only). ``progress(done, total)`` counts scans; ``should_cancel()``
    is polled and, once true, cancels the remaining tasks and raises ``Cancelled`` (finished scans stay
    done). ``report(message)`` receives one-line messages about the cluster and the run.

    The table has one row per scan, in the order given, also written as ``output_dir/results.csv`` and
    ``results.json``; ``table.attrs`` holds ``wall_seconds`` (first task sent to last row back) and ``workers``.
    """
    settings = settings or CohortSettings()
    settings.check()
    scans = with_scan_ids(scans)
    output = CohortOutput(output_dir, settings.mask_suffix)
    output.prepare()
    say = report or (lambda _message: None)
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(cohort_client(scheduler, workers, say, resources))
        check_resources(cluster_workers(client), resources)
        submit_options = {"pure": False, "resources": resources}
        identity = result_unless_cancelled(client.submit(describe_model, settings.model, **submit_options),
                                           should_cancel)
        say(f"model {identity['model_id']}, adapter {identity['adapter_id']}, on {identity['device']}")
        keys = {scan.scan_id: settings.task_key(scan, identity) for scan in scans}
        rows: dict[str, dict] = {}
        if not overwrite:
            for scan in scans:
                finished = output.finished_row(scan, keys[scan.scan_id])
                if finished is not None:
                    rows[scan.scan_id] = {**finished, "resumed": True}
        todo = [scan for scan in scans if scan.scan_id not in rows]
        worker_info = cluster_workers(client)
        if rows:
            say(f"{len(rows)} scan{'s' if len(rows) != 1 else ''} finished by an earlier run (skipped; --overwrite "
                "redoes them)")
        say(f"{len(todo)} scan{'s' if len(todo) != 1 else ''} to run on {len(worker_info)} "
            f"worker{'s' if len(worker_info) != 1 else ''}")
        started = time.perf_counter()
        options = WorkerOptions(threads_by_host(worker_info), cache_dir, disk_cache)
        rows.update(collect(client, todo, settings, output, keys, options, submit_options, progress, should_cancel,
                            done_before=len(rows), total=len(scans)))
        wall_seconds = time.perf_counter() - started
        workers_used = len(cluster_workers(client))
    output.remove_staging()
    ordered = [rows[scan.scan_id] for scan in scans]
    about = {"settings": asdict(settings), "model": identity, "wall_seconds": round(wall_seconds, 2),
             "workers": workers_used}
    table = output.write_results(ordered, about)
    table.attrs.update(wall_seconds=wall_seconds, workers=workers_used, output_dir=str(output.root))
    return table


def cluster_workers(client) -> dict:
    """{address: info} of every worker (recent distributed lists only the first few unless asked for all)."""
    try:
        return client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:  # distributed before 2025: always all of them
        return client.scheduler_info()["workers"]


def check_resources(worker_info: dict, resources: dict[str, float] | None) -> None:
    """Refuse resources no worker has: the tasks would wait for such a worker for ever."""
    if not resources:
        return
    for info in worker_info.values():
        offered = info.get("resources") or {}
        if all(offered.get(name, 0) >= amount for name, amount in resources.items()):
            return
    wanted = ",".join(f"{name}={amount:g}" for name, amount in resources.items())
    raise ValueError(f"no worker of the cluster offers the resources {wanted}: start the workers with "
                     f"dask worker ... --resources {wanted} (see docs/batch.md)")


def result_unless_cancelled(future, should_cancel: Callable[[], bool] | None):
    """``future.result()``, polling ``should_cancel`` while waiting (loading a model takes seconds)."""
    while should_cancel is not None and not future.done():
        if should_cancel():
            future.cancel()
            raise Cancelled("cohort run cancelled before any scan started")
        time.sleep(POLL_SECONDS)
    return future.result()


def threads_by_host(worker_info: dict) -> dict[str, int]:
    """Dask threads per machine, so that the workers of one machine share its cores for torch."""
    totals: dict[str, int] = {}
    for address, info in worker_info.items():
        host = urlparse(address).hostname or info.get("host", "")
        totals[host] = totals.get(host, 0) + int(info.get("nthreads", 1))
    return totals


def collect(client, scans: list[Scan], settings: CohortSettings, output: CohortOutput, keys: dict[str, str],
            options: WorkerOptions, submit_options: dict, progress: Progress | None,
            should_cancel: Callable[[], bool] | None, done_before: int, total: int) -> dict[str, dict]:
    """Send one task per scan and gather their rows as they finish; a task that dask gave up on is an error row."""
    from distributed import as_completed

    run_id = uuid.uuid4().hex[:8]
    futures = {client.submit(process_scan, scan, settings, str(output.root), keys[scan.scan_id], options,
                             key=f"napari-sam-ft-{settings.mode}-{scan.scan_id}-{run_id}", **submit_options): scan
               for scan in scans}
    rows: dict[str, dict] = {}
    if progress:
        progress(done_before, total)
    pending = as_completed(futures, loop=client.loop)
    try:
        while not pending.is_empty():
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"cohort run cancelled after {done_before + len(rows)} of {total} scans; "
                                "a new run resumes from the finished ones")
            if not pending.has_ready():
                time.sleep(POLL_SECONDS)
                continue
            for future in pending.next_batch(block=False):
                scan = futures[future]
                rows[scan.scan_id] = task_row(future, scan, settings, output, keys[scan.scan_id])
                if progress:
                    progress(done_before + len(rows), total)
    finally:
        unfinished = [future for future in futures if not future.done()]
        if unfinished:
            client.cancel(unfinished)
    return rows


def task_row(future, scan: Scan, settings: CohortSettings, output: CohortOutput, task_key: str) -> dict:
    """The row a task returned, or an error row when dask itself failed it (its worker died too often)."""
    from distributed.scheduler import KilledWorker

    try:
        return future.result()
    except KilledWorker as error:
        message = (f"the workers running this scan died {error.allowed_failures + 1} times "
                   "(out of memory? try fewer workers or a smaller --slices range)")
    except Exception as error:  # e.g. the scan could not be sent to a worker
        message = f"{type(error).__name__}: {error}"
    row = {**output.base_row(scan, settings, task_key), "error": message}
    output.record(row)
    return row
