"""The int8 KV cache at real size: two builds of the same 7B checkpoint that differ only in
`--kv-cache` (fp16, the default, and int8), side by side in one process.

Usage: python benchmarks/kv_int8_7b.py FP16_BUILD INT8_BUILD [--prompts 4] [--decode 32] [--json F]
- Accuracy: multimodal prompts (synthetic images of mixed aspect ratios, templated questions)
  prepared once by the fp16 build's pipeline, then prefilled by each decoder (ONNX Runtime's
  prompt kernel): the last-position logits' cosine, top-1 and top-10 overlap, int8 against fp16;
  then `--decode` greedy tokens from each, and the share of them that agree.
- Bytes per cached position, and the time per decode step at one row for each cache.
Writes benchmarks/results/kv_int8_7b.json by default.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fp16_build", type=Path)
    ap.add_argument("int8_build", type=Path)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "kv_int8_7b.json")
    args = ap.parse_args()

    from convllava_export import set_kernel_env

    set_kernel_env()
    from convllava_export.benchmarks.serving import machine_info
    from convllava_export.engines.onnxruntime import open_decoder
    from convllava_export.runtime.build_loader import open_build
    from convllava_export.runtime.pipeline import Request, Timings
    from convllava_export.synthetic import colour_samples

    pipe = open_build(args.fp16_build, prefill="onnxruntime")
    decoders = {"fp16": pipe.decoder, "int8": open_decoder(args.int8_build / "llm", prefill="onnxruntime")}
    questions = ["What is shown in this image?", "Describe the colours.", "Is the image wide or tall?", "What shape is in the picture?"]
    prompts = [pipe.prepare(Request(questions[k % 4], [s.image]), Timings()) for k, s in enumerate(colour_samples(args.prompts, seed=2024))]
    rows = []
    for k, emb in enumerate(prompts):
        out = {}
        for name, dec in decoders.items():
            cache = dec.new_cache(1 << 30, 1, 2048)
            cache.open(len(emb) + args.decode + 1)
            t = time.perf_counter()
            logits = dec.prefill(cache, emb)
            prefill_s = time.perf_counter() - t
            cache.commit()  # the row joins the running rows
            tokens, t = [int(np.argmax(logits))], time.perf_counter()
            for _ in range(args.decode - 1):
                tokens.append(int(np.argmax(dec.decode(cache, dec.embed(np.array([tokens[-1]])))[0])))
            out[name] = {"logits": logits, "tokens": tokens, "prefill_s": prefill_s, "tpot_s": (time.perf_counter() - t) / max(1, args.decode - 1)}
        a, b = out["fp16"]["logits"].astype(np.float64), out["int8"]["logits"].astype(np.float64)
        agree = next((i for i, (x, y) in enumerate(zip(out["fp16"]["tokens"], out["int8"]["tokens"])) if x != y), args.decode)
        rows.append({"prompt_positions": len(emb), "logits_cosine": round(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), 5),
                     "top1_same": bool(np.argmax(a) == np.argmax(b)), "top10_overlap": len(set(np.argsort(a)[-10:].tolist()) & set(np.argsort(b)[-10:].tolist())),
                     "greedy_tokens_identical_before_first_difference": agree,
                     "tpot_s": {n: round(o["tpot_s"], 3) for n, o in out.items()}, "prefill_s": {n: round(o["prefill_s"], 2) for n, o in out.items()}})
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "fp16_build": args.fp16_build.name, "int8_build": args.int8_build.name, "machine": machine_info(),
        "bytes_per_position": {n: int(d.cache_shape.position_bytes) for n, d in decoders.items()},
        "prompts": rows,
        "summary": {"min_logits_cosine": min(r["logits_cosine"] for r in rows), "top1_same": sum(r["top1_same"] for r in rows), "of": len(rows),
                    "mean_top10_overlap": round(float(np.mean([r["top10_overlap"] for r in rows])), 2),
                    "tpot_ratio_int8_over_fp16": round(float(np.mean([r["tpot_s"]["int8"] / r["tpot_s"]["fp16"] for r in rows])), 3)},
    }
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
