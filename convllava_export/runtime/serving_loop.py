"""The serving loop: an encoder thread and a scheduler thread around one Scheduler
(scheduler.py: admission by KV bytes, chunked prefill, one batched decode step).

    submit() ─► waiting ─► encoder thread ─► ready ─► scheduler thread ─► events (emit callback)
                (bounded)   decode + preprocess  (≤ max_running   Scheduler.step(): admit by KV
                            images, encoder cache, prepared)      bytes, prefill a chunk, decode
                            vision engine, splice                 every running row, retire

A request's events end with `Finished` (usage and timings) or an exception: a client's mistake
is a ConvLlavaError (4xx), the server's own failure a ServerFault (5xx). A dead loop thread
fails every waiting request at once and every later one (`failure`, /health turns 503).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConvLlavaError
from ..preprocess import visual_tokens
from .generation import NO_TOKEN, Timings, stream_generated
from .memory import trim
from .pipeline import Pipeline, Request
from .sampling import SamplingParams
from .scheduler import (
    Finished,
    Job,
    LruBytes,
    PrefixCache,
    Scheduler,
    SchedulerSettings,
    SchedulerStats,
    ServerFault,
    as_fault,
    kv_budget_bytes,
    position_keys,
)

__all__ = ["Finished", "Handle", "LoopSettings", "QueueFull", "SchedulerStats", "ServerFault", "ServingLoop"]

log = logging.getLogger("convllava_export.serving_loop")
DEFAULT_CONTEXT = 2048  # when the build records none


@dataclass(frozen=True)
class LoopSettings:
    max_running: int = 32  # sequences decoded together
    max_waiting: int = 64  # submitted but not yet running; QueueFull beyond
    max_batched_tokens: int | None = None  # prefill chunk (the most a decode step waits for a prefill); None: the decoder's own
    encoder_cache_mb: float = 256.0  # image embeddings kept, LRU (a 576-token 4096-wide image is 9 MB)
    prefix_cache_mb: float = 256.0  # KV caches of finished sequences kept for prefix reuse, LRU (~500 positions at 7B fp16)
    kv_cache_mb: float | None = None  # KV budget of the running rows; None: from the memory available at start

    def validate(self) -> None:
        if self.max_running < 1 or self.max_waiting < 0 or (self.max_batched_tokens is not None and self.max_batched_tokens < 1):
            raise ConvLlavaError("serving loop settings: max_running and max_batched_tokens must be >= 1, max_waiting >= 0")
        if self.encoder_cache_mb < 0 or self.prefix_cache_mb < 0:
            raise ConvLlavaError("serving loop settings: cache sizes must be >= 0 MB")
        if self.kv_cache_mb is not None and self.kv_cache_mb <= 0:
            raise ConvLlavaError("serving loop settings: --kv-cache-mb must be > 0")


class QueueFull(ConvLlavaError):
    """More requests are waiting than the serving loop admits."""


class Handle:
    def __init__(self, job: Job) -> None:
        self._job = job

    def cancel(self) -> None:
        """The client went away: the sequence is dropped at the next step and its cache freed."""
        self._job.cancelled.set()


def image_key(pixels: np.ndarray) -> bytes:
    """Content hash of preprocessed pixels (shape included): the encoder cache's key."""
    h = hashlib.sha256(str(pixels.shape).encode())
    h.update(np.ascontiguousarray(pixels).data)
    return h.digest()


