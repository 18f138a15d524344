"""`convllava-export build`: checkpoint → one self-describing build folder for a target.

Layout of a build folder:
    manifest.json                 what was built, from what, with which libraries; file checksums
                                  (whole-file and spot sha256s, and a digest of that list: see `file_entries`)
    preprocessor_config.json      the tower's preprocessing + mode / resolution / token budget
    tokenizer/                    the checkpoint's tokenizer files
    vision/  vision.onnx, vision.ort.onnx, vision.json, vision_report.json[, vision.engine(.json)]
    llm/     decoder.onnx, decoder.json, embed_tokens.npy       (--llm-backend onnxruntime)
             engine/, convllava_trtllm.json                      (--llm-backend tensorrt-llm)
The folder is assembled in a temporary sibling and renamed into place only when complete.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import BuildError, ConvLlavaError
from .targets import check_target, get_target
from .manifest import SCHEMA_VERSION, read_manifest
from .precisions import CALIBRATED_VISION, TRTLLM_BYTES_LIKE
from .tokenizer import copy_tokenizer
from .fsutil import SPOT_BLOCK, SPOT_BLOCKS, TOOL_NAME, atomic_output_dir, check_destination, json_sha256, sha256_file, spot_sha256

LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-llm", "numpy", "pillow")
Progress = Callable[[str], None]


def library_versions() -> dict[str, str]:
    found = {}
    for lib in LIBRARIES:
        try:
            found[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return found


def default_target() -> str:
    """jetson on a Jetson, TensorRT when a GPU and TensorRT are both present, otherwise ONNX Runtime on CPU."""
    from .extras import available

    if available("tensorrt"):
        from .engines.tensorrt import jetson_identity

        if jetson_identity() is not None:
            return "jetson"
        try:
            import torch

            if torch.cuda.is_available():
                return "tensorrt"
        except ImportError:  # pragma: no cover
            pass
    return "cpu"


@dataclass
class BuildOptions:
    target: str = "cpu"
    vision_precision: str = "fp32"
    llm_precision: str = "fp32"
    mode: str = "pad"
    resolution: int | None = None
    max_tokens: int | None = None
    calib_images: str | None = None
    calib_method: str = "minmax"
    calib_limit: int = 64
    min_size: str = "64x64"
    opt_size: str | None = None
    max_size: str = "2048x2048"
    max_batch: int = 4
    int4_block_size: int = 128  # export/stream_quant.py BLOCK_SIZE
    llm_graph: str = "auto"  # "dynamo", or "gqa" (ORT's fused attention layout; needs onnxruntime-genai); auto: export/llm.choose_graph
    llm_backend: str = "onnxruntime"  # or "tensorrt-llm": ModelOpt + trtllm-build (engine flow)
    awq_block_size: int = 128  # tensorrt-llm int4-awq group size
    calib_prompts: str | None = None  # tensorrt-llm: JSONL of calibration questions (default: built in)
    threads: int | None = None
    vision_tower: str | None = None
    force: bool = False
    smoke_test: bool = True
    reference_dtype: str = "auto"  # the torch reference the smoke test compares with (sizing.py)
    min_vision_cosine: float | None = None  # smoke-test gates; None: the precision's default (gates.py)
    min_token_agreement: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _validate(opts: BuildOptions) -> None:
    """Everything about the options and this machine that can be refused before any work."""
    from .options import check_llm, check_trtllm_here, check_vision

    target = get_target(opts.target)
    check_vision(opts.vision_precision)
    check_llm(opts.llm_backend, opts.llm_precision, opts.llm_graph)
    check_target(target, opts.vision_precision)
    if opts.llm_backend == "tensorrt-llm" and target.ort_device != "cuda":
        raise BuildError(f"--llm-backend tensorrt-llm runs on an NVIDIA GPU; target '{opts.target}' is the CPU (use --target tensorrt, orin or cuda)")
    if target.ort_device == "cuda":
        from .extras import available

        if target.backend == "tensorrt" and not available("tensorrt"):
            raise BuildError(f"target '{opts.target}' needs TensorRT: pip install 'convllava-export[gpu]' on the GPU machine")
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BuildError(f"target '{opts.target}' needs onnxruntime-gpu (CUDAExecutionProvider): pip install 'convllava-export[gpu]'")
        if target.backend == "tensorrt":  # TensorRT version, GPU and Jetson release, before minutes of export
            import tensorrt as trt

            from .engines.tensorrt import gpu_identity, jetson_identity

            gpu = gpu_identity()
            target = check_target(target, opts.vision_precision, trt.__version__, tuple(gpu["compute_capability"]), jetson_identity(), gpu.get("gpu_name"))
        if opts.llm_backend == "tensorrt-llm":
            check_trtllm_here(opts.llm_precision, target.name)
    if opts.llm_backend == "tensorrt-llm" and opts.llm_precision != "fp16" and opts.calib_images is None:
        raise BuildError(
            f"--llm-precision {opts.llm_precision} is calibrated on multimodal prompts: pass --calib-images DIR (images like those "
            "you will serve), a `calibrate` set, or --calib-images builtin for the synthetic set"
        )


def build(checkpoint: str | Path, dest: str | Path, opts: BuildOptions, progress: Progress = print) -> dict[str, Any]:
    """Export, engine build, smoke test and reference check; returns the manifest.

    The phases run one after another and each frees what it loaded, so the peak is that of the
    largest phase, never the sum (a 7B checkpoint builds on a 24 GB machine): the vision tower
    in fp32, then the LLM in the checkpoint's own dtype (or none at all: the gqa builder reads
    the shards), then the reference LLM alone (fed the reference image embeddings computed in
    the first phase), then the new build. Memory and disk are estimated before anything is
    written, and each stage's time and peak RSS go into the manifest.
    """
    from .calibration.images import calibration_source, split_heldout
    from .checkpoint import read_checkpoint
    from .engines.profiles import VisionProfile
    from .export.llm import export_llm_from_checkpoint
    from .export.vision import export_vision
    from .model.reference import ReferenceModel
    from .preprocess import DEFAULT_MAX_TOKENS, PreprocessConfig
    from .progress import StageLog
    from .sizing import available_memory, check_fits, estimate_build, model_size

    if opts.llm_backend == "onnxruntime" and opts.llm_graph == "auto":
        from .export.llm import choose_graph

        graph, why = choose_graph("auto", opts.llm_precision)
        opts = replace(opts, llm_graph=graph, extra={**opts.extra, "llm_graph_why": why})
    _validate(opts)
    target = get_target(opts.target)
    dest = Path(dest)
    check_destination(dest, opts.force, BuildError)
    info = read_checkpoint(checkpoint, opts.vision_tower)
    res = opts.resolution or info.native_resolution
    profile = VisionProfile.from_strings(opts.min_size, opts.opt_size or f"{res}x{res}", opts.max_size, (1, 1, opts.max_batch))
    pcfg = PreprocessConfig.from_preprocessor_config(info.preprocessor_config, mode=opts.mode, resolution=res, max_tokens=opts.max_tokens)
    if opts.calib_images is None and opts.vision_precision in CALIBRATED_VISION:
        raise BuildError(f"vision precision {opts.vision_precision} needs --calib-images DIR (or a `calibrate` set, or --calib-images builtin)")
    size = model_size(info)
    budget = available_memory()
    llm_as = TRTLLM_BYTES_LIKE[opts.llm_precision] if opts.llm_backend == "tensorrt-llm" else opts.llm_precision
    est = estimate_build(size, opts.vision_precision, llm_as, opts.llm_graph, opts.int4_block_size, opts.reference_dtype, opts.smoke_test, budget)
    progress(f"estimated peak memory {est.memory / 1e9:.1f} GB ({budget / 1e9:.1f} GB available), disk {est.disk / 1e9:.1f} GB; reference dtype: {est.reference_why}")
    check_fits(est, dest, budget, size, llm_as)
    if opts.llm_backend == "onnxruntime":
        progress(f"LLM graph: {opts.llm_graph} ({opts.extra.get('llm_graph_why', '--llm-graph')})")
    max_visual = min(profile.max_visual_tokens, DEFAULT_MAX_TOKENS) if opts.mode == "native" and not opts.max_tokens else opts.max_tokens or (res // 64) ** 2
    max_context = int(info.config.get("tokenizer_model_max_length", 2048))
    trtllm_cfg = None
    if opts.llm_backend == "tensorrt-llm":  # the engine's shapes, checked before minutes of work
        from .engines.tensorrt_llm import TrtLlmBuildConfig

        trtllm_cfg = TrtLlmBuildConfig(max_batch_size=opts.max_batch, max_visual_tokens=max_visual, max_input_len=max_context, max_seq_len=max_context + TRTLLM_MAX_NEW)
        trtllm_cfg.validate()
    started = time.perf_counter()
    log = StageLog(progress, 4 if opts.smoke_test else 2)
    with atomic_output_dir(dest, opts.force, BuildError) as tmp:
        log.stage(f"vision export ({opts.vision_precision})")
        ref = ReferenceModel.load(checkpoint, vision_tower=opts.vision_tower, load_llm=False, progress=progress)
        pixels, _ = calibration_source(opts.calib_images, pcfg, opts.calib_limit, progress)
        cal, held = split_heldout(pixels)
        vis = export_vision(ref.vision, tmp / "vision", opts.vision_precision, cal, held, opts.calib_method, opts.threads, progress)
        sample = _smoke_sample(pcfg)
        sample["reference_embeds"] = ref.encode_images(sample["pixels"][None])[0]
        del ref, pixels, cal, held
        trt_plan, jetson = _build_trt(tmp / "vision", opts, profile, progress) if target.backend == "tensorrt" else (None, None)
        if opts.llm_backend == "tensorrt-llm":
            log.stage(f"TensorRT-LLM engine ({opts.llm_precision})")
            llm_part = _build_trtllm(checkpoint, tmp, opts, trtllm_cfg, progress)
        else:
            log.stage(f"LLM export ({opts.llm_precision}, {opts.llm_graph} graph)")
            export_llm_from_checkpoint(info, tmp / "llm", opts.llm_precision, opts.int4_block_size, progress, opts.llm_graph, budget)
            llm_part = {"backend": "onnxruntime", "graph": opts.llm_graph, "graph_choice": opts.extra.get("llm_graph_why", "--llm-graph")}
        copy_tokenizer(info.path, tmp / "tokenizer")
        (tmp / "preprocessor_config.json").write_text(json.dumps({**info.preprocessor_config, "convllava_export": pcfg.to_dict()}, indent=2))
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": TOOL_NAME, "version": __version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": {"machine": platform.machine(), "python": platform.python_version(), "memory_available_gb": round(budget / 1e9, 2)},
            "libraries": library_versions(),
            "source": {"checkpoint": str(info.path), "vision_tower": str(info.tower_path), "tower_weights_from": info.tower_weights_source, "fingerprint": info.fingerprint(), "weights_dtype": str(size.weights_dtype).replace("torch.", "")},
            "target": trt_plan.target if trt_plan is not None else opts.target,
            "jetson": jetson if trt_plan is not None and get_target(trt_plan.target).jetson else None,
            "vision": {
                "backend": target.backend,
                "precision": opts.vision_precision,
                "graph": "vision/vision.onnx",
                "ort_graph": "vision/vision.ort.onnx" if (tmp / "vision" / "vision.ort.onnx").exists() else None,
                "profile": profile.to_dict(),
                "report": vis.report.get("heldout"),
            },
            "llm": {**llm_part, "precision": opts.llm_precision, "folder": "llm", "vocab_size": size.vocab},
            "preprocess": pcfg.to_dict(),
            "token_budget": {"max_visual_tokens_per_image": max_visual, "max_context": max_context},
            "prompt_template": "vicuna_v1",
            "threads": opts.threads,
            "estimate": est.to_dict(),
        }
        checks: dict[str, Any] = {}
        if opts.smoke_test:
            log.stage(f"reference answer (torch, {est.reference_dtype})")
            checks["reference_dtype"] = est.reference_dtype
            _reference_answer(checkpoint, opts.vision_tower, est.reference_dtype, pcfg, sample, progress)
            log.stage("smoke test of the build")
            checks.update(_smoke_test(tmp, manifest, sample, progress))
            from .gates import check, thresholds

            limits = thresholds(opts.vision_precision, opts.llm_precision, opts.min_vision_cosine, opts.min_token_agreement)
            checks["gates"] = check({"vision_cosine": checks["vision_cosine"], "token_agreement": checks["token_agreement"]}, limits)
        manifest["checks"] = checks
        log.close()
        manifest["stages"] = log.to_dict()
        manifest["files"], manifest["integrity"] = file_entries(tmp)
        manifest["build_seconds"] = round(time.perf_counter() - started, 2)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    progress(f"build written to {dest} in {manifest['build_seconds']:.1f} s")
    return manifest


def file_entries(folder: Path, block: int = SPOT_BLOCK, blocks: int = SPOT_BLOCKS) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest's `files` (size, sha256 and spot sha256 of every file) and `integrity` sections.

    `integrity` holds the spot-check sampling and a sha256 of the `files` section itself, so an
    edit of that list is noticed. This detects corruption and accidental changes; it is not a
    signature: whoever can write the folder can rewrite the manifest and its digest too.
    """
    files = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p), "spot_sha256": spot_sha256(p, block, blocks)}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    return files, {"spot_block_bytes": block, "spot_blocks": blocks, "files_sha256": json_sha256(files)}


