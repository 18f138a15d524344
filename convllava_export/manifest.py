"""A build's manifest.json as one typed object, written and read here only.

A leaf module (errors only), so `build` (which writes it) and the runtime, server, Ray backend
and CLI (which read it) share one definition without importing each other.

Schema 2 (this version) writes every section complete: the LLM section names its `graph`
(ONNX Runtime) and its `format` (`onnx` or `engine`), and `token_budget.max_context` is always
there, so no reader supplies a default. A schema-1 folder still loads: `Manifest.from_dict`
fills in exactly the defaults readers used to apply (graph `dynamo`, context 2048).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BuildError

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
FILE = "manifest.json"


@dataclass(frozen=True)
class VisionSection:
    backend: str  # onnxruntime or tensorrt (precisions.BACKENDS)
    precision: str
    graph: str  # the ONNX graph, relative to the build folder
    profile: dict[str, Any]  # engines.profiles.VisionProfile.to_dict()
    ort_graph: str | None = None  # the CPU-optimized copy, where built
    report: dict[str, Any] | None = None  # held-out cosine against the fp32 reference


@dataclass(frozen=True)
class LlmSection:
    backend: str  # onnxruntime or tensorrt-llm
    precision: str
    folder: str
    vocab_size: int
    format: str  # "onnx" (decoder.onnx) or "engine" (a TensorRT-LLM engine)
    graph: str | None = None  # onnxruntime: dynamo or gqa
    graph_choice: str | None = None  # why that graph (auto's reason, or --llm-graph)
    engine: str | None = None  # tensorrt-llm: the engine folder
    quant_algo: str | None = None
    calibration: dict[str, Any] | None = None
    engine_config: dict[str, Any] | None = None


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    tool: dict[str, Any]
    created: str
    host: dict[str, Any]
    libraries: dict[str, str]
    source: dict[str, Any]  # checkpoint, vision_tower, fingerprint, weights_dtype
    target: str
    vision: VisionSection
    llm: LlmSection
    preprocess: dict[str, Any]
    token_budget: dict[str, int]  # max_visual_tokens_per_image, max_context
    prompt_template: str
    jetson: dict[str, Any] | None = None
    threads: int | None = None
    estimate: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Any] = field(default_factory=dict)
    integrity: dict[str, Any] | None = None
    build_seconds: float | None = None

    @property
    def max_context(self) -> int:
        return int(self.token_budget["max_context"])

    def part(self, name: str) -> VisionSection | LlmSection:
        return self.vision if name == "vision" else self.llm

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = FILE) -> Manifest:
        """A manifest of schema 1 or 2; refuses anything else, or a section that is malformed."""
        version = data.get("schema_version")
        if version not in READABLE_SCHEMAS:
            raise BuildError(f"{where}: schema version {version} is not one this version reads ({', '.join(map(str, READABLE_SCHEMAS))}); rebuild with this version of convllava-export")
        data = _upgrade(dict(data)) if version == 1 else data
        try:
            fields = {f.name for f in dataclasses.fields(cls)}
            values = {k: v for k, v in data.items() if k in fields}
            values["vision"] = _section(VisionSection, data["vision"])
            values["llm"] = _section(LlmSection, data["llm"])
            return cls(**values)
        except (KeyError, TypeError) as exc:
            raise BuildError(f"{where} is malformed ({type(exc).__name__}: {exc}); rebuild it with `convllava-export build`") from None


def _section(kind: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v for k, v in data.items() if k in names})


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 → 2: the defaults schema-1 readers applied, made explicit."""
    llm = dict(data["llm"])
    if llm.get("backend", "onnxruntime") == "onnxruntime":
        llm.setdefault("backend", "onnxruntime")
        llm.setdefault("graph", "dynamo")
        llm.setdefault("format", "onnx")
    else:
        llm.setdefault("format", "engine")
    vision = dict(data["vision"])
    vision.setdefault("backend", "onnxruntime")
    budget = dict(data.get("token_budget") or {})
    budget.setdefault("max_context", 2048)
    return {**data, "llm": llm, "vision": vision, "token_budget": budget, "schema_version": 2}


def _load(folder: Path) -> tuple[dict[str, Any], Path]:
    path = Path(folder) / FILE
    if not path.is_file():
        raise BuildError(f"{folder} is not a build folder (no {FILE}); create one with `convllava-export build`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BuildError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BuildError(f"{path} is not a manifest (a JSON object)")
    if data.get("schema_version") not in READABLE_SCHEMAS:
        raise BuildError(f"{path}: schema version {data.get('schema_version')} is not one this version reads ({', '.join(map(str, READABLE_SCHEMAS))}); rebuild with this version of convllava-export")
    return data, path


def read_manifest(folder: Path) -> Manifest:
    data, path = _load(folder)
    return Manifest.from_dict(data, str(path))


def read_file_list(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(files, integrity) alone: `verify` checks the files even when another section is malformed."""
    data, path = _load(folder)
    if not isinstance(data.get("files", {}), dict):
        raise BuildError(f"{path}: its file list is malformed; rebuild it with `convllava-export build`")
    return data.get("files", {}), data.get("integrity")


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = Path(folder) / FILE
    path.write_text(json.dumps(manifest.to_dict(), indent=2))
    return path
