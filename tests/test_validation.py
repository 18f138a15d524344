"""validate (metrics, reports, gates) and calibrate, on the tiny trained model."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from convllava_export.build import BuildOptions, build
from convllava_export.cli import cli
from convllava_export.errors import ConvLlavaError
from convllava_export.validation.data import builtin_items, load_items
from convllava_export.validation.metrics import anls, exact_match

from conftest import under_ci


@pytest.fixture(scope="module")
def quant_builds(tiny_checkpoint, tiny_build, tmp_path_factory):
    root = tmp_path_factory.mktemp("qbuilds")
    build(tiny_checkpoint, root / "int8-vision", BuildOptions(vision_precision="int8", calib_images="builtin", smoke_test=False), progress=lambda m: None)
    build(tiny_checkpoint, root / "int4-llm", BuildOptions(llm_precision="int4", smoke_test=False), progress=lambda m: None)
    return [tiny_build, root / "int8-vision", root / "int4-llm"]


@pytest.fixture(scope="module")
def broken_build(tiny_checkpoint, tmp_path_factory):
    """A build of a checkpoint whose projector weight was corrupted (sign-flipped rows)."""
    root = tmp_path_factory.mktemp("broken")
    shutil.copytree(tiny_checkpoint.parent, root / "ck")
    ck = root / "ck" / tiny_checkpoint.name
    index = json.loads((ck / "pytorch_model.bin.index.json").read_text())
    shard = ck / index["weight_map"]["model.mm_projector.2.weight"]
    state = torch.load(shard, weights_only=True)
    w = state["model.mm_projector.2.weight"]
    state["model.mm_projector.2.weight"] = torch.cat([-w[: w.shape[0] // 2], w[w.shape[0] // 2 :]])
    torch.save(state, shard)
    build(ck, root / "broken", BuildOptions(smoke_test=False), progress=lambda m: None)
    return root / "broken"


def test_metrics():
    assert exact_match("The  Red car.", ["red car"]) == 1.0 and exact_match("blue", ["red"]) == 0.0
    assert anls("hello world", ["hello world"]) == 1.0
    assert 0.8 < anls("hello wrld", ["hello world"]) < 1.0 and anls("xyz", ["hello world"]) == 0.0


def test_builtin_data_has_mixed_aspect_ratios():
    items = builtin_items(16, seed=0)
    assert {it.kind for it in items} == {"colour", "document", "chart", "shapes"}
    ratios = [it.image.size[0] / it.image.size[1] for it in items]
    assert max(ratios) >= 4 and min(ratios) <= 0.5  # very wide documents, tall charts
    assert all(it.answers for it in items)


def test_jsonl_and_folder_data(tmp_path):
    s = builtin_items(2, kinds=("colour",))
    for i, it in enumerate(s):
        it.image.save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i}.png", "question": it.question, "answers": it.answers} for i, it in enumerate(s)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items = load_items(tmp_path / "data.jsonl")
    assert len(items) == 2 and items[0].answers == s[0].answers
    (tmp_path / "imgs").mkdir()
    shutil.copy(tmp_path / "0.png", tmp_path / "imgs")
    assert load_items(tmp_path / "imgs", question="What?")[0].question == "What?"
    with pytest.raises(ConvLlavaError, match="--question"):
        load_items(tmp_path / "imgs")
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ConvLlavaError, match="bad.jsonl:1"):
        load_items(tmp_path / "bad.jsonl")


def test_identical_build_passes_with_perfect_scores(tiny_build, tiny_checkpoint, tmp_path):
    res = CliRunner().invoke(
        cli,
        ["validate", str(tiny_build), "--reference", str(tiny_checkpoint), "--data", "builtin:colour:8", "-o", str(tmp_path),
         "--min-cosine", "0.99999", "--min-agreement", "1.0", "--max-kl", "1e-6", "--min-accuracy", "0.85"],
    )
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "report.json").read_text())["builds"][0]["metrics"]
    assert round(m["vision_cosine"]["min"], 5) == 1.0 and m["top1_agreement"] == 1.0 and m["greedy_exact_match"] == 1.0
    assert m["task_accuracy"] >= 0.85


def test_broken_build_fails_the_gate(broken_build, tiny_checkpoint, tmp_path):
    res = CliRunner().invoke(cli, ["validate", str(broken_build), "--reference", str(tiny_checkpoint), "--data", "builtin:colour:6", "-o", str(tmp_path), "--min-cosine", "0.99", "--min-agreement", "0.95"])
    assert res.exit_code == 1, res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["passed"]
    failed = {f["metric"] for f in report["failures"]}
    assert {"vision_cosine_mean", "top1_agreement"} <= failed
    assert "gate failed: broken: vision_cosine_mean" in res.output
    assert 'class="fail"' in (tmp_path / "report.html").read_text()


def test_three_builds_one_run_with_reports(quant_builds, tiny_checkpoint, tmp_path):
    out = tmp_path / "val"
    res = CliRunner().invoke(cli, ["validate", *map(str, quant_builds), "--reference", str(tiny_checkpoint), "--data", "builtin:12", "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    names = [b["name"] for b in report["builds"]]
    assert names == ["fp32", "int8-vision", "int4-llm"]
    by = {b["name"]: b["metrics"] for b in report["builds"]}
    assert by["fp32"]["vision_cosine"]["mean"] > 0.99999
    assert by["int8-vision"]["vision_cosine"]["mean"] < by["fp32"]["vision_cosine"]["mean"]  # quantization's price shows
    assert round(by["int4-llm"]["vision_cosine"]["mean"], 5) == 1.0  # fp32 vision in the int4-LLM build
    for m in by.values():
        assert m["latency"]["ttft_s"] > 0 and m["latency"]["decode_tokens_per_s"] > 0 and m["task_accuracy"] is not None
    html = (out / "report.html").read_text()
    assert html.count("<svg") == 4 and "<script" not in html and "data:image/png;base64," in html


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None and not under_ci(), reason="no headless Chromium (apt-get install chromium); with CI set this test fails instead")
def test_html_report_in_headless_browser(quant_builds, tiny_checkpoint, tmp_path):
    assert _chromium() is not None, "CI is set and no headless Chromium is installed: .ci/run installs it (apt-get install chromium)"
    out = tmp_path / "val"
    CliRunner().invoke(cli, ["validate", str(quant_builds[0]), str(quant_builds[1]), "--reference", str(tiny_checkpoint), "--data", "builtin:colour:4", "-o", str(out)])
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<svg") == 3 and dom.count('class="point"') == 3 and 'class="bar"' in dom
    assert 'id="summary"' in dom and "int8-vision" in dom
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", "--window-size=1200,1600", (out / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_calibrate_set_is_deterministic_and_reusable(tiny_checkpoint, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, it in enumerate(builtin_items(6, kinds=("colour",))):
        it.image.save(imgs / f"{i}.{'png' if i % 2 else 'jpg'}")
    runner = CliRunner()
    for name in ("c1", "c2"):
        res = runner.invoke(cli, ["calibrate", str(tiny_checkpoint), "--images", str(imgs), "-o", str(tmp_path / name), "--mode", "native", "--max-tokens", "32"])
        assert res.exit_code == 0, res.output
    assert (tmp_path / "c1" / "vision.npz").read_bytes() == (tmp_path / "c2" / "vision.npz").read_bytes()
    meta = json.loads((tmp_path / "c1" / "calib.json").read_text())
    assert len(meta["shapes"]) == 6 and len({tuple(s) for s in meta["shapes"]}) > 1 and meta["llm_sequences"] == 6
    with np.load(tmp_path / "c1" / "llm.npz") as z:
        assert z["s00000"].shape[1] == 64 and z["s00000"].shape[0] > 16
    res = runner.invoke(cli, ["export", "vision", str(tiny_checkpoint), "-o", str(tmp_path / "v"), "--precision", "int8", "--calib", str(tmp_path / "c1"), "--mode", "native", "--max-tokens", "32"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["export", "vision", str(tiny_checkpoint), "-o", str(tmp_path / "v2"), "--precision", "int8", "--calib", str(tmp_path / "c1"), "--mode", "pad"])
    assert res.exit_code == 2 and "preprocessed with mode=native" in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(cli, ["calibrate", str(tiny_checkpoint), "--images", str(tmp_path / "empty"), "-o", str(tmp_path / "c3")])
    assert res.exit_code == 2 and "holds no images" in res.output and not (tmp_path / "c3").exists()
