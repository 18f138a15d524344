"""Issue 21 at real size: where a q4 prompt and a one-row q4 decode step spend their time.

Why: the 16-client figure is half prompts and half decode steps (bench serve's `server_time`);
this splits each into the decoder's parts, timed in-process by wrapping its methods: the GEMM
calls (`linear`: activation quantization + gemm_q4 over the resident weights), attention
(torch SDPA), rotary, RMSNorm, and the rest (residuals, SiLU, cache writes).

Usage: python benchmarks/q4_profile_7b.py BUILD [--tokens 490] [--steps 10] [--repeats 2]
Writes benchmarks/results/q4_profile_7b.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("build", type=Path)
    ap.add_argument("--tokens", type=int, default=490)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    from convllava_export import set_kernel_env

    set_kernel_env()
    import numpy as np
    import torch.nn.functional as F

    from convllava_export.benchmarks.serving import machine_info
    from convllava_export.engines.onnxruntime import open_decoder

    spent: dict[str, float] = collections.defaultdict(float)

    def timed(key: str, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t

        return wrapper

    dec = open_decoder(a.build / "llm", prefill="q4")
    for name in ("linear", "_rotary", "_norm"):
        setattr(dec.gemm, name, timed(name.strip("_"), getattr(dec.gemm, name)))
    F.scaled_dot_product_attention = timed("attention", F.scaled_dot_product_attention)
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(a.repeats):
        cache = dec.new_cache(1 << 34, 1, a.tokens + a.steps + 8)
        cache.open(a.tokens + a.steps + 2)
        spent.clear()
        t = time.perf_counter()
        dec.prefill(cache, dec.embed(rng.integers(0, dec.vocab_size, a.tokens)))
        prompt = {"total_s": time.perf_counter() - t, **spent}
        cache.commit()
        emb = dec.embed(rng.integers(0, dec.vocab_size, 1))
        dec.decode(cache, emb)  # warm
        spent.clear()
        t = time.perf_counter()
        for _ in range(a.steps):
            dec.decode(cache, emb)
        step = {"total_s": (time.perf_counter() - t) / a.steps, **{k: v / a.steps for k, v in spent.items()}}
        for part in (prompt, step):
            part["rest"] = part["total_s"] - sum(v for k, v in part.items() if k != "total_s")
        runs.append({"prompt": {k: round(v, 4) for k, v in prompt.items()}, "decode_step_1_row": {k: round(v, 4) for k, v in step.items()}})
        print(json.dumps(runs[-1]), flush=True)
    result = {"build": str(a.build), "tokens": a.tokens, "context_of_steps": a.tokens, "machine": machine_info(), "runs": runs}
    (ROOT / "benchmarks" / "results" / "q4_profile_7b.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
