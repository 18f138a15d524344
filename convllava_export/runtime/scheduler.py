"""The generation loop every command runs: admission by KV bytes, chunked prefill into the
request's cache row, one batched decode step for every running row, retirement of each row on
its own. `serve` steps it from the scheduler thread of the serving loop (serving_loop.py); `run`,
`chat`, `validate`, the build's smoke test and `Pipeline.generate` step it in the caller's thread
(`stream_tokens`), so a fix or a speed-up here reaches all of them.

Per step: cancelled rows leave; admitted requests open pending cache rows in order (FIFO) while
their reservation fits the KV budget (prompt + max_tokens, within the context), each reusing the
longest cached prefix; one prefill pass runs the next chunk of the pending rows, at most
`max_batched_tokens` positions in all (a kernel may share work between them: the bf16 one unpacks
each weight once per pass); rows whose prompt is in join the running rows, oldest first; every
running row decodes one token in one forward. A row's chunks always start at multiples of
`max_batched_tokens` from its first uncached position, so which rows share a pass never changes
its numbers. A request whose logits are not finite fails alone with a
ServerFault (a 500), a backend failure fails the rows it touched, and the loop goes on.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConvLlavaError
from ..prompt import IMAGE_TOKEN_INDEX
from .generation import (
    NO_TOKEN,
    Decoder,
    GenerationResult,
    Generator,
    SequenceState,
    TablePrompt,
    Timings,
    TokenEvent,
    stream_generated,
)
from .kv import KVCache, SeqKV
from .sampling import SamplingParams

MB = 1 << 20
KV_MEMORY_FRACTION = 0.5  # default KV budget: at most this share of the memory available when the loop starts
# ... and at most this much: a 7B int4 server then stays within ~8 GB at 16 clients (BENCHMARKS.md),
# as vLLM-CPU's KV space is a fixed size too; raise it with --kv-cache-mb on a larger machine
KV_DEFAULT_MAX_MB = 2048


class ServerFault(RuntimeError):
    """The server's own failure (non-finite logits, a backend error, a dead loop thread): a 5xx
    for the requests it touches, never a client's mistake."""


@dataclass
class Finished:
    """The last event of a request: usage and timings."""

    timings: Timings
    completion_tokens: int
    prompt_tokens: int
    cached_prompt_tokens: int = 0


@dataclass
class Job:
    """One request inside the loop."""

    request: Any  # pipeline.Request (None for a sequence given as embeddings)
    params: SamplingParams
    emit: Callable[[Any], None]  # TokenEvent, Finished, or an exception
    pixels: Callable[[], Sequence[np.ndarray]] | None = None  # decoded off the caller's thread
    image_embeds: Sequence[np.ndarray] | None = None  # encoded elsewhere (a Ray vision replica)
    timings: Timings = field(default_factory=Timings)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    seq: np.ndarray | TablePrompt | None = None  # spliced embeddings [S, H] (a TablePrompt for a Generator)
    keys: np.ndarray | None = None  # one key per position: token id, or an image row's key (< 0)
    index: int = 0  # TokenEvent.index: the request's place in a fixed batch

    @property
    def prompt_len(self) -> int:
        return self.seq.length if isinstance(self.seq, TablePrompt) else len(self.seq)


@dataclass
class SchedulerStats:
    """Counters read by /metrics (plain ints: the scheduler thread writes, readers tolerate a stale value)."""

    running: int = 0
    waiting: int = 0
    decode_steps: int = 0
    decoded_rows: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # decode steps by rows decoded together (at most max_running keys)
    encoder_hits: int = 0
    encoder_misses: int = 0
    prefix_hit_tokens: int = 0
    prompt_tokens: int = 0
    prefill_passes: int = 0
    prefill_s: float = 0.0  # wall time inside the decoder's prefill passes (where a server's time goes: bench serve)
    decode_s: float = 0.0  # ... and inside its decode steps
    kv_bytes: int = 0  # the KV cache's buffers now
    kv_budget_bytes: int = 0


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
    """Compact KV copies of finished sequences, keyed by their positions' keys; a new request
    reuses the longest shared prefix (system prompt + image rows + earlier turns)."""

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


