"""The generation loop at serving scale: GroupQueryAttention decodes every running row in one ORT
run over shared past/present buffers, admission counts KV bytes, generation stops at the context
on every decoder, and no single request can stop the engine or hurt another."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from convllava_export.errors import ConvLlavaError
from convllava_export.model.reference import TorchDecoder
from convllava_export.runtime.serving_loop import LoopSettings, ServerFault, ServingLoop
from convllava_export.runtime.generation import Timings
from convllava_export.runtime.kv import SlotCache
from convllava_export.runtime.pipeline import Request
from convllava_export.runtime.sampling import SamplingParams
from convllava_export.runtime.scheduler import Job, Scheduler, SchedulerSettings, generate

from conftest import needs, require
from test_engine import Collector, images, pipeline_for, requests

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
needs_genai = needs("onnxruntime_genai", "genai")


def open_gqa(request, fixture: str, kernel: str = "onnxruntime"):
    from convllava_export.engines.onnxruntime import open_decoder

    return open_decoder(request.getfixturevalue(fixture), prefill=kernel)  # ORT's in-place IOBinding path unless asked


def sequences(dec, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, dec.table.shape[1])).astype(np.float32) * 0.5 for n in lengths]


class BindingSpy:
    """An IOBinding that records reads of every output at once (which would copy the whole
    bound KV buffer back each step, as a bug once did)."""

    def __init__(self, io, copies: list) -> None:
        self.io, self.copies = io, copies

    def copy_outputs_to_cpu(self):
        self.copies.append(1)
        return self.io.copy_outputs_to_cpu()

    def __getattr__(self, name):
        return getattr(self.io, name)


class CountingSession:
    """The decoder's ORT session, counting runs (the real session does the work)."""

    def __init__(self, session) -> None:
        self.session, self.runs, self.present_copies = session, [], []

    def io_binding(self):
        return BindingSpy(self.session.io_binding(), self.present_copies)

    def run_with_iobinding(self, io):
        self.runs.append(1)
        return self.session.run_with_iobinding(io.io)

    def __getattr__(self, name):
        return getattr(self.session, name)


def four_rows(dec, reference, seqs, log: list):
    """The four `seqs` through one scheduler (4 rows, 8-position prefill chunks) to the end: the
    scheduler, each job's token ids, what `log` gained in each step that decoded all four rows
    with nothing prefilling, and the cache buffer's addresses in those steps."""
    sched = Scheduler(dec, reference.tokenizer, SchedulerSettings(max_running=4, max_batched_tokens=8, kv_budget_bytes=1 << 30, max_context=512))
    got = [[] for _ in seqs]
    for i, s in enumerate(seqs):
        sched.add(Job(None, GREEDY, lambda ev, i=i: got[i].append(ev), seq=s, index=i))
    pointers, steps = set(), []
    while not sched.idle:
        before, rows, prefilling = len(log), len(sched.running), bool(sched.pending) or bool(sched.queue)
        sched.step()
        if rows == 4 and not prefilling:
            steps.append(log[before:])
            pointers.add(sched.cache.arrays[0].ctypes.data)
    return sched, [[e.token_id for e in g if hasattr(e, "token_id")] for g in got], steps, pointers


@needs_genai
@pytest.mark.parametrize("fixture", ["conformance_gqa", "conformance_gqa_int4", "conformance_gqa_int4_kv8"])
def test_gqa_decodes_all_rows_in_one_run_in_place(fixture, reference, request):
    dec = open_gqa(request, fixture)
    assert dec.dtype == {"conformance_gqa": np.float32, "conformance_gqa_int4": np.float16, "conformance_gqa_int4_kv8": np.int8}[fixture]  # int4: fp16 unless built int8
    seqs = sequences(dec, (5, 17, 9, 30))
    alone = [generate(dec, reference.tokenizer, [s], GREEDY)[0].token_ids for s in seqs]
    counting = CountingSession(dec.session)
    dec.session = counting
    sched, got, steps, pointers = four_rows(dec, reference, seqs, counting.runs)
    decode_runs = [len(c) for c in steps]
    assert got == alone
    assert decode_runs and set(decode_runs) == {1}  # four rows, one ORT run per step
    assert len(pointers) == 1  # the same buffer every step: written in place, never re-made
    assert not counting.present_copies  # only the logits are read back
    assert max(sched.stats.batch_sizes) == 4