def _build_trt(folder: Path, opts: BuildOptions, profile, progress: Progress):
    """The TensorRT vision engine; returns its plan (whose `target` resolves `jetson`) and the
    L4T/JetPack release of this machine (None off Jetson)."""
    from .engines.tensorrt import build_engine, gpu_identity, jetson_identity, plan_build
    from .extras import require

    trt = require("tensorrt", "gpu", "TensorRT engines")
    gpu, jetson = gpu_identity(), jetson_identity()
    plan = plan_build(
        opts.vision_precision, trt.__version__, profile, tuple(gpu["compute_capability"]),
        version_compatible=bool(opts.extra.get("version_compatible")), target=opts.target, jetson=jetson,
    )
    cache = Path(opts.extra.get("timing_cache") or Path.home() / ".cache" / "convllava-export" / "timing.cache")
    cache.parent.mkdir(parents=True, exist_ok=True)
    build_engine(folder / "vision.onnx", folder, plan, cache, progress)
    return plan, jetson


TRTLLM_MAX_NEW = 1024  # tokens a TensorRT-LLM engine generates past the longest prompt (serve's --max-tokens default)


def _build_trtllm(checkpoint, tmp: Path, opts: BuildOptions, cfg, progress: Progress) -> dict[str, Any]:
    """The engine flow into tmp/llm: ModelOpt quantization calibrated on multimodal prompts (the
    calibration images spliced into templated questions), the TensorRT-LLM checkpoint in a
    scratch folder, then `trtllm-build` with a prompt table for max batch x visual tokens."""
    from .engines.tensorrt_llm import META, build_trtllm_engine, export_checkpoint
    from .export.trtllm import calibration_sequences
    from .model.reference import ReferenceModel
    from .progress import release_memory

    ref = ReferenceModel.load(checkpoint, vision_tower=opts.vision_tower, dtype="fp16", device="cuda", progress=progress)  # _validate: a GPU is here
    seqs = [] if opts.llm_precision == "fp16" else calibration_sequences(ref, opts.calib_images, opts.calib_prompts, opts.calib_limit, progress)
    llm = ref.llm
    del ref  # the tower goes before ModelOpt builds its quantized copy of the LLM
    release_memory()
    scratch = tmp.parent / f"{tmp.name}-trtllm-checkpoint"
    try:
        meta = export_checkpoint(llm, seqs, opts.llm_precision, scratch, "engine", opts.awq_block_size, progress=progress)
        del llm, seqs
        release_memory()  # the fp16 model off the GPU before trtllm-build needs it
        (tmp / "llm").mkdir()
        build_trtllm_engine(scratch, tmp / "llm" / "engine", cfg, progress)
        shutil.copyfile(scratch / META, tmp / "llm" / META)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"backend": "tensorrt-llm", "engine": "llm/engine", "quant_algo": meta["quant_algo"], "calibration": meta["calibration"], "engine_config": asdict(cfg)}


