"""Explicit KV-cache state, owned by whoever schedules generation, never by a decoder.

A decoder is a set of pure functions over these objects (generation.Decoder): it reads a cache
and returns a new one. Two layouts, one per decoder family:

- `SeqKV`: one sequence, per-layer arrays [1, kv_heads, length, head_dim], no padding. What a
  prefill produces, what the prefix cache stores, what a request keeps between chunks.
- `PaddedBatch`: the running sequences of a dense decoder (torch reference, ONNX Runtime dynamo
  graph), left-padded to one length so one forward decodes all of them. Row b's tokens are its
  last `lengths[b]` columns; the padding columns are masked out, so a row computes what it would
  alone.
- `RowBatch`: for decoders that run one row at a time (the fused GroupQueryAttention graph):
  just the rows' own caches.

Arrays are numpy (float32 or float16, the graph's dtype). Joining and dropping rows copies the
cache (on admission and retirement only); a decode step passes each layer's array through once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SeqKV:
    arrays: tuple[np.ndarray, ...]  # per cache tensor (layer 0 key, layer 0 value, ...): [1, heads, length, head_dim]
    length: int

    def prefix(self, n: int) -> SeqKV:
        """The cache of the first n positions (a shared prompt prefix)."""
        if n == self.length:
            return self
        return SeqKV(tuple(np.ascontiguousarray(a[:, :, :n]) for a in self.arrays), n)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


@dataclass(frozen=True)
class PaddedBatch:
    arrays: tuple[np.ndarray, ...]  # [B, heads, T, head_dim]
    lengths: tuple[int, ...]  # real tokens per row, right-aligned

    @property
    def width(self) -> int:
        return self.arrays[0].shape[2] if self.arrays else 0

    def mask(self, new: int = 1) -> np.ndarray:
        """[B, T + new] int64: 1 on each row's real tokens and the new ones."""
        cols = np.arange(self.width + new)
        start = self.width - np.asarray(self.lengths)[:, None]
        return (cols[None, :] >= start).astype(np.int64)

    def positions(self) -> np.ndarray:
        """[B, 1] int64: each row's next position (its own length, padding not counted)."""
        return np.asarray(self.lengths, dtype=np.int64)[:, None]

    def join(self, seq: SeqKV) -> PaddedBatch:
        """Add a sequence as the last row, left-padding whichever side is shorter."""
        if not self.lengths:
            return PaddedBatch(seq.arrays, (seq.length,))
        width = max(self.width, seq.length)
        arrays = tuple(np.concatenate([_left_pad(a, width), _left_pad(b, width)]) for a, b in zip(self.arrays, seq.arrays))
        return PaddedBatch(arrays, (*self.lengths, seq.length))

    def drop(self, keep: Sequence[int]) -> PaddedBatch:
        """Only rows `keep`, with the padding no remaining row needs trimmed off."""
        if not keep:
            return PaddedBatch((), ())
        lengths = tuple(self.lengths[i] for i in keep)
        cut = self.width - max(lengths)
        return PaddedBatch(tuple(np.ascontiguousarray(a[list(keep), :, cut:]) for a in self.arrays), lengths)

    def row(self, b: int) -> SeqKV:
        n = self.lengths[b]
        return SeqKV(tuple(np.ascontiguousarray(a[b : b + 1, :, self.width - n :]) for a in self.arrays), n)

    def advanced(self, arrays: Sequence[np.ndarray]) -> PaddedBatch:
        """After a decode step: the graph's present arrays, one more token per row."""
        return PaddedBatch(tuple(arrays), tuple(n + 1 for n in self.lengths))


@dataclass(frozen=True)
class RowBatch:
    rows: tuple[SeqKV, ...]

    def join(self, seq: SeqKV) -> RowBatch:
        return RowBatch((*self.rows, seq))

    def drop(self, keep: Sequence[int]) -> RowBatch:
        return RowBatch(tuple(self.rows[i] for i in keep))

    def row(self, b: int) -> SeqKV:
        return self.rows[b]


Batch = PaddedBatch | RowBatch


class DenseDecoder:
    """`extend`/`decode` for decoders whose graph takes a left-padded batch with an attention
    mask and position ids (the torch reference, the ONNX Runtime dynamo graph). Subclasses give
    `step(embeds [B,S,H], mask [B,P+S], positions [B,S], past arrays | None) -> (last-position
    logits [B,V], present arrays)`."""

    def step(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: tuple[np.ndarray, ...] | None) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        raise NotImplementedError

    def extend(self, embeds: np.ndarray, past: SeqKV | None = None) -> tuple[np.ndarray, SeqKV]:
        """One sequence, S new positions [S, H] after `past`: a prefill, a prefill chunk or one token."""
        n, s = (past.length if past else 0), len(embeds)
        mask = np.ones((1, n + s), dtype=np.int64)
        positions = np.arange(n, n + s, dtype=np.int64)[None]
        logits, present = self.step(embeds[None], mask, positions, past.arrays if past else None)
        return logits[0], SeqKV(tuple(present), n + s)

    def new_batch(self) -> PaddedBatch:
        return PaddedBatch((), ())

    def decode(self, embeds: np.ndarray, batch: PaddedBatch) -> tuple[np.ndarray, PaddedBatch]:
        """One token per running row [B, H], all rows in one forward."""
        logits, present = self.step(embeds[:, None], batch.mask(), batch.positions(), batch.arrays)
        return logits, batch.advanced(present)


class RowDecoder:
    """`decode` row by row over `extend`, for graphs that take no padding (GroupQueryAttention
    reads each row's length from its mask and expects positions to start at 0)."""

    def extend(self, embeds: np.ndarray, past: SeqKV | None = None) -> tuple[np.ndarray, SeqKV]:
        raise NotImplementedError

    def new_batch(self) -> RowBatch:
        return RowBatch(())

    def decode(self, embeds: np.ndarray, batch: RowBatch) -> tuple[np.ndarray, RowBatch]:
        out = [self.extend(embeds[b : b + 1], row) for b, row in enumerate(batch.rows)]
        return np.stack([logits for logits, _ in out]), RowBatch(tuple(kv for _, kv in out))


def _left_pad(a: np.ndarray, width: int) -> np.ndarray:
    if a.shape[2] == width:
        return a
    pad = np.zeros((a.shape[0], a.shape[1], width - a.shape[2], a.shape[3]), dtype=a.dtype)
    return np.concatenate([pad, a], axis=2)
