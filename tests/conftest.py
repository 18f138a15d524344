"""Shared fixtures: the conformance set (copied into the repo) and a tiny trained checkpoint."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

# tests/vllm_env runs in vLLM's own venv (.ci/vllm): vLLM pins its torch and transformers
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_env"]

FIXTURES = Path(__file__).parent / "fixtures" / "conformance"
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(2)


# -- optional dependencies: skipped here when absent, never under CI ------------------------------
def under_ci() -> bool:
    """True when the CI variable is set (.ci/run exports CI=1 and installs every extra the tests use)."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def _missing_reason(module: str, extra: str) -> str:
    return f"{module} is not installed: pip install -e '.[{extra}]' (with CI set this test fails instead)"


def needs(module: str, extra: str) -> pytest.MarkDecorator:
    """Mark a test that needs `module` (installed by the `extra` extra): skipped with the reason
    when it is missing, except under CI, where the marker does nothing: CI installs the extra, so
    a missing or broken install surfaces as the test's import error instead of a quiet skip."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is None and not under_ci(), reason=_missing_reason(module, extra))


def require(module: str, extra: str) -> None:
    """`needs` from inside a test (one case of a parametrized test): skip when `module` is missing,
    except under CI, where it is imported so that its import error fails the test."""
    if under_ci():
        importlib.import_module(module)
    elif importlib.util.find_spec(module) is None:
        pytest.skip(_missing_reason(module, extra))


@pytest.fixture(scope="session")
def conformance() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def manifest() -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())


@pytest.fixture(scope="session")
def reference(conformance):
    from convllava_export.model.reference import ReferenceModel

    return ReferenceModel.load(conformance / "convllava-tiny-a", vision_tower=conformance / "convnext-tiny-a")


@pytest.fixture()
def ckpt_copy(tmp_path, conformance) -> Path:
    """A writable copy of the conformance checkpoint pair, laid out as siblings."""
    shutil.copytree(conformance / "convllava-tiny-a", tmp_path / "convllava-tiny-a")
    shutil.copytree(conformance / "convnext-tiny-a", tmp_path / "convnext-tiny-a")
    for p in tmp_path.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return tmp_path / "convllava-tiny-a"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The trained tiny demo model (about 40 s of CPU), written once per test session."""
    from convllava_export.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_reference(tiny_checkpoint):
    from convllava_export.model.reference import ReferenceModel

    return ReferenceModel.load(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_build(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model built for CPU: fp32 vision, fp32 LLM (exact against the reference)."""
    from convllava_export.build import BuildOptions, build

    dest = tmp_path_factory.mktemp("builds") / "fp32"
    build(tiny_checkpoint, dest, BuildOptions(target="cpu"), progress=lambda m: None)
    return dest


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_build):
    from convllava_export.runtime.build_loader import load_pipeline

    return load_pipeline(tiny_build)


@pytest.fixture(scope="session")
def conformance_decoder(reference, tmp_path_factory) -> Path:
    """The conformance LLM exported for ONNX Runtime (dynamo graph, fp32)."""
    from convllava_export.export.llm import export_llm_onnxruntime

    folder = tmp_path_factory.mktemp("llm") / "fp32"
    export_llm_onnxruntime(reference.llm, folder, "fp32", progress=lambda m: None)
    return folder


@pytest.fixture(scope="session")
def conformance_gqa(reference, tmp_path_factory) -> Path:
    """The conformance LLM in ORT's fused GroupQueryAttention layout (needs onnxruntime-genai)."""
    from convllava_export.export.llm import export_llm_onnxruntime

    folder = tmp_path_factory.mktemp("llm") / "gqa-fp32"
    export_llm_onnxruntime(reference.llm, folder, "fp32", progress=lambda m: None, graph="gqa")
    return folder


@pytest.fixture(scope="session")
def conformance_gqa_int4_kv8(reference, conformance_gqa_int4, tmp_path_factory) -> Path:
    """The int4 gqa graph with an int8 KV cache, calibrated on multimodal prompts of the reference."""
    import shutil

    from convllava_export.calibration.kv import int8_cache_from
    from convllava_export.calibration.prompts import DEFAULT_QUESTIONS, multimodal_sequences
    from convllava_export.preprocess import PreprocessConfig, preprocess
    from convllava_export.synthetic import colour_samples

    folder = tmp_path_factory.mktemp("llm") / "gqa-int4-kv8"
    shutil.copytree(conformance_gqa_int4, folder)
    cfg = PreprocessConfig.from_preprocessor_config(reference.info.preprocessor_config)
    pixels = [preprocess(s.image, cfg)[None] for s in colour_samples(4, seed=7)]
    int8_cache_from(folder, multimodal_sequences(reference, pixels, DEFAULT_QUESTIONS), "test images")
    return folder


@pytest.fixture(scope="session")
def conformance_gqa_int4(reference, tmp_path_factory) -> Path:
    """The conformance LLM as an int4 GroupQueryAttention graph: its KV cache is fp16."""
    from convllava_export.export.llm import export_llm_onnxruntime

    folder = tmp_path_factory.mktemp("llm") / "gqa-int4"
    export_llm_onnxruntime(reference.llm, folder, "int4", progress=lambda m: None, graph="gqa")
    return folder
