"""Open a build folder as a Pipeline, after checking it is intact and usable here; `verify`'s full check."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import BuildError
from ..fsutil import json_sha256, sha256_file, spot_sha256
from ..manifest import Manifest, read_manifest
from ..preprocess import PreprocessConfig
from .pipeline import Pipeline

FULL_HASH_LIMIT = 256 << 20  # at load, files up to this size are hashed whole, larger ones spot-checked
log = logging.getLogger(__name__)


@dataclass
class FileCheck:
    """What a check of a build's files found."""

    problems: list[str] = field(default_factory=list)
    size_only: list[str] = field(default_factory=list)  # large files of an old manifest (no spot sha256)
    hashed_bytes: int = 0


def _present(folder: Path) -> set[str]:
    """Every entry of the folder that is not a real directory (links included, not followed)."""
    found = set()
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.add(Path(root, name).relative_to(folder).as_posix())
    return found


def check_files(
    folder: Path, files: dict[str, Any], integrity: dict[str, Any] | None, full: bool = False, full_hash_limit: int = FULL_HASH_LIMIT, progress: Callable[[int], None] | None = None
) -> FileCheck:
    """Compare a build folder with its manifest; see `verify_files` for what is checked when.

    `full`: sha256 of every whole file (`convllava-export verify`); `progress(n)` per n bytes hashed.
    """
    folder = Path(folder)
    result = FileCheck()
    if integrity is not None and json_sha256(files) != integrity.get("files_sha256"):
        result.problems.append("manifest.json's file list was edited (its digest does not match)")
    for rel in sorted(_present(folder) - files.keys() - {"manifest.json"}):
        result.problems.append(f"{rel} is not part of the build")
    for rel, entry in files.items():
        path = folder / rel
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)):
            result.problems.append(f"manifest.json's entry for {rel} is malformed")
        elif PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
            result.problems.append(f"{rel} is outside the build folder")
        elif path.is_symlink() or not path.is_file():
            result.problems.append(f"{rel} is missing" if not os.path.lexists(path) else f"{rel} is not a regular file")
        elif path.stat().st_size != entry["bytes"]:
            result.problems.append(f"{rel} is {path.stat().st_size} bytes, expected {entry['bytes']}")
        elif full or entry["bytes"] <= full_hash_limit:
            result.hashed_bytes += entry["bytes"]
            if sha256_file(path, progress) != entry["sha256"]:
                result.problems.append(f"{rel} has a different checksum")
        elif integrity is not None and "spot_sha256" in entry:
            if spot_sha256(path, integrity["spot_block_bytes"], integrity["spot_blocks"]) != entry["spot_sha256"]:
                result.problems.append(f"{rel} has a different checksum (sampled blocks)")
        else:
            result.size_only.append(rel)
    return result


def verify_files(folder: Path, files: dict[str, Any], integrity: dict[str, Any] | None, mode: str | bool = True, full_hash_limit: int = FULL_HASH_LIMIT) -> None:
    """Refuse a build that differs from its manifest (corruption, a partial copy, an accidental edit).

    Load-time checks (`mode=True`): the digest of the manifest's file list; no file that the list
    does not name (besides manifest.json); every listed file present, regular, of its size; files
    up to `full_hash_limit` by whole-file sha256, larger ones by the sha256 of sampled blocks
    (fsutil.spot_sha256: first, last and evenly spaced 1 MiB blocks), which misses a change
    between the samples. `mode='full'` hashes every whole file. Manifests written before spot
    checks existed get their large files checked by size only, with a warning. This is
    detection, not authentication: anyone who can write the folder can rewrite the manifest.
    """
    if not mode:
        return
    result = check_files(folder, files, integrity, full=mode == "full", full_hash_limit=full_hash_limit)
    if result.problems:
        raise BuildError(f"build folder {folder} was modified or is incomplete: {'; '.join(result.problems[:5])}. Rebuild it.")
    if result.size_only:
        log.warning(
            "%s: its manifest predates spot checks, so %s were checked by size only; `convllava-export verify %s` hashes every file",
            folder, ", ".join(result.size_only), folder,
        )


def check_libraries(manifest: Manifest) -> None:
    """ONNX Runtime must be at least the version that built the graphs (opset/kernels)."""
    built = manifest.libraries.get("onnxruntime") or manifest.libraries.get("onnxruntime-gpu")
    if not built:
        return
    try:
        here = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        try:
            here = metadata.version("onnxruntime-gpu")
        except metadata.PackageNotFoundError:
            raise BuildError("onnxruntime is not installed: pip install onnxruntime") from None
    key = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    if key(here) < key(built):
        raise BuildError(f"this build was made with onnxruntime {built}; installed is {here}, which may lack its operators. Upgrade onnxruntime or rebuild here.")


