"""Builds that fail when they are wrong (issue 15 item 2): the smoke test's gates."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from convllava_export.cli import cli
from convllava_export.errors import GateError
from convllava_export.errors import BuildError
from convllava_export.gates import check, thresholds
from convllava_export.precisions import precision


def test_thresholds_by_precision_and_override():
    want = {"vision_cosine": precision("vision", "onnxruntime", "int8").gate, "token_agreement": precision("llm", "onnxruntime", "int4").gate}
    assert thresholds(("onnxruntime", "int8"), ("onnxruntime", "int4")) == want == {"vision_cosine": 0.97, "token_agreement": 0.8}
    assert thresholds(("onnxruntime", "fp32"), ("onnxruntime", "fp32"), 0.5, 0.0) == {"vision_cosine": 0.5, "token_agreement": 0.0}
    with pytest.raises(BuildError, match=r"llm precision 'int3' is not available for onnxruntime \(use fp32, fp16, int8, int4\)"):
        thresholds(("onnxruntime", "fp32"), ("onnxruntime", "int3"))  # no silent default for an unknown precision
    assert check({"vision_cosine": 0.99, "token_agreement": 0.9}, {"vision_cosine": 0.98, "token_agreement": 0.8})["passed"]
    with pytest.raises(GateError, match="token_agreement 0.5000 < 0.8") as err:
        check({"vision_cosine": 0.99, "token_agreement": 0.5}, {"vision_cosine": 0.98, "token_agreement": 0.8})
    assert err.value.exit_code == 1
    with pytest.raises(GateError, match="vision_cosine nan"):
        check({"vision_cosine": float("nan"), "token_agreement": 1.0}, {"vision_cosine": 0.98, "token_agreement": 0.8})


def test_broken_quantization_fails_the_build_and_keeps_the_previous_one(tiny_checkpoint, tmp_path, monkeypatch):
    """A real defect (int4 scales off by 4x: every weight wrong) is caught by the default gate:
    exit 1, the previous build untouched, the thresholds named."""
    from convllava_export.export import stream_quant

    dest = tmp_path / "b"
    args = ["build", str(tiny_checkpoint), "-o", str(dest), "--llm-precision", "int4", "--llm-graph", "dynamo"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    manifest = json.loads((dest / "manifest.json").read_text())
    gates = manifest["checks"]["gates"]
    assert gates["passed"] and gates["thresholds"]["token_agreement"] == precision("llm", "onnxruntime", "int4").gate and gates["figures"]["token_agreement"] >= 0.8
    before = (dest / "manifest.json").read_bytes()

    real = stream_quant._quantize

    def broken(w, bits, block):
        packed, scales = real(w, bits, block)
        return packed, np.ascontiguousarray(scales * 4)

    monkeypatch.setattr(stream_quant, "_quantize", broken)
    res = CliRunner().invoke(cli, [*args, "--force"])
    assert res.exit_code == 1, res.output
    assert "smoke test below threshold: token_agreement" in res.output and "was not written" in res.output
    assert (dest / "manifest.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name != "b"]


def test_gate_override_is_recorded(tiny_checkpoint, tmp_path):
    dest = tmp_path / "b"
    res = CliRunner().invoke(cli, ["build", str(tiny_checkpoint), "-o", str(dest), "--min-vision-cosine", "0.5", "--min-token-agreement", "0"])
    assert res.exit_code == 0, res.output
    gates = json.loads((dest / "manifest.json").read_text())["checks"]["gates"]
    assert gates["thresholds"] == {"vision_cosine": 0.5, "token_agreement": 0.0}
    res = CliRunner().invoke(cli, ["build", str(tiny_checkpoint), "-o", str(tmp_path / "c"), "--vision-precision", "int8", "--calib", "builtin", "--min-vision-cosine", "0.99999"])
    assert res.exit_code == 1 and "vision_cosine" in res.output and not (tmp_path / "c").exists()