def memory_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (the cgroup limit when lower); 8 GiB where neither is readable."""
    avail = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(path).read().strip()
            usage_path = path.replace("memory.max", "memory.current").replace("limit_in_bytes", "usage_in_bytes")
            if raw.isdigit() and int(raw) < (1 << 60):
                free = int(raw) - int(open(usage_path).read().strip())
                avail = min(avail, free) if avail is not None else free
        except (OSError, ValueError):
            continue
    return avail if avail is not None else 8 << 30


def kv_budget_bytes(kv_cache_mb: float | None, position_bytes: int, max_rows: int, max_context: int) -> float:
    """The KV budget: as asked, else the smallest of what every row at full context would take,
    KV_MEMORY_FRACTION of the memory available now (after the model is loaded) and KV_DEFAULT_MAX_MB."""
    if kv_cache_mb is not None:
        return kv_cache_mb * MB
    return float(min(max_rows * max_context * position_bytes, KV_MEMORY_FRACTION * memory_available_bytes(), KV_DEFAULT_MAX_MB * MB))


@dataclass(frozen=True)
class SchedulerSettings:
    max_running: int = 32  # rows decoded together
    max_batched_tokens: int = 256  # prefill chunk: the most a decode step waits for a prefill
    kv_budget_bytes: float = 4 << 30
    max_context: int = 2048


@dataclass
class _Row:
    job: Job
    state: SequenceState
    limit: int  # positions reserved (prompt + max tokens, within the context)
    done: int = 0  # prompt positions in the cache (a reused prefix counts)
    cached: int = 0  # positions reused from the prefix cache
    fed: list[int] = field(default_factory=list)  # generated tokens already in the cache
    opened: float = field(default_factory=time.perf_counter)  # when its prefill began
    logits: np.ndarray | None = None  # its last prefill chunk's, until it joins the running rows


def as_fault(exc: BaseException, what: str = "generation") -> BaseException:
    """A client's mistake stays as it is; anything else becomes a ServerFault (a 5xx)."""
    if isinstance(exc, (ConvLlavaError, ServerFault)):
        return exc
    fault = ServerFault(f"{what} failed: {type(exc).__name__}")
    fault.__cause__ = exc
    return fault


