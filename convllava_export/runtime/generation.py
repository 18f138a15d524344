"""The LLM backend contracts and what a sequence carries between steps (sampling, text, stop strings).

A `Decoder` (torch, ONNX Runtime) is pure functions over a KV cache it makes but never keeps
(kv.py): `new_cache`, `prefill(cache, embeds)` into the cache's pending row, `decode(cache,
embeds)` for one token of every running row. The scheduler (scheduler.py) owns the caches. A
`Generator` (TensorRT-LLM, `runs_own_loop = True`) runs its own decoding loop: prompts go in as
token ids plus the images' rows (its prompt-embedding table), tokens come out step by step, and
`stream_generated` turns them into the same TokenEvents.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .kv import CacheShape, KVCache, SeqKV
from .sampling import SamplingParams, select_tokens


class Decoder(Protocol):
    vocab_size: int
    cache_shape: CacheShape
    runs_own_loop: bool  # False: the scheduler drives it step by step
    prefill_tokens: int  # the prefill chunk it runs best (the serving loop's default chunk)

    def embed(self, ids: np.ndarray) -> np.ndarray: ...

    def new_cache(self, budget_bytes: float, max_rows: int, max_width: int) -> KVCache: ...

    def prefill_rows(self, cache: KVCache, chunks: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The next chunk [S_i, H] of pending rows 0..n-1 in one pass; each row's last logits [V]
        (None for an empty chunk: a row whose prompt is in, waiting for the rows before it)."""

    def prefill(self, cache: KVCache, embeds: np.ndarray) -> np.ndarray:
        """`prefill_rows` for the first pending row alone."""

    def decode(self, cache: KVCache, embeds: np.ndarray) -> np.ndarray: ...

    def extend(self, embeds: np.ndarray, past: SeqKV | None = None) -> tuple[np.ndarray, SeqKV]:
        """One sequence outside any batch (teacher forcing)."""


@dataclass(frozen=True)
class TablePrompt:
    """A prompt for a Generator: token ids with IMAGE_TOKEN_INDEX at each image, and each
    image's embedding rows (the engine looks them up through its prompt table)."""

    ids: Sequence[int]
    images: Sequence[np.ndarray] = ()

    @property
    def rows(self) -> int:
        """Image rows: what the prompt takes of the engine's prompt table."""
        return sum(len(e) for e in self.images)

    @property
    def length(self) -> int:
        """Positions once each image marker becomes its rows."""
        return len(self.ids) - len(self.images) + self.rows


class Generator(Protocol):
    vocab_size: int
    runs_own_loop: bool  # True

    def check(self, prompt: TablePrompt) -> None:
        """Refuse (ConvLlavaError) a prompt beyond the engine's shapes, before it joins a batch."""

    def stream(self, prompts: Sequence[TablePrompt], params: SamplingParams, end_id: int) -> Iterator[list[list[int]]]: ...

    def context_logits(self, prompt: TablePrompt) -> np.ndarray: ...


NO_TOKEN = -1  # a TokenEvent that only ends a sequence (and flushes its text)


@dataclass
class TokenEvent:
    """One new token of request `index`; `text` is the newly printable text (may be empty)."""

    index: int
    token_id: int
    text: str
    finish_reason: str | None = None  # "stop" (eos or stop string) or "length"
    prompt_tokens: int = 0  # the request's prompt positions, where the loop knows them (per-chunk usage)