@needs_genai
def test_q4_decodes_all_rows_with_one_gemm_per_weight(reference, request):
    """The q4 decoder's step: four rows cost the GEMM calls of one row (each weight read once for
    all of them), the cache buffer is written in place, and greedy tokens equal each row alone."""
    from convllava_export.engines.kernels import dequant_library

    if dequant_library() is None:
        pytest.skip("no C compiler here: the q4 kernel is native only")
    dec = open_gqa(request, "conformance_gqa_int4", "q4")
    seqs = sequences(dec, (5, 17, 9, 30))
    alone = [generate(dec, reference.tokenizer, [s], GREEDY)[0].token_ids for s in seqs]
    calls = []
    real = dec.gemm._linear_q4
    dec.gemm._linear_q4 = lambda hs, w: calls.append(sum(h.shape[0] for h in hs)) or real(hs, w)
    _, got, steps, pointers = four_rows(dec, reference, seqs, calls)
    assert got == alone
    weights = len(dec.gemm.resident)  # one packed weight per call: q, k, v and gate, up fused where they can be
    assert steps and all(len(c) == weights and set(c) == {4} for c in steps)  # one call per packed weight, all four rows in it
    assert len(pointers) == 1


@needs_genai
def test_slot_cache_rows_move_and_memory_is_returned(reference, request):
    dec = open_gqa(request, "conformance_gqa")
    cache = dec.new_cache(budget_bytes=1 << 30, max_rows=8, max_width=4096)
    assert isinstance(cache, SlotCache) and cache.nbytes == 0
    seqs = sequences(dec, (6, 11, 4))
    for s in seqs:
        cache.open(40)
        dec.prefill(cache, s)
        cache.commit()
    rows_before = [cache.row(i) for i in range(3)]
    assert all(r.arrays[0].shape[2] == r.length and r.arrays[0].flags.owndata for r in rows_before)  # compact copies
    cache.drop([0, 2])  # row 1 leaves, row 2 moves into its place
    assert cache.lengths == [6, 4]
    moved = cache.row(1)
    assert all(np.array_equal(a, b) for a, b in zip(moved.arrays, rows_before[2].arrays))
    cache.drop([])
    assert cache.nbytes == 0 and cache.arrays == []  # all given back


def test_kv_budget_admits_what_fits_and_refuses_what_never_can(reference, conformance, request):
    pipe = pipeline_for("dynamo", reference, request)
    reqs = requests(conformance)[:4]
    alone = [r.token_ids for r in (pipe.generate_batch([q], GREEDY)[0] for q in reqs)]
    pb = pipe.decoder.cache_shape.position_bytes
    longest = max(len(pipe.prepare(q, Timings())) for q in reqs) + GREEDY.max_new_tokens  # the most a row reserves
    budget_mb = 2 * longest * pb / (1 << 20)  # room for two rows at a time, not four
    engine = ServingLoop(pipe, LoopSettings(max_running=8, kv_cache_mb=budget_mb))
    cols = [Collector() for _ in reqs]
    for r, c in zip(reqs, cols):
        engine.submit(r, GREEDY, c)
    for c in cols:
        c.wait()
    assert [c.tokens for c in cols] == alone
    assert max(engine.stats.batch_sizes) <= 2 < len(reqs)  # admission held the others back
    too_big = Collector()
    engine.submit(reqs[0], SamplingParams(max_new_tokens=2000, ignore_eos=True), too_big)
    with pytest.raises(ConvLlavaError, match="KV cache"):
        too_big.wait()
    engine.close()


