"""Issue 21 at real size: what one batched decode step costs on a 7B int4 gqa build, by rows.

Why: the 16-client target (throughput >= 4x one client) is bounded by this step. With ONNX
Runtime's MatMulNBits at M = rows, a step reads the int4 weights once, but past a few rows it is
bound by the int8 compute, not by the read, so even a free prompt path gives at most
rows x t(1) / t(rows) times one client's decode rate.

Usage: python benchmarks/decode_rows_7b.py BUILD [--rows 1,4,16,32] [--context 8] [--steps 3] [--kernel onnxruntime|q4] [--out SUFFIX]
Each row holds `context` prompt positions; the step is timed over `steps` runs after a warm one
(the cache's positions advance, as in serving). --kernel q4: every step on the q4 kernel
(Q4GqaDecoder), else ONNX Runtime's MatMulNBits. Writes benchmarks/results/decode_rows_7b{SUFFIX}.json
with the load time and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("build", type=Path)
    ap.add_argument("--rows", default="1,4,16,32")
    ap.add_argument("--context", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--kernel", default="onnxruntime", choices=["onnxruntime", "q4"])
    ap.add_argument("--out", default="", help="suffix of the JSON name")
    a = ap.parse_args()
    from convllava_export import set_kernel_env

    set_kernel_env()
    import numpy as np

    from convllava_export.benchmarks.serving import machine_info
    from convllava_export.engines.onnxruntime import open_decoder

    t = time.perf_counter()
    dec = open_decoder(a.build / "llm", prefill=a.kernel)
    load_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    out = []
    for n in [int(x) for x in a.rows.split(",")]:
        cache = dec.new_cache(1 << 34, n, a.context + a.steps + 8)
        for _ in range(n):
            cache.open(a.context + a.steps + 2)
            dec.prefill(cache, dec.embed(rng.integers(0, dec.vocab_size, a.context)))
            cache.commit()
        emb = dec.embed(rng.integers(0, dec.vocab_size, n))
        dec.decode(cache, emb)
        t = time.perf_counter()
        for _ in range(a.steps):
            dec.decode(cache, emb)
        step = (time.perf_counter() - t) / a.steps
        out.append({"rows": n, "step_s": round(step, 3), "tok_s": round(n / step, 2)})
        print(json.dumps(out[-1]), flush=True)
    one = out[0]["step_s"] if out[0]["rows"] == 1 else None
    for r in out:
        if one:
            r["bound_vs_one_client"] = round(r["rows"] * one / r["step_s"], 2)  # free prefill: rows x t(1) / t(rows)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB
    result = {"build": str(a.build), "kernel": a.kernel, "context": a.context, "load_s": round(load_s, 1), "peak_rss_gb": round(peak, 2), "machine": machine_info(), "decode": out}
    (ROOT / "benchmarks" / "results" / f"decode_rows_7b{a.out}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
