"""GPU checks for a lent CUDA machine (no TensorRT there): one script, results as JSON.

1. The torch reference on CUDA, fp32 and fp16, against the conformance fixtures.
2. A TensorRT-LLM FP8 checkpoint of the conformance LLM through ModelOpt (FP8 needs sm_89+),
   calibrated on the fixtures' multimodal prompts.
3. Torch eager latency of the full-size ConvNeXt†+projector on the GPU (fp32 / fp16 / bf16),
   and the fp16 range check (activations above 65504) at 1536².

Usage: python benchmarks/gpu_check.py OUT.json
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIX = ROOT / "tests" / "fixtures" / "conformance"


def conformance(results: dict) -> None:
    from convllava_export.model.reference import ReferenceModel, TorchDecoder
    from convllava_export.preprocess import PreprocessConfig, load_image, preprocess
    from convllava_export.runtime.generation import generate
    from convllava_export.runtime.sampling import SamplingParams

    manifest = json.loads((FIX / "manifest.json").read_text())
    for dtype, tol in (("fp32", {"feat": 1e-4, "logit": 1e-4}), ("fp16", {"feat": 3e-2, "logit": 5e-2})):
        ref = ReferenceModel.load(FIX / "convllava-tiny-a", vision_tower=FIX / "convnext-tiny-a", dtype=dtype, device="cuda")
        cfg = PreprocessConfig.from_preprocessor_config(ref.info.preprocessor_config)
        dec = TorchDecoder(ref)
        out = {}
        for name, e in manifest["images"].items():
            g = np.load(FIX / "golden" / e["npz"])
            px = preprocess(load_image(FIX / "images" / name), cfg)[None]
            with torch.no_grad():
                feats = ref.vision.features(torch.from_numpy(px).to("cuda", ref.dtype)).float().cpu().numpy()
            seq = g["inputs_embeds"][0]
            res = generate(dec, ref.tokenizer, [seq], SamplingParams(max_new_tokens=64))[0]
            first = dec.extend(seq)[0]
            out[name] = {
                "features_max_abs": float(np.abs(feats - g["vision_features"]).max()),
                "first_logits_max_abs": float(np.abs(first - g["first_forward_last_logits"]).max()),
                "greedy_ids_equal": res.token_ids == g["gen_ids_until_eos"].tolist(),
            }
        ok = all(v["features_max_abs"] <= tol["feat"] and v["first_logits_max_abs"] <= tol["logit"] and v["greedy_ids_equal"] for v in out.values())
        results[f"conformance_cuda_{dtype}"] = {"passed": ok, "tolerance": tol, "images": out}


def fp8_trtllm(results: dict, workdir: Path) -> None:
    from convllava_export.engines.tensorrt_llm import export_trtllm_checkpoint
    from convllava_export.model.reference import ReferenceModel

    ref = ReferenceModel.load(FIX / "convllava-tiny-a", vision_tower=FIX / "convnext-tiny-a", device="cuda")
    manifest = json.loads((FIX / "manifest.json").read_text())
    seqs = [np.load(FIX / "golden" / e["npz"])["inputs_embeds"][0] for e in manifest["images"].values()]
    t = time.perf_counter()
    meta = export_trtllm_checkpoint(ref.llm, seqs, "fp8", workdir / "fp8", progress=lambda m: None)
    from safetensors import safe_open

    dtypes = {}
    with safe_open(str(workdir / "fp8" / "rank0.safetensors"), "pt") as f:
        for k in f.keys():
            if k.endswith("qkv.weight") or k.endswith("fc.weight"):
                dtypes[k] = str(f.get_tensor(k).dtype)
    results["trtllm_fp8"] = {"meta": meta, "seconds": time.perf_counter() - t, "weight_dtypes": dtypes, "passed": meta["quant_algo"] == "FP8" and all("float8" in d for d in dtypes.values())}


def vision_latency(results: dict) -> None:
    from convllava_export.benchmarks.vision import build_vision
    from convllava_export.export.vision import fp16_overflow_report

    vision = build_vision().cuda().eval()
    rows = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        v = vision.to(dtype)
        for hw in ((768, 768), (1024, 1024), (1536, 1536), (1536, 2560)):
            x = torch.randn(1, 3, *hw, device="cuda", dtype=dtype)
            with torch.no_grad():
                for _ in range(2):
                    v(x)
                torch.cuda.synchronize()
                times = []
                for _ in range(5):
                    t = time.perf_counter()
                    y = v(x)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
            rows[f"{str(dtype).replace('torch.', '')} {hw[0]}x{hw[1]}"] = {"ms": float(np.median(times) * 1e3), "finite": bool(torch.isfinite(y).all())}
    results["vision_torch_cuda"] = {"device": torch.cuda.get_device_name(0), "rows": rows}
    vision = vision.float().cpu()
    rng = np.random.default_rng(0)
    report = fp16_overflow_report(vision, [rng.standard_normal((1, 3, 1536, 1536)).astype(np.float32)])
    results["fp16_range_1536_random_weights"] = {"max_abs": report["max_abs"], "count": report["count"], "first": report["overflows_fp16"][:5]}


def main() -> None:
    out = Path(sys.argv[1])
    work = out.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "cc": list(torch.cuda.get_device_capability(0))}
    for name, fn in (("conformance", lambda: conformance(results)), ("fp8", lambda: fp8_trtllm(results, work)), ("vision", lambda: vision_latency(results))):
        t = time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001 - record and go on to the next check
            results[f"{name}_error"] = traceback.format_exc()[-3000:]
        results[f"{name}_seconds"] = time.perf_counter() - t
        out.write_text(json.dumps(results, indent=2))
        print(name, "done", flush=True)


if __name__ == "__main__":
    main()
