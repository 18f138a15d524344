"""The bf16 prompt kernel of int4 gqa builds (engines/bf16_prefill.py): the same numbers as ONNX
Runtime's prefill within bf16 rounding, the same cache layout (ORT decodes on from it), the same
tokens alone and in a batch, one dequantization (native or torch), and no copy of the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import require

from convllava_export.cli import cli
from convllava_export.engines import bf16_prefill
from convllava_export.errors import BuildError


@pytest.fixture(scope="module")
def int4_folder(request):
    require("onnxruntime_genai", "genai")
    return request.getfixturevalue("conformance_gqa_int4")


def decoders(folder):
    from convllava_export.engines.onnxruntime import open_decoder

    return open_decoder(folder, prefill="bf16"), open_decoder(folder, prefill="onnxruntime")


def prefill_then_decode(dec, embeds, chunks, feed, steps=3):
    """Prefill `embeds` in `chunks`, then decode `steps` tokens on ORT, feeding `feed` (the same
    tokens for every decoder compared, so their logits stay comparable); last prefill logits,
    the cache and each step's logits."""
    cache = dec.new_cache(1 << 28, 2, 512)
    cache.open(len(embeds) + steps + 1)
    done = 0
    for n in chunks:
        logits = dec.prefill(cache, embeds[done : done + n])
        done += n
    cache.commit()
    steps_logits = [dec.decode(cache, dec.embed(np.array([t])))[0] for t in feed[:steps]]
    return logits, cache, steps_logits


def cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("chunks", [(130,), (100, 30)], ids=["one-chunk", "two-chunks"])
def test_bf16_prefill_matches_onnxruntime(int4_folder, chunks):
    bf, ort = decoders(int4_folder)
    assert bf.prefill_kernel == "bf16" and ort.prefill_kernel == "onnxruntime"
    bf.bf16_min_tokens = min(chunks)  # the second chunk too: attention over the cached positions
    rng = np.random.default_rng(3)
    embeds = bf.embed(rng.integers(0, bf.vocab_size, sum(chunks)))
    feed = rng.integers(0, bf.vocab_size, 3)
    lb, cb, sb = prefill_then_decode(bf, embeds, chunks, feed)
    lo, co, so = prefill_then_decode(ort, embeds, chunks, feed)
    assert bf.bf16.tokens == sum(chunks)  # the bf16 kernel ran every prompt position
    assert cosine(lb, lo) > 0.9999 and lb.argmax() == lo.argmax()
    # ORT decodes on from the bf16 kernel's cache as from its own (a key written unrotated, or
    # at another position, drops these to ~0.9)
    assert all(cosine(a, b) > 0.9999 for a, b in zip(sb, so))
    n = sum(chunks)
    for a, b in zip(cb.arrays, co.arrays):  # keys after rotary, values: where GroupQueryAttention puts them
        a, b = a[0, :, :n].astype(np.float32), b[0, :, :n].astype(np.float32)
        assert np.abs(a - b).max() <= 0.03 * np.abs(b).max()


def test_short_chunks_stay_on_onnxruntime(int4_folder):
    bf, _ = decoders(int4_folder)
    embeds = bf.embed(np.arange(bf.bf16_min_tokens - 1))
    prefill_then_decode(bf, embeds, (len(embeds),), [1], steps=1)
    assert bf.bf16.tokens == 0


def test_extend_takes_the_same_kernel_as_prefill(int4_folder):
    """validate's teacher forcing (extend) measures what serving runs."""
    bf, _ = decoders(int4_folder)
    embeds = bf.embed(np.random.default_rng(4).integers(0, bf.vocab_size, 120))
    logits, kv = bf.extend(embeds[:100])
    logits2, kv2 = bf.extend(embeds[100:], kv)
    via_cache, cache, _ = prefill_then_decode(bf, embeds, (100, 20), [], steps=0)
    assert bf.bf16.tokens == 100 + 100  # the 20-position chunks went to ORT both times
    np.testing.assert_array_equal(logits2, via_cache)
    np.testing.assert_array_equal(kv2.arrays[0][0], cache.arrays[0][0, :, :120])


