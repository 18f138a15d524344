"""Open a build folder as a Pipeline, after checking it is intact and usable here."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..fsutil import sha256_file
from ..preprocess import PreprocessConfig
from .pipeline import Pipeline

FULL_HASH_LIMIT = 256 << 20  # files above this are checked by size unless verify="full"


def verify_files(folder: Path, manifest: dict[str, Any], mode: str | bool = True) -> None:
    """Every file listed exists with its size; small ones (or all, mode='full') by sha256."""
    if not mode:
        return
    bad = []
    for rel, entry in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            bad.append(f"{rel} is missing")
        elif path.stat().st_size != entry["bytes"]:
            bad.append(f"{rel} is {path.stat().st_size} bytes, expected {entry['bytes']}")
        elif (mode == "full" or entry["bytes"] <= FULL_HASH_LIMIT) and sha256_file(path) != entry["sha256"]:
            bad.append(f"{rel} has a different checksum")
    if bad:
        raise BuildError(f"build folder {folder} was modified or is incomplete: {'; '.join(bad[:5])}. Rebuild it.")


def check_libraries(manifest: dict[str, Any]) -> None:
    """ONNX Runtime must be at least the version that built the graphs (opset/kernels)."""
    built = manifest.get("libraries", {}).get("onnxruntime") or manifest.get("libraries", {}).get("onnxruntime-gpu")
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


def preprocess_config(manifest: dict[str, Any]) -> PreprocessConfig:
    pre = manifest["preprocess"]
    return PreprocessConfig(**{**pre, "mean": tuple(pre["mean"]), "std": tuple(pre["std"]), "size": tuple(pre["size"]) if pre.get("size") else None})


def load_vision(folder: Path, manifest: dict[str, Any], threads: int | None = None, vision_backend: str | None = None) -> tuple[Any, str]:
    """The build's vision engine and a description of it (e.g. 'onnxruntime fp32')."""
    from ..engines.onnxruntime import OrtVision
    from ..engines.profiles import VisionProfile

    threads = threads or manifest.get("threads")
    ort_target = {"jetson": "tensorrt"}.get(manifest["target"], manifest["target"])
    profile = VisionProfile.from_dict(manifest["vision"]["profile"])
    backend = vision_backend or manifest["vision"]["backend"]
    if backend == "tensorrt":
        from ..engines.tensorrt import TrtVision

        vision: Any = TrtVision(folder / "vision")
    elif backend == "onnxruntime":
        graph = manifest["vision"].get("ort_graph") if ort_target == "cpu" else None
        vision = OrtVision(folder / (graph or manifest["vision"]["graph"]), ort_target if ort_target != "tensorrt" else "cuda", threads, profile)
    else:
        raise BuildError(f"unknown vision backend '{backend}' in the manifest")
    return vision, f"{backend} {manifest['vision']['precision']}"


def load_decoder(folder: Path, manifest: dict[str, Any], threads: int | None = None, llm_target: str | None = None) -> tuple[Any, str]:
    """The build's LLM decoder and a description of it."""
    from ..engines.onnxruntime import open_decoder

    threads = threads or manifest.get("threads")
    llm_target = llm_target or ("cpu" if manifest["target"] == "cpu" else "cuda")
    return open_decoder(folder / manifest["llm"]["folder"], llm_target, threads), f"onnxruntime {manifest['llm']['precision']}"


def load_pipeline_from_manifest(
    folder: Path,
    manifest: dict[str, Any],
    verify: str | bool = True,
    threads: int | None = None,
    vision_backend: str | None = None,
    llm_target: str | None = None,
    parts: tuple[str, ...] = ("vision", "llm"),
) -> Pipeline:
    """A Pipeline over the build; `parts` loads only some engines (a Ray replica needs one)."""
    from ..tokenizer import load_tokenizer

    folder = Path(folder)
    verify_files(folder, manifest, verify)
    check_libraries(manifest)
    vision, vision_info = load_vision(folder, manifest, threads, vision_backend) if "vision" in parts else (None, "not loaded")
    decoder, llm_info = load_decoder(folder, manifest, threads, llm_target) if "llm" in parts else (None, "not loaded")
    tokenizer = load_tokenizer(folder / "tokenizer")
    info = {"build": str(folder), "target": manifest["target"], "vision": vision_info, "llm": llm_info}
    pipe = Pipeline(vision, decoder, tokenizer, preprocess_config(manifest), info)
    pipe.max_context = int(manifest.get("token_budget", {}).get("max_context", 2048))
    return pipe


def load_pipeline(folder: str | Path, verify: str | bool = True, threads: int | None = None, **kw: Any) -> Pipeline:
    from ..build import read_manifest

    folder = Path(folder)
    return load_pipeline_from_manifest(folder, read_manifest(folder), verify, threads, **kw)
