"""The bf16 prompt kernel of int4 gqa builds (engines/native_llm.py): the same numbers as ONNX
Runtime's prefill within bf16 rounding, the same cache layout (ORT decodes on from it), the same
tokens alone and in a batch, one dequantization (native or torch), and no copy of the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import require

from convllava_export.cli import cli
from convllava_export.engines import native_llm
from convllava_export.errors import BuildError


@pytest.fixture(scope="module")
def int4_folder(request):
    require("onnxruntime_genai", "genai")
    return request.getfixturevalue("conformance_gqa_int4")


KERNELS = ("bf16", "int8", "q4")
# cosine of the last logits / decode steps against ORT's own prefill: bf16 rounding, int8 (one
# activation scale per position; ORT's is per block of 32) a little more, q4 (int8 activations
# per block, as ORT's) about as close as bf16
AGREE = {"bf16": 0.9999, "int8": 0.999, "q4": 0.9999}
UNPACK = {"bf16": "_dequant", "int8": "_quant_i8", "q4": "_linear_q4"}  # what reads a weight tile (q4: resident, one GEMM a weight)


def decoders(folder, kernel="bf16"):
    from convllava_export.engines.kernels import dequant_library
    from convllava_export.engines.onnxruntime import open_decoder

    if kernel == "q4" and dequant_library() is None:
        pytest.skip("no C compiler here: the q4 kernel is native only (bf16/int8 have torch fallbacks)")

    return open_decoder(folder, prefill=kernel), open_decoder(folder, prefill="onnxruntime")


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


def exact_and_kernel(dec, embeds):
    """The last prefill logits of `embeds` from the int4 model's exact math (the same unpacked
    weights, fp32 activations: compute=float32), then from the decoder's own GEMM kernel."""
    kernel = dec.gemm.compute
    dec.gemm.compute = torch.float32
    try:
        exact, _, _ = prefill_then_decode(dec, embeds, (len(embeds),), [], steps=0)
    finally:
        dec.gemm.compute = kernel
    fast, _, _ = prefill_then_decode(dec, embeds, (len(embeds),), [], steps=0)
    return exact, fast


def cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunks", [(130,), (100, 30)], ids=["one-chunk", "two-chunks"])
def test_native_llm_matches_onnxruntime(int4_folder, chunks, kernel):
    bf, ort = decoders(int4_folder, kernel)
    assert bf.prefill_kernel == kernel and ort.prefill_kernel == "onnxruntime"
    bf.gemm_min_tokens = min(chunks)  # the second chunk too: attention over the cached positions
    rng = np.random.default_rng(3)
    embeds = bf.embed(rng.integers(0, bf.vocab_size, sum(chunks)))
    feed = rng.integers(0, bf.vocab_size, 3)
    lb, cb, sb = prefill_then_decode(bf, embeds, chunks, feed)
    lo, co, so = prefill_then_decode(ort, embeds, chunks, feed)
    assert bf.gemm.tokens == sum(chunks)  # the GEMM kernel ran every prompt position
    assert cosine(lb, lo) > AGREE[kernel] and lb.argmax() == lo.argmax()
    # ORT decodes on from the kernel's cache as from its own (a key written unrotated, or at
    # another position, drops these to ~0.9)
    assert all(cosine(a, b) > AGREE[kernel] for a, b in zip(sb, so))
    n = sum(chunks)
    for a, b in zip(cb.arrays, co.arrays):  # keys after rotary, values: where GroupQueryAttention puts them
        a, b = a[0, :, :n].astype(np.float32), b[0, :, :n].astype(np.float32)
        assert np.abs(a - b).max() <= 0.03 * np.abs(b).max()


def test_short_chunks_stay_on_onnxruntime(int4_folder):
    bf, _ = decoders(int4_folder)
    embeds = bf.embed(np.arange(bf.gemm_min_tokens - 1))
    prefill_then_decode(bf, embeds, (len(embeds),), [1], steps=1)
    assert bf.gemm.tokens == 0


