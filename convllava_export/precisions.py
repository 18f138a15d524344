"""The one table of what each backend builds, at which precisions: every list is read from it.

A leaf module (no imports from this package beyond `errors`), so the CLI's choices, `build`'s
validation, sizing, the smoke-test gates, the targets, the exporters, `validate --simulate` and
the runtime's registry read the same rows. Adding a precision is one `Precision` row in its
`PartBackend` (and its exporter and tests); everything else follows:

- `PartBackend`: one (part, backend) a build can hold: the vision tower on ONNX Runtime or
  TensorRT, the LLM on ONNX Runtime or TensorRT-LLM. Its rows are its precisions.
- `Precision`: calibrated or not, bytes per weight for sizing, the default smoke gate, the
  minimum compute capability that runs it, the targets that accept it, and for the LLM the
  ONNX graph layouts or TensorRT-LLM formats that make it.
- Behaviour lives in two registries keyed by (part, backend): `export/parts.py` (check the
  machine, build the part into a build folder) and `engines/registry.py` (load it); tests check
  both hold every row here.

`refuse` is the single place an unknown or unsupported combination is refused, listing the
valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BuildError

PARTS = ("vision", "llm")
DEVICES = ("cpu", "cuda")  # where ONNX Runtime and the torch reference run
# target names (targets.TARGETS defines them; this leaf cannot import it, tests/test_architecture.py checks they agree)
TRT_TARGETS = ("tensorrt", "orin", "thor", "jetson")
GPU_TARGETS = ("cuda",) + TRT_TARGETS

# the torch reference's dtype (`auto`: fp32 when it fits in memory, else the checkpoint's; sizing.py)
REFERENCE_DTYPES = ("auto", "fp32", "bf16", "fp16")
# How a gqa int4/int8 graph's LLM runs (--llm-kernel, old name --prefill): ONNX Runtime's MatMulNBits;
# prompt chunks unpacked for torch's bf16 or int8 GEMMs, decode on ORT; or q4, every step on our
# int4 x int8 VNNI kernel without an ORT session (engines/native_llm.py, engines/onnxruntime.Q4GqaDecoder).
# auto: bf16 with AMX-BF16, q4 with AVX-512 VNNI (int4 builds, fp16 or int8 cache), else ONNX Runtime.
PREFILL_KERNELS = ("auto", "onnxruntime", "bf16", "int8", "q4")
# The KV cache of an int4/int8 gqa graph: auto is fp16; int8 halves it (per-channel scales
# calibrated on multimodal prompts at build time, export/llm_gqa.int8_kv_cache).
KV_CACHES = ("auto", "int8")
# activation-range calibration of int8 vision graphs (calibration/ranges.py)
CALIB_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class ModelOptFormat:
    """One ModelOpt quantization format: its config in `modelopt.torch.quantization` and the
    `quant_algo` ModelOpt writes into the exported checkpoint's config for it."""

    config: str | None  # None: no quantization (fp16)
    quant_algo: str | None


@dataclass(frozen=True)
class Precision:
    """One precision of one (part, backend)."""

    name: str
    describe: str
    weight_bytes: float  # bytes per matmul weight as exported, before block scales (sizing.py)
    gate: float  # default smoke-test threshold: vision cosine or teacher-forced top-1 agreement (gates.py)
    targets: tuple[str, ...]  # the build targets that accept it (targets.py reads this)
    calibrated: bool = False  # needs calibration data (images, or multimodal prompts for the LLM)
    block_scaled: bool = False  # + 4 bytes per `block` weights of fp32 scales
    min_cc: tuple[int, int] | None = None  # oldest GPU compute capability that runs it
    graphs: tuple[str, ...] = ()  # ONNX Runtime LLM: the decoder layouts that make it
    formats: tuple[str, ...] = ()  # TensorRT-LLM: the routes that make it (engine, hf)
    modelopt: ModelOptFormat | None = None  # TensorRT-LLM: the ModelOpt format
    simulated: bool = False  # `validate --simulate` fake-quantizes it on the CPU (ModelOpt)

    def bytes_per_weight(self, block: int = 128) -> float:
        return self.weight_bytes + (4 / block if self.block_scaled else 0.0)


@dataclass(frozen=True)
class PartBackend:
    """What one backend builds for one part of the model."""

    part: str  # "vision" or "llm"
    backend: str  # what the manifest names: onnxruntime, tensorrt, tensorrt-llm
    describe: str
    precisions: tuple[Precision, ...]
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)  # other choices: graph, format

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.precisions)

    def get(self, name: str) -> Precision | None:
        return next((p for p in self.precisions if p.name == name), None)


_ORT = ("cpu",) + GPU_TARGETS  # ONNX Runtime runs the LLM on any target's device
_GQA, _DYNAMO = ("dynamo", "gqa"), ("dynamo",)
_ENGINE, _HF, _BOTH = ("engine",), ("hf",), ("engine", "hf")
FP8_CC, FP4_CC = (8, 9), (10, 0)  # FP8 tensor cores: Ada/Hopper/Blackwell; FP4: Blackwell

