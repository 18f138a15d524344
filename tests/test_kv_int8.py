"""The int8 KV cache (`build --kv-cache int8`): half the fp16 cache's bytes, calibrated per channel
on multimodal prompts, close to the fp16 cache's logits, and the
bf16 prompt kernel writing the same int8 values GroupQueryAttention would. Batched rows equal to
rows alone, in place: tests/test_scheduler.py (every gqa cache)."""

from __future__ import annotations

import numpy as np
import pytest

from convllava_export.extras import require

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _genai():
    require("onnxruntime_genai", "genai")


def _decoders(request):
    from convllava_export.engines.onnxruntime import open_decoder

    return open_decoder(request.getfixturevalue("conformance_gqa_int4"), prefill="onnxruntime"), open_decoder(request.getfixturevalue("conformance_gqa_int4_kv8"), prefill="onnxruntime")


def _prompts(reference, n=3):
    from convllava_export.calibration.prompts import multimodal_sequences
    from convllava_export.preprocess import PreprocessConfig, preprocess
    from convllava_export.synthetic import colour_samples

    cfg = PreprocessConfig.from_preprocessor_config(reference.info.preprocessor_config)
    pixels = [preprocess(s.image, cfg)[None] for s in colour_samples(n, seed=99)]  # not the calibration images
    return multimodal_sequences(reference, pixels, ["Describe the colours.", "What shape is it?", "Is it wide or tall?"])


def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_int8_cache_is_half_the_bytes_and_close_to_fp16(reference, request):
    fp16, int8 = _decoders(request)
    assert int8.dtype == np.int8 and fp16.dtype == np.float16
    assert int8.cache_shape.position_bytes * 2 == fp16.cache_shape.position_bytes
    scales = [np.frombuffer(t.raw_data, np.float32) for t in __import__("onnx").load(str(int8.folder / "decoder.onnx"), load_external_data=False).graph.initializer
              if t.name.startswith("kv_scale.")]
    assert len(scales) == 2 * fp16.cache_shape.tensors // 2 and all(len(s) == fp16.kv_heads * fp16.head_dim and (s > 0).all() for s in scales)
    for seq in _prompts(reference):
        (a, _), (b, kv_b) = fp16.extend(seq), int8.extend(seq)
        assert kv_b.arrays[0].dtype == np.int8 and np.abs(kv_b.arrays[0]).max() > 64  # the scales use the int8 range
        assert cosine(a, b) > 0.995, cosine(a, b)
        assert np.argmax(a) == np.argmax(b)


def test_bf16_prompt_kernel_writes_the_int8_values_ort_writes(reference, request):
    from convllava_export.engines.onnxruntime import open_decoder

    folder = request.getfixturevalue("conformance_gqa_int4_kv8")
    ort, bf16 = open_decoder(folder, prefill="onnxruntime"), open_decoder(folder, prefill="bf16")
    bf16.gemm_min_tokens = 1
    for seq in _prompts(reference, 2):
        (a, kv_a), (b, kv_b) = ort.extend(seq), bf16.extend(seq)
        assert cosine(a, b) > 0.99
        for x, y in zip(kv_a.arrays[:2], kv_b.arrays[:2]):  # layer 0: the same inputs, so the same scales and layout give values a step apart at most
            d = np.abs(x.astype(np.int16) - y.astype(np.int16))
            assert d.max() <= 1 and (d == 0).mean() > 0.8
        assert min(cosine(x, y) for x, y in zip(kv_a.arrays, kv_b.arrays)) > 0.99  # every layer


def test_kv_int8_needs_the_gqa_graph(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from convllava_export.cli import cli

    res = CliRunner().invoke(cli, ["build", str(tiny_checkpoint), "-o", str(tmp_path / "b"), "--llm-precision", "int4", "--llm-graph", "dynamo", "--kv-cache", "int8"])
    assert res.exit_code == 2 and "--kv-cache int8" in res.output and "gqa" in res.output
    assert not (tmp_path / "b").exists()


def test_the_installed_onnxruntime_runs_an_int8_cache():
    """The capability probe a build runs first: a one-node int8 GroupQueryAttention decode step."""
    from convllava_export.export.llm_gqa import int8_kv_cache_unsupported

    assert int8_kv_cache_unsupported() is None


def test_a_runtime_without_int8_caches_is_refused_before_the_export(tiny_checkpoint, tmp_path, monkeypatch):
    """An onnxruntime whose GroupQueryAttention has no int8 cache (older than the verified one) is
    named with what to do, exit 2, before any export: not a failure after minutes of 7B work."""
    from click.testing import CliRunner

    from convllava_export.cli import cli
    from convllava_export.export import llm_gqa

    require("onnxruntime_genai", "genai")
    llm_gqa.int8_kv_cache_unsupported.cache_clear()
    monkeypatch.setattr(llm_gqa, "int8_kv_cache_unsupported", lambda: "onnxruntime 1.20.0 refuses an int8 GroupQueryAttention cache (Fail: type int8)")
    res = CliRunner().invoke(cli, ["build", str(tiny_checkpoint), "-o", str(tmp_path / "b"), "--llm-precision", "int4", "--kv-cache", "int8"])
    assert res.exit_code == 2, res.output
    assert "--kv-cache int8: onnxruntime 1.20.0 refuses" in res.output and "onnxruntime>=1.32" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "b").exists()


