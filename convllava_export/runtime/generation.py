"""One generation loop for every backend: prefill spliced embeddings, then decode token by token.

A backend only provides a `Decoder`: `embed(ids)`, `reset()` and `forward(embeds, mask,
positions) -> last-position logits`, keeping its own KV cache. Batches are left-padded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .sampling import SamplingParams, select_tokens


class Decoder(Protocol):
    vocab_size: int

    def embed(self, ids: np.ndarray) -> np.ndarray: ...

    def reset(self) -> None: ...

    def forward(self, embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray: ...


@dataclass
class TokenEvent:
    """One new token of request `index`; `text` is the newly printable text (may be empty)."""

    index: int
    token_id: int
    text: str
    finish_reason: str | None = None  # "stop" (eos or stop string) or "length"


@dataclass
class Timings:
    preprocess_s: float = 0.0
    vision_s: float = 0.0
    prefill_s: float = 0.0  # time to first token, from the LLM's start
    decode_s: float = 0.0
    decode_tokens: int = 0

    @property
    def ttft_s(self) -> float:
        return self.preprocess_s + self.vision_s + self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
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


def left_pad(sequences: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[S_i,H] list → (embeds [B,S,H], mask [B,S] int64, position_ids [B,S] int64)."""
    length = max(len(s) for s in sequences)
    hidden = sequences[0].shape[-1]
    embeds = np.zeros((len(sequences), length, hidden), dtype=np.float32)
    mask = np.zeros((len(sequences), length), dtype=np.int64)
    for i, s in enumerate(sequences):
        embeds[i, length - len(s) :] = s
        mask[i, length - len(s) :] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return embeds, mask, positions


def stream_tokens(
    decoder: Decoder,
    tokenizer,
    sequences: Sequence[np.ndarray],
    params: SamplingParams,
    timings: Sequence[Timings] | None = None,
) -> Iterator[TokenEvent]:
    """Generate for a batch of spliced embedding sequences, yielding tokens as they come."""
    params.validate()
    eos = tokenizer.eos_token_id
    rng = np.random.default_rng(params.seed)
    timings = list(timings) if timings is not None else [Timings() for _ in sequences]
    detoks = [_Detokenizer(tokenizer, params.stop) for _ in sequences]
    done = [False] * len(sequences)
    embeds, mask, positions = left_pad(sequences)
    decoder.reset()
    t0 = time.perf_counter()
    logits = decoder.forward(embeds, mask, positions)
    t_first = time.perf_counter()
    for t in timings:
        t.prefill_s = t_first - t0
    next_pos = positions[:, -1:] + 1
    for step in range(params.max_new_tokens):
        tokens = select_tokens(logits, params, rng)
        for i, tok in enumerate(tokens):
            if done[i]:
                continue
            tok = int(tok)
            if tok == eos and not params.ignore_eos:
                done[i] = True
                yield TokenEvent(i, tok, detoks[i].flush(), "stop")
                continue
            text, hit_stop = detoks[i].push(tok)
            last = step == params.max_new_tokens - 1
            reason = "stop" if hit_stop else ("length" if last else None)
            done[i] = reason is not None
            if reason == "length":
                text += detoks[i].flush()
            yield TokenEvent(i, tok, text, reason)
        if all(done):
            break
        now = time.perf_counter()
        tokens = np.where(done, eos, tokens).astype(np.int64)
        mask = np.concatenate([mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
        logits = decoder.forward(decoder.embed(tokens[:, None]), mask, next_pos)
        next_pos = next_pos + 1
        elapsed = time.perf_counter() - now
        for i, t in enumerate(timings):
            if not done[i]:
                t.decode_s += elapsed
                t.decode_tokens += 1


def generate(
    decoder: Decoder,
    tokenizer,
    sequences: Sequence[np.ndarray],
    params: SamplingParams,
    timings: Sequence[Timings] | None = None,
) -> list[GenerationResult]:
    """Non-streaming `stream_tokens`: one result per sequence."""
    timings = list(timings) if timings is not None else [Timings() for _ in sequences]
    ids: list[list[int]] = [[] for _ in sequences]
    texts = [""] * len(sequences)
    reasons = ["length"] * len(sequences)
    for ev in stream_tokens(decoder, tokenizer, sequences, params, timings):
        ids[ev.index].append(ev.token_id)
        texts[ev.index] += ev.text
        if ev.finish_reason:
            reasons[ev.index] = ev.finish_reason
    return [GenerationResult(ids[i], texts[i], reasons[i], timings[i]) for i in range(len(sequences))]
