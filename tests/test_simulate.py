"""Simulated builds (`validate --simulate`): ModelOpt fake quantization of the reference on CPU."""

from __future__ import annotations

import json

# CI installs the `quant` extra: a broken install fails here, it does not skip the module
import modelopt.torch.quantization  # noqa: F401
import numpy as np
import pytest
import torch

from convllava_export.errors import ConvLlavaError
from convllava_export.preprocess import PreprocessConfig
from convllava_export.runtime.pipeline import Pipeline
from convllava_export.validation.data import builtin_items
from convllava_export.validation.report import SIMULATED_NOTE, write_reports
from convllava_export.validation.run import Gates, _ReferenceCache, evaluate_build, validate
from convllava_export.validation.simulate import (
    calibration_data,
    check_cpu_support,
    parse_formats,
    quantizer_counts,
    resolve_awq_block_size,
    simulate_build,
)

QUIET = lambda m: None  # noqa: E731


@pytest.fixture(scope="module")
def calibration(tiny_reference):
    cfg = PreprocessConfig.from_preprocessor_config(tiny_reference.info.preprocessor_config)
    return calibration_data(tiny_reference, cfg, "builtin", 8, progress=QUIET)


@pytest.fixture(scope="module")
def sims(tiny_reference, calibration):
    return {f: simulate_build(tiny_reference, f, calibration, progress=QUIET) for f in ("fp8", "int4-awq")}


@pytest.fixture(scope="module")
def sim_report(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("simreport")
    said: list[str] = []
    items = builtin_items(6, kinds=("colour",))
    report, images = validate([], tiny_checkpoint, items, Gates(min_agreement=0.5), max_new_tokens=12, progress=said.append,
                              simulate=["fp8", "int4-awq"], calib_limit=8)
    write_reports(report, images, out)
    return report, out, said


def test_unknown_format_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(ConvLlavaError, match="cannot simulate 'int3': known formats are int8-sq, fp8, int4-awq, nvfp4"):
        validate([], tiny_checkpoint, builtin_items(1), Gates(), simulate=["int3"], progress=QUIET)
    with pytest.raises(ConvLlavaError, match="nothing to validate"):
        validate([], tiny_checkpoint, builtin_items(1), Gates(), progress=QUIET)
    assert parse_formats(["FP8", "simulated:int4-awq", "fp8"]) == ["fp8", "int4-awq"]


def test_format_without_a_cpu_kernel_is_refused_with_the_reason():
    with pytest.raises(ConvLlavaError, match=r"cannot simulate nvfp4 on CPU: ModelOpt .* NVFP4_DEFAULT_CFG only with a CUDA kernel"):
        check_cpu_support("nvfp4")
    for f in ("fp8", "int4-awq", "int8-sq"):
        check_cpu_support(f)


def test_awq_block_size_follows_the_export_rule():
    assert resolve_awq_block_size(4096, 11008, None) == 128
    assert resolve_awq_block_size(256, 688, None) == 16  # the mid model
    assert resolve_awq_block_size(64, 128, None) == 64
    with pytest.raises(ConvLlavaError, match="must divide"):
        resolve_awq_block_size(256, 688, 128)


def test_simulation_really_quantizes(tiny_reference, calibration, sims):
    # quantizers inserted and enabled; the reference itself untouched
    assert sims["fp8"].info["quantizers"]["llm"]["enabled"] > 0 and sims["fp8"].info["quantizers"]["vision"]["enabled"] > 0
    assert sims["int4-awq"].info["quantizers"]["llm"]["enabled"] > 0 and "vision" not in sims["int4-awq"].info["quantizers"]
    assert sims["int4-awq"].info["awq_block_size"] == 64
    assert quantizer_counts(tiny_reference.llm)["quantizers"] == 0 and quantizer_counts(tiny_reference.vision)["quantizers"] == 0
    # logits of the same multimodal prompts move, int4 weights more than fp8
    x = torch.from_numpy(np.stack([s for s in calibration.sequences if len(s) == len(calibration.sequences[0])]).astype(np.float32))
    with torch.no_grad():
        ref = tiny_reference.llm(inputs_embeds=x).logits
        diff = {f: (s.model.llm(inputs_embeds=x).logits - ref).abs().mean().item() for f, s in sims.items()}
    assert 0 < diff["fp8"] < diff["int4-awq"], diff
    # fp8 also rounds the vision tower; int4-awq keeps the fp32 one
    px = calibration.pixels[0]
    want = tiny_reference.encode_images(px)
    assert np.abs(sims["fp8"].model.encode_images(px) - want).max() > 0
    assert np.array_equal(sims["int4-awq"].model.encode_images(px), want)


def test_real_pipelines_are_not_marked_simulated(tiny_reference):
    items = builtin_items(1, kinds=("colour",))
    images = {it.id: it.image for it in items}
    got = evaluate_build("torch", Pipeline.from_reference(tiny_reference), items, images, _ReferenceCache(tiny_reference, 4), QUIET)
    assert got["simulated"] is False and got["metrics"]["top1_agreement"] == 1.0


def test_simulated_fp8_and_int4_awq_in_the_report(sim_report):
    report, out, said = sim_report
    by = {b["name"]: b for b in report["builds"]}
    assert list(by) == ["simulated:fp8", "simulated:int4-awq"]
    for b in by.values():
        m = b["metrics"]
        assert b["simulated"] is True and b["info"]["note"] == SIMULATED_NOTE
        assert m["kl_mean"] >= 0 and 0 <= m["greedy_exact_match"] <= 1 and m["task_accuracy"] is not None and m["latency"]["ttft_s"] > 0
    fp8, awq = by["simulated:fp8"]["metrics"], by["simulated:int4-awq"]["metrics"]
    assert fp8["top1_agreement"] >= 0.9 and fp8["kl_mean"] > 0
    assert 0.9 < fp8["vision_cosine"]["mean"] < 1.0  # the fp8 vision tower is rounded too
    assert round(awq["vision_cosine"]["mean"], 6) == 1.0  # int4-awq: LLM only
    assert report["simulation"]["formats"] == ["fp8", "int4-awq"] and report["simulation"]["calibration"]["prompts"] == 8
    assert report["passed"]  # gates apply to simulated builds like real ones
    assert any("calibrating the LLM" in s for s in said) and any("calibrating the vision tower" in s for s in said)
    assert json.loads((out / "report.json").read_text())["builds"][0]["simulated"] is True
    page = (out / "report.html").read_text()
    assert page.count('class="simulated"') == 2 and SIMULATED_NOTE.replace("'", "&#x27;") in page and 'id="simulated-note"' in page
    assert page.count('class="point"') == 1  # only the reference: a simulated build's latency is not an engine's


def test_validate_cli_simulate(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from convllava_export.cli import cli

    res = CliRunner().invoke(cli, ["validate", "--reference", str(tiny_checkpoint), "--simulate", "fp8", "--data", "builtin:4", "--calib-limit", "4", "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [b["name"] for b in report["builds"]] == ["simulated:fp8"] and report["builds"][0]["simulated"]
    res = CliRunner().invoke(cli, ["validate", "--reference", str(tiny_checkpoint), "-o", str(tmp_path / "none")])
    assert res.exit_code == 2 and "nothing to validate" in res.output