def test_extend_takes_the_same_kernel_as_prefill(int4_folder):
    """validate's teacher forcing (extend) measures what serving runs."""
    bf, _ = decoders(int4_folder)
    embeds = bf.embed(np.random.default_rng(4).integers(0, bf.vocab_size, 120))
    logits, kv = bf.extend(embeds[:100])
    logits2, kv2 = bf.extend(embeds[100:], kv)
    via_cache, cache, _ = prefill_then_decode(bf, embeds, (100, 20), [], steps=0)
    assert bf.gemm.tokens == 100 + 100  # the 20-position chunks went to ORT both times
    np.testing.assert_array_equal(logits2, via_cache)
    np.testing.assert_array_equal(kv2.arrays[0][0], cache.arrays[0][0, :, :120])


def test_native_and_torch_dequantization_agree_bit_for_bit(int4_folder):
    bf, _ = decoders(int4_folder)
    pf = bf.gemm
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


@pytest.mark.parametrize("kernel", ("bf16", "int8"))
def test_the_kernel_keeps_no_copy_of_the_weights(int4_folder, monkeypatch, kernel):
    """Only a tile of rows is ever unpacked: with a 512-element tile, the buffers stay a tile's
    size although the model's weights are many times that (a cache of unpacked weights fails)."""
    monkeypatch.setattr(native_llm, "SCRATCH_ELEMENTS", 512)
    bf, ort = decoders(int4_folder, kernel)
    rng = np.random.default_rng(5)
    embeds, feed = bf.embed(rng.integers(0, bf.vocab_size, 110)), rng.integers(0, bf.vocab_size, 2)
    lb, _, sb = prefill_then_decode(bf, embeds, (110,), feed, steps=2)
    lo, _, so = prefill_then_decode(ort, embeds, (110,), feed, steps=2)
    assert cosine(lb, lo) > AGREE[kernel] and all(cosine(a, b) > AGREE[kernel] for a, b in zip(sb, so))
    weights = sum(w.n * w.k for layer in bf.gemm.layers for w in (*layer.qkv, layer.o, layer.gate, layer.up, layer.down))
    held = sum(b.numel() * b.element_size() for b in bf.gemm._buffers.values())
    largest_row = max(w.blocks * w.block for layer in bf.gemm.layers for w in (*layer.qkv, layer.down))
    tile = max(512, largest_row)  # a tile is at least one row
    assert weights > 20 * tile
    assert held <= tile * (2 + 4) + tile  # bf16 + fp32 (or int8) tiles, packed bytes and scales below a tile more


@pytest.mark.parametrize("kernel", KERNELS)
def test_batched_tokens_equal_alone_with_the_gemm_kernel(int4_folder, reference, kernel):
    """The scheduler's rule for every backend: greedy tokens alone = in a batch."""
    from convllava_export.runtime.sampling import SamplingParams
    from convllava_export.runtime.scheduler import generate

    bf, _ = decoders(int4_folder, kernel)
    rng = np.random.default_rng(6)
    seqs = [bf.embed(rng.integers(0, bf.vocab_size, n)) for n in (140, 100, 180)]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    alone = [generate(bf, reference.tokenizer, [s], params)[0].token_ids for s in seqs]
    together = [r.token_ids for r in generate(bf, reference.tokenizer, seqs, params)]
    assert together == alone
    assert bf.gemm.tokens == 2 * sum(len(s) for s in seqs)


def test_refusals(conformance_gqa, conformance_decoder, int4_folder, tiny_build):
    from convllava_export.engines.onnxruntime import open_decoder

    with pytest.raises(BuildError, match="int4/int8 gqa graphs"):
        open_decoder(conformance_gqa, prefill="bf16")  # fp32 gqa: stays exact on ORT
    with pytest.raises(BuildError, match="gqa graph"):
        open_decoder(conformance_decoder, prefill="bf16")
    assert open_decoder(int4_folder, prefill="onnxruntime").gemm is None
    res = CliRunner().invoke(cli, ["run", str(tiny_build), "--prompt", "hi", "--prefill", "bf16", "--max-new-tokens", "2"])  # the old name
    assert res.exit_code == 2 and "--llm-kernel bf16" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["run", str(tiny_build), "--prompt", "hi", "--llm-kernel", "q4", "--max-new-tokens", "2"])
    assert res.exit_code == 2 and "--llm-kernel q4" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("kernel", KERNELS)
