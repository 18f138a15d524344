"""benchmarks/gpu_check.py: the one script a lent GPU machine runs (issue 15 item 7).

Here (no CUDA) every check must be skipped with its reason and the JSON still written; on a GPU
machine the same script runs them. What each check runs is the product's own code (CLI, build,
validate), so it is exercised by the rest of the suite on CPU.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: run benchmarks/gpu_check.py itself")
def test_every_check_skips_with_a_reason_without_a_gpu(tmp_path):
    gc = _load()
    assert list(gc.CHECKS) == ["conformance", "trtllm_checkpoint", "hf_checkpoints", "simulate", "tensorrt_vision", "trtllm_build", "trtllm_custom_module", "vision_latency"]
    for name in gc.CHECKS:  # each is named in the docstring a person reads before running it
        assert f"{name}:" in gc.__doc__
    results = gc.main(tmp_path / "out.json")
    assert results["skipped"] == {name: "no CUDA GPU visible to torch" for name in gc.CHECKS}
    assert json.loads((tmp_path / "out.json").read_text())["skipped"] == results["skipped"]
    assert gc.main(tmp_path / "one.json", ["simulate"])["skipped"] == {"simulate": "no CUDA GPU visible to torch"}