class Scheduler:
    """Admission, chunked prefill and batched decode over one decoder and its KV cache."""

    def __init__(self, decoder: Decoder, tokenizer: Any, settings: SchedulerSettings, prefix_cache: PrefixCache | None = None, stats: SchedulerStats | None = None) -> None:
        self.decoder, self.tokenizer, self.settings = decoder, tokenizer, settings
        self.cache: KVCache = decoder.new_cache(settings.kv_budget_bytes, settings.max_running, settings.max_context)
        self.prefix_cache = prefix_cache
        self.stats = stats or SchedulerStats()
        self.stats.kv_budget_bytes = int(settings.kv_budget_bytes)
        self.queue: deque[Job] = deque()  # admitted, waiting for a cache row
        self.pending: list[_Row] = []  # rows being prefilled, in cache order
        self.running: list[_Row] = []

    # -- admission --------------------------------------------------------------------------
    def limit(self, job: Job) -> int:
        """Positions a request may reach: its prompt and max_tokens, within the context."""
        p = job.prompt_len
        return max(p, min(p + job.params.max_new_tokens, self.settings.max_context))

    def check(self, job: Job) -> None:
        """Refuse (400) a request whose cache could never fit the budget, before it waits."""
        need = self.limit(job)
        if not self.cache.ever_fits(need):
            pb = self.cache.shape.position_bytes
            raise ConvLlavaError(
                f"this request needs {need} positions of KV cache ({need * pb / MB:.0f} MB), above the server's budget of "
                f"{self.settings.kv_budget_bytes / MB:.0f} MB; lower max_tokens or shorten the prompt"
            )

    @property
    def room(self) -> int:
        """How many more requests may be admitted (queued for a row) now."""
        return self.settings.max_running - len(self.running) - len(self.pending) - len(self.queue)

    @property
    def idle(self) -> bool:
        return not self.queue and not self.pending and not self.running

    def add(self, job: Job) -> None:
        job.submitted = time.perf_counter()  # from here, waiting for a row counts as queued
        self.queue.append(job)

    def fail_all(self, exc: BaseException) -> None:
        """Every request in the loop ends with `exc` (the serving loop is stopping or broken)."""
        rows = [*self.running, *self.pending]
        for job in [*self.queue, *(r.job for r in rows)]:
            job.emit(exc)
        self.queue.clear()
        self.running, self.pending = [], []
        self.cache.drop([])
        self.cache.abandon()

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> None:
        self._drop_cancelled()
        self._open()
        if self.pending:
            self._prefill_pass()
        if self.running:
            self._decode()
        self.stats.running = len(self.running)
        self.stats.kv_bytes = self.cache.nbytes

    def _drop_cancelled(self) -> None:
        self.queue = deque(j for j in self.queue if not j.cancelled.is_set())
        for k in reversed(range(len(self.pending))):
            if self.pending[k].job.cancelled.is_set():
                del self.pending[k]
                self.cache.abandon(k)
        keep = [i for i, r in enumerate(self.running) if not r.job.cancelled.is_set()]
        if len(keep) < len(self.running):
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        self.cache.drop(keep)
        self.running = [self.running[i] for i in keep]

    def _chunk(self, row: _Row) -> int:
        """Positions of the row's next chunk (0 once its prompt is in)."""
        return min(row.job.prompt_len, row.done + self.settings.max_batched_tokens) - row.done

    def _open(self) -> None:
        """Admitted requests open pending rows, oldest first, while their reservation fits the KV
        budget and their first chunk fits this step's pass (FIFO: a large request is not
        overtaken forever by small ones; the first pending row always gets a pass)."""
        room = self.settings.max_batched_tokens - sum(self._chunk(r) for r in self.pending)
        while self.queue:
            job = self.queue[0]
            limit = self.limit(job)
            if (self.pending and min(job.prompt_len, self.settings.max_batched_tokens) > room) or not self.cache.fits(limit):
                return
            self.queue.popleft()
            job.timings.queued_s += time.perf_counter() - job.submitted
            cached, kv = self.prefix_cache.lookup(job.keys) if self.prefix_cache is not None and job.keys is not None else (0, None)
            self.stats.prefix_hit_tokens += cached
            self.stats.prompt_tokens += job.prompt_len
            params = dataclasses.replace(job.params, max_new_tokens=max(1, limit - job.prompt_len))  # stops at the context
            self.cache.open(limit, kv)
            row = _Row(job, SequenceState(job.index, params, self.tokenizer, job.timings), limit, cached, cached)
            self.pending.append(row)
            room -= self._chunk(row)

    def _prefill_pass(self) -> None:
        """The next chunk of the first pending rows, at most max_batched_tokens positions in all,
        in one decoder call; then finished rows join the running rows, oldest first."""
        take, room = 0, self.settings.max_batched_tokens
        while take < len(self.pending) and (take == 0 or self._chunk(self.pending[take]) <= room):
            room -= self._chunk(self.pending[take])
            take += 1
        rows = self.pending[:take]
        sizes = [self._chunk(r) for r in rows]
        chunks = [np.asarray(r.job.seq[r.done : r.done + n], dtype=np.float32) for r, n in zip(rows, sizes)]
        t0 = time.perf_counter()
        try:
            logits = self.decoder.prefill_rows(self.cache, chunks)
        except Exception as exc:  # noqa: BLE001 - these requests fail, the loop goes on
            fault = as_fault(exc)
            for k in reversed(range(take)):
                self.cache.abandon(k)
                rows[k].job.emit(fault)
            del self.pending[:take]
            return
        finally:
            self.stats.prefill_s += time.perf_counter() - t0
            self.stats.prefill_passes += 1
        for r, n, lg in zip(rows, sizes, logits):
            if n:
                r.done += n
                r.logits = lg
        while self.pending and self._chunk(self.pending[0]) == 0:
            row = self.pending.pop(0)
            self.cache.commit()
            row.job.timings.prefill_s = time.perf_counter() - row.opened  # to the first token, wall clock
            self.running.append(row)
            logits_row, row.logits = row.logits, None
            if not self._accept(len(self.running) - 1, logits_row):
                self._keep(list(range(len(self.running) - 1)))

    def _decode(self) -> None:
        tokens = np.array([r.state.last_token for r in self.running])
        t0 = time.perf_counter()
        try:
            logits = self.decoder.decode(self.cache, self.decoder.embed(tokens))
        except Exception as exc:  # noqa: BLE001 - the rows in this forward fail; the loop goes on
            fault = as_fault(exc)
            for r in self.running:
                r.job.emit(fault)
            self._keep([])
            return
        finally:
            elapsed = time.perf_counter() - t0
            self.stats.decode_s += elapsed
        n = len(self.running)
        self.stats.decode_steps += 1
        self.stats.decoded_rows += n
        self.stats.batch_sizes[n] = self.stats.batch_sizes.get(n, 0) + 1
        keep = []
        for i, r in enumerate(self.running):
            r.fed.append(int(tokens[i]))
            r.job.timings.decode_s += elapsed
            r.job.timings.decode_tokens += 1
            if self._accept(i, logits[i]):
                keep.append(i)
        if len(keep) < n:
            self._keep(keep)

    def _accept(self, i: int, logits: np.ndarray) -> bool:
        """Row i's next token from its logits; False when the row ends (finished or failed)."""
        r = self.running[i]
        job = r.job
        if not np.isfinite(logits).all():
            job.emit(ServerFault("the model produced non-finite logits for this request"))
            return False
        try:
            event = r.state.accept(logits)
        except Exception as exc:  # noqa: BLE001
            job.emit(as_fault(exc))
            return False
        event.prompt_tokens = job.prompt_len
        job.emit(event)
        if event.finish_reason is None:
            return True
        if self.prefix_cache is not None and job.keys is not None and self.prefix_cache.lru.budget > 0:
            self.prefix_cache.store(np.concatenate([job.keys, np.asarray(r.fed, dtype=np.int64)]), self.cache.row(i))
        job.emit(Finished(job.timings, r.state.generated, job.prompt_len, r.cached))
        return False