BACKENDS: tuple[PartBackend, ...] = (
    PartBackend("vision", "onnxruntime", "ConvNeXt† + projector on ONNX Runtime (CPU or CUDA EP)", (
        Precision("fp32", "fp32 graph", 4.0, 0.999, ("cpu", "cuda")),
        Precision("fp16", "fp16 graph, LayerNorms kept fp32", 2.0, 0.995, ("cpu", "cuda")),
        Precision("int8", "int8 QDQ, calibrated activation ranges", 1.0, 0.97, ("cpu", "cuda"), calibrated=True),
        # fp8 Q/DQ graphs are for TensorRT and the CUDA EP; the CPU kernels do not run them
        Precision("fp8", "fp8 E4M3 QDQ (ModelOpt), calibrated", 1.0, 0.97, ("cuda",), calibrated=True, simulated=True),
    )),
    PartBackend("vision", "tensorrt", "TensorRT engine built from the vision ONNX graph", (
        Precision("fp32", "fp32 engine", 4.0, 0.999, TRT_TARGETS),
        Precision("fp16", "fp16 engine", 2.0, 0.995, TRT_TARGETS),
        Precision("int8", "int8 engine from the calibrated QDQ graph", 1.0, 0.97, TRT_TARGETS, calibrated=True),
        Precision("fp8", "fp8 engine from the QDQ graph", 1.0, 0.97, ("tensorrt", "thor", "jetson"), calibrated=True, min_cc=FP8_CC),
    )),
    PartBackend("llm", "onnxruntime", "Vicuna on ONNX Runtime (dynamo graph, or the fused gqa layout)", (
        Precision("fp32", "fp32 weights", 4.0, 0.98, _ORT, graphs=_GQA),
        Precision("fp16", "fp16 weights", 2.0, 0.95, _ORT, graphs=_DYNAMO),
        Precision("int8", "int8 blockwise weights (MatMulNBits)", 1.0, 0.9, _ORT, block_scaled=True, graphs=_GQA),
        Precision("int4", "int4 blockwise weights (MatMulNBits)", 0.5, 0.8, _ORT, block_scaled=True, graphs=_GQA),
    ), {"graph": _GQA}),
    # engine flow (`trtllm-build`, TensorRT-LLM 0.12-jetson .. 1.2.x) and the PyTorch backend's
    # unified HF checkpoint (`export llm --backend tensorrt-llm --format hf`); gates set like their
    # ORT neighbours (not yet measured on a GPU, docs/tensorrt-llm.md)
    PartBackend("llm", "tensorrt-llm", "Vicuna on TensorRT-LLM (ModelOpt quantization)", (
        Precision("fp16", "fp16 weights and activations", 2.0, 0.95, GPU_TARGETS, formats=_BOTH, modelopt=ModelOptFormat(None, None)),
        Precision("int8", "INT8 per-channel weights, fp16 activations", 1.0, 0.9, GPU_TARGETS, calibrated=True, formats=_ENGINE,
                  modelopt=ModelOptFormat("INT8_WEIGHT_ONLY_CFG", "W8A16")),
        Precision("int8-sq", "INT8 SmoothQuant: per-channel weights, per-tensor activations", 1.0, 0.9, GPU_TARGETS, calibrated=True,
                  formats=_ENGINE, modelopt=ModelOptFormat("INT8_SMOOTHQUANT_CFG", "W8A8_SQ_PER_CHANNEL"), simulated=True),
        Precision("fp8", "FP8 E4M3 per-tensor weights and activations", 1.0, 0.9, GPU_TARGETS, calibrated=True, min_cc=FP8_CC,
                  formats=_BOTH, modelopt=ModelOptFormat("FP8_DEFAULT_CFG", "FP8"), simulated=True),
        Precision("int4-awq", "INT4 blockwise weights with AWQ-lite scaling, fp16 activations", 0.5, 0.8, GPU_TARGETS, calibrated=True,
                  block_scaled=True, formats=_BOTH, modelopt=ModelOptFormat("INT4_AWQ_CFG", "W4A16_AWQ"), simulated=True),
        Precision("nvfp4", "NVFP4: E2M1 weights and activations in 16-element blocks with FP8 scales", 0.5, 0.8, GPU_TARGETS,
                  calibrated=True, block_scaled=True, min_cc=FP4_CC, formats=_HF, modelopt=ModelOptFormat("NVFP4_DEFAULT_CFG", "NVFP4"), simulated=True),
        Precision("w4a8-awq", "INT4 AWQ weights with FP8 activations", 0.5, 0.8, GPU_TARGETS, calibrated=True, block_scaled=True,
                  min_cc=FP8_CC, formats=_HF, modelopt=ModelOptFormat("W4A8_AWQ_BETA_CFG", "W4A8_AWQ")),
    ), {"format": _BOTH}),
)