def _smoke_sample(pcfg) -> dict[str, Any]:
    from .preprocess import preprocess
    from .synthetic import colour_samples

    sample = colour_samples(1, seed=1234)[0]
    return {"image": sample.image, "question": sample.question, "pixels": preprocess(sample.image, pcfg)}


SMOKE_TOKENS = 24


def _reference_answer(checkpoint, vision_tower, dtype: str, pcfg, sample: dict, progress: Progress) -> None:
    """The torch reference's greedy answer to the smoke sample, from the LLM alone (the image
    embeddings come from the fp32 vision phase), stored in `sample`."""
    from .model.reference import ReferenceModel, TorchDecoder
    from .runtime.generation import Timings
    from .runtime.scheduler import generate
    from .runtime.pipeline import Pipeline, Request
    from .runtime.sampling import SamplingParams

    ref = ReferenceModel.load(checkpoint, vision_tower=vision_tower, dtype=dtype, load_vision=False, progress=progress)
    pipe = Pipeline(None, TorchDecoder(ref), ref.tokenizer, pcfg)
    seq = pipe.prepare(Request(sample["question"], [sample["image"]]), Timings(), [sample["reference_embeds"]])
    want = generate(pipe.decoder, ref.tokenizer, [seq], SamplingParams(max_new_tokens=SMOKE_TOKENS))[0]
    sample["reference_ids"], sample["reference_text"] = want.token_ids, want.text
    del pipe, ref