@dataclass
class Timings:
    queued_s: float = 0.0  # waiting for the engine (serving only)
    preprocess_s: float = 0.0
    vision_s: float = 0.0
    prefill_s: float = 0.0  # time to first token, from the LLM's start
    decode_s: float = 0.0
    decode_tokens: int = 0

    @property
    def ttft_s(self) -> float:
        return self.queued_s + self.preprocess_s + self.vision_s + self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "queued_s": self.queued_s,
            "preprocess_s": self.preprocess_s,
            "vision_s": self.vision_s,
            "prefill_s": self.prefill_s,
            "ttft_s": self.ttft_s,
            "decode_s": self.decode_s,
            "decode_tokens": self.decode_tokens,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    timings: Timings = field(default_factory=Timings)


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is the start of some stop string.

    Only the last len(stop)-1 characters can matter, and only where the stop's first character
    occurs, so the cost is bounded by the stop strings' lengths, not by the text's.
    """
    longest = 0
    for s in stops:
        tail = text[-(len(s) - 1) :] if len(s) > 1 else ""
        i = tail.find(s[0])
        while i >= 0 and len(tail) - i > longest:
            if s.startswith(tail[i:]):
                longest = len(tail) - i
                break
            i = tail.find(s[0], i + 1)
    return longest


class _Detokenizer:
    """Incremental text with stop strings: holds back text that could still become a stop string.

    A stop string cannot start inside text already emitted (that text was emitted because no
    stop could begin there), so each step searches only from the first unemitted character.
    """

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (new printable text, hit a stop string)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [pos for pos in (text.find(s, self.emitted) for s in self.stop) if pos >= 0]
        if hits:
            self.text = text[: min(hits)]
            delta = self.text[self.emitted :]
            self.emitted = len(self.text)
            return delta, True
        self.text = text
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence from byte-fallback tokens
            return "", False
        safe = len(text) - held_back(text, self.stop)
        delta = text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return delta, False

    def flush(self) -> str:
        delta = self.text[self.emitted :].rstrip("\ufffd")
        self.emitted = len(self.text)
        return delta


class SequenceState:
    """What one sequence carries between steps besides its cache: sampling, text, counters."""

    def __init__(self, index: int, params: SamplingParams, tokenizer, timings: Timings) -> None:
        self.index, self.params, self.timings = index, params, timings
        self.rng = np.random.default_rng(params.seed)
        self.detok = _Detokenizer(tokenizer, params.stop)
        self.eos = tokenizer.eos_token_id
        self.generated = 0
        self.last_token = -1

    def accept(self, logits: np.ndarray) -> TokenEvent:
        """Choose the next token from this sequence's last-position logits [V]."""
        return self.take(int(select_tokens(logits[None], self.params, self.rng)[0]))

    def take(self, tok: int) -> TokenEvent:
        """Account for the next token, chosen here or by an engine that samples itself."""
        self.generated += 1
        self.last_token = tok
        if tok == self.eos and not self.params.ignore_eos:
            return TokenEvent(self.index, tok, self.detok.flush(), "stop")
        text, hit_stop = self.detok.push(tok)
        reason = "stop" if hit_stop else ("length" if self.generated >= self.params.max_new_tokens else None)
        if reason == "length":
            text += self.detok.flush()
        return TokenEvent(self.index, tok, text, reason)


def stream_generated(
    generator: Generator,
    tokenizer,
    prompts: Sequence[TablePrompt],
    params: SamplingParams | Sequence[SamplingParams],
    timings: Sequence[Timings] | None = None,
) -> Iterator[TokenEvent]:
    """`stream_tokens` for a Generator: the engine samples; text, stop strings and finish
    reasons are handled here exactly as for a Decoder. Stops reading once every sequence ended.

    `params` may differ per sequence in what is handled here (max_new_tokens, stop strings);
    the engine gets the first's sampling settings and the largest max_new_tokens."""
    each = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    for p in each:
        p.validate()
    engine_params = dataclasses.replace(each[0], max_new_tokens=max(p.max_new_tokens for p in each)) if each else params
    timings = list(timings) if timings is not None else [Timings() for _ in prompts]
    states = [SequenceState(i, p, tokenizer, t) for i, (p, t) in enumerate(zip(each, timings))]
    done = [False] * len(prompts)
    t0 = last = time.perf_counter()
    steps = generator.stream(prompts, engine_params, -1 if tokenizer.eos_token_id is None else int(tokenizer.eos_token_id))
    try:
        for new in steps:
            now = time.perf_counter()
            for i, toks in enumerate(new):
                for tok in toks:
                    if done[i]:
                        break
                    if states[i].generated == 0:
                        timings[i].prefill_s = now - t0
                    else:
                        timings[i].decode_s += now - last
                        timings[i].decode_tokens += 1
                    event = states[i].take(tok)
                    done[i] = event.finish_reason is not None
                    yield event
            last = now
            if all(done):
                break
    finally:
        close = getattr(steps, "close", None)
        if close is not None:
            close()
    for i, finished in enumerate(done):  # the engine ran out of room (its max_seq_len) before max_new_tokens
        if not finished:
            yield TokenEvent(i, NO_TOKEN, states[i].detok.flush(), "length")