def preprocess_config(manifest: Manifest) -> PreprocessConfig:
    pre = manifest.preprocess
    return PreprocessConfig(**{**pre, "mean": tuple(pre["mean"]), "std": tuple(pre["std"]), "size": tuple(pre["size"]) if pre.get("size") else None})


def load_context(folder: Path, manifest: Manifest, threads: int | None = None, device: str | None = None, prefill: str = "auto") -> Any:
    """What every backend loader gets (engines/registry.py): ONNX Runtime runs on the target's
    device unless `device` overrides it."""
    from ..engines.registry import LoadContext
    from ..targets import get_target

    return LoadContext(Path(folder), manifest, threads or manifest.threads, device or get_target(manifest.target).ort_device, prefill)


def load_pipeline_from_manifest(
    folder: Path,
    manifest: Manifest,
    verify: str | bool = True,
    threads: int | None = None,
    vision_backend: str | None = None,
    llm_backend: str | None = None,
    parts: tuple[str, ...] = ("vision", "llm"),
    device: str | None = None,
    prefill: str = "auto",
) -> Pipeline:
    """A Pipeline over the build, its backends opened by the registry from what the manifest
    names (`vision_backend` / `llm_backend` override it, e.g. `torch` for the reference);
    `parts` loads only some engines (a Ray replica needs one)."""
    from ..engines.profiles import VisionProfile
    from ..engines.registry import open_backend
    from ..tokenizer import load_tokenizer

    folder = Path(folder)
    verify_files(folder, manifest.files, manifest.integrity, verify)
    check_libraries(manifest)
    ctx = load_context(folder, manifest, threads, device, prefill)
    vision, vision_info = open_backend("vision", ctx, vision_backend) if "vision" in parts else (None, "not loaded")
    decoder, llm_info = open_backend("llm", ctx, llm_backend) if "llm" in parts else (None, "not loaded")
    tokenizer = load_tokenizer(folder / "tokenizer")
    info = {
        "build": folder.resolve().name,  # not the path: /health is public
        "target": manifest.target,
        "vision": vision_info,
        "llm": llm_info,
        "max_images": VisionProfile.from_dict(manifest.vision.profile).max_batch,  # images per vision-engine run
    }
    pipe = Pipeline(vision, decoder, tokenizer, preprocess_config(manifest), info)
    pipe.max_context = manifest.max_context
    return pipe


def load_pipeline(folder: str | Path, verify: str | bool = True, threads: int | None = None, **kw: Any) -> Pipeline:
    folder = Path(folder)
    return load_pipeline_from_manifest(folder, read_manifest(folder), verify, threads, **kw)


def open_build(folder: str | Path, threads: int | None = None, vision_backend: str | None = None, llm_backend: str | None = None, prefill: str = "auto") -> Pipeline:
    """A build loaded for long-running generation (run, chat, serve, demo): the process hands
    freed memory back to the system from the start (runtime/memory.py), then the pipeline loads.
    `vision_backend`/`llm_backend` override the manifest's (torch: the source checkpoint)."""
    from .memory import return_freed_memory

    return_freed_memory()  # before anything is loaded: freed KV rows and caches go back to the system
    return load_pipeline(folder, threads=threads, vision_backend=vision_backend, llm_backend=llm_backend, prefill=prefill)


def listed_bytes(files: dict[str, Any]) -> int:
    """Bytes of every file a manifest lists (what a full verification hashes: a progress total)."""
    return sum(entry.get("bytes", 0) for entry in files.values() if isinstance(entry, dict))


@dataclass(frozen=True)
class Verification:
    """`convllava-export verify`'s result: every listed file hashed in full."""

    folder: Path
    files: int
    result: FileCheck
    seconds: float

    def report(self) -> dict[str, Any]:
        return {"build": str(self.folder), "intact": not self.result.problems, "problems": self.result.problems, "files": self.files, "bytes": self.result.hashed_bytes,
                "seconds": round(self.seconds, 3)}

    def raise_if_damaged(self) -> None:
        problems = self.result.problems
        if problems:
            more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise BuildError(f"{self.folder} differs from its manifest: {'; '.join(problems[:10])}{more}. Rebuild it or restore it from a copy.")

    def summary(self) -> str:
        return f"{self.folder}: intact ({self.files} files, {self.result.hashed_bytes / 1e9:.2f} GB hashed in {self.seconds:.1f} s)"


def verify_build(folder: str | Path, files: dict[str, Any], integrity: dict[str, Any] | None, progress: Callable[[int], None] | None = None) -> Verification:
    """Hash every file of `files` (manifest.read_file_list) in full; `progress(n)` per n bytes hashed."""
    started = time.perf_counter()
    result = check_files(Path(folder), files, integrity, full=True, progress=progress)
    return Verification(Path(folder), len(files), result, time.perf_counter() - started)
