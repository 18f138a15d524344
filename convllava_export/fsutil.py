"""Atomic output folders and checksums: a failed export or build never leaves half a folder."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ExportError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(dest: Path) -> None:
    """Temporary folders of builds that were killed (SIGKILL, power loss) are swept on the next run."""
    for old in dest.parent.glob(f".{dest.name}.tmp-*"):
        pid = old.name[len(f".{dest.name}.tmp-"):].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(dest: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success rename it into place.

    An existing `dest` is refused unless `force`, and is replaced only after the new one is
    complete. On any failure (or Ctrl-C) the temporary folder is removed and `dest` is untouched.
    """
    dest = Path(dest)
    if dest.exists() and not force:
        raise ExportError(f"destination {dest} already exists; pass --force to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
