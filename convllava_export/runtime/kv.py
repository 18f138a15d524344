"""KV caches, owned by whoever schedules generation (runtime/scheduler.py), never by a decoder.

A decoder is a set of pure functions over these objects (generation.Decoder). The scheduler
opens a pending row for each new sequence (`open`; several may be pending at once), the decoder
prefills pending rows chunk by chunk (`prefill_rows`: one chunk per row in one pass, so a kernel
may share work between them), the first pending row joins the running rows once its prompt is in
(`commit`), every running row decodes one token in one forward (`decode`), and finished rows
leave (`drop`). Two layouts, one per graph family:

- `SlotCache` (the fused GroupQueryAttention graph): per-layer buffers [rows, kv_heads, width,
  head_dim] bound as both past and present, so GroupQueryAttention writes each new position in
  place and a decode step copies nothing. Rows are right-padded (each row's length is its mask's
  count of ones); running rows are 0..n-1 and the pending rows follow them, so one ORT run
  covers every running row. A leaving row's place is taken by the last row (one row copied).
  The buffer grows in steps (rows by powers of two, width in `WIDTH_STEP` positions) and shrinks
  when its rows leave, within a byte budget.
- `DenseCache` (torch reference, ONNX Runtime dynamo graph): those graphs concatenate past and
  new keys inside the graph and return new arrays each step, so they cannot write in place; the
  running rows are a left-padded `PaddedBatch` (a row computes exactly what it would alone), each
  pending row is its own `SeqKV`, and joining or leaving copies the batch.

Both account their bytes the same way (rows × width × bytes per position), which is what
admission counts. `SeqKV` is one sequence's compact cache: what the prefix cache keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WIDTH_STEP = 256  # a slot buffer's width grows in these steps (re-laid out at most once per step)


@dataclass(frozen=True)
class SeqKV:
    arrays: tuple[np.ndarray, ...]  # per cache tensor (layer 0 key, layer 0 value, ...): [1, heads, length, head_dim]
    length: int

    def prefix(self, n: int) -> SeqKV:
        """The cache of the first n positions (a shared prompt prefix), as its own compact copy."""
        if n == self.length and all(a.shape[2] == n for a in self.arrays):
            return self
        return SeqKV(tuple(np.ascontiguousarray(a[:, :, :n]) for a in self.arrays), n)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


@dataclass(frozen=True)
class CacheShape:
    """What a decoder's cache holds per position: `tensors` arrays (a key and a value per layer)
    of [kv_heads, head_dim] in `dtype`."""

    tensors: int
    kv_heads: int
    head_dim: int
    dtype: np.dtype

    @property
    def position_bytes(self) -> int:
        return self.tensors * self.kv_heads * self.head_dim * np.dtype(self.dtype).itemsize


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class _Budgeted:
    """What both cache layouts share: their shape per position and the byte budget."""

    def __init__(self, shape: CacheShape, budget_bytes: float, max_rows: int, max_width: int) -> None:
        self.shape, self.budget, self.max_rows, self.max_width = shape, budget_bytes, max_rows, max_width

    def ever_fits(self, limit: int) -> bool:
        """Whether a row that may reach `limit` positions fits the budget alone."""
        return limit * self.shape.position_bytes <= self.budget


class SlotCache(_Budgeted):
    """Shared past/present buffers for batched in-place decoding (see the module docstring)."""

    def __init__(self, shape: CacheShape, budget_bytes: float, max_rows: int, max_width: int) -> None:
        super().__init__(shape, budget_bytes, max_rows, max_width)
        self.arrays: list[np.ndarray] = []
        self.lengths: list[int] = []  # running rows, then the pending row when one is open
        self.limits: list[int] = []  # positions each row may reach (prompt + max tokens, within the context)
        self.pending = 0  # rows being prefilled, after the running ones

    # -- accounting -------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Running rows (pending ones not counted)."""
        return len(self.lengths) - self.pending

    @property
    def capacity(self) -> tuple[int, int]:
        return (self.arrays[0].shape[0], self.arrays[0].shape[2]) if self.arrays else (0, 0)

    @property
    def nbytes(self) -> int:
        rows, width = self.capacity
        return rows * width * self.shape.position_bytes

    def _plan(self, rows: int, width: int) -> tuple[int, int] | None:
        """Buffer capacity for `rows` rows of `width` positions: rounded up when the budget
        allows (fewer re-layouts), exact when only that fits, None when nothing does."""
        pb = self.shape.position_bytes
        have_r, have_w = self.capacity
        r = max(have_r, min(_next_pow2(rows), self.max_rows))
        w = max(have_w, min(-(-width // WIDTH_STEP) * WIDTH_STEP, self.max_width))
        for cand_r, cand_w in ((r, w), (max(have_r, rows), w), (max(have_r, rows), max(have_w, width)), (rows, width)):
            if cand_r >= rows and cand_w >= width and cand_r * cand_w * pb <= self.budget:
                return cand_r, cand_w
        return None

    def fits(self, limit: int) -> bool:
        """Whether a new row that may reach `limit` positions fits the budget beside the others."""
        return self._plan(len(self.lengths) + 1, max([limit, *self.limits])) is not None

    def _relayout(self, rows: int, width: int) -> None:
        """New buffers of [rows, heads, width, dim], one tensor at a time (the old one freed
        before the next is made, so the peak is one tensor above the larger of the two)."""
        used = max(self.lengths, default=0)
        n = len(self.lengths)
        s = self.shape
        old = self.arrays
        self.arrays = []
        for i in range(s.tensors):
            new = np.zeros((rows, s.kv_heads, width, s.head_dim), dtype=s.dtype)
            if old and n:
                new[:n, :, :used] = old[i][:n, :, :used]
                old[i] = None  # freed before the next tensor is made
            self.arrays.append(new)

    # -- rows -------------------------------------------------------------------------------
    def open(self, limit: int, prefix: SeqKV | None = None) -> None:
        """Start a pending row (the last row), its first positions copied from `prefix`."""
        plan = self._plan(len(self.lengths) + 1, max([limit, *self.limits]))
        if plan is None:
            raise RuntimeError("SlotCache.open without room: admission must check fits() first")
        if plan != self.capacity:
            self._relayout(*plan)
        row, n = len(self.lengths), prefix.length if prefix is not None else 0
        if prefix is not None:
            for a, p in zip(self.arrays, prefix.arrays):
                a[row, :, :n] = p[0, :, :n]
        self.lengths.append(n)
        self.limits.append(limit)
        self.pending += 1

    def commit(self) -> None:
        """The first pending row joins the running rows."""
        assert self.pending
        self.pending -= 1

    def abandon(self, k: int | None = None) -> None:
        """Drop pending row k (its request failed or was cancelled during prefill); None: all."""
        if not self.pending:
            return
        n = self.rows
        gone = set(range(self.pending)) if k is None else {k}
        self._reorder([*range(n), *(n + j for j in range(self.pending) if j not in gone)])
        self.pending -= len(gone)
        self._maybe_shrink()

    def drop(self, keep: Sequence[int]) -> None:
        """Keep only running rows `keep` (in that order; pending rows stay pending, after them)."""
        n = self.rows
        self._reorder([*keep, *range(n, n + self.pending)])
        self._maybe_shrink()

    def _reorder(self, order: list[int]) -> None:
        """Rows `order` become rows 0..len(order)-1 (each moved row's positions copied)."""
        if order == list(range(len(order))):
            del self.lengths[len(order) :], self.limits[len(order) :]
            return
        for dst, src in enumerate(order):
            if dst != src:
                m = self.lengths[src]
                for a in self.arrays:
                    a[dst, :, :m] = a[src, :, :m]
        self.lengths = [self.lengths[i] for i in order]
        self.limits = [self.limits[i] for i in order]

    def _maybe_shrink(self) -> None:
        """Give memory back: all of it when no row is left, else when the rows need under half."""
        if not self.lengths:
            self.arrays = []
            return
        rows, width = self.capacity
        need_r, need_w = len(self.lengths), max(self.limits)
        if rows * width >= 2 * _next_pow2(need_r) * max(need_w, WIDTH_STEP):
            plan = (min(rows, _next_pow2(need_r)), min(width, -(-need_w // WIDTH_STEP) * WIDTH_STEP))
            self._relayout(*plan)

    def row(self, b: int) -> SeqKV:
        """Row b's cache as a compact copy (for the prefix cache)."""
        n = self.lengths[b]
        return SeqKV(tuple(np.ascontiguousarray(a[b : b + 1, :, :n]) for a in self.arrays), n)

    def mask(self, rows: slice, new: int) -> np.ndarray:
        """[rows, longest + new] int64, right-padded: each row's positions and its `new` ones."""
        lengths = np.asarray(self.lengths[rows])
        cols = np.arange(int(lengths.max()) + new)
        return (cols[None, :] < (lengths[:, None] + new)).astype(np.int64)

    def advance(self, rows: slice, new: int) -> None:
        for i in range(*rows.indices(len(self.lengths))):
            self.lengths[i] += new


class DenseCache(_Budgeted):
    """Running rows as a left-padded PaddedBatch plus the pending row's SeqKV (see module docstring)."""

    def __init__(self, shape: CacheShape, budget_bytes: float, max_rows: int, max_width: int) -> None:
        super().__init__(shape, budget_bytes, max_rows, max_width)
        self.batch = PaddedBatch((), ())
        self.pending_kvs: list[SeqKV | None] = []  # rows being prefilled, in order
        self.limits: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.batch.lengths)

    @property
    def pending(self) -> int:
        return len(self.pending_kvs)

    @property
    def lengths(self) -> list[int]:
        return [*self.batch.lengths, *(kv.length if kv else 0 for kv in self.pending_kvs)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.batch.arrays) + sum(kv.nbytes for kv in self.pending_kvs if kv)

    def fits(self, limit: int) -> bool:
        return (len(self.limits) + 1) * max([limit, *self.limits]) * self.shape.position_bytes <= self.budget

    def open(self, limit: int, prefix: SeqKV | None = None) -> None:
        self.pending_kvs.append(prefix)
        self.limits.append(limit)

    def commit(self) -> None:
        first = self.pending_kvs.pop(0)
        assert first is not None
        self.batch = self.batch.join(first)

    def abandon(self, k: int | None = None) -> None:
        """Drop pending row k; None: all."""
        if k is None:
            del self.limits[self.rows :]
            self.pending_kvs = []
        elif k < len(self.pending_kvs):
            del self.pending_kvs[k], self.limits[self.rows + k]

    def drop(self, keep: Sequence[int]) -> None:
        self.limits = [self.limits[i] for i in keep] + self.limits[self.rows :]
        self.batch = self.batch.drop(keep)

    def row(self, b: int) -> SeqKV:
        return self.batch.row(b)


KVCache = SlotCache | DenseCache


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


class DenseDecoder:
    """The Decoder contract for graphs that take a left-padded batch with an attention mask and
    position ids (the torch reference, the ONNX Runtime dynamo graph). Subclasses give
    `cache_shape` and `step(embeds [B,S,H], mask [B,P+S], positions [B,S], past arrays | None)
    -> (last-position logits [B,V], present arrays)`."""

    cache_shape: CacheShape
    runs_own_loop = False
    prefill_tokens = 256

    def step(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: tuple[np.ndarray, ...] | None) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        raise NotImplementedError

    def extend(self, embeds: np.ndarray, past: SeqKV | None = None) -> tuple[np.ndarray, SeqKV]:
        """One sequence, S new positions [S, H] after `past`: a prefill, a prefill chunk or one token."""
        n, s = (past.length if past else 0), len(embeds)
        mask = np.ones((1, n + s), dtype=np.int64)
        positions = np.arange(n, n + s, dtype=np.int64)[None]
        logits, present = self.step(embeds[None], mask, positions, past.arrays if past else None)
        return logits[0], SeqKV(tuple(present), n + s)

    def new_cache(self, budget_bytes: float, max_rows: int, max_width: int) -> DenseCache:
        return DenseCache(self.cache_shape, budget_bytes, max_rows, max_width)

    def prefill_rows(self, cache: DenseCache, chunks: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The next positions of pending rows 0..len(chunks)-1 (chunk [S_i, H] each); each row's
        last position's logits [V]."""
        out = []
        for k, embeds in enumerate(chunks):
            if not len(embeds):  # a row whose prompt is in, waiting to join
                out.append(None)
                continue
            logits, cache.pending_kvs[k] = self.extend(embeds, cache.pending_kvs[k])
            out.append(logits)
        return out

    def prefill(self, cache: DenseCache, embeds: np.ndarray) -> np.ndarray:
        """S more positions [S, H] of the first pending row; its last position's logits [V]."""
        return self.prefill_rows(cache, [embeds])[0]

    def decode(self, cache: DenseCache, embeds: np.ndarray) -> np.ndarray:
        """One token per running row [B, H], all rows in one forward; logits [B, V]."""
        b = cache.batch
        logits, present = self.step(embeds[:, None], b.mask(), b.positions(), b.arrays)
        cache.batch = b.advanced(present)
        return logits


def _left_pad(a: np.ndarray, width: int) -> np.ndarray:
    if a.shape[2] == width:
        return a
    pad = np.zeros((a.shape[0], a.shape[1], width - a.shape[2], a.shape[3]), dtype=a.dtype)
    return np.concatenate([pad, a], axis=2)
