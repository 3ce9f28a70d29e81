"""A run's workdir. For now only its lock: one run per workdir at a time.

``hold_lock`` takes an OS advisory lock (``flock``) on ``<workdir>/.lock`` and writes the holder (process id,
host, start time) into it. The kernel drops the lock when its holder ends, however it ends (``kill -9``
included), so a lock left by a dead run is stale by construction and the next run simply takes it. The file
itself stays after the run: whether it is locked, not whether it exists, is what counts.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
import warnings

from oat_jax.disk_full import writing

LOCK_FILE = ".lock"


class WorkdirBusy(RuntimeError):
    """Another live run holds the workdir's lock; the message names its process."""


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says (it may be a moment before the holder has written it)."""
    for _ in range(10):
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "a process that has not said who it is"


@contextlib.contextmanager
def hold_lock(workdir: str):
    """Holds ``workdir``'s lock for the block (making the folder); WorkdirBusy when another run holds it."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by programs this one starts
    try:
        locked = _try_lock(fd, path)
        if locked is False:
            raise WorkdirBusy(f"workdir {workdir} is in use by another run ({_holder(fd)}); wait for it to "
                              "finish or stop it, or pass another --workdir")
        if locked:
            started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            holder = f"process {os.getpid()} on host {socket.gethostname()}, started {started}\n"
            with writing(path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder.encode(), 0)
        try:
            yield
        finally:
            if locked:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)  # no stale holder for the next reader to name; the flock alone counts
                    fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _try_lock(fd: int, path: str) -> bool | None:
    """True when locked, False when another holds the lock, None when this file system has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        # Some network or FUSE mounts: run, but unguarded.
        warnings.warn(f"cannot lock {path} ({error.strerror}); nothing stops a second run on this workdir at once")
        return None
