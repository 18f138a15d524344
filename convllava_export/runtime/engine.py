"""The serving engine: in-flight batching over explicit KV caches, an image-embedding cache and
prefix reuse, for one Pipeline.

    submit() ─► waiting ─► encoder thread ─► ready ─► scheduler thread ─► events (emit callback)
                (bounded)   decode + preprocess  (≤ max_running   admit, prefill in chunks,
                            images, encoder cache, prepared)      one batched decode step,
                            vision engine, splice                 retire each sequence alone

The scheduler owns every cache (kv.py); decoders are pure functions over them. Between two decode
steps it admits ready requests (their prefill reuses the longest cached prefix and runs in
chunks of at most `max_batched_tokens`, so running streams keep flowing), decodes every running
sequence in one forward, and retires each sequence on its own (eos, stop string, length, or its
client gone). A request's events end with `Finished` (usage and timings) or an exception.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConvLlavaError
from ..preprocess import visual_tokens
from ..prompt import IMAGE_TOKEN_INDEX
from .generation import NO_TOKEN, SequenceState, Timings, TokenEvent, is_generator, stream_generated
from .kv import SeqKV
from .pipeline import Pipeline, Request
from .sampling import SamplingParams

log = logging.getLogger("convllava_export.engine")


@dataclass(frozen=True)
class EngineSettings:
    max_running: int = 32  # sequences decoded together
    max_waiting: int = 64  # submitted but not yet running; QueueFull beyond
    max_batched_tokens: int = 256  # prefill chunk: the most a decode step waits for a prefill
    encoder_cache_mb: float = 512.0  # image embeddings kept, LRU (a 576-token 4096-wide image is 9 MB)
    prefix_cache_mb: float = 1024.0  # KV caches of finished sequences kept for prefix reuse, LRU

    def validate(self) -> None:
        if self.max_running < 1 or self.max_waiting < 0 or self.max_batched_tokens < 1:
            raise ConvLlavaError("engine settings: max_running and max_batched_tokens must be >= 1, max_waiting >= 0")
        if self.encoder_cache_mb < 0 or self.prefix_cache_mb < 0:
            raise ConvLlavaError("engine settings: cache sizes must be >= 0 MB")


@dataclass
class Finished:
    """The last event of a request: usage and timings."""

    timings: Timings
    completion_tokens: int
    prompt_tokens: int
    cached_prompt_tokens: int = 0


class QueueFull(ConvLlavaError):
    """More requests are waiting than the engine admits."""


@dataclass
class Job:
    """One request inside the engine."""

    request: Request
    params: SamplingParams
    emit: Callable[[Any], None]  # TokenEvent, Finished, or an exception; called from engine threads
    pixels: Callable[[], Sequence[np.ndarray]] | None = None  # decoded off the caller's thread
    image_embeds: Sequence[np.ndarray] | None = None  # encoded elsewhere (a Ray vision replica)
    timings: Timings = field(default_factory=Timings)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    seq: np.ndarray | None = None  # spliced embeddings [S, H]
    keys: np.ndarray | None = None  # one key per position: token id, or an image row's key (< 0)


class Handle:
    def __init__(self, job: Job) -> None:
        self._job = job

    def cancel(self) -> None:
        """The client went away: the sequence is dropped at the next step and its cache freed."""
        self._job.cancelled.set()


class LruBytes:
    """An LRU map bounded by the bytes of its values."""

    def __init__(self, budget_bytes: float) -> None:
        self.budget = budget_bytes
        self.items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            hit = self.items.get(key)
            if hit is None:
                return None
            self.items.move_to_end(key)
            return hit[0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        if nbytes > self.budget:
            return
        with self.lock:
            if key in self.items:
                self.bytes -= self.items.pop(key)[1]
            self.items[key] = (value, nbytes)
            self.bytes += nbytes
            while self.bytes > self.budget:
                self.bytes -= self.items.popitem(last=False)[1][1]

    def values(self) -> list[tuple[Any, Any]]:
        with self.lock:
            return [(k, v) for k, (v, _) in self.items.items()]

    def touch(self, key: Any) -> None:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)


def image_key(pixels: np.ndarray) -> bytes:
    """Content hash of preprocessed pixels (shape included): the encoder cache's key."""
    h = hashlib.sha256(str(pixels.shape).encode())
    h.update(np.ascontiguousarray(pixels).data)
    return h.digest()