def loop_settings(decoder: Decoder, rows: int, max_context: int | None, kv_cache_mb: float | None = None, max_batched_tokens: int | None = None, longest: int = 0) -> SchedulerSettings:
    """Settings for a fixed batch in the caller's thread: each prompt prefilled in one chunk."""
    ctx = max_context or 1 << 20
    budget = kv_budget_bytes(kv_cache_mb, decoder.cache_shape.position_bytes, rows, min(ctx, max(longest, 1)))
    return SchedulerSettings(max_running=max(1, rows), max_batched_tokens=max_batched_tokens or max(1, longest), kv_budget_bytes=budget, max_context=ctx)


def stream_tokens(
    decoder: Decoder,
    tokenizer,
    sequences: Sequence[np.ndarray],
    params: SamplingParams,
    timings: Sequence[Timings] | None = None,
    max_context: int | None = None,
    kv_cache_mb: float | None = None,
) -> Iterator[TokenEvent]:
    """Generate for a fixed batch of spliced embedding sequences [S_i, H] through the Scheduler
    (the loop `serve` runs), yielding tokens as they come. With greedy decoding a sequence's
    tokens do not depend on its batch. A failure raises once its request has no more events."""
    params.validate()
    timings = list(timings) if timings is not None else [Timings() for _ in sequences]
    events: list[Any] = []
    jobs = [Job(None, params, events.append, timings=t, seq=np.asarray(s, dtype=np.float32), index=i) for i, (s, t) in enumerate(zip(sequences, timings))]
    if not jobs:
        return
    longest = max(len(s) + params.max_new_tokens for s in sequences)
    sched = Scheduler(decoder, tokenizer, loop_settings(decoder, len(jobs), max_context, kv_cache_mb, max(len(s) for s in sequences), longest))
    for job in jobs:
        sched.check(job)
        sched.add(job)
    while not sched.idle:
        sched.step()
        for ev in events:
            if isinstance(ev, BaseException):
                raise ev
            if isinstance(ev, TokenEvent):
                yield ev
        events.clear()


def stream_events(
    backend: Decoder | Generator,
    tokenizer,
    sequences: Sequence[np.ndarray] | Sequence[TablePrompt],
    params: SamplingParams,
    timings: Sequence[Timings] | None = None,
    max_context: int | None = None,
) -> Iterator[TokenEvent]:
    """`stream_tokens` for a Decoder, `stream_generated` for a Generator."""
    if backend.runs_own_loop:
        return stream_generated(backend, tokenizer, sequences, params, timings)
    return stream_tokens(backend, tokenizer, sequences, params, timings, max_context)


def generate(
    decoder: Decoder | Generator,
    tokenizer,
    sequences: Sequence[np.ndarray] | Sequence[TablePrompt],
    params: SamplingParams,
    timings: Sequence[Timings] | None = None,
    max_context: int | None = None,
) -> list[GenerationResult]:
    """Non-streaming `stream_events`: one result per sequence."""
    timings = list(timings) if timings is not None else [Timings() for _ in sequences]
    ids: list[list[int]] = [[] for _ in sequences]
    texts = [""] * len(sequences)
    reasons = ["length"] * len(sequences)
    for ev in stream_events(decoder, tokenizer, sequences, params, timings, max_context):
        if ev.token_id != NO_TOKEN:
            ids[ev.index].append(ev.token_id)
        texts[ev.index] += ev.text
        if ev.finish_reason:
            reasons[ev.index] = ev.finish_reason
    return [GenerationResult(ids[i], texts[i], reasons[i], timings[i]) for i in range(len(sequences))]