def test_one_pass_prefills_several_rows_each_as_alone(int4_folder, monkeypatch, kernel):
    """prefill_rows shares each unpacked tile between the rows (one unpacking per weight tile for
    the pass) and gives every row the logits and cache it gets alone, bit for bit."""
    bf, _ = decoders(int4_folder, kernel)
    pf = bf.gemm
    calls = []
    unpack = UNPACK[kernel]
    real = getattr(pf, unpack)
    monkeypatch.setattr(pf, unpack, lambda *a: calls.append(a) or real(*a))
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
        assert len(calls) == per_pass > 0  # the pass unpacked each tile once, not once per row
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
        exact, fast = exact_and_kernel(bf, embeds)
        int8, _, _ = prefill_then_decode(ort, embeds, (120,), [], steps=0)
        gaps["bf16"].append(np.abs(fast - exact).max())
        gaps["onnxruntime"].append(np.abs(int8 - exact).max())
        assert fast.argmax() == exact.argmax()
    assert max(gaps["bf16"]) < min(gaps["onnxruntime"]), gaps


def test_int8_unpacking_native_and_torch_agree_bit_for_bit(int4_folder):
    """The C requantization (quant_i8) and its torch fallback give the same int8 rows and scales,
    and rows · scale stay within half an int8 step of the exact int4 weights."""
    pf = decoders(int4_folder, "int8")[0].gemm
    if pf.lib is None:
        pytest.skip("no C compiler here: only the torch requantization exists to compare")
    w = pf.layers[0].down
    native = [t.clone() for t in pf._quant_i8(w, 0, w.n)]
    lib, pf.lib = pf.lib, None
    try:
        fallback = [t.clone() for t in pf._quant_i8(w, 0, w.n)]
    finally:
        pf.lib = lib
    assert torch.equal(native[0], fallback[0]) and torch.equal(native[1], fallback[1])
    exact = pf._dequant(w, 0, w.n, torch.float32)
    step = native[1][:, None]
    assert (native[0].float() * step - exact).abs().le(0.5 * step + 1e-7).all()
    assert native[0].abs().max() <= 127 and native[0].abs().amax(1).ge(100).all()  # the range is used
    # activations: high and low rows, the same in C and torch, and ~15 bits of each value
    h = torch.randn(37, 4096, generator=torch.Generator().manual_seed(2)) * 3
    a8, sa, _, _ = pf._quant_activations(h)
    pf.lib = None
    try:
        b8, sb, _, _ = pf._quant_activations(h)
    finally:
        pf.lib = lib
    assert torch.equal(a8, b8) and torch.equal(sa, sb)
    back = a8[:37].float() * sa[:37, None] + a8[37:].float() * sa[37:, None]
    assert (back - h).abs().max() <= 0.5 * sa[37:].max() + 1e-6


def test_int8_keeps_outlier_columns_in_fp32(int4_folder, monkeypatch):
    """A real 7B model's activations have a few channels ~50x the rest; one int8 scale per position
    would flatten every other value of the row. Those columns go through fp32: the error against
    the exact int4 math stays small with them, and grows tenfold when the decomposition is off."""
    pf = decoders(int4_folder, "int8")[0].gemm
    w = pf.layers[0].gate
    h = torch.randn(64, w.k, generator=torch.Generator().manual_seed(9))
    h[:, [3, 17]] *= 60
    pf.compute = torch.float32
    exact = pf.linear([h], w)[0]
    rest = pf.linear([h.index_fill(1, torch.tensor([3, 17]), 0.0)], w)[0]  # what the other columns add
    pf.compute = torch.int8

    def err():  # relative to the other columns' part, which the flattening spoils
        got = pf.linear([h], w)[0]
        return float((got - exact).norm() / rest.norm())

    kept = err()
    assert len(pf._quant_activations(pf._permute(h, w))[2]) == 2  # those two columns, not the zero padding of K
    assert len(pf._quant_activations(pf._permute(torch.randn(64, w.k), w))[2]) == 0  # and none in plain data
    monkeypatch.setattr(native_llm, "OUTLIER_RATIO", float("inf"))
    flattened = err()
    assert kept < 0.02 and flattened > 10 * kept, (kept, flattened)


def test_int8_is_close_to_the_exact_int4_math(int4_folder):
    """The accuracy the int8 kernel trades for speed, on whole prompts: the last logits against
    the int4 model's exact math (compute=float32) keep their top token and a cosine > 0.999."""
    bf, _ = decoders(int4_folder, "int8")
    rng = np.random.default_rng(8)
    for _ in range(3):
        exact, fast = exact_and_kernel(bf, bf.embed(rng.integers(0, bf.vocab_size, 120)))
        assert fast.argmax() == exact.argmax() and cosine(fast, exact) > 0.999