@pytest.mark.parametrize("kind", ["torch", "dynamo", "gqa", "gqa-int4"])
def test_generation_stops_at_the_context(kind, reference, conformance, request):
    if kind.startswith("gqa"):
        require("onnxruntime_genai", "genai")
    pipe = pipeline_for("gqa" if kind.startswith("gqa") else kind, reference, request)
    if kind == "gqa-int4":
        pipe.decoder = open_gqa(request, "conformance_gqa_int4")
    req = Request("Describe it.", [])
    prompt = pipe.prepare(req, Timings())
    pipe.max_context = len(prompt) + 5
    res = pipe.generate([], "Describe it.", SamplingParams(max_new_tokens=100, ignore_eos=True))
    assert res.finish_reason == "length" and len(res.token_ids) == 5  # prompt + answer = the context
    engine = ServingLoop(pipe, LoopSettings(max_running=2))
    c = Collector()
    engine.submit(req, SamplingParams(max_new_tokens=100, ignore_eos=True), c)
    done = c.wait()
    assert done.prompt_tokens + done.completion_tokens == pipe.max_context and c.tokens == res.token_ids
    engine.close()


class PoisonOnLength:
    """A real decoder that returns NaN logits for prompts of one length (a fault inside the model)."""

    def __init__(self, dec, length: int) -> None:
        self.dec, self.length = dec, length
        self.runs_own_loop = False

    def prefill_rows(self, cache, chunks):
        out = self.dec.prefill_rows(cache, chunks)
        n = cache.rows
        return [np.full_like(lg, np.nan) if lg is not None and cache.lengths[n + k] == self.length else lg for k, lg in enumerate(out)]

    def __getattr__(self, name):
        return getattr(self.dec, name)


def test_non_finite_logits_fail_one_request_and_the_engine_goes_on(reference, conformance, request):
    pipe = pipeline_for("dynamo", reference, request)
    reqs = requests(conformance)
    alone = [r.token_ids for r in (pipe.generate_batch([q], GREEDY)[0] for q in reqs[:2])]
    poisoned = len(pipe.prepare(reqs[3], Timings()))
    pipe.decoder = PoisonOnLength(pipe.decoder, poisoned)
    engine = ServingLoop(pipe, LoopSettings(max_running=4))
    bad, ok = Collector(), [Collector(), Collector()]
    engine.submit(reqs[0], GREEDY, ok[0])
    engine.submit(reqs[3], GREEDY, bad)
    engine.submit(reqs[1], GREEDY, ok[1])
    with pytest.raises(ServerFault, match="non-finite"):
        bad.wait()
    for c in ok:
        c.wait()
    assert [c.tokens for c in ok] == alone
    # an extreme temperature samples (no overflow into NaN) instead of killing the thread
    hot = Collector()
    engine.submit(reqs[1], SamplingParams(max_new_tokens=3, temperature=1e-300, seed=1), hot)
    assert hot.wait().completion_tokens == 3 and hot.tokens == alone[1][:3]  # that cold is greedy
    assert engine.healthy
    engine.close()


