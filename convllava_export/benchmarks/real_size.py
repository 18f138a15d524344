"""`convllava-export bench real-size`: the product at the size users have (issue 12).

One run, on one machine, each step in a fresh process so each peak RSS is its own:
  machine   cores, ISA, measured read bandwidth and fp32 GEMM ceiling
  build     int4 LLM + int8 vision at 768² (stages, peak RSS of the process tree, disk)
  run       the build at 768², 1024² and 1536² (TTFT, decode tok/s over N tokens, RSS)
  torch     the official model in PyTorch eager, bf16, same image and prompt (user's path today)
  llama.cpp Q4_0 of the same LLM weights (GGUF written here), same prompt length
  validate  the build against the reference (dtype chosen by memory), a few items
  serve     the OpenAI server on the build: one request, then 4 concurrent; server RSS
  trtllm_hf (not by default: ~20 min of CPU) `export llm --backend tensorrt-llm --format hf
            --precision fp8` on the CPU: ModelOpt calibration + unified checkpoint, peak RSS
Results: JSON (benchmarks/results/real_size_*.json) and BENCHMARKS.md / docs/real-size.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

GB = 1e9


def _child(step: str, *args: str) -> dict[str, Any]:
    """Run one step in a fresh interpreter; its last stdout line is JSON. Adds the wall time
    and the peak RSS of the child's process tree (wait4's ru_maxrss: the child or its largest
    descendant, e.g. the onnxruntime-genai builder)."""
    import tempfile

    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "convllava_export.benchmarks.real_size", step, *args], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "stderr": stderr[-3000:], "wall_s": round(wall, 2)}
    lines = [x for x in stdout.strip().splitlines() if x.startswith("{")]
    res = json.loads(lines[-1]) if lines else {"error": "no result", "stderr": stderr[-3000:]}
    res["wall_s"] = round(wall, 2)
    res["tree_peak_rss_gb"] = round(usage.ru_maxrss * 1024 / GB, 3)
    return res


def _peak_rss_gb() -> float:
    from ..progress import peak_rss_bytes

    return round(peak_rss_bytes() / GB, 3)


# -- steps (run in the child) -----------------------------------------------------------------
def step_machine() -> dict[str, Any]:
    import torch

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni") if f in flags]
    a = np.ones(2**28 // 8 * 4, dtype=np.float64)  # 1 GiB
    a.sum()
    t = time.perf_counter()
    for _ in range(5):
        a.sum()
    bw = 5 * a.nbytes / (time.perf_counter() - t)
    del a
    torch.set_num_threads(os.cpu_count() or 1)
    x = torch.randn(2048, 2048)
    x @ x
    t = time.perf_counter()
    for _ in range(10):
        x @ x
    gflops = 10 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    from ..sizing import available_memory

    return {"cpu": cpu, "cores": os.cpu_count(), "isa": isa, "read_bandwidth_gb_s": round(bw / GB, 1), "fp32_gemm_gflops": round(gflops, 1),
            "memory_available_gb": round(available_memory() / GB, 1), "python": platform.python_version(), "torch": torch.__version__}


def step_build(checkpoint: str, dest: str, resolution: str, block: str = "128") -> dict[str, Any]:
    from ..build import BuildOptions, build
    # random weights: near-flat logits, so token agreement carries no signal; the gate is off
    # here (figures still recorded) and the vision gate stays at its int8 default
    opts = BuildOptions(target="cpu", vision_precision="int8", llm_precision="int4", resolution=int(resolution), calib_images="builtin", calib_limit=8,
                        llm_graph="auto", force=True, min_token_agreement=0.0, int4_block_size=int(block))
    manifest = build(checkpoint, dest, opts, progress=lambda m: print(m, file=sys.stderr, flush=True))
    disk = sum(f["bytes"] for f in manifest.files.values())
    return {"stages": manifest.stages, "estimate": manifest.estimate, "checks": {k: v for k, v in manifest.checks.items() if k != "timings"},
            "build_seconds": manifest.build_seconds, "build_disk_gb": round(disk / GB, 2), "llm_graph": manifest.llm.graph, "peak_rss_gb": _peak_rss_gb()}


def _sample(resolution: int, cfg) -> tuple[Any, str]:
    """The same synthetic image and question for every contender, preprocessed at `resolution`."""
    import dataclasses

    from ..preprocess import preprocess
    from ..synthetic import colour_samples

    s = colour_samples(1, seed=7)[0]
    return preprocess(s.image, dataclasses.replace(cfg, resolution=resolution)), s.question


def step_run(build_dir: str, resolution: str, tokens: str) -> dict[str, Any]:
    from ..runtime.build_loader import load_pipeline
    from ..runtime.pipeline import Request
    from ..runtime.sampling import SamplingParams

    pipe = load_pipeline(build_dir)
    px, question = _sample(int(resolution), pipe.preprocess_cfg)
    pipe.generate([px], question, SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up (session arenas, first-run kernels)
    res = pipe.generate([px], question, SamplingParams(max_new_tokens=int(tokens), ignore_eos=True))
    t = res.timings
    visual = px.shape[1] * px.shape[2] // 64**2
    ids = pipe.plan(Request(question, [px]), [visual])
    return {"resolution": int(resolution), "visual_tokens": visual, "prompt_tokens": len(ids) - 1 + visual,
            "vision_s": t.vision_s, "prefill_s": t.prefill_s, "ttft_s": t.ttft_s, "decode_tokens": t.decode_tokens, "decode_tokens_per_s": t.decode_tokens_per_s,
            "peak_rss_gb": _peak_rss_gb()}


def step_torch(checkpoint: str, resolution: str, tokens: str) -> dict[str, Any]:
    import torch

    from ..model.reference import ReferenceModel
    from ..preprocess import PreprocessConfig
    from ..runtime.pipeline import Pipeline
    from ..runtime.sampling import SamplingParams

    torch.set_num_threads(os.cpu_count() or 1)
    ref = ReferenceModel.load(checkpoint, dtype="bf16")
    cfg = PreprocessConfig.from_preprocessor_config(ref.info.preprocessor_config, resolution=int(resolution))
    pipe = Pipeline.from_reference(ref, cfg)
    px, question = _sample(int(resolution), cfg)
    res = pipe.generate([px], question, SamplingParams(max_new_tokens=int(tokens), ignore_eos=True))
    t = res.timings
    return {"resolution": int(resolution), "dtype": "bf16", "vision_s": t.vision_s, "prefill_s": t.prefill_s, "ttft_s": t.ttft_s,
            "decode_tokens": t.decode_tokens, "decode_tokens_per_s": t.decode_tokens_per_s, "peak_rss_gb": _peak_rss_gb()}


def step_llama_cpp(checkpoint: str, work: str, prompt_len: str, tokens: str) -> dict[str, Any]:
    from ..checkpoint import read_checkpoint
    from ..engines.llama_cpp import LlamaCppTimer, quantize_gguf, write_gguf

    work_p = Path(work)
    q4 = work_p / "llm-q4_0.gguf"
    made = {}
    if not q4.exists():
        f16 = work_p / "llm-f16.gguf"
        t = time.perf_counter()
        write_gguf(None, f16, checkpoint=read_checkpoint(checkpoint))
        made["gguf_f16_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        quantize_gguf(f16, q4, "q4_0", threads=os.cpu_count() or 1)
        made["quantize_q4_0_s"] = round(time.perf_counter() - t, 1)
        f16.unlink()
    n = int(prompt_len)
    timer = LlamaCppTimer(q4, threads=os.cpu_count() or 1, n_ctx=max(2048, n + int(tokens) + 8))
    ids = [1] + [int(i) for i in np.random.default_rng(0).integers(3, 30000, n - 1)]
    timer.run(ids[:16], 2)  # warm-up
    res = timer.run(ids, int(tokens))
    res.pop("tokens", None)
    prefill_s = n / res["prefill_tokens_per_s"]
    return {**made, "prompt_tokens": n, "prefill_s": prefill_s, **res, "gguf_gb": round(q4.stat().st_size / GB, 2), "peak_rss_gb": _peak_rss_gb()}


def step_trtllm_hf(checkpoint: str, dest: str, precision: str = "fp8", limit: str = "8") -> dict[str, Any]:
    import shutil

    from ..export.trtllm import export_llm_tensorrt
    from ..fsutil import atomic_output_dir

    shutil.rmtree(dest, ignore_errors=True)
    t = time.perf_counter()
    with atomic_output_dir(Path(dest)) as tmp:
        meta = export_llm_tensorrt(checkpoint, tmp, precision, "hf", calib_images="builtin", calib_limit=int(limit), progress=lambda m: print(m, file=sys.stderr, flush=True))
    disk = sum(p.stat().st_size for p in Path(dest).rglob("*") if p.is_file())
    return {"precision": precision, "quant_algo": meta["quant_algo"], "calibration": meta["calibration"], "seconds": round(time.perf_counter() - t, 1),
            "disk_gb": round(disk / GB, 2), "peak_rss_gb": _peak_rss_gb()}


def step_validate(build_dir: str, checkpoint: str, out: str) -> dict[str, Any]:
    from ..validation.data import load_items
    from ..validation.report import write_reports
    from ..validation.run import Gates, validate

    items = load_items("builtin:4", None, 4)
    report, images = validate([build_dir], checkpoint, items, Gates(), max_new_tokens=8, progress=lambda m: print(m, file=sys.stderr, flush=True))
    write_reports(report, images, Path(out))
    m = report["builds"][0]["metrics"]
    return {"reference_dtype": report["reference"]["dtype"], "items": len(items), "vision_cosine_mean": m["vision_cosine"]["mean"], "top1_agreement": m["top1_agreement"],
            "kl_mean": m["kl_mean"], "peak_rss_gb": _peak_rss_gb()}


def step_serve(build_dir: str, tokens: str) -> dict[str, Any]:
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from .e2e import chat_bodies

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "convllava_export.cli", "serve", build_dir, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t = time.perf_counter()
        while time.perf_counter() - t < 600:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                return {"error": f"server exited {proc.returncode}: {proc.stderr.read()[-2000:]}"}
            time.sleep(1)
        startup = time.perf_counter() - t
        bodies = chat_bodies(int(tokens), n=4, ignore_eos=True)

        def post(body):
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=900)
            return r.status_code, time.perf_counter() - t0, r.json().get("usage", {})

        one = post(bodies[0])
        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            four = list(pool.map(post, bodies))
        wall4 = time.perf_counter() - t0
        status = Path(f"/proc/{proc.pid}/status").read_text()
        hwm = next(int(x.split()[1]) * 1024 for x in status.splitlines() if x.startswith("VmHWM:"))
        return {"startup_s": startup, "one_request_s": one[1], "one_status": one[0], "four_concurrent_wall_s": wall4, "four_statuses": [f[0] for f in four],
                "four_tokens_per_s": sum(f[2].get("completion_tokens", 0) for f in four) / wall4, "server_peak_rss_gb": round(hwm / GB, 3), "peak_rss_gb": round(hwm / GB, 3)}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


STEPS = {"machine": step_machine, "build": step_build, "run": step_run, "torch": step_torch, "llama_cpp": step_llama_cpp, "validate": step_validate, "serve": step_serve,
         "trtllm_hf": step_trtllm_hf}


# -- the orchestrator ---------------------------------------------------------------------------
STEP_NAMES = ("build", "run", "torch", "llama_cpp", "validate", "serve", "trtllm_hf")
DEFAULT_STEPS = STEP_NAMES[:-1]


def parse_steps(text: str | None) -> tuple[str, ...]:
    """`--steps a,b`: the steps named (None: DEFAULT_STEPS); an unknown name is refused."""
    from ..errors import ConvLlavaError

    chosen = DEFAULT_STEPS if text is None else tuple(s.strip() for s in text.split(",") if s.strip())
    if set(chosen) - set(STEP_NAMES):
        raise ConvLlavaError(f"unknown step(s) {', '.join(sorted(set(chosen) - set(STEP_NAMES)))} (use {', '.join(STEP_NAMES)})")
    return chosen


def real_size(workdir: Path, shape: str = "vicuna-7b", resolutions: tuple[int, ...] = (768, 1024, 1536), tokens: int = 128, torch_tokens: int = 16,
              with_llama_cpp: bool = True, skip_build: bool = False, progress=print, block: int = 128, steps: tuple[str, ...] = DEFAULT_STEPS) -> dict[str, Any]:
    from ..tiny import ModelShape, write_random_checkpoint

    workdir.mkdir(parents=True, exist_ok=True)
    ck = workdir / "ck" / "ConvLLaVA-tiny-sft"
    build_dir = workdir / f"build-768-b{block}"
    out: dict[str, Any] = {"shape": shape, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "int4_block_size": block, "steps": list(steps)}
    progress("machine")
    out["machine"] = _child("machine")
    if not (ck / "config.json").is_file():
        progress(f"writing a random {shape} checkpoint")
        t = time.perf_counter()
        write_random_checkpoint(workdir / "ck", ModelShape.preset(shape))
        out["checkpoint_write_s"] = round(time.perf_counter() - t, 1)
    out["checkpoint_gb"] = round(sum(p.stat().st_size for p in (workdir / "ck").rglob("*") if p.is_file()) / GB, 2)
    if "build" in steps and (not skip_build or not (build_dir / "manifest.json").is_file()):
        progress(f"build (int4 LLM block {block}, int8 vision, 768)")
        out["build"] = _child("build", str(ck), str(build_dir), "768", str(block))
    if "run" in steps:
        for r in resolutions:
            progress(f"run at {r}")
            out[f"run_{r}"] = _child("run", str(build_dir), str(r), str(tokens))
    if "torch" in steps:
        progress("torch eager bf16")
        out["torch_768"] = _child("torch", str(ck), "768", str(torch_tokens))
    if "llama_cpp" in steps and with_llama_cpp and "prompt_tokens" in out.get("run_768", {}):
        progress("llama.cpp Q4_0")
        out["llama_cpp"] = _child("llama_cpp", str(ck), str(workdir), str(out["run_768"]["prompt_tokens"]), str(tokens))
    if "validate" in steps:
        progress("validate")
        out["validate"] = _child("validate", str(build_dir), str(ck), str(workdir / "validation"))
    if "serve" in steps:
        progress("serve")
        out["serve"] = _child("serve", str(build_dir), "32")
    if "trtllm_hf" in steps:
        progress("TensorRT-LLM unified checkpoint (fp8) on the CPU")
        out["trtllm_hf"] = _child("trtllm_hf", str(ck), str(workdir / "trtllm-hf-fp8"), "fp8", "8")
    out["summary"] = summarize(out)
    return out


def summarize(out: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets as ratios measured in this run."""
    s: dict[str, Any] = {}
    ck = out.get("checkpoint_gb")
    b = out.get("build", {})
    if "stages" in b and ck:
        peak = max([x for st in b["stages"] for x in (st.get("peak_rss_gb"), st.get("child_peak_rss_gb")) if x] + [b.get("peak_rss_gb") or 0, b.get("tree_peak_rss_gb") or 0])
        s["build_peak_rss_gb"] = peak
        s["build_peak_vs_checkpoint"] = round(peak / ck, 3)
    r, t, c = out.get("run_768", {}), out.get("torch_768", {}), out.get("llama_cpp", {})
    if "ttft_s" in r:
        s["run_768_peak_rss_gb"] = r.get("peak_rss_gb")
    if "ttft_s" in r and "ttft_s" in t:
        s["ttft_vs_torch"] = round(r["ttft_s"] / t["ttft_s"], 3)
        s["decode_vs_torch"] = round(r["decode_tokens_per_s"] / t["decode_tokens_per_s"], 2)
    h = out.get("trtllm_hf", {})
    if "seconds" in h and ck:
        s["trtllm_hf_peak_rss_gb"] = max(h.get("peak_rss_gb") or 0, h.get("tree_peak_rss_gb") or 0)
        s["trtllm_hf_peak_vs_checkpoint"] = round(s["trtllm_hf_peak_rss_gb"] / ck, 3)
    if "ttft_s" in r and "decode_tokens_per_s" in c:
        s["decode_vs_llama_cpp"] = round(r["decode_tokens_per_s"] / c["decode_tokens_per_s"], 3)
        s["prefill_vs_llama_cpp"] = round((r["prompt_tokens"] / r["prefill_s"]) / c["prefill_tokens_per_s"], 3)
    return s


def main() -> None:
    step, args = sys.argv[1], sys.argv[2:]
    import warnings

    warnings.filterwarnings("ignore")
    res = STEPS[step](*args)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