def _smoke_test(folder: Path, manifest: dict, sample: dict, progress: Progress) -> dict[str, Any]:
    """Run the new build once on the smoke sample and compare with the reference's answer:
    image_embeds cosine, teacher-forced top-1 agreement on the reference's greedy tokens (the
    gate), and the free-running answer for a person to read."""
    from .export.vision import cosine_report
    from .runtime.build_loader import load_pipeline_from_manifest
    from .runtime.generation import Timings
    from .runtime.pipeline import Request
    from .validation.metrics import teacher_forced_logits

    pipe = load_pipeline_from_manifest(folder, manifest, verify=False)
    built = pipe.generate(sample["image"], sample["question"], max_new_tokens=SMOKE_TOKENS)
    embeds = pipe.vision.encode(sample["pixels"][None])
    cos = cosine_report([sample["reference_embeds"][None]], [embeds])
    want = sample["reference_ids"]
    seq = pipe.prepare(Request(sample["question"], [sample["image"]]), Timings(), [embeds[0]])
    top1 = teacher_forced_logits(pipe.decoder, seq, want).argmax(-1)
    agree = float(np.mean(top1 == np.asarray(want))) if want else 1.0
    checks = {
        "smoke_answer": built.text,
        "reference_answer": sample["reference_text"],
        "token_agreement": agree,
        "greedy_exact_match": built.token_ids == want,
        "vision_cosine": cos["cosine_mean"],
        "timings": built.timings.to_dict(),
    }
    if not np.isfinite(cos["cosine_mean"]) or not built.token_ids:
        raise ConvLlavaError(f"smoke test failed: the built engines produced no usable output ({checks})")
    progress(f"smoke test: '{built.text}' (reference: '{sample['reference_text']}'); vision cosine {cos['cosine_mean']:.5f}, teacher-forced top-1 agreement {agree:.3f}")
    return checks


def inspect_build(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = manifest.get("files", {})
    return {
        "build": str(folder),
        "schema_version": manifest["schema_version"],
        "tool": f"{manifest['tool']['name']} {manifest['tool']['version']}",
        "target": manifest["target"],
        "vision": f"{manifest['vision']['backend']} {manifest['vision']['precision']}",
        "llm": f"{manifest['llm']['backend']} {manifest['llm']['precision']}",
        "preprocess": manifest["preprocess"],
        "vision_profile": manifest["vision"]["profile"],
        "token_budget": manifest["token_budget"],
        "prompt_template": manifest["prompt_template"],
        "source": manifest["source"],
        "libraries": manifest["libraries"],
        "checks": {k: v for k, v in manifest.get("checks", {}).items() if k != "timings"},
        "size_mb": round(sum(f["bytes"] for f in files.values()) / 1e6, 2),
        "files": len(files),
    }