def test_a_dead_engine_thread_fails_requests_at_once_and_health_is_503(tiny_pipeline):
    from serving_helpers import LiveServer

    from convllava_export.runtime.server import ServerLimits, create_app

    app = create_app(tiny_pipeline, "m", ServerLimits(max_queue=4))
    engine = app.state.backend.serving_loop
    with LiveServer(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        started = threading.Event()
        real_step = engine.scheduler.step

        def boom():
            if engine.scheduler.running:
                started.set()
                raise MemoryError("simulated: the scheduler thread dies")
            real_step()

        engine.scheduler.step = boom
        body = {"messages": [{"role": "user", "content": "Describe it."}], "max_tokens": 50, "ignore_eos": True}
        t0 = time.time()
        res = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert started.is_set() and res.status_code == 500 and time.time() - t0 < 10  # failed, did not hang
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "restart" in health.json()["error"]
        res = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
        assert res.status_code == 503  # later requests fail at once
    assert not any(t.is_alive() for t in engine.threads)  # shutdown closed the engine


def test_out_of_profile_image_fails_only_its_own_request(reference, conformance, request):
    pipe = pipeline_for("dynamo", reference, request, mode="native")
    real = pipe.vision.encode

    def encode(px):  # a vision engine whose profile stops at 500 px
        if max(px.shape[2:]) > 500:
            raise ConvLlavaError(f"image of {px.shape[2]}x{px.shape[3]} is beyond the vision engine's profile")
        return real(px)

    pipe.vision.encode = encode
    im = images(conformance)
    engine = ServingLoop(pipe, LoopSettings(max_running=4))
    cols = [Collector(), Collector(), Collector()]
    jobs = [Job(Request("What is it?", [im[name]]), GREEDY, c) for name, c in zip(["square_256x256", "wide_512x192", "small_100x60"], cols)]
    for j in jobs:
        engine.stats.waiting += 1
    ready = engine._encode(jobs)  # one encoder batch, as the encoder thread would form it
    assert [j.emit for j in ready] == [cols[0], cols[2]]
    with pytest.raises(ConvLlavaError, match="profile"):
        cols[1].wait(timeout=1)
    assert all(v.base is None or v.base.nbytes == v.nbytes for _, v in engine.encoder_cache.values())  # each holds its own image, not a batch
    engine.close()


def test_torch_decoder_cache_shape_matches_its_arrays(reference):
    dec = TorchDecoder(reference)
    logits, kv = dec.extend(np.zeros((3, reference.llm.config.hidden_size), np.float32))
    assert kv.nbytes == 3 * dec.cache_shape.position_bytes


def test_default_kv_budget_is_capped():
    """The default KV budget is the smallest of the rows at full context, half the memory
    available and KV_DEFAULT_MAX_MB (a 7B int4 server stays within 8 GB at 16 clients);
    --kv-cache-mb is taken as given."""
    from convllava_export.runtime.scheduler import KV_DEFAULT_MAX_MB, MB, kv_budget_bytes

    seven_b = 32 * 2 * 8 * 128 * 2 * 4  # layers x (k, v) x kv heads x head dim x fp16, 4x wider heads: 0.5 MB a position
    assert kv_budget_bytes(None, seven_b, 16, 2048) <= KV_DEFAULT_MAX_MB * MB
    assert kv_budget_bytes(None, 1024, 2, 64) == 2 * 64 * 1024  # small: what the rows need
    assert kv_budget_bytes(3000, seven_b, 16, 2048) == 3000 * MB


@needs_genai
def test_one_prefill_pass_takes_several_pending_rows(reference, request):
    """A pass holds the next chunk of pending rows up to max_batched_tokens positions in all, the
    rows join in order, and each request's tokens are the ones it gets alone."""
    dec = open_gqa(request, "conformance_gqa")
    seqs = sequences(dec, (20, 50, 12, 7), seed=3)
    alone = [generate(dec, reference.tokenizer, [s], GREEDY)[0].token_ids for s in seqs]
    passes = []
    real = dec.prefill_rows
    dec.prefill_rows = lambda cache, chunks: passes.append([len(c) for c in chunks]) or real(cache, chunks)
    sched = Scheduler(dec, reference.tokenizer, SchedulerSettings(max_running=4, max_batched_tokens=32, kv_budget_bytes=1 << 30, max_context=512))
    got = [[] for _ in seqs]
    for i, s in enumerate(seqs):
        sched.add(Job(None, GREEDY, lambda ev, i=i: got[i].append(ev), seq=s, index=i))
    while not sched.idle:
        sched.step()
    assert [[e.token_id for e in g if hasattr(e, "token_id")] for g in got] == alone
    # chunks start at multiples of 32 from each row's start; a row joins a pass while it fits
    assert passes == [[20], [32], [18, 12], [7]]