def test_build_with_an_int8_cache_calibrates_on_its_own_engines_and_answers(tiny_checkpoint, tmp_path):
    """`build --kv-cache int8` end to end: scales from the build's vision graph and prompts, recorded
    in the manifest, and the build passes its own smoke test and answers through `run`."""
    from click.testing import CliRunner

    from convllava_export.cli import cli
    from convllava_export.export.spec import PartSpec
    from convllava_export.manifest import read_manifest

    out = tmp_path / "kv8"
    res = CliRunner().invoke(cli, ["build", str(tiny_checkpoint), "-o", str(out), "--llm-precision", "int4", "--kv-cache", "int8", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "KV cache calibration" in res.output
    m = read_manifest(out)
    kv = m.llm.calibration["kv_cache"]
    assert kv["source"] == "builtin synthetic images" and kv["prompts"] >= 4 and kv["positions"] > kv["prompts"] * 16  # image rows in every prompt
    from convllava_export.build import inspect_build

    assert inspect_build(out)["llm_calibration"] == {"kv_cache": kv}  # `inspect` shows it
    spec = PartSpec.load(out / "llm" / "decoder.json")
    assert spec.attributes["kv_dtype"] == "int8" and {t.dtype for t in spec.inputs if t.name.startswith("past_key_values.")} == {"int8"}
    run = CliRunner().invoke(cli, ["run", str(out), "--image", str(__import__("convllava_export").__path__[0] + "/data/demo_blue_wide.png"), "--prompt", "What is it?", "--max-new-tokens", "4"])
    assert run.exit_code == 0, run.output


def test_the_q4_decoder_decodes_an_int8_cache_as_ort_does(reference, request):
    """Q4GqaDecoder over an int8 cache: prompt and batched decode steps write the cache values ORT
    writes (a rounding step apart), the logits agree, and greedy tokens in a batch equal alone."""
    from convllava_export.engines.onnxruntime import open_decoder
    from convllava_export.runtime.sampling import SamplingParams
    from convllava_export.runtime.scheduler import generate

    from convllava_export.engines.kernels import dequant_library

    if dequant_library() is None:
        pytest.skip("no C compiler here: the q4 kernel is native only")
    folder = request.getfixturevalue("conformance_gqa_int4_kv8")
    ort, q4 = open_decoder(folder, prefill="onnxruntime"), open_decoder(folder, prefill="q4")
    assert q4.prefill_kernel == "q4" and q4.session is None
    seqs = _prompts(reference, 3)
    feed = np.random.default_rng(3).integers(0, ort.vocab_size, 3)
    for dec in (ort, q4):
        cache = dec.new_cache(1 << 28, 3, 512)
        for s in seqs:
            cache.open(len(s) + 4)
            dec.prefill(cache, s)
            cache.commit()
        dec.steps = [dec.decode(cache, dec.embed(feed)) for _ in range(2)]
        dec.cache = cache
    for a, b in zip(ort.steps, q4.steps):
        assert min(cosine(x, y) for x, y in zip(a, b)) > 0.99
    for x, y in zip(ort.cache.arrays, q4.cache.arrays):
        for k, s in enumerate(seqs):  # each row's positions: its prompt and the two steps
            d = np.abs(x[k, :, : len(s) + 2].astype(np.int16) - y[k, :, : len(s) + 2].astype(np.int16))
            assert d.max() <= 2 and (d == 0).mean() > 0.8
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    alone = [generate(q4, reference.tokenizer, [s], params)[0].token_ids for s in seqs]
    assert [r.token_ids for r in generate(q4, reference.tokenizer, seqs, params)] == alone


def test_auto_runs_an_int8_cache_on_q4_where_the_cpu_has_it(request, monkeypatch):
    """`--llm-kernel auto` on a q4 CPU: the int8-cache build decodes on Q4GqaDecoder too (its
    attention reads the int8 cache with attend_i8), elsewhere on ONNX Runtime."""
    from convllava_export.engines import native_llm
    from convllava_export.engines.kernels import dequant_library
    from convllava_export.engines.onnxruntime import OrtGqaDecoder, Q4GqaDecoder, open_decoder

    if dequant_library() is None:
        pytest.skip("no C compiler here: the q4 kernel is native only")
    folder = request.getfixturevalue("conformance_gqa_int4_kv8")
    monkeypatch.setattr(native_llm, "cpu_prefill_kernel", lambda: "q4")
    assert isinstance(open_decoder(folder), Q4GqaDecoder)
    monkeypatch.setattr(native_llm, "cpu_prefill_kernel", lambda: None)
    dec = open_decoder(folder)
    assert type(dec) is OrtGqaDecoder and dec.session is not None
