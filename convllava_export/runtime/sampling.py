"""Next-token selection on numpy logits: greedy, temperature and top-p, seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks; vLLM's request field of the same name)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")


def select_tokens(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """logits [B,V] → token ids [B]."""
    if params.temperature == 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64)
    z = (z - z.max(axis=-1, keepdims=True)) / params.temperature  # <= 0 before scaling: no overflow at any temperature
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.empty(len(probs), dtype=np.int64)
    for i, p in enumerate(probs):
        if params.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, params.top_p) + 1)]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        out[i] = rng.choice(len(p), p=p)
    return out
