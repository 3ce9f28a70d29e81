"""A full disk under the workdir, reported as one line that says where and what to do.

A write that finds no space (errno ENOSPC) raises ``WorkdirFull`` naming the file or checkpoint it was writing.
Nothing written before is lost: checkpoints are complete or absent, and a metrics line cut short is redone, so
the same command resumes the run once there is space again.
"""
from __future__ import annotations

import contextlib
import errno


class WorkdirFull(RuntimeError):
    """No space left on the device holding the workdir; the message names the path being written."""


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or one it was raised from) is ENOSPC: an OSError from Python, or tensorstore's
    RESOURCE_EXHAUSTED ValueError from Orbax, which carries the OS message but no errno."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def writing(path: str):
    """Turns a full disk met inside the block into ``WorkdirFull`` naming ``path``; other errors pass."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise WorkdirFull(f"no space left on device writing {path}; free space there (or use another --workdir) "
                          "and rerun the same command to resume") from error