# ---------------------------------------------------------------------------------------------
# lookups (everything below reads BACKENDS)


def backends(part: str) -> tuple[PartBackend, ...]:
    return tuple(b for b in BACKENDS if b.part == part)


def backend_names(part: str) -> tuple[str, ...]:
    return tuple(b.backend for b in backends(part))


def part_backend(part: str, backend: str) -> PartBackend:
    for b in BACKENDS:
        if b.part == part and b.backend == backend:
            return b
    raise BuildError(f"unknown {part} backend '{backend}' (use {', '.join(backend_names(part))})")


def names(part: str, backend: str | None = None, **where: object) -> tuple[str, ...]:
    """Precision names of `part` (one backend, or all in table order), optionally filtered by
    row fields: names("llm", "onnxruntime", graph="gqa"), names("vision", calibrated=True)."""
    out: dict[str, None] = {}
    for b in backends(part):
        if backend is None or b.backend == backend:
            for p in b.precisions:
                if _matches(p, where):
                    out[p.name] = None
    return tuple(out)


def _matches(p: Precision, where: dict[str, object]) -> bool:
    for key, want in where.items():
        if key == "graph":
            ok = want in p.graphs
        elif key == "format":
            ok = want in p.formats
        elif key == "target":
            ok = want in p.targets
        else:
            ok = getattr(p, key) == want
        if not ok:
            return False
    return True


def precision(part: str, backend: str, name: str, **where: str) -> Precision:
    """The row, or the one refusal (exit 2) that names what is valid instead."""
    pb = part_backend(part, backend)
    row = pb.get(name)
    if row is not None and _matches(row, where):
        return row
    refuse(part, backend, name, **where)
    raise AssertionError("unreachable")


def refuse(part: str, backend: str, name: str, **where: str) -> None:
    """Raise the BuildError for a (part, backend, precision[, graph / format / target]) the
    table does not hold, listing the valid choices and where else the precision is made."""
    pb = part_backend(part, backend)
    for key, value in where.items():
        if key in pb.options and value not in pb.options[key]:
            raise BuildError(f"unknown {part} {key} '{value}' for {backend} (use {', '.join(pb.options[key])})")
    what = f"{part} precision '{name}'"
    row = pb.get(name)
    if row is None:
        elsewhere = [b.backend for b in backends(part) if b.get(name)]
        hint = f"; {name} is made by the {' / '.join(elsewhere)} backend" if elsewhere else ""
        raise BuildError(f"{what} is not available for {backend} (use {', '.join(pb.names)}){hint}")
    key, value = next((k, v) for k, v in where.items() if not _matches(row, {k: v}))
    valid = names(part, backend, **{key: value})
    made_by = {"graph": row.graphs, "format": row.formats, "target": row.targets}.get(key, ())
    also = f"; {name} is made by {key} {', '.join(made_by)}" if made_by else ""
    raise BuildError(f"{what} is not available for {backend} with {key} '{value}' (use {', '.join(valid) or 'another ' + key}){also}")


# ---------------------------------------------------------------------------------------------
# the lists other modules name (derived, never written out)

LLM_GRAPHS = part_backend("llm", "onnxruntime").options["graph"]
TRTLLM_HF = names("llm", "tensorrt-llm", format="hf")
TRTLLM_FORMATS = part_backend("llm", "tensorrt-llm").options["format"]
MODELOPT: dict[str, ModelOptFormat] = {p.name: p.modelopt for p in part_backend("llm", "tensorrt-llm").precisions if p.modelopt}
AWQ = tuple(n for n in MODELOPT if n.endswith("-awq"))  # formats with an AWQ group size
SIMULATED = names("llm", simulated=True)  # `validate --simulate` formats (ModelOpt fake quantization)
SIMULATED_VISION = names("vision", simulated=True)  # ... that quantize the tower too
# runtime backends a manifest can name: the build backends, plus torch (the source checkpoint)
VISION_RUNTIMES = backend_names("vision") + ("torch",)
LLM_RUNTIMES = backend_names("llm") + ("torch",)


def describe(part: str, backend: str, name: str) -> str:
    return precision(part, backend, name).describe


def table_rows(block: int = 128) -> list[dict[str, object]]:
    """Every row, flat (`convllava-export precisions`)."""
    return [
        {
            "part": b.part, "backend": b.backend, "precision": p.name, "describe": p.describe, "calibrated": p.calibrated,
            "bytes_per_weight": round(p.bytes_per_weight(block), 4), "gate": p.gate,
            "min_gpu": f"sm_{p.min_cc[0]}{p.min_cc[1]}" if p.min_cc else None,
            "graphs": list(p.graphs), "formats": list(p.formats), "targets": list(p.targets), "simulated": p.simulated,
        }
        for b in BACKENDS
        for p in b.precisions
    ]
