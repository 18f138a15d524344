"""Issue 21 at real size: the GEMM prompt kernels (engines/native_llm.py, bf16 and int8) beside ONNX Runtime's
MatMulNBits, on a 7B int4 gqa build, one process per measurement, one run.

Usage: python benchmarks/bf16_prefill_7b.py BUILD [--tokens 189,490,1024] [--kernels onnxruntime,bf16,int8,q4,q4-resident]
       [--out SUFFIX] [--accuracy N] [--serve] [--concurrency 1,16] [--vllm-folder FOLDER --vllm-venv VENV]
- Prefill: one prompt of N random-token embeddings through each kernel (OrtGqaDecoder.prefill on
  a fresh slot), wall time, prompt tokens/s, each GEMM kernel's speed-up and logits' cosine
  against ONNX Runtime's.
- --accuracy N: each kernel's last logits against the exact int4 math (fp32 activations).
- --serve: `bench serve BUILD --workload image --workload text` with `--prefill onnxruntime`, then
  with `--prefill bf16` (same requests, 128 tokens each, one server at a time); with
  --vllm-folder/--vllm-venv the last kernel's run has vLLM-CPU + our plugin beside it (`export vllm`
  folder, the venv `.ci/vllm` makes), started only after our server has stopped.
Writes benchmarks/results/bf16_prefill_7b.json and serve_7b_prefill_{onnxruntime,bf16}.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _kernels(dec, names):
    """NativeLlm objects for each kernel name (None: ORT's own), sharing `dec`; q4-resident: the
    q4 kernel over weights packed once (what Q4GqaDecoder runs), q4: re-packed each pass."""
    from convllava_export.engines.native_llm import NativeLlm

    threads = dec.gemm.threads if dec.gemm else None
    return {k: (None if k == "onnxruntime" else NativeLlm(dec.folder, threads, compute=k.split("-")[0], resident=k.endswith("-resident"))) for k in names}


def prefill_probe(build: Path, tokens: list[int], kernels: list[str]) -> dict:
    """In this process: every kernel over the same embeddings (the ORT session is shared)."""
    from convllava_export import set_kernel_env

    set_kernel_env()  # as the CLI does, before torch loads
    import numpy as np

    from convllava_export.engines.onnxruntime import open_decoder
    from convllava_export.benchmarks.serving import machine_info

    t = time.perf_counter()
    dec = open_decoder(build / "llm", prefill="onnxruntime")
    load_s = time.perf_counter() - t
    gemms = _kernels(dec, kernels)
    rng = np.random.default_rng(0)
    rows = []
    for n in tokens:
        emb = dec.embed(rng.integers(0, dec.vocab_size, n))
        out = {}
        for kernel in [kernels[0], *kernels]:  # the first twice: its first pass reads the weights from disk into the page cache
            cache = dec.new_cache(1 << 31, 1, 2048)
            cache.open(n + 8)
            dec.gemm = gemms[kernel]
            t = time.perf_counter()
            logits = dec.prefill(cache, emb)
            out[kernel] = (time.perf_counter() - t, logits)
        lo = out.get("onnxruntime", out[kernels[0]])[1]
        row = {"tokens": n}
        for k, (dt, lg) in out.items():
            row[f"{k}_s"], row[f"{k}_tok_s"] = round(dt, 2), round(n / dt, 1)
            if "onnxruntime" in out and k != "onnxruntime":
                row[f"{k}_speedup"] = round(out["onnxruntime"][0] / dt, 2)
                row[f"{k}_logits_cosine_vs_onnxruntime"] = round(float(lo @ lg / np.linalg.norm(lo) / np.linalg.norm(lg)), 5)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"load_s": round(load_s, 1), "machine": machine_info(), "kernels": kernels, "prefill": rows}


def accuracy_probe(build: Path, n: int, kernels: list[str]) -> dict:
    """Every kernel against the int4 model's exact math (the same unpacked weights, fp32
    activations, fp16 cache: NativeLlm with compute=float32), on one prompt of n positions."""
    from convllava_export import set_kernel_env

    set_kernel_env()
    import numpy as np
    import torch

    from convllava_export.engines.onnxruntime import open_decoder

    dec = open_decoder(build / "llm", prefill="onnxruntime")
    gemms = _kernels(dec, kernels)
    exact = _kernels(dec, ["bf16"])["bf16"]
    exact.compute = torch.float32
    emb = dec.embed(np.random.default_rng(1).integers(0, dec.vocab_size, n))
    out = {}
    for name, kernel in [("exact", exact), *gemms.items()]:
        dec.gemm = kernel
        cache = dec.new_cache(1 << 31, 1, 2048)
        cache.open(n + 8)
        out[name] = dec.prefill(cache, emb)
    cos = lambda a, b: round(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), 5)  # noqa: E731
    top = lambda a, k=10: set(np.argsort(a)[-k:].tolist())  # noqa: E731
    row = {"tokens": n}
    for k in kernels:
        row[f"cosine_{k}_vs_exact"] = cos(out[k], out["exact"])
        row[f"top1_{k}_eq_exact"] = bool(out[k].argmax() == out["exact"].argmax())
        row[f"top10_overlap_{k}"] = len(top(out[k]) & top(out["exact"]))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("build", type=Path)
    ap.add_argument("--tokens", default="189,490,1024")
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--vllm-folder", type=Path, default=None)
    ap.add_argument("--vllm-venv", type=Path, default=None)
    ap.add_argument("--skip-probe", action="store_true")
    ap.add_argument("--kernels", default="onnxruntime,bf16", help="which --prefill kernels to probe and serve with")
    ap.add_argument("--tag", default="", help="suffix of the serve JSON names")
    ap.add_argument("--accuracy", type=int, default=0, metavar="N", help="only: the kernels against the exact int4 math on N positions")
    ap.add_argument("--out", default="", help="suffix of the probe JSON names (default: none, as before)")
    a = ap.parse_args()
    if a.accuracy:
        (RESULTS / f"bf16_prefill_7b_accuracy{a.out}.json").write_text(json.dumps(accuracy_probe(a.build, a.accuracy, a.kernels.split(",")), indent=1))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not a.skip_probe:
        result = prefill_probe(a.build, [int(x) for x in a.tokens.split(",")], a.kernels.split(","))
        (RESULTS / f"bf16_prefill_7b{a.out}.json").write_text(json.dumps(result, indent=1))
    if a.serve:
        for kernel in a.kernels.split(","):
            peer = []
            if kernel == a.kernels.split(",")[-1] and a.vllm_folder and a.vllm_venv:
                # bf16 as issue 21 asks (the random checkpoint stores fp16; vLLM-CPU's fp16 GEMMs are far slower here)
                cmd = (f"VLLM_CPU_KVCACHE_SPACE=4 {a.vllm_venv}/bin/python -m vllm.entrypoints.openai.api_server --model {a.vllm_folder} "
                       "--host 127.0.0.1 --port 8011 --max-model-len 2048 --enforce-eager --dtype bfloat16")
                peer = ["--against", "http://127.0.0.1:8011", "--against-images", "--against-cmd", cmd]
            subprocess.run([sys.executable, "-m", "convllava_export.cli", "bench", "serve", str(a.build), "--concurrency", a.concurrency, "--workload", "image",
                            "--workload", "text", "--prompt-words", "140", "--requests-per-client", "1", "--max-running", "16", "--time-limit-s", "1800",
                            f"--serve-arg=--prefill={kernel}", *peer, "--json", str(RESULTS / f"serve_7b_prefill_{kernel}{a.tag}.json")], check=True)


if __name__ == "__main__":
    main()