class ServingLoop:
    def __init__(self, pipeline: Pipeline, settings: LoopSettings | None = None) -> None:
        self.pipeline = pipeline
        self.settings = settings or LoopSettings()
        self.settings.validate()
        self.decoder = pipeline.decoder
        self.waiting: queue.Queue[Job | None] = queue.Queue()
        self.ready: queue.Queue[Job] = queue.Queue(maxsize=self.settings.max_running)
        self.encoder_cache = LruBytes(self.settings.encoder_cache_mb * (1 << 20))
        self.prefix_cache = PrefixCache(self.settings.prefix_cache_mb * (1 << 20))
        self.stats = SchedulerStats()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.failure: BaseException | None = None  # set when a loop thread died: every request fails at once
        self.scheduler: Scheduler | None = None
        if not self.decoder.runs_own_loop:
            ctx = pipeline.max_context or DEFAULT_CONTEXT
            s = self.settings
            budget = kv_budget_bytes(s.kv_cache_mb, self.decoder.cache_shape.position_bytes, s.max_running, ctx)
            self.scheduler = Scheduler(
                self.decoder, pipeline.tokenizer, SchedulerSettings(s.max_running, s.max_batched_tokens or self.decoder.prefill_tokens, budget, ctx), self.prefix_cache, self.stats
            )
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
        if self.failure is not None or self.stopping.is_set():
            raise ServerFault("the engine has stopped" + (" after a failure; restart the server" if self.failure else ""))
        with self.lock:
            if self.stats.waiting >= self.settings.max_waiting + self.settings.max_running:
                raise QueueFull(f"{self.stats.waiting} requests are waiting (limit {self.settings.max_waiting}); retry later")
            self.stats.waiting += 1
        job = Job(request, params, emit, pixels, image_embeds, timings or Timings())
        self.waiting.put(job)
        return Handle(job)

    @property
    def healthy(self) -> bool:
        return self.failure is None and all(t.is_alive() for t in self.threads)

    def close(self, timeout: float = 5.0) -> None:
        """Stop both threads (bounded wait) and end every request still inside with a ServerFault."""
        self.stopping.set()
        self.waiting.put(None)
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout)
        self._fail_everything(ServerFault("the server is shutting down"))

    # -- failure ----------------------------------------------------------------------------
    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as exc:  # noqa: BLE001 - a dead loop thread must be loud and fail its requests
            log.exception("serving loop thread %s died", threading.current_thread().name)
            self.failure = exc
            self.stopping.set()
            self.waiting.put(None)
            self._fail_everything(ServerFault("the engine stopped after an internal failure; restart the server"))

    def _fail_everything(self, fault: ServerFault) -> None:
        for q in (self.waiting, self.ready):
            while True:
                try:
                    job = q.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    self._fail(job, fault)
        if self.scheduler is not None and (threading.current_thread().name == "convllava-scheduler" or not self.threads[1].is_alive()):
            self.scheduler.fail_all(fault)

    def _leave_queue(self) -> None:
        with self.lock:
            self.stats.waiting -= 1

    def _fail(self, job: Job, exc: BaseException) -> None:
        self._leave_queue()
        job.emit(exc)

    # -- encoder stage ----------------------------------------------------------------------
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
                while not self.stopping.is_set():  # blocks while max_running requests are prepared: bounded memory
                    try:
                        self.ready.put(job, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                else:
                    self._fail(job, ServerFault("the server is shutting down"))

    def _encode_misses(self, misses: dict[bytes, np.ndarray]) -> tuple[dict[bytes, np.ndarray], dict[bytes, BaseException]]:
        """Embeddings of the images no cache holds, images of one shape in one vision run. When
        a run fails, its images are encoded one by one, so a bad image fails only its own requests."""
        pipe = self.pipeline
        done: dict[bytes, np.ndarray] = {}
        failed: dict[bytes, BaseException] = {}
        try:
            for h, e in zip(misses, pipe.encode_pixels(list(misses.values()), Timings())):
                done[h] = e
        except Exception:  # noqa: BLE001 - find which image it was
            for h, p in misses.items():
                try:
                    done[h] = pipe.encode_pixels([p], Timings())[0]
                except Exception as exc:  # noqa: BLE001
                    failed[h] = as_fault(exc, "the vision engine")
        for h, e in done.items():
            self.encoder_cache.put(h, e, e.nbytes)
        return done, failed

    def _encode(self, jobs: list[Job]) -> list[Job]:
        """Plan every job (context checked before encoding), encode the images no cache holds,
        then splice and check each against the KV budget. Returns the jobs that are ready."""
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
        failed: dict[bytes, BaseException] = {}
        encoded_s = 0.0
        if misses:
            t0 = time.perf_counter()
            done, failed = self._encode_misses(misses)
            known.update(done)
            encoded_s = time.perf_counter() - t0
        ready = []
        for job, ids, pixels, hashes in planned:
            bad = next((failed[h] for h in hashes if h in failed), None)
            if bad is not None:
                self._fail(job, bad)
                continue
            job.timings.vision_s += encoded_s if any(h in misses for h in hashes) else 0.0
            embeds = list(job.image_embeds) if job.image_embeds is not None else [known[h] for h in hashes]
            try:
                job.seq = pipe.splice(ids, embeds)  # embeddings, or a TablePrompt for a Generator
                job.keys = position_keys(ids, hashes, [len(e) for e in embeds])
                if self.scheduler is not None:
                    self.scheduler.check(job)  # a cache that could never fit the budget: 400 now, not a wait forever
                else:
                    self.decoder.check(job.seq)  # beyond the engine's shapes: this request fails, not its batch
            except Exception as exc:  # noqa: BLE001
                self._fail(job, exc)
                continue
            ready.append(job)
        return ready

    # -- scheduler --------------------------------------------------------------------------
    def _scheduler_loop(self) -> None:
        if self.scheduler is None:
            return self._generator_loop()
        sched = self.scheduler
        busy = False
        while not self.stopping.is_set():
            if busy and sched.idle:  # a burst is over: what the heaps still hold goes back
                trim()
            busy = not sched.idle
            while sched.room > 0:
                try:
                    job = self.ready.get(timeout=0.05) if sched.idle else self.ready.get_nowait()
                except queue.Empty:
                    break
                self._leave_queue()
                if not job.cancelled.is_set():
                    sched.add(job)
            if not sched.idle:
                sched.step()

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
            fault = as_fault(exc)
            for i in live:
                group[i].emit(fault)
        finally:
            events.close()
            self.stats.running = 0
        self.stats.decode_steps += 1
        self.stats.batch_sizes[len(group)] = self.stats.batch_sizes.get(len(group), 0) + 1
