"""Comparators, Polygraphy-style: each takes reference and candidate outputs and returns numbers."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..runtime.generation import Decoder, Generator, TablePrompt


def teacher_forced_logits(decoder: Decoder | Generator, prompt: np.ndarray | TablePrompt, answer_ids: Sequence[int]) -> np.ndarray:
    """Logits [len(answer), V] predicting each answer token given the true prefix (a Generator:
    one run over prompt + answer, reading the engine's context logits)."""
    if decoder.runs_own_loop:
        full = TablePrompt([*prompt.ids, *answer_ids[:-1]], prompt.images)
        rows = np.asarray(decoder.context_logits(full), dtype=np.float64)  # one per (expanded) position
        return rows[-max(len(answer_ids), 1) :]  # position i predicts token i+1: the last prompt row predicts answer[0]
    logits, kv = decoder.extend(np.asarray(prompt, dtype=np.float32))
    rows = [logits]
    for tok in answer_ids[:-1]:
        logits, kv = decoder.extend(decoder.embed(np.array([tok])), kv)
        rows.append(logits)
    return np.stack(rows).astype(np.float64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def logits_agreement(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """Next-token KL(ref‖cand) (mean over positions) and top-1 agreement."""
    lp, lq = log_softmax(ref), log_softmax(cand)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": float((ref.argmax(-1) == cand.argmax(-1)).mean())}


def first_divergence(ref_ids: Sequence[int], cand_ids: Sequence[int]) -> int | None:
    """Index of the first differing token of two greedy outputs, None when identical."""
    for i, (a, b) in enumerate(zip(ref_ids, cand_ids)):
        if a != b:
            return i
    return None if len(ref_ids) == len(cand_ids) else min(len(ref_ids), len(cand_ids))


def token_agreement(ref_ids: Sequence[int], cand_ids: Sequence[int]) -> float:
    n = max(len(ref_ids), len(cand_ids), 1)
    return sum(a == b for a, b in zip(ref_ids, cand_ids)) / n


def normalize_answer(text: str) -> str:
    """SQuAD/VQA-style normalization: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity (DocVQA): 1 - NL, zeroed below the threshold."""
    best = 0.0
    p = " ".join(prediction.lower().split())
    for a in answers:
        a = " ".join(a.lower().split())
        nl = _levenshtein(p, a) / max(len(p), len(a), 1)
        best = max(best, 1 - nl if nl < threshold else 0.0)
    return best


def cosine_per_image(ref: np.ndarray, cand: np.ndarray) -> float:
    a, b = ref.reshape(-1, ref.shape[-1]).astype(np.float64), cand.reshape(-1, cand.shape[-1]).astype(np.float64)
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)).mean())


def summarize(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "min": None, "max": None}
    return {"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max())}
