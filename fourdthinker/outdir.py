"""Write a whole output directory or nothing: build it beside the target, then rename it in place."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fourdthinker.errors import UsageError


class OutputDirError(UsageError):
    """A bad output directory argument (the CLI turns it into exit code 2)."""


def check_output_dir(out: Path, overwrite: bool, arg: str = "--out") -> None:
    """Fail early, before any work, on a target that cannot or must not be written."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{arg} {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputDirError(f"{arg} {out}: directory is not empty; pass --overwrite to replace it")
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise OutputDirError(f"{arg} {out}: {probe} is not writable; choose a writable directory")


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False, arg: str = "--out") -> Iterator[Path]:
    """Yield a temp dir next to `out`; on success it replaces `out`, on failure it is removed."""
    out = Path(out)
    check_output_dir(out, overwrite, arg)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp.", dir=out.parent))
    except OSError as err:
        # root passes os.access checks on read-only or virtual file systems: only trying tells
        raise OutputDirError(f"{arg} {out}: cannot write there ({err.strerror}); choose a writable directory") from None
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