def test_native_and_torch_dequantization_agree_bit_for_bit(int4_folder):
    bf, _ = decoders(int4_folder)
    pf = bf.bf16
    if pf.lib is None:
        pytest.skip("no C compiler here: only the torch dequantization exists to compare")
    w = pf.layers[0].gate
    for dtype in (torch.bfloat16, torch.float32):
        native = pf._dequant(w, 0, w.n, dtype).clone()
        lib, pf.lib = pf.lib, None
        try:
            fallback = pf._dequant(w, 0, w.n, dtype).clone()
        finally:
            pf.lib = lib
        assert torch.equal(native, fallback)
    # and the values are MatMulNBits' own: (q - 8) * scale, K permuted back to order
    packed = pf._array(f"model.layers.0.mlp.gate_proj.MatMul.weight_Q4").reshape(w.n, w.blocks, w.block // 2)
    scales = pf._array(f"model.layers.0.mlp.gate_proj.MatMul.weight_scales").reshape(w.n, w.blocks, 1)
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(w.n, w.blocks, w.block).astype(np.float32) - 8
    expect = (q * scales).reshape(w.n, -1)[:, : w.k]
    got = pf._dequant(w, 0, w.n, torch.float32).view(w.n, w.blocks, 2, w.block // 2).transpose(-1, -2).reshape(w.n, -1)[:, : w.k]
    np.testing.assert_array_equal(got.numpy(), expect)


def test_the_kernel_keeps_no_copy_of_the_weights(int4_folder, monkeypatch):
    """Only a tile of rows is ever unpacked: with a 512-element tile, the buffers stay a tile's
    size although the model's weights are many times that (a cache of unpacked weights fails)."""
    monkeypatch.setattr(bf16_prefill, "SCRATCH_ELEMENTS", 512)
    bf, ort = decoders(int4_folder)
    rng = np.random.default_rng(5)
    embeds, feed = bf.embed(rng.integers(0, bf.vocab_size, 110)), rng.integers(0, bf.vocab_size, 2)
    lb, _, sb = prefill_then_decode(bf, embeds, (110,), feed, steps=2)
    lo, _, so = prefill_then_decode(ort, embeds, (110,), feed, steps=2)
    assert cosine(lb, lo) > 0.9999 and all(cosine(a, b) > 0.9999 for a, b in zip(sb, so))
    weights = sum(w.n * w.k for layer in bf.bf16.layers for w in (*layer.qkv, layer.o, layer.gate, layer.up, layer.down))
    held = sum(b.numel() * b.element_size() for b in bf.bf16._buffers.values())
    largest_row = max(w.blocks * w.block for layer in bf.bf16.layers for w in (*layer.qkv, layer.down))
    tile = max(512, largest_row)  # a tile is at least one row
    assert weights > 20 * tile
    assert held <= tile * (2 + 4) + tile  # bf16 + fp32 tiles, packed bytes and scales below a tile more


def test_batched_tokens_equal_alone_with_the_bf16_kernel(int4_folder, reference):
    """The scheduler's rule for every backend: greedy tokens alone = in a batch."""
    from convllava_export.runtime.sampling import SamplingParams
    from convllava_export.runtime.scheduler import generate

    bf, _ = decoders(int4_folder)
    rng = np.random.default_rng(6)
    seqs = [bf.embed(rng.integers(0, bf.vocab_size, n)) for n in (140, 100, 180)]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    alone = [generate(bf, reference.tokenizer, [s], params)[0].token_ids for s in seqs]
    together = [r.token_ids for r in generate(bf, reference.tokenizer, seqs, params)]
    assert together == alone
    assert bf.bf16.tokens == 2 * sum(len(s) for s in seqs)


def test_refusals(conformance_gqa, conformance_decoder, int4_folder, tiny_build):
    from convllava_export.engines.onnxruntime import open_decoder

    with pytest.raises(BuildError, match="int4/int8 gqa graphs"):
        open_decoder(conformance_gqa, prefill="bf16")  # fp32 gqa: stays exact on ORT
    with pytest.raises(BuildError, match="gqa graph"):
        open_decoder(conformance_decoder, prefill="bf16")
    assert open_decoder(int4_folder, prefill="onnxruntime").bf16 is None
    res = CliRunner().invoke(cli, ["run", str(tiny_build), "--prompt", "hi", "--prefill", "bf16", "--max-new-tokens", "2"])
    assert res.exit_code == 2 and "--prefill bf16" in res.output and "Traceback" not in res.output


def test_one_pass_prefills_several_rows_each_as_alone(int4_folder, monkeypatch):
    """prefill_rows shares each unpacked tile between the rows (one unpacking per weight tile for
    the pass) and gives every row the logits and cache it gets alone, bit for bit."""
    bf, _ = decoders(int4_folder)
    pf = bf.bf16
    calls = []
    real = pf._dequant
    monkeypatch.setattr(pf, "_dequant", lambda *a: calls.append(a) or real(*a))
    rng = np.random.default_rng(7)
    chunks = [bf.embed(rng.integers(0, bf.vocab_size, n)) for n in (100, 130, 97)]
    together = bf.new_cache(1 << 28, 4, 512)
    for c in chunks:
        together.open(len(c) + 4)
    logits = bf.prefill_rows(together, chunks)
    per_pass = len(calls)
    for k, c in enumerate(chunks):
        calls.clear()
        alone = bf.new_cache(1 << 28, 4, 512)
        alone.open(len(c) + 4)
        np.testing.assert_array_equal(bf.prefill(alone, c), logits[k])
        assert len(calls) == per_pass  # the pass unpacked each tile once, not once per row
        for a, b in zip(together.arrays, alone.arrays):
            np.testing.assert_array_equal(a[k, :, : len(c)], b[0, :, : len(c)])
    assert together.lengths == [len(c) for c in chunks] and together.pending == 3


def test_bf16_is_closer_to_the_exact_int4_math_than_int8_activations(int4_folder):
    """The accuracy claim: against the int4 model's exact math (the same unpacked weights, fp32
    activations: compute=float32), bf16 activations lose less than MatMulNBits' int8 ones."""
    bf, ort = decoders(int4_folder)
    rng = np.random.default_rng(8)
    gaps = {"bf16": [], "onnxruntime": []}
    for _ in range(3):
        embeds = bf.embed(rng.integers(0, bf.vocab_size, 120))
        bf.bf16.compute = torch.float32
        exact, _, _ = prefill_then_decode(bf, embeds, (120,), [], steps=0)
        bf.bf16.compute = torch.bfloat16
        fast, _, _ = prefill_then_decode(bf, embeds, (120,), [], steps=0)
        int8, _, _ = prefill_then_decode(ort, embeds, (120,), [], steps=0)
        gaps["bf16"].append(np.abs(fast - exact).max())
        gaps["onnxruntime"].append(np.abs(int8 - exact).max())
        assert fast.argmax() == exact.argmax()
    assert max(gaps["bf16"]) < min(gaps["onnxruntime"]), gaps