def position_keys(ids: Sequence[int], image_hashes: Sequence[bytes], image_rows: Sequence[int]) -> np.ndarray:
    """One int64 per embedding position: the token id, or for image rows a negative key derived
    from the image's hash and the row, so two prompts share a prefix exactly when their
    positions hold the same tokens and the same image rows."""
    out: list[np.ndarray] = []
    k = 0
    for t in ids:
        if t == IMAGE_TOKEN_INDEX:
            base = int.from_bytes(image_hashes[k][:6], "little") << 12
            out.append(-1 - (base + np.arange(image_rows[k], dtype=np.int64)))
            k += 1
        else:
            out.append(np.array([t], dtype=np.int64))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class PrefixCache:
    """KV caches of finished sequences, keyed by their positions' keys; a new request reuses the
    longest shared prefix (system prompt + image rows + earlier turns)."""

    def __init__(self, budget_bytes: float) -> None:
        self.lru = LruBytes(budget_bytes)
        self.counter = 0

    def lookup(self, keys: np.ndarray) -> tuple[int, SeqKV | None]:
        best, best_id, best_kv = 0, None, None
        for entry_id, (entry_keys, kv) in self.lru.values():
            n = min(len(entry_keys), len(keys) - 1, kv.length)  # leave one position to compute logits from
            if n <= best:
                continue
            diff = np.flatnonzero(entry_keys[:n] != keys[:n])
            m = int(diff[0]) if len(diff) else n
            if m > best:
                best, best_id, best_kv = m, entry_id, kv
        if best_kv is None:
            return 0, None
        self.lru.touch(best_id)
        return best, best_kv.prefix(best)

    def store(self, keys: np.ndarray, kv: SeqKV) -> None:
        self.counter += 1
        self.lru.put(self.counter, (keys[: kv.length].copy(), kv), kv.nbytes + keys.nbytes)


@dataclass
class EngineStats:
    """Counters read by /metrics (plain ints: the scheduler thread writes, readers tolerate a stale value)."""

    running: int = 0
    waiting: int = 0
    decode_steps: int = 0
    decoded_rows: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # decode steps by rows decoded together
    encoder_hits: int = 0
    encoder_misses: int = 0
    prefix_hit_tokens: int = 0
    prompt_tokens: int = 0


@dataclass
class _Prefill:
    job: Job
    done: int  # positions in the cache so far (a reused prefix counts)
    kv: SeqKV | None
    cached: int  # positions reused from the prefix cache


@dataclass
class _Running:
    job: Job
    state: SequenceState
    prompt_tokens: int
    cached_tokens: int
    fed: list[int] = field(default_factory=list)  # generated tokens already in the cache


