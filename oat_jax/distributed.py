"""One run over several processes (hosts) with ``jax.distributed``: joining the run, and the few places where
the processes must act together.

Every process runs the same program on the same config: it reads the whole dataset and puts its own devices'
slices of each global batch (``sharding.place_batch``); XLA does the cross-host reductions. Process 0 alone
writes the run's files (config.json, metrics.jsonl, summary.json) and prints; Orbax coordinates the
checkpoints of all processes itself.

Where the run's processes are found, each setting from the config's ``distributed`` group or else from the
environment (the config wins):

    coordinator_address  OAT_COORDINATOR_ADDRESS  "host:port" of process 0; "auto" = JAX's cluster detection
                                                  (SLURM, Open MPI, Kubernetes, ...); "" = a single process
    num_processes        OAT_NUM_PROCESSES        how many processes take part (0 = detected)
    process_id           OAT_PROCESS_ID           this process's number, 0..num_processes-1 (-1 = detected)
"""
from __future__ import annotations

import os
import sys
import threading

import jax
import numpy as np

ENVIRONMENT = {"coordinator_address": "OAT_COORDINATOR_ADDRESS", "num_processes": "OAT_NUM_PROCESSES",
               "process_id": "OAT_PROCESS_ID"}


class DistributedError(RuntimeError):
    """Settings that cannot start a run over several processes, or a failure to join it."""


def _from_environment(name: str, default: int) -> int:
    text = os.environ.get(ENVIRONMENT[name], "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"${ENVIRONMENT[name]} must be a whole number, got {text!r}") from None


def settings(config) -> dict | None:
    """The keyword arguments of ``jax.distributed.initialize`` that the config and environment ask for, or
    None for a single-process run."""
    group = config.distributed
    address = group.coordinator_address or os.environ.get(ENVIRONMENT["coordinator_address"], "").strip()
    processes = group.num_processes or _from_environment("num_processes", 0)
    process_id = group.process_id if group.process_id >= 0 else _from_environment("process_id", -1)
    if not address:
        if processes > 1 or process_id > 0:
            raise DistributedError(
                f"{processes or '?'} processes (this one number {process_id}) need a coordinator: set "
                f"distributed.coordinator_address or ${ENVIRONMENT['coordinator_address']} to process 0's host:port")
        return None
    if address == "auto":  # JAX finds all three from the cluster's environment
        return {}
    if address.rpartition(":")[0] == "" or not address.rpartition(":")[2].isdigit():
        raise DistributedError(f"coordinator address must be host:port, got {address!r}")
    if processes < 1 or not 0 <= process_id < processes:
        raise DistributedError(
            f"with coordinator {address}, set num_processes (>= 1, got {processes}) and process_id "
            f"(0..num_processes-1, got {process_id}) in the config's distributed group or as "
            f"${ENVIRONMENT['num_processes']} and ${ENVIRONMENT['process_id']}")
    return {"coordinator_address": address, "num_processes": processes, "process_id": process_id}


def initialize(config) -> None:
    """Joins the run of several processes the config or environment describes (a no-op for one process).
    Must come before anything runs on a device; returns once every process has joined.

    JAX ends a process that cannot join (an abort with a C++ stack trace), with no exception to catch. So
    when not every process has joined within ``distributed.timeout_seconds``, this prints one line saying
    so and ends the process itself with status 2, a little before JAX would."""
    arguments = settings(config)
    if arguments is None or jax.distributed.is_initialized():
        return
    timeout = config.distributed.timeout_seconds
    where = (f"process {arguments['process_id']} of {arguments['num_processes']} with coordinator "
             f"{arguments['coordinator_address']}" if arguments else "a process of the cluster's detected run")

    def give_up():
        print(f"error: cannot join the run as {where}: not every process joined within {timeout} s "
              "(distributed.timeout_seconds); start all of them with the same coordinator address",
              file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**arguments, initialization_timeout=timeout + _JAX_TIMEOUT_MARGIN_SECONDS)
    except (RuntimeError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise DistributedError(f"cannot join the run as {where}: {first_line} (it must start before anything "
                               "else uses JAX)") from None
    finally:
        watchdog.cancel()


# JAX's own deadline comes this much after ours, so that ours is the one that reports.
_JAX_TIMEOUT_MARGIN_SECONDS = 30


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    """Whether this process writes the run's files and prints (process 0; the only one when alone)."""
    return jax.process_index() == 0


def warn(message: str) -> None:
    """A warning line on stderr, from process 0 alone."""
    if is_primary():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier of this name (nothing to wait for when alone)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any: decisions that change which collective operations
    run next (stopping part-way, say) must be the same everywhere, or the others would wait forever."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
