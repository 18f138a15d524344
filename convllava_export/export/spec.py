"""One description per exported model part: inputs, outputs and their dynamic axes.

Written next to every graph as `<part>.json`, read back by engines and the runtime, so
nothing downstream guesses names or shapes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]  # str = a named dynamic axis


@dataclass
class PartSpec:
    part: str  # "vision" or "decoder"
    graph: str  # file name of the ONNX graph
    precision: str
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    attributes: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path) -> Path:
        path = folder / f"{Path(self.graph).stem}.json"
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> PartSpec:
        data = json.loads(Path(path).read_text())
        data["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
        data["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
        return cls(**data)


def vision_spec(graph: str, precision: str, opset: int, hidden: int, stride: int, **attrs: Any) -> PartSpec:
    return PartSpec(
        part="vision",
        graph=graph,
        precision=precision,
        opset=opset,
        inputs=[TensorSpec("pixel_values", "float32", ["batch", 3, "height", "width"])],
        outputs=[TensorSpec("image_embeds", "float32", ["batch", "num_visual_tokens", hidden])],
        attributes={"stride": stride, "num_visual_tokens": f"(height/{stride})*(width/{stride})", **attrs},
    )


def decoder_spec(graph: str, precision: str, opset: int, layers: int, kv_heads: int, head_dim: int, hidden: int, vocab: int, **attrs: Any) -> PartSpec:
    past = [
        TensorSpec(f"past_key_values.{i}.{kind}", "float32", ["batch", kv_heads, "past_sequence", head_dim])
        for i in range(layers)
        for kind in ("key", "value")
    ]
    present = [
        TensorSpec(f"present.{i}.{kind}", "float32", ["batch", kv_heads, "total_sequence", head_dim])
        for i in range(layers)
        for kind in ("key", "value")
    ]
    return PartSpec(
        part="decoder",
        graph=graph,
        precision=precision,
        opset=opset,
        inputs=[
            TensorSpec("inputs_embeds", "float32", ["batch", "sequence", hidden]),
            TensorSpec("attention_mask", "int64", ["batch", "total_sequence"]),
            TensorSpec("position_ids", "int64", ["batch", "sequence"]),
            *past,
        ],
        outputs=[TensorSpec("logits", "float32", ["batch", 1, vocab]), *present],
        attributes={"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "hidden": hidden, "vocab": vocab, **attrs},
    )
