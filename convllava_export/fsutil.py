"""Output folders and checksums: a failed export or build never leaves half a folder, and
`--force` never deletes anything this tool did not write."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import ConvLlavaError, ExportError

SPOT_BLOCK = 1 << 20  # bytes per sampled block of a spot check
SPOT_BLOCKS = 16  # sampled blocks: the first, the last and evenly spaced between
TOOL_NAME = "convllava-export"  # written into every build manifest; how `--force` knows a build


def sha256_file(path: str | os.PathLike, progress: Callable[[int], None] | None = None, chunk: int = 8 << 20) -> str:
    """sha256 of a whole file; `progress(n)` after each n bytes read."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if progress:
                progress(n)
    return h.hexdigest()


def spot_offsets(size: int, block: int = SPOT_BLOCK, blocks: int = SPOT_BLOCKS) -> list[int]:
    """Where a spot check reads: `blocks` blocks spread from the first byte to the last."""
    last = max(size - block, 0)
    return sorted({round(i * last / (blocks - 1)) for i in range(blocks)}) if blocks > 1 else [0]


def spot_sha256(path: str | os.PathLike, block: int = SPOT_BLOCK, blocks: int = SPOT_BLOCKS) -> str:
    """sha256 of sampled blocks (see `spot_offsets`): reads `blocks * block` bytes whatever the
    file's size, so a multi-GB file is checked in milliseconds, but only at those places."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for offset in spot_offsets(os.fstat(f.fileno()).st_size, block, blocks):
            f.seek(offset)
            h.update(f.read(block))
    return h.hexdigest()


def json_sha256(value: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no spaces): equal for equal data however it was formatted."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


# Marker files only this tool writes, with what their JSON must hold.
_MARKERS: dict[str, Callable[[dict], bool]] = {
    "manifest.json": lambda d: "schema_version" in d and isinstance(d.get("tool"), dict) and d["tool"].get("name") == TOOL_NAME,  # build
    "vision.json": lambda d: d.get("part") == "vision" and {"graph", "opset", "inputs"} <= d.keys(),  # export vision
    "decoder.json": lambda d: d.get("part") == "decoder" and {"graph", "opset", "inputs"} <= d.keys(),  # export llm (onnxruntime)
    "convllava_trtllm.json": lambda d: {"quant_algo", "prompt_table_base"} <= d.keys(),  # export llm (tensorrt-llm)
    "calib.json": lambda d: {"schema", "checkpoint_fingerprint", "shapes"} <= d.keys(),  # calibrate
    "config.json": lambda d: isinstance(d.get("convllava"), dict) and "image_token_id" in d["convllava"],  # export vllm
}


def is_ours(folder: Path) -> bool:
    """A folder this tool wrote: a build, an export or a calibration set, known by its marker file."""
    for name, check in _MARKERS.items():
        data = _read_json(folder / name)
        if isinstance(data, dict) and check(data):
            return True
    return False


def writable_dir(path: str | os.PathLike, error: type[ConvLlavaError] = ExportError) -> Path:
    """Create `path` (and parents) if needed and check it can be written in; one clear line otherwise
    (a parent that is a file, /proc, a read-only disk), never a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise error(f"cannot create folder {path}: a file of that name is in the way; choose another output path") from None
    except OSError as exc:
        raise error(f"cannot create folder {exc.filename or path}: {exc.strerror or exc}; choose another output path") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise error(f"cannot write in {path}: permission denied or a read-only file system; choose another output path")
    return path


def check_destination(dest: str | os.PathLike, force: bool, error: type[ConvLlavaError] = ExportError) -> None:
    """Refuse an output path that must not be replaced, before any work is done.

    Without `force` nothing existing is replaced. With it, only an empty folder or a folder this
    tool wrote (`is_ours`); a file, a link or a folder of other files is never deleted.
    """
    dest = Path(dest)
    if os.path.lexists(dest):
        if dest.is_symlink() or not dest.is_dir():
            kind = "a symbolic link" if dest.is_symlink() else "a file"
            raise error(f"{dest} is {kind}, not an output folder of {TOOL_NAME}; choose another output path or remove it yourself")
        try:
            empty = not any(dest.iterdir())
        except OSError as exc:
            raise error(f"cannot read {dest}: {exc.strerror or exc}; choose another output path") from None
        if not empty and not is_ours(dest):
            raise error(
                f"{dest} already exists and holds files that are not a build or export of {TOOL_NAME}; "
                "--force replaces only those (or an empty folder): choose another output path or remove it yourself"
            )
        if not force:
            raise error(f"destination {dest} already exists; pass --force to replace it")
    writable_dir(dest.parent, error)


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
def atomic_output_dir(dest: str | os.PathLike, force: bool = False, error: type[ConvLlavaError] = ExportError) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success rename it into place.

    `dest` must pass `check_destination` (again at the end: it may change during a long build)
    and is replaced only after the new one is complete. On any failure (or Ctrl-C) the temporary
    folder is removed and `dest` is untouched. The folder is made with mode 0o777 less the umask,
    like any other output (mkdtemp's 0o700 would survive the rename).
    """
    dest = Path(dest)
    check_destination(dest, force, error)
    _remove_stale(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.mkdir(0o777)
    except OSError as exc:
        raise error(f"cannot write in {dest.parent}: {exc.strerror or exc}; choose another output path") from None
    try:
        yield tmp
        if os.path.lexists(dest):
            check_destination(dest, force, error)
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