class Engine:
    def __init__(self, pipeline: Pipeline, settings: EngineSettings | None = None) -> None:
        self.pipeline = pipeline
        self.settings = settings or EngineSettings()
        self.settings.validate()
        self.decoder = pipeline.decoder
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.ready: queue.Queue[Job] = queue.Queue(maxsize=self.settings.max_running)
        self.encoder_cache = LruBytes(self.settings.encoder_cache_mb * (1 << 20))
        self.prefix_cache = PrefixCache(self.settings.prefix_cache_mb * (1 << 20))
        self.stats = EngineStats()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._guard, args=(self._encoder_loop,), name="convllava-encoder", daemon=True),
            threading.Thread(target=self._guard, args=(self._scheduler_loop,), name="convllava-scheduler", daemon=True),
        ]
        for t in self.threads:
            t.start()

    # -- API --------------------------------------------------------------------------------
    def submit(
        self,
        request: Request,
        params: SamplingParams,
        emit: Callable[[Any], None],
        pixels: Callable[[], Sequence[np.ndarray]] | None = None,
        image_embeds: Sequence[np.ndarray] | None = None,
        timings: Timings | None = None,
    ) -> Handle:
        """Queue a request; its events go to `emit`. `pixels` produces the preprocessed images
        (called on the encoder thread, so decoding happens off the caller's thread and only
        for admitted requests); without it `request.images` are used."""
        params.validate()
        with self.lock:
            if self.stats.waiting >= self.settings.max_waiting + self.settings.max_running:
                raise QueueFull(f"{self.stats.waiting} requests are waiting (limit {self.settings.max_waiting}); retry later")
            self.stats.waiting += 1
        job = Job(request, params, emit, pixels, image_embeds, timings or Timings())
        self.waiting.put(job)
        return Handle(job)

    def close(self) -> None:
        self.stopping.set()
        self.waiting.put(None)  # type: ignore[arg-type]

    # -- encoder stage ----------------------------------------------------------------------
    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except Exception:  # noqa: BLE001 - a dead engine thread must be loud
            log.exception("engine thread %s died", threading.current_thread().name)
            raise

    def _leave_queue(self) -> None:
        with self.lock:
            self.stats.waiting -= 1

    def _fail(self, job: Job, exc: BaseException) -> None:
        self._leave_queue()
        job.emit(exc)

    def _encoder_loop(self) -> None:
        while not self.stopping.is_set():
            first = self.waiting.get()
            if first is None:
                return
            jobs = [first]
            while len(jobs) < self.settings.max_running:  # whatever else is waiting now: encoded together
                try:
                    nxt = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.stopping.set()
                    break
                jobs.append(nxt)
            for job in jobs:
                if job.cancelled.is_set():  # its client left while it waited
                    self._fail(job, ConvLlavaError("cancelled"))
            for job in self._encode([j for j in jobs if not j.cancelled.is_set()]):
                self.ready.put(job)  # blocks while max_running requests are prepared: bounded memory

    def _encode(self, jobs: list[Job]) -> list[Job]:
        """Plan every job (context checked before encoding), encode the images no cache holds,
        images of one shape in one vision run, then splice. Returns the jobs that are ready."""
        pipe = self.pipeline
        planned: list[tuple[Job, list[int], list[np.ndarray], list[bytes]]] = []
        for job in jobs:
            try:
                t0 = time.perf_counter()
                job.timings.queued_s = t0 - job.submitted
                if job.image_embeds is not None:
                    pixels: list[np.ndarray] = []
                    rows = [len(e) for e in job.image_embeds]
                    hashes = [image_key(np.asarray(e)) for e in job.image_embeds]
                else:
                    pixels = list(job.pixels() if job.pixels is not None else pipe.pixel_values(job.request.images))
                    rows = [visual_tokens(p.shape[1], p.shape[2]) for p in pixels]
                    hashes = [image_key(p) for p in pixels]
                job.timings.preprocess_s += time.perf_counter() - t0
                planned.append((job, pipe.plan(job.request, rows), pixels, hashes))
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                self._fail(job, exc)
        known: dict[bytes, np.ndarray] = {}  # embeddings by image hash, held here for this batch
        misses: dict[bytes, np.ndarray] = {}
        for _, _, pixels, hashes in planned:
            for p, h in zip(pixels, hashes):
                if h not in known and h not in misses:
                    cached = self.encoder_cache.get(h)
                    if cached is None:
                        misses[h] = p
                        self.stats.encoder_misses += 1
                        continue
                    known[h] = cached
                self.stats.encoder_hits += 1
        if misses:
            t0 = time.perf_counter()
            try:
                embeds = pipe.encode_pixels(list(misses.values()), Timings())
            except Exception as exc:  # noqa: BLE001
                for job, *_ in planned:
                    self._fail(job, exc)
                return []
            for h, e in zip(misses, embeds):
                known[h] = e
                self.encoder_cache.put(h, e, e.nbytes)
            encoded_s = time.perf_counter() - t0
        ready = []
        for job, ids, pixels, hashes in planned:
            if misses:
                job.timings.vision_s += encoded_s
            if job.image_embeds is not None:
                embeds = list(job.image_embeds)
            else:
                embeds = [known[h] for h in hashes]
            job.seq = pipe.splice(ids, embeds)  # embeddings, or a TablePrompt for a Generator
            job.keys = position_keys(ids, hashes, [len(e) for e in embeds])
            if is_generator(self.decoder):
                try:
                    self.decoder.check(job.seq)  # beyond the engine's shapes: this request fails, not its batch
                except Exception as exc:  # noqa: BLE001
                    self._fail(job, exc)
                    continue
            ready.append(job)
        return ready

    # -- scheduler --------------------------------------------------------------------------
    def _admit(self, running: list[_Running], prefilling: list[_Prefill], block: bool) -> None:
        while len(running) + len(prefilling) < self.settings.max_running:
            try:
                job = self.ready.get(timeout=0.05) if block and not running and not prefilling else self.ready.get_nowait()
            except queue.Empty:
                return
            self._leave_queue()
            if job.cancelled.is_set():
                continue
            cached, kv = self.prefix_cache.lookup(job.keys)
            self.stats.prefix_hit_tokens += cached
            self.stats.prompt_tokens += len(job.seq)
            prefilling.append(_Prefill(job, cached, kv, cached))

    def _generator_loop(self) -> None:
        """For an LLM that runs its own loop (TensorRT-LLM): static batches. The ready requests
        with the same sampling settings go to the engine together and run to their end (each
        stops on its own eos, stop string or max_tokens here); the next batch starts then."""
        tokenizer = self.pipeline.tokenizer
        while not self.stopping.is_set():
            jobs: list[Job] = []
            while len(jobs) < self.settings.max_running:
                try:
                    jobs.append(self.ready.get(timeout=0.05) if not jobs else self.ready.get_nowait())
                except queue.Empty:
                    break
            for job in jobs:
                self._leave_queue()
            groups: dict[tuple[Any, ...], list[Job]] = {}
            for job in jobs:
                if not job.cancelled.is_set():
                    p = job.params
                    groups.setdefault((p.temperature, p.top_p, p.seed, p.ignore_eos), []).append(job)
            for group in groups.values():
                self._generate_group(group, tokenizer)

    def _generate_group(self, group: list[Job], tokenizer: Any) -> None:
        counts = [0] * len(group)
        live = set(range(len(group)))
        events = stream_generated(self.decoder, tokenizer, [j.seq for j in group], [j.params for j in group], [j.timings for j in group])
        self.stats.running = len(group)
        self.stats.prompt_tokens += sum(j.seq.length for j in group)
        try:
            for ev in events:
                job = group[ev.index]
                counts[ev.index] += ev.token_id != NO_TOKEN
                job.emit(ev)
                if ev.finish_reason is not None:
                    job.emit(Finished(job.timings, counts[ev.index], job.seq.length))
                    live.discard(ev.index)
                if all(group[i].cancelled.is_set() for i in live):  # every client still waiting has gone
                    break
        except Exception as exc:  # noqa: BLE001 - the engine failed this batch; the server goes on
            for i in live:
                group[i].emit(exc)
        finally:
            events.close()
            self.stats.running = 0
        self.stats.decode_steps += 1
        self.stats.batch_sizes[len(group)] = self.stats.batch_sizes.get(len(group), 0) + 1

    def _scheduler_loop(self) -> None:
        if is_generator(self.decoder):
            return self._generator_loop()
        dec = self.decoder
        batch = dec.new_batch()
        running: list[_Running] = []
        prefilling: list[_Prefill] = []
        while not self.stopping.is_set():
            self._admit(running, prefilling, block=True)
            if prefilling:  # one prefill chunk, oldest admitted first
                p = prefilling[0]
                if p.job.cancelled.is_set():
                    prefilling.pop(0)
                    continue
                end = min(len(p.job.seq), p.done + self.settings.max_batched_tokens)
                try:
                    logits, p.kv = dec.extend(p.job.seq[p.done : end], p.kv)
                except Exception as exc:  # noqa: BLE001
                    prefilling.pop(0)
                    p.job.emit(exc)
                    continue
                p.done = end
                if end == len(p.job.seq):
                    prefilling.pop(0)
                    t = p.job.timings  # prefill: from the end of encoding to the first token, wall clock
                    t.prefill_s = time.perf_counter() - p.job.submitted - t.queued_s - t.preprocess_s - t.vision_s
                    run = _Running(p.job, SequenceState(0, p.job.params, self.pipeline.tokenizer, p.job.timings), len(p.job.seq), p.cached)
                    if self._emit(run, run.state.accept(logits), p.kv):
                        batch = batch.join(p.kv)
                        running.append(run)
            if not running:
                continue
            # drop sequences whose client went away, then one decode step for all
            keep = [i for i, r in enumerate(running) if not r.job.cancelled.is_set()]
            if len(keep) < len(running):
                batch, running = batch.drop(keep), [running[i] for i in keep]
                if not running:
                    batch = dec.new_batch()
                    continue
            t0 = time.perf_counter()
            tokens = np.array([r.state.last_token for r in running])
            try:
                logits, batch = dec.decode(dec.embed(tokens), batch)
            except Exception as exc:  # noqa: BLE001
                for r in running:
                    r.job.emit(exc)
                batch, running = dec.new_batch(), []
                continue
            elapsed = time.perf_counter() - t0
            self.stats.decode_steps += 1
            self.stats.decoded_rows += len(running)
            self.stats.batch_sizes[len(running)] = self.stats.batch_sizes.get(len(running), 0) + 1
            keep = []
            for row, r in enumerate(running):
                r.fed.append(int(tokens[row]))
                r.job.timings.decode_s += elapsed
                r.job.timings.decode_tokens += 1
                if self._emit(r, r.state.accept(logits[row]), None, batch, row):
                    keep.append(row)
            if len(keep) < len(running):
                batch, running = batch.drop(keep), [running[i] for i in keep]
                if not running:
                    batch = dec.new_batch()
            self.stats.running = len(running)

    def _emit(self, run: _Running, event: TokenEvent, kv: SeqKV | None, batch: Any = None, row: int = -1) -> bool:
        """Send one token; on the sequence's last, store its cache for prefix reuse and send
        Finished. Returns whether the sequence goes on."""
        job = run.job
        job.emit(event)
        if event.finish_reason is None:
            return True
        if self.settings.prefix_cache_mb > 0:  # the row's cache is copied out only when it can be kept
            final = kv if kv is not None else batch.row(row)
            self.prefix_cache.store(np.concatenate([job.keys, np.asarray(run.fed, dtype=np.int64)]), final)
        job.emit(Finished(job.timings, run.state.generated, run.prompt_tokens, run.cached_tokens))
        return False
