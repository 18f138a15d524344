"""Peak RSS of exporting a Vicuna-7B-shaped decoder (random weights) to ONNX in fp16.

Usage: python benchmarks/export_memory_7b.py WORKDIR [--skip-write]
Writes a synthetic 7B checkpoint in the released layout (fp16, shard by shard), then loads it
in fp16 and exports the decoder in a fresh process, reporting that process's peak RSS (VmHWM)
against the fp16 weight bytes. Target (issue 4): <= 1.5x.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time, torch
from pathlib import Path
from convllava_export.model.reference import ReferenceModel
from convllava_export.export.llm import export_decoder
from convllava_export.benchmarks import peak_rss_mb
ck, out = sys.argv[1], Path(sys.argv[2])
t = time.perf_counter()
ref = ReferenceModel.load(ck, dtype="fp16", load_vision=False)
load_s = time.perf_counter() - t
after_load = peak_rss_mb()
weights = sum(p.numel() * p.element_size() for p in ref.llm.parameters())
out.mkdir(parents=True, exist_ok=True)
t = time.perf_counter()
export_decoder(ref.llm, out, progress=lambda m: print(m, flush=True))
print(json.dumps({"fp16_weight_gb": weights / 1e9, "load_s": load_s, "export_s": time.perf_counter() - t,
                  "peak_rss_after_load_gb": after_load / 1024, "peak_rss_gb": peak_rss_mb() / 1024,
                  "ratio": peak_rss_mb() * 2**20 / weights}))
"""


def main() -> None:
    work = Path(sys.argv[1])
    if "--skip-write" not in sys.argv:
        from convllava_export.tiny import ModelShape, write_random_checkpoint

        t = time.perf_counter()
        write_random_checkpoint(work / "ck", ModelShape.preset("vicuna-7b"))
        print(f"wrote the synthetic checkpoint in {time.perf_counter() - t:.0f} s", flush=True)
    res = subprocess.run([sys.executable, "-c", CHILD, str(work / "ck" / "ConvLLaVA-tiny-sft"), str(work / "onnx")], capture_output=True, text=True)
    print(res.stdout[-3000:], res.stderr[-3000:])
    (work / "result.json").write_text(res.stdout.strip().splitlines()[-1] if res.stdout.strip() else json.dumps({"error": res.stderr[-2000:]}))


if __name__ == "__main__":
    main()
