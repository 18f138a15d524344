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
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import BuildError, ConvLlavaError
from .export.parts import Built, builder
from .export.plan import BuildOptions, ResolvedBuild, ResolvedPart
from .gates import check as check_gates
from .gates import thresholds
from .manifest import SCHEMA_VERSION, LlmSection, Manifest, VisionSection, read_manifest, write_manifest
from .precisions import PARTS, part_backend, precision
from .targets import check_target
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


def resolve(checkpoint: str | Path, opts: BuildOptions) -> ResolvedBuild:
    """Everything about the options and this machine that can be refused before any work: the
    precision rows (precisions.py, one refusal for an unknown combination), each part's
    settings and checks (export/parts.py), the target's libraries, the shapes."""
    from .checkpoint import read_checkpoint
    from .engines.profiles import VisionProfile
    from .preprocess import DEFAULT_MAX_TOKENS, PreprocessConfig
    from .sizing import available_memory, model_size

    target = check_target(opts.target, opts.vision_precision)  # the target's own words for a precision it lacks
    backends = {"vision": target.backend, "llm": opts.llm_backend}
    names = {"vision": opts.vision_precision, "llm": opts.llm_precision}
    parts = {}
    for part in PARTS:
        pb = part_backend(part, backends[part])
        row = precision(part, pb.backend, names[part])
        parts[part] = ResolvedPart(pb, row, builder(part, pb.backend).settings(opts, row))
    info = read_checkpoint(checkpoint, opts.vision_tower)
    res = opts.resolution or info.native_resolution
    profile = VisionProfile.from_strings(opts.min_size, opts.opt_size or f"{res}x{res}", opts.max_size, (1, 1, opts.max_batch))
    pcfg = PreprocessConfig.from_preprocessor_config(info.preprocessor_config, mode=opts.mode, resolution=res, max_tokens=opts.max_tokens)
    max_visual = min(profile.max_visual_tokens, DEFAULT_MAX_TOKENS) if opts.mode == "native" and not opts.max_tokens else opts.max_tokens or (res // 64) ** 2
    resolved = ResolvedBuild(
        checkpoint, opts, target, info, model_size(info), available_memory(), pcfg, profile, max_visual,
        int(info.config.get("tokenizer_model_max_length", 2048)), parts,
    )
    for part in PARTS:
        builder(part, parts[part].name).check(resolved)
    if target.ort_device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BuildError(f"target '{opts.target}' needs onnxruntime-gpu (CUDAExecutionProvider): pip install 'convllava-export[gpu]'")
    return resolved


def build(checkpoint: str | Path, dest: str | Path, opts: BuildOptions, progress: Progress = print) -> Manifest:
    """Export, engine build, smoke test and reference check; returns the manifest.

    The phases run one after another and each frees what it loaded, so the peak is that of the
    largest phase, never the sum (a 7B checkpoint builds on a 24 GB machine): the vision tower
    in fp32, then the LLM in the checkpoint's own dtype (or none at all: the gqa builder reads
    the shards), then the reference LLM alone (fed the reference image embeddings computed in
    the first phase), then the new build. Memory and disk are estimated before anything is
    written, and each stage's time and peak RSS go into the manifest.
    """
    from .progress import StageLog
    from .sizing import check_fits, estimate_build

    dest = Path(dest)
    check_destination(dest, opts.force, BuildError)
    resolved = resolve(checkpoint, opts)
    vision, llm = resolved.vision, resolved.llm
    est = estimate_build(resolved.size, vision.row, llm.row, llm.settings.get("graph"), opts.int4_block_size, opts.reference_dtype, opts.smoke_test, resolved.budget)
    progress(f"estimated peak memory {est.memory / 1e9:.1f} GB ({resolved.budget / 1e9:.1f} GB available), disk {est.disk / 1e9:.1f} GB; reference dtype: {est.reference_why}")
    smallest = min(llm.backend.precisions, key=lambda p: p.bytes_per_weight(opts.int4_block_size))
    check_fits(est, dest, resolved.budget, resolved.size, llm.row, smallest)
    if "graph" in llm.settings:
        progress(f"LLM graph: {llm.settings['graph']} ({llm.settings['graph_choice']})")
    started = time.perf_counter()
    log = StageLog(progress, 4 if opts.smoke_test else 2)
    with atomic_output_dir(dest, opts.force, BuildError) as tmp:
        sample = _smoke_sample(resolved.pcfg)
        built: dict[str, Built] = {}
        for part in PARTS:
            make = builder(part, resolved.parts[part].name)
            log.stage(make.stage(resolved))
            built[part] = make.build(resolved, tmp, progress, sample["pixels"]) if part == "vision" else make.build(resolved, tmp, progress)
        sample["reference_embeds"] = built["vision"].reference_embeds
        copy_tokenizer(resolved.info.path, tmp / "tokenizer")
        if opts.kv_cache == "int8":  # calibrated on the build's own engines, so after both parts
            from .calibration.kv import quantize_kv_cache

            section = built["vision"].section
            kv = quantize_kv_cache(tmp, tmp / (section.get("ort_graph") or section["graph"]), resolved.pcfg, opts.calib_images, opts.calib_prompts, opts.threads, progress)
            built["llm"].section["calibration"] = {"kv_cache": kv}
        (tmp / "preprocessor_config.json").write_text(json.dumps({**resolved.info.preprocessor_config, "convllava_export": resolved.pcfg.to_dict()}, indent=2))
        manifest = _manifest(resolved, built, est)
        checks: dict[str, Any] = {}
        if opts.smoke_test:
            log.stage(f"reference answer (torch, {est.reference_dtype})")
            checks["reference_dtype"] = est.reference_dtype
            _reference_answer(checkpoint, opts.vision_tower, est.reference_dtype, resolved.pcfg, sample, progress)
            log.stage("smoke test of the build")
            checks.update(_smoke_test(tmp, manifest, sample, progress))
            limits = thresholds((vision.name, vision.row.name), (llm.name, llm.row.name), opts.min_vision_cosine, opts.min_token_agreement)
            checks["gates"] = check_gates({"vision_cosine": checks["vision_cosine"], "token_agreement": checks["token_agreement"]}, limits)
        log.close()
        files, integrity = file_entries(tmp)
        manifest = manifest.replace(checks=checks, stages=log.to_dict(), files=files, integrity=integrity, build_seconds=round(time.perf_counter() - started, 2))
        write_manifest(tmp, manifest)
    progress(f"build written to {dest} in {manifest.build_seconds:.1f} s")
    return manifest


def _manifest(resolved: ResolvedBuild, built: dict[str, Built], est) -> Manifest:
    """The manifest before its checks, stages and file list."""
    info, size, opts = resolved.info, resolved.size, resolved.opts
    return Manifest(
        schema_version=SCHEMA_VERSION,
        tool={"name": TOOL_NAME, "version": __version__},
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        host={"machine": platform.machine(), "python": platform.python_version(), "memory_available_gb": round(resolved.budget / 1e9, 2)},
        libraries=library_versions(),
        source={"checkpoint": str(info.path), "vision_tower": str(info.tower_path), "tower_weights_from": info.tower_weights_source, "fingerprint": info.fingerprint(), "weights_dtype": str(size.weights_dtype).replace("torch.", "")},
        target=built["vision"].target or opts.target,
        jetson=built["vision"].jetson,
        vision=VisionSection(**built["vision"].section),
        llm=LlmSection(**built["llm"].section, precision=resolved.llm.row.name, folder="llm", vocab_size=size.vocab),
        preprocess=resolved.pcfg.to_dict(),
        token_budget={"max_visual_tokens_per_image": resolved.max_visual, "max_context": resolved.max_context},
        prompt_template="vicuna_v1",
        threads=opts.threads,
        estimate=est.to_dict(),
    )


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


def _smoke_test(folder: Path, manifest: Manifest, sample: dict, progress: Progress) -> dict[str, Any]:
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
    m = read_manifest(folder)
    return {
        "build": str(folder),
        "schema_version": m.schema_version,
        "tool": f"{m.tool['name']} {m.tool['version']}",
        "target": m.target,
        "vision": f"{m.vision.backend} {m.vision.precision}",
        "llm": f"{m.llm.backend} {m.llm.precision}",
        "llm_calibration": m.llm.calibration,  # tensorrt-llm's quantization, or the int8 KV cache's scales
        "preprocess": m.preprocess,
        "vision_profile": m.vision.profile,
        "token_budget": m.token_budget,
        "prompt_template": m.prompt_template,
        "source": m.source,
        "libraries": m.libraries,
        "checks": {k: v for k, v in m.checks.items() if k != "timings"},
        "size_mb": round(sum(f["bytes"] for f in m.files.values()) / 1e6, 2),
        "files": len(m.files),
    }
