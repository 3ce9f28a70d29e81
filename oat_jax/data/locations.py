"""Where datasets kept as folders are looked for.

In order: the explicit ``data_dir``, then ``$OAT_DATA_DIR/<name>``, then
``/usr/share/datasets/<name>``. An explicit ``data_dir`` is never skipped
silently: if it does not hold the dataset that is an error, so a typo cannot
load other data.
"""

from __future__ import annotations

import os
from typing import Callable

from oat_jax.data import DatasetError

ENV_VAR = "OAT_DATA_DIR"
SYSTEM_DIR = "/usr/share/datasets"


def find_root(
    name: str, data_dir: str, holds_copy: Callable[[str], bool], expected: str
) -> tuple[str | None, list[str]]:
    """(the folder holding dataset ``name``, or None; the folders searched in vain).

    Raises DatasetError when ``data_dir`` is given but ``holds_copy`` rejects
    it; ``expected`` says what it should hold.
    """
    if data_dir:
        folder = os.path.expanduser(data_dir)
        if not holds_copy(folder):
            raise DatasetError(f"data_dir {folder} does not hold {name}: expected {expected}")
        return folder, []
    searched = []
    for folder in default_dirs(name):
        if holds_copy(folder):
            return folder, searched
        searched.append(folder)
    return None, searched


def default_dirs(name: str) -> list[str]:
    """The folders searched for ``name`` when no data_dir is given."""
    env = os.environ.get(ENV_VAR, "")
    dirs = [os.path.join(os.path.expanduser(env), name)] if env else []
    return dirs + [os.path.join(SYSTEM_DIR, name)]