@pytest.mark.parametrize(
    "flags, native, kernel",
    [({"amx_bf16", "avx512_vnni", "avx512bw"}, True, "bf16"), ({"avx512_vnni", "avx512bw"}, True, "q4"), ({"avx512_vnni", "avx512bw"}, False, None), ({"avx2", "fma"}, True, None)],
)
def test_auto_picks_the_kernel_of_the_cpu(monkeypatch, flags, native, kernel):
    monkeypatch.setattr(native_llm, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(native_llm, "_q4_native", lambda: native)
    assert native_llm.cpu_prefill_kernel() == kernel


def test_q4_vnni_and_reference_agree_bit_for_bit():
    """gemm_q4's VNNI tiles (8 rows x 32 columns, and every tail: 1-7 rows, one group, a partial
    group) give the plain reference's bits, and both the int4 math within int8 activation
    rounding. On a CPU without AVX-512 VNNI both are the reference (q4_vnni() says which)."""
    from convllava_export.engines.kernels import dequant_library

    lib = dequant_library()
    if lib is None:
        pytest.skip("no C compiler here: the q4 kernel is native only")
    rng = np.random.default_rng(11)
    n, blocks, block = 40, 3, 32  # 2 full groups + 8 columns
    kp = blocks * block
    q = rng.integers(0, 16, size=(n, kp), dtype=np.uint8)
    packed = np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4))
    scales = rng.uniform(0.01, 0.1, size=(n, blocks)).astype(np.float32)
    wq = np.zeros((3, kp // 8, 16), np.uint32)
    ws = np.zeros((3, blocks, 16), np.float32)
    lib.pack_q4(packed.ctypes.data, scales.ctypes.data, wq.ctypes.data, ws.ctypes.data, n, blocks, block)
    exact_w = (q.astype(np.float64) - 8) * np.repeat(scales, block, axis=1)
    for m in (1, 5, 8, 13, 70):
        h = rng.standard_normal((m, kp)).astype(np.float32)
        aq = np.zeros((-(-m // 8) * 8, kp), np.int8)
        sa, za = np.empty((m, blocks), np.float32), np.empty((m, blocks), np.int32)
        lib.quant_act_q4(h.ctypes.data, kp, aq.ctypes.data, sa.ctypes.data, za.ctypes.data, 0, m, block)
        fast, ref = np.full((m, n), np.nan, np.float32), np.full((m, n), np.nan, np.float32)
        lib.gemm_q4(aq.ctypes.data, sa.ctypes.data, za.ctypes.data, m, wq.ctypes.data, ws.ctypes.data, 0, 3, blocks, block, fast.ctypes.data, n, n, 64)
        lib.gemm_q4_ref(aq.ctypes.data, sa.ctypes.data, za.ctypes.data, m, wq.ctypes.data, ws.ctypes.data, 0, 3, blocks, block, ref.ctypes.data, n, n)
        np.testing.assert_array_equal(fast, ref)
        exact = h.astype(np.float64) @ exact_w.T
        assert np.abs(fast - exact).max() < 0.02 * np.abs(exact).max(), m
    # a NaN or inf poisons its own row only (NaN out, as the exact math gives), the rest unchanged
    bad = h.copy()
    bad[2, 7], bad[5, 40] = np.nan, np.inf
    lib.quant_act_q4(bad.ctypes.data, kp, aq.ctypes.data, sa.ctypes.data, za.ctypes.data, 0, m, block)
    poisoned = np.zeros((m, n), np.float32)
    lib.gemm_q4(aq.ctypes.data, sa.ctypes.data, za.ctypes.data, m, wq.ctypes.data, ws.ctypes.data, 0, 3, blocks, block, poisoned.ctypes.data, n, n, 64)
    rows = np.isnan(poisoned).all(axis=1)
    assert rows[[2, 5]].all() and rows.sum() == 2
    np.testing.assert_array_equal(np.delete(poisoned, [2, 5], 0), np.delete(fast, [2, 5], 0))


def test_q4_is_close_to_the_exact_int4_math(int4_folder):
    """q4's trade (int8 activations per block of K, as MatMulNBits' accuracy level 4) on whole
    prompts: the last logits against the int4 model's exact math keep their top token, cosine > 0.9999."""
    dec, _ = decoders(int4_folder, "q4")
    rng = np.random.default_rng(8)
    for _ in range(3):
        exact, fast = exact_and_kernel(dec, dec.embed(rng.integers(0, dec.vocab_size, 120)))
        assert fast.argmax() == exact.argmax() and cosine(fast, exact) > 0.9999


def test_the_q4_decoder_holds_one_packed_copy_and_no_onnxruntime_session(int4_folder):
    """Q4GqaDecoder's memory: no ORT session (whose prepacked weights would be a second copy),
    the packed weights once (int4 bytes + fp32 block scales, whole groups of 16 columns), no tile buffers."""
    dec = decoders(int4_folder, "q4")[0]
    assert dec.session is None and dec.prefill_kernel == "q4"
    pf = dec.gemm
    expect = sum(-(-w.n // 16) * 16 * w.blocks * (w.block // 2 + 4) for w in pf._weights())
    held = sum(t.numel() * t.element_size() for pair in pf.resident.values() for t in pair)
    assert held == expect
    assert not pf._buffers
    # q, k, v and gate, up packed side by side where their columns fill whole groups
    fused = sum(len(k) for k in pf.fused)
    assert len(pf.resident) == len(pf._weights()) - fused + len(pf.fused)
    assert len(pf.fused) == sum(pf._fusable(layer.qkv) + pf._fusable((layer.gate, layer.up)) for layer in pf.layers) > 0


def test_attend_i8_reads_the_int8_cache_as_dequantized_attention_does():
    """attend_i8 (q4 decode over an int8 cache): the attention of the dequantized cache, per row to
    its own length, grouped heads mapped as GroupQueryAttention maps them; a row's output the
    same bits alone or beside others; a NaN query poisons its own row and head only."""
    from convllava_export.engines.kernels import dequant_library

    lib = dequant_library()
    if lib is None:
        pytest.skip("no C compiler here: the kernel is native only")
    rng = np.random.default_rng(5)
    slots, nh, kvh, cap, hd, scale = 3, 4, 2, 40, 32, 0.17
    kc = rng.integers(-127, 128, size=(slots, kvh, cap, hd), dtype=np.int8)
    vc = rng.integers(-127, 128, size=(slots, kvh, cap, hd), dtype=np.int8)
    ks, vs = rng.uniform(0.01, 0.1, (kvh, hd)).astype(np.float32), rng.uniform(0.01, 0.1, (kvh, hd)).astype(np.float32)
    q = rng.standard_normal((slots, nh, hd)).astype(np.float32)
    lens = np.array([5, 39, 17], dtype=np.int64)  # positions 0..len attended

    def attend(q, lens, n):
        out = np.full((n, nh, hd), np.nan, np.float32)
        scratch = np.empty(cap + 2 * hd, np.float32)
        lib.attend_i8(q.ctypes.data, kc.ctypes.data, vc.ctypes.data, ks.ctypes.data, vs.ctypes.data, lens.ctypes.data, nh, kvh, cap, hd, scale, out.ctypes.data, scratch.ctypes.data, 0, n * nh)
        return out

    got = attend(q, lens, slots)
    for r in range(slots):
        keys = kc[r, :, : lens[r] + 1].astype(np.float64) * ks[:, None]
        values = vc[r, :, : lens[r] + 1].astype(np.float64) * vs[:, None]
        for h in range(nh):
            g = h // (nh // kvh)
            s = scale * keys[g] @ q[r, h]
            p = np.exp(s - s.max())
            want = (p / p.sum()) @ values[g]
            np.testing.assert_allclose(got[r, h], want, rtol=2e-4, atol=1e-5)
    first = attend(np.ascontiguousarray(q[:1]), lens[:1], 1)  # row 0 alone: slot 0, the same bits
    np.testing.assert_array_equal(first[0], got[0])
    bad = q.copy()
    bad[1, 2, 3] = np.nan
    poisoned = attend(bad, lens, slots)
    assert np.isnan(poisoned[1, 2]).all() and np.isfinite(np.delete(poisoned.reshape(-1, hd), [1 * nh + 2], 0)).all()
