"""GPU checks for a lent CUDA machine: one script, results as JSON, within 10 minutes.

1. conformance: the torch reference on CUDA, fp32 and fp16, against the conformance fixtures.
2. trtllm_checkpoint: a TensorRT-LLM FP8 checkpoint of the conformance LLM through ModelOpt
   (FP8 needs sm_89+), calibrated on the fixtures' multimodal prompts.
3. hf_checkpoints: ModelOpt unified HF checkpoints (`export llm --format hf`) at fp8, nvfp4,
   int4-awq and w4a8-awq, through the CLI, calibrated on the GPU (CI makes them on CPU).
4. simulate: `validate --device cuda --simulate fp8 --simulate int4-awq --simulate nvfp4` on a
   freshly trained tiny model: what the CPU cannot simulate (nvfp4), with the same metrics.
5. tensorrt_vision: `build --target tensorrt --vision-precision fp16` of the tiny model; the
   smoke test measures the built engine's cosine (needs TensorRT and onnxruntime-gpu).
6. trtllm_build: `build --llm-backend tensorrt-llm --llm-precision int4-awq`, then `run`
   (needs TensorRT-LLM 0.12-1.2.x and TensorRT).
7. trtllm_custom_module: `export vllm` of the tiny model, then TensorRT-LLM's LLM API (PyTorch
   backend) with our custom module (`convllava_export/plugins/trtllm`) on one conformance image:
   greedy ids against the golden `gen_ids_16`, from pixels and from precomputed embeddings
   (needs TensorRT-LLM 1.2.x / 1.3.x).
8. vision_latency: torch eager latency of the full-size ConvNeXt†+projector (fp32 / fp16 /
   bf16), and the fp16 range check (activations above 65504) at 1536².

A check whose requirements are missing is recorded as skipped with the reason (`skip_reason`);
without a CUDA GPU every check is skipped, so the script runs (and is tested) anywhere.

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
    from convllava_export.runtime.scheduler import generate
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
    from convllava_export.engines.tensorrt_llm import export_checkpoint
    from convllava_export.model.reference import ReferenceModel

    ref = ReferenceModel.load(FIX / "convllava-tiny-a", vision_tower=FIX / "convnext-tiny-a", device="cuda")
    manifest = json.loads((FIX / "manifest.json").read_text())
    seqs = [np.load(FIX / "golden" / e["npz"])["inputs_embeds"][0] for e in manifest["images"].values()]
    t = time.perf_counter()
    meta = export_checkpoint(ref.llm, seqs, "fp8", workdir / "fp8", "engine", progress=lambda m: None)
    from safetensors import safe_open

    dtypes = {}
    with safe_open(str(workdir / "fp8" / "rank0.safetensors"), "pt") as f:
        for k in f.keys():
            if k.endswith("qkv.weight") or k.endswith("fc.weight"):
                dtypes[k] = str(f.get_tensor(k).dtype)
    results["trtllm_checkpoint_fp8"] = {"meta": meta, "seconds": time.perf_counter() - t, "weight_dtypes": dtypes, "passed": meta["quant_algo"] == "FP8" and all("float8" in d for d in dtypes.values())}


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


def hf_checkpoints(results: dict, workdir: Path, formats: tuple[str, ...] = ("fp8", "nvfp4", "int4-awq", "w4a8-awq")) -> None:
    from click.testing import CliRunner

    from convllava_export.cli import cli

    ckpt = FIX / "convllava-tiny-a"
    out = {}
    for precision in formats:
        dest = workdir / f"hf-{precision}"
        args = ["export", "llm", str(ckpt), "--vision-tower", str(FIX / "convnext-tiny-a"), "-o", str(dest), "--force",
                "--backend", "tensorrt-llm", "--format", "hf", "--precision", precision, "--calib-images", "builtin", "--calib-limit", "8", "--awq-block-size", "32"]
        t = time.perf_counter()
        res = CliRunner().invoke(cli, args)
        row: dict = {"exit_code": res.exit_code, "seconds": time.perf_counter() - t}
        if res.exit_code == 0:
            row["hf_quant_config"] = json.loads((dest / "hf_quant_config.json").read_text())["quantization"]
        else:
            row["output"] = res.output[-1500:]
        out[precision] = row
    from convllava_export.precisions import MODELOPT

    results["hf_checkpoints"] = {"formats": out, "passed": all(out[p].get("hf_quant_config", {}).get("quant_algo") == MODELOPT[p].quant_algo for p in formats)}


def simulate(results: dict, workdir: Path, device: str = "cuda", formats: tuple[str, ...] = ("fp8", "int4-awq", "nvfp4")) -> None:
    from convllava_export.tiny import write_tiny_checkpoint
    from convllava_export.validation.data import load_items
    from convllava_export.validation.report import write_reports
    from convllava_export.validation.run import Gates, validate

    ckpt = write_tiny_checkpoint(workdir / "tiny", progress=lambda m: None)
    report, images = validate([], ckpt, load_items("builtin:16"), Gates(), 16, simulate=formats, device=device, progress=lambda m: None)
    write_reports(report, images, workdir / "simulate-report")
    rows = {b["name"]: {k: b["metrics"][k] for k in ("top1_agreement", "kl_mean", "greedy_exact_match")} | {"cosine_mean": b["metrics"]["vision_cosine"]["mean"]} for b in report["builds"]}
    results[f"simulate_{device}"] = {"builds": rows, "note": report["simulation"]["note"], "passed": set(rows) == {f"simulated:{f}" for f in formats}}


def _build(results: dict, key: str, workdir: Path, extra: list[str]) -> None:
    from click.testing import CliRunner

    from convllava_export.cli import cli

    ckpt = FIX / "convllava-tiny-a"
    dest = workdir / key
    args = ["build", str(ckpt), "--vision-tower", str(FIX / "convnext-tiny-a"), "-o", str(dest), "--force", "--target", "tensorrt",
            "--calib-images", "builtin", "--min-size", "64x64", "--max-size", "512x512", "--min-token-agreement", "0", *extra]
    t = time.perf_counter()
    res = CliRunner().invoke(cli, args)
    row: dict = {"exit_code": res.exit_code, "seconds": time.perf_counter() - t, "output": res.output[-2000:]}
    if res.exit_code == 0:
        manifest = json.loads((dest / "manifest.json").read_text())
        row["checks"] = {k: v for k, v in manifest["checks"].items() if k != "timings"}
        row["llm"] = manifest["llm"]
        ran = CliRunner().invoke(cli, ["run", str(dest), "--image", str(next((FIX / "images").iterdir())), "--prompt", "What is shown?", "--max-new-tokens", "16"])
        row["run"] = {"exit_code": ran.exit_code, "output": ran.output[-1000:]}
    row["passed"] = res.exit_code == 0 and row.get("run", {}).get("exit_code") == 0
    results[key] = row


def tensorrt_vision(results: dict, workdir: Path) -> None:
    _build(results, "tensorrt_vision", workdir, ["--vision-precision", "fp16", "--llm-precision", "fp16"])


def trtllm_build(results: dict, workdir: Path) -> None:
    _build(results, "trtllm_build", workdir, ["--vision-precision", "fp16", "--llm-backend", "tensorrt-llm", "--llm-precision", "int4-awq", "--awq-block-size", "32"])


def trtllm_custom_module(results: dict, workdir: Path) -> None:
    from PIL import Image
    from tensorrt_llm import LLM, SamplingParams

    import convllava_export.plugins.trtllm  # noqa: F401 - registers ConvLLaVA with TensorRT-LLM
    from convllava_export.export.hf_folder import export_hf_folder
    from convllava_export.prompt import build_prompt

    try:
        from tensorrt_llm.llmapi import KvCacheConfig
    except ImportError:  # pragma: no cover
        KvCacheConfig = None
    import tensorrt_llm

    folder = workdir / "convllava-hf"
    export_hf_folder(FIX / "convllava-tiny-a", folder, vision_tower=FIX / "convnext-tiny-a", force=True, progress=lambda m: None)
    name = "square_256x256.png"
    g = np.load(FIX / "golden" / json.loads((FIX / "manifest.json").read_text())["images"][name]["npz"])
    want = g["gen_ids_16"].tolist()
    kw = {"kv_cache_config": KvCacheConfig(enable_block_reuse=False, free_gpu_memory_fraction=0.3)} if KvCacheConfig else {}
    t = time.perf_counter()
    llm = LLM(model=str(folder), max_batch_size=2, max_seq_len=512, **kw)
    params = SamplingParams(max_tokens=16, temperature=0.0, top_k=1, ignore_eos=True)
    prompt = build_prompt(json.loads((FIX / "manifest.json").read_text())["prompt"]["question"])
    row: dict = {"tensorrt_llm": tensorrt_llm.__version__, "load_seconds": time.perf_counter() - t, "golden": want}
    got = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": [Image.open(FIX / "images" / name).convert("RGB")]}}], params)
    row["pixels_ids"] = list(got[0].outputs[0].token_ids)
    try:
        emb = torch.from_numpy(g["projected_features"][0])
        got = llm.generate([{"prompt": prompt, "multi_modal_embeddings": {"image": [emb]}}], params)
        row["embeddings_ids"] = list(got[0].outputs[0].token_ids)
    except Exception:  # noqa: BLE001 - recorded: the pixel path is the main check
        row["embeddings_error"] = traceback.format_exc()[-1500:]
    row["passed"] = row["pixels_ids"] == want and row.get("embeddings_ids") == want
    results["trtllm_custom_module"] = row


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def skip_reason(name: str) -> str | None:
    """Why check `name` cannot run here (None: it can)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    cc = torch.cuda.get_device_capability(0)
    if name in ("trtllm_checkpoint", "hf_checkpoints", "simulate") and not _has("modelopt"):
        return "NVIDIA ModelOpt not installed (pip install 'convllava-export[quant]')"
    if name == "trtllm_checkpoint":
        from convllava_export.engines.tensorrt_llm import gpu_note

        note = gpu_note("fp8", cc)  # the checkpoint is made anywhere; this check also runs it through the GPU's FP8 path
        if note:
            return note
    if name in ("tensorrt_vision", "trtllm_build"):
        if not _has("tensorrt"):
            return "TensorRT not installed (the lent machine has none; pip install 'convllava-export[gpu]')"
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime-gpu (CUDAExecutionProvider) not installed"
    if name == "trtllm_custom_module":
        if not _has("tensorrt_llm"):
            return "tensorrt_llm not installed"
        from importlib import metadata

        from convllava_export.plugins.trtllm_core import TrtLlmVersionError, check_version

        try:
            check_version(metadata.version("tensorrt_llm"))
        except TrtLlmVersionError as exc:
            return str(exc)
    if name == "trtllm_build":
        if not _has("tensorrt_llm"):
            return "TensorRT-LLM not installed (engine flow: 0.12-1.2.x)"
        from importlib import metadata

        from convllava_export.engines.tensorrt_llm import check_trtllm_version
        from convllava_export.errors import ConvLlavaError

        try:
            check_trtllm_version(metadata.version("tensorrt_llm"))
        except ConvLlavaError as exc:
            return str(exc)
    return None


CHECKS = {
    "conformance": lambda r, w: conformance(r),
    "trtllm_checkpoint": fp8_trtllm,
    "hf_checkpoints": hf_checkpoints,
    "simulate": simulate,
    "tensorrt_vision": tensorrt_vision,
    "trtllm_build": trtllm_build,
    "trtllm_custom_module": trtllm_custom_module,
    "vision_latency": lambda r, w: vision_latency(r),
}


def main(out: Path, only: list[str] | None = None) -> dict:
    work = out.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    results: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if cuda else None,
                     "cc": list(torch.cuda.get_device_capability(0)) if cuda else None, "skipped": {}}
    for name, fn in CHECKS.items():
        if only and name not in only:
            continue
        why = skip_reason(name)
        if why is not None:
            results["skipped"][name] = why
            print(name, "skipped:", why, flush=True)
            continue
        t = time.perf_counter()
        try:
            fn(results, work)
        except Exception:  # noqa: BLE001 - record and go on to the next check
            results[f"{name}_error"] = traceback.format_exc()[-3000:]
        results[f"{name}_seconds"] = time.perf_counter() - t
        out.write_text(json.dumps(results, indent=2))
        print(name, "done", flush=True)
    out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or None)
