"""Dask clusters for the heavy data stages (ingest, features), through ``dask.distributed``.

A stage runs on Dask when its ``dask`` param (``data.dask``, ``features.dask``) or, when that is
null, ``$TLPIPE_DASK_SCHEDULER`` names a cluster:

* ``local:N``: a :class:`distributed.LocalCluster` of N single-threaded worker processes on this
  machine, started for the stage and closed after it;
* ``tcp://host:port`` (or ``tls://...``): an existing scheduler (``dask scheduler`` plus ``dask worker``
  processes on any number of machines). Its workers import this project's code and read and write
  the stage's staging folder, so they run from a checkout of the same commit on a shared filesystem
  that holds the project at the same path.

Without either, the stage runs its embedded local path (a process pool), which stays the fastest
path on one machine. Both paths write byte-identical outputs.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tlpipe.core.errors import UserError
from tlpipe.core.params import check_dask_address

SCHEDULER_ENV = "TLPIPE_DASK_SCHEDULER"
LOCAL = re.compile(r"^local:(\d+)$")
CONNECT_TIMEOUT_S = 30


class ClusterError(UserError, RuntimeError):
    """A Dask scheduler address is malformed or its scheduler cannot be reached."""


@dataclass(frozen=True)
class ClusterInfo:
    """What a stage ran on (logged, never written into outputs)."""

    address: str
    workers: int
    local: bool


def resolve_scheduler(param: str | None) -> str | None:
    """The cluster a stage should use: its param, else ``$TLPIPE_DASK_SCHEDULER``, else None (local path)."""
    address = param or os.environ.get(SCHEDULER_ENV) or None
    if address is None:
        return None
    try:
        return check_dask_address(address.strip())
    except ValueError as error:
        source = "the stage's dask param" if param else SCHEDULER_ENV
        raise ClusterError(f"{source}: {error}") from None


def worker_count(client) -> int:
    """Number of workers the client's scheduler has now."""
    return len(client.scheduler_info(n_workers=-1).get("workers", {}))


@contextmanager
def dask_client(address: str) -> Iterator[tuple[object, ClusterInfo]]:
    """A ``distributed.Client`` on ``address`` (a fresh LocalCluster for ``local:N``), closed on exit.

    Raises:
        ClusterError: When the scheduler cannot be reached or has no workers.
    """
    from distributed import Client, LocalCluster

    match = LOCAL.match(check_dask_address(address))
    if match:
        workers = int(match.group(1))
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", silence_logs=logging.WARNING)  # loopback only
        try:
            with Client(cluster) as client:
                client.wait_for_workers(workers, timeout=300)
                yield client, ClusterInfo(address, workers, True)
        finally:
            cluster.close()
        return
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as error:
        raise ClusterError(f"Dask scheduler {address} is unreachable ({error}); start it (`dask scheduler`, then "
                           f"`dask worker {address}` on each machine) or unset {SCHEDULER_ENV}") from None
    try:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise ClusterError(f"Dask scheduler {address} has no workers: start `dask worker {address}`") from None
        yield client, ClusterInfo(address, worker_count(client), False)
    finally:
        client.close()


def even_chunks(total: int, chunk: int, align: int = 1) -> list[range]:
    """Split ``range(total)`` into consecutive ranges of ``chunk`` items (rounded up to a multiple of ``align``)."""
    chunk = max(align, -(-max(1, chunk) // align) * align)
    return [range(start, min(start + chunk, total)) for start in range(0, total, chunk)]


def log_cluster(stage: str, info: ClusterInfo) -> None:
    """Say where a stage runs (stage logs only: outputs never record it, so both paths write the same bytes)."""
    kind = "a local cluster" if info.local else "the scheduler"
    logging.getLogger("tlpipe.cluster").warning("%s runs on Dask: %s %s with %d worker(s)", stage, kind,
                                                info.address, info.workers)


@contextmanager
def stage_cluster(stage: str, param: str | None) -> Iterator[object | None]:
    """The Dask client a heavy stage runs on, if one is configured: ``param`` (the stage's ``dask``), else
    ``$TLPIPE_DASK_SCHEDULER``; the cluster is logged and closed after the block. None: the local path."""
    address = resolve_scheduler(param)
    if address is None:
        yield None
        return
    with dask_client(address) as (client, info):
        log_cluster(stage, info)
        yield client
