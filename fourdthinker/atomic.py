"""Whole or nothing on disk: a file or a directory is built beside its target, then renamed into
place, so a reader (a resumed stage, a trainer, a user) sees the old version or the whole new one,
never a torn one. One home for it: every writer of the project uses these."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], Any]) -> Path:
    """Write `data` (text as UTF-8, bytes, or a callable that writes the file it is given, e.g.
    `lambda p: frame.to_parquet(p)`) to `path` whole or not at all; parents are created. The file
    gets the mode a plain `open` would give (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, payload: Any, indent: int | None = 2) -> Path:
    return atomic_write(path, json.dumps(payload, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, records: Any) -> Path:
    """One JSON object per line (UTF-8), the format of every JSONL file the project writes."""
    return atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
