"""How each (part, backend) of precisions.BACKENDS is checked and built: one builder per row group.

`build` loops over the parts; it never branches on a backend. A builder has four steps:
- `settings(opts, row)`: its own choices, resolved before any work (the LLM graph; the
  TensorRT-LLM engine shapes are validated here, so a bad shape fails in the first second);
- `check(resolved)`: what this machine and the options must have (TensorRT, TensorRT-LLM, a GPU
  that runs the format, calibration data);
- `stage(resolved)`: the progress label;
- `build(resolved, folder, progress, ...)`: write the part into the build folder and return its
  manifest section (`Built`).
Loading a built part is the runtime's registry (engines/registry.py), keyed the same way.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BuildError
from ..precisions import precision
from .plan import BuildOptions, ResolvedBuild

Progress = Callable[[str], None]
TRTLLM_MAX_NEW = 1024  # tokens a TensorRT-LLM engine generates past the longest prompt (serve's --max-tokens default)


@dataclass
class Built:
    """A part written into the build folder: its manifest section, and for the vision part the
    reference's embeddings of the smoke sample (computed while the fp32 tower is loaded) and
    the target the TensorRT plan resolved (`jetson` → orin / thor) with the Jetson release."""

    section: dict[str, Any]
    reference_embeds: np.ndarray | None = None
    target: str | None = None
    jetson: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# vision


class OnnxVision:
    """The vision ONNX graph at the row's precision (calibrated from images where the row says),
    its CPU-optimized copy and the held-out cosine report. Every vision backend starts here."""

    def settings(self, opts: BuildOptions, row) -> dict[str, Any]:
        return {}

    def check(self, resolved: ResolvedBuild) -> None:
        if resolved.vision.row.calibrated and resolved.opts.calib_images is None:
            raise BuildError(
                f"vision precision {resolved.vision.row.name} needs --calib-images DIR (or a `calibrate` set, or --calib-images builtin)"
            )

    def stage(self, resolved: ResolvedBuild) -> str:
        return f"vision export ({resolved.vision.row.name})"

    def build(self, resolved: ResolvedBuild, tmp: Path, progress: Progress, sample_pixels: np.ndarray) -> Built:
        from ..calibration.dataset import calibration_source
        from ..calibration.images import split_heldout
        from ..model.reference import ReferenceModel
        from .vision import export_vision

        opts = resolved.opts
        ref = ReferenceModel.load(resolved.checkpoint, vision_tower=opts.vision_tower, load_llm=False, progress=progress)
        pixels, _ = calibration_source(opts.calib_images, resolved.pcfg, opts.calib_limit, progress)
        cal, held = split_heldout(pixels)
        vis = export_vision(ref.vision, tmp / "vision", resolved.vision.row.name, cal, held, opts.calib_method, opts.threads, progress)
        embeds = ref.encode_images(sample_pixels[None])[0]
        section = {
            "backend": resolved.vision.name,
            "precision": resolved.vision.row.name,
            "graph": "vision/vision.onnx",
            "ort_graph": "vision/vision.ort.onnx" if (tmp / "vision" / "vision.ort.onnx").exists() else None,
            "profile": resolved.profile.to_dict(),
            "report": vis.report.get("heldout"),
        }
        return Built(section, embeds)


class TensorRTVision(OnnxVision):
    """The ONNX graph, then a TensorRT engine built from it on this GPU (engines/tensorrt)."""

    def check(self, resolved: ResolvedBuild) -> None:
        super().check(resolved)
        from ..extras import available
        from ..targets import check_target

        if not available("tensorrt"):
            raise BuildError(f"target '{resolved.target.name}' needs TensorRT: pip install 'convllava-export[gpu]' on the GPU machine")
        import tensorrt as trt

        from ..engines.tensorrt import gpu_identity, jetson_identity

        gpu = gpu_identity()  # TensorRT version, GPU and Jetson release, before minutes of export
        check_target(resolved.target, resolved.vision.row.name, trt.__version__, tuple(gpu["compute_capability"]), jetson_identity(), gpu.get("gpu_name"))

    def build(self, resolved: ResolvedBuild, tmp: Path, progress: Progress, sample_pixels: np.ndarray) -> Built:
        from ..engines.tensorrt import build_engine, gpu_identity, jetson_identity, plan_build
        from ..extras import require
        from ..targets import get_target

        built = super().build(resolved, tmp, progress, sample_pixels)
        opts = resolved.opts
        trt = require("tensorrt", "gpu", "TensorRT engines")
        gpu, jetson = gpu_identity(), jetson_identity()
        plan = plan_build(
            resolved.vision.row.name, trt.__version__, resolved.profile, tuple(gpu["compute_capability"]),
            version_compatible=bool(opts.extra.get("version_compatible")), target=opts.target, jetson=jetson,
        )
        cache = Path(opts.extra.get("timing_cache") or Path.home() / ".cache" / "convllava-export" / "timing.cache")
        cache.parent.mkdir(parents=True, exist_ok=True)
        build_engine(tmp / "vision" / "vision.onnx", tmp / "vision", plan, cache, progress)
        built.target = plan.target
        built.jetson = jetson if get_target(plan.target).jetson else None
        return built


# ---------------------------------------------------------------------------------------------
# LLM


class OrtLlm:
    """The decoder graph for ONNX Runtime: our dynamo export or the fused gqa layout."""

    def settings(self, opts: BuildOptions, row) -> dict[str, Any]:
        from .llm import choose_graph

        graph, why = choose_graph(opts.llm_graph, row.name)
        precision("llm", "onnxruntime", row.name, graph=graph)  # the table's refusal, before any machine check
        return {"graph": graph, "graph_choice": why}

    def check(self, resolved: ResolvedBuild) -> None:
        from ..options import check_llm

        check_llm("onnxruntime", resolved.llm.row.name, resolved.llm.settings["graph"])
        if resolved.opts.kv_cache == "int8":
            from .llm_gqa import int8_kv_cache_unsupported

            if resolved.llm.settings["graph"] != "gqa":
                raise BuildError(f"--kv-cache int8 is the gqa graph's cache; this build's LLM graph is {resolved.llm.settings['graph']} ({resolved.llm.settings['graph_choice']}): "
                                 "build an int4/int8 LLM with --llm-graph gqa (onnxruntime-genai installed), or leave --kv-cache auto")
            why = int8_kv_cache_unsupported()
            if why:
                raise BuildError(f"--kv-cache int8: {why}; install onnxruntime>=1.32 (where it is verified), or leave --kv-cache auto")

    def stage(self, resolved: ResolvedBuild) -> str:
        return f"LLM export ({resolved.llm.row.name}, {resolved.llm.settings['graph']} graph)"

    def build(self, resolved: ResolvedBuild, tmp: Path, progress: Progress) -> Built:
        from .llm import export_llm_from_checkpoint

        graph = resolved.llm.settings["graph"]
        export_llm_from_checkpoint(resolved.info, tmp / "llm", resolved.llm.row.name, resolved.opts.int4_block_size, progress, graph, resolved.budget)
        return Built({"backend": "onnxruntime", "format": "onnx", "graph": graph, "graph_choice": resolved.llm.settings["graph_choice"]})


class TrtLlm:
    """The engine flow: ModelOpt quantization calibrated on multimodal prompts, the TensorRT-LLM
    checkpoint in a scratch folder, then `trtllm-build` with a prompt table for max batch x
    visual tokens (engines/tensorrt_llm.py)."""

    def settings(self, opts: BuildOptions, row) -> dict[str, Any]:
        precision("llm", "tensorrt-llm", row.name, format="engine")  # `build` makes engines; hf checkpoints: `export llm --format hf`
        return {"format": "engine"}

    def engine_config(self, resolved: ResolvedBuild):
        from ..engines.tensorrt_llm import TrtLlmBuildConfig

        ctx = resolved.max_context
        cfg = TrtLlmBuildConfig(max_batch_size=resolved.opts.max_batch, max_visual_tokens=resolved.max_visual, max_input_len=ctx, max_seq_len=ctx + TRTLLM_MAX_NEW)
        cfg.validate()
        return cfg

    def check(self, resolved: ResolvedBuild) -> None:
        from ..options import check_trtllm_here

        row, opts = resolved.llm.row, resolved.opts  # the row and its format were checked by settings()
        if opts.kv_cache != "auto":
            raise BuildError("--kv-cache int8 is the onnxruntime gqa graph's; a TensorRT-LLM engine sets its own KV cache (leave --kv-cache auto)")
        if resolved.target.ort_device != "cuda":
            raise BuildError(f"--llm-backend tensorrt-llm runs on an NVIDIA GPU; target '{opts.target}' is the CPU (use --target tensorrt, orin or cuda)")
        self.engine_config(resolved)  # the engine's shapes, checked before minutes of work
        check_trtllm_here(row.name, resolved.target.name)
        if row.calibrated and opts.calib_images is None:
            raise BuildError(
                f"--llm-precision {row.name} is calibrated on multimodal prompts: pass --calib-images DIR (images like those "
                "you will serve), a `calibrate` set, or --calib-images builtin for the synthetic set"
            )

    def stage(self, resolved: ResolvedBuild) -> str:
        return f"TensorRT-LLM engine ({resolved.llm.row.name})"

    def build(self, resolved: ResolvedBuild, tmp: Path, progress: Progress) -> Built:
        from ..engines.tensorrt_llm import META, build_trtllm_engine, export_checkpoint
        from ..model.reference import ReferenceModel
        from ..progress import release_memory
        from .trtllm import calibration_sequences

        opts, row, cfg = resolved.opts, resolved.llm.row, self.engine_config(resolved)
        ref = ReferenceModel.load(resolved.checkpoint, vision_tower=opts.vision_tower, dtype="fp16", device="cuda", progress=progress)  # check: a GPU is here
        seqs = calibration_sequences(ref, opts.calib_images, opts.calib_prompts, opts.calib_limit, progress) if row.calibrated else []
        llm = ref.llm
        del ref  # the tower goes before ModelOpt builds its quantized copy of the LLM
        release_memory()
        scratch = tmp.parent / f"{tmp.name}-trtllm-checkpoint"
        try:
            meta = export_checkpoint(llm, seqs, row.name, scratch, "engine", opts.awq_block_size, progress=progress)
            del llm, seqs
            release_memory()  # the fp16 model off the GPU before trtllm-build needs it
            (tmp / "llm").mkdir()
            build_trtllm_engine(scratch, tmp / "llm" / "engine", cfg, progress)
            shutil.copyfile(scratch / META, tmp / "llm" / META)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        section = {"backend": "tensorrt-llm", "format": "engine", "engine": "llm/engine", "quant_algo": meta["quant_algo"], "calibration": meta["calibration"], "engine_config": asdict(cfg)}
        return Built(section)


BUILDERS: dict[tuple[str, str], Any] = {
    ("vision", "onnxruntime"): OnnxVision(),
    ("vision", "tensorrt"): TensorRTVision(),
    ("llm", "onnxruntime"): OrtLlm(),
    ("llm", "tensorrt-llm"): TrtLlm(),
}


def builder(part: str, backend: str) -> Any:
    try:
        return BUILDERS[(part, backend)]
    except KeyError:
        raise BuildError(f"no builder for the {part} backend '{backend}' (this version builds {', '.join(b for p, b in BUILDERS if p == part)})") from None
