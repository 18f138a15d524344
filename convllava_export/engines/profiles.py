"""Shape profiles for the vision engine: one plan drives TensorRT and the TensorRT EP alike.

Pure code (no GPU): validated here, serialized into engine metadata and the build manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ExportError
from ..preprocess import STRIDE, visual_tokens

Shape = tuple[int, int, int, int]


def parse_hw(text: str, what: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in str(text).lower().replace("×", "x").split("x")]
    except ValueError:
        raise ExportError(f"{what} '{text}' is not of the form HxW (e.g. 1536x1536)") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise ExportError(f"{what} '{text}' is not of the form HxW (e.g. 1536x1536)")
    if parts[0] % STRIDE or parts[1] % STRIDE:
        raise ExportError(f"{what} {parts[0]}x{parts[1]} is not a multiple of {STRIDE} on both sides (the tower's total stride)")
    return parts[0], parts[1]


@dataclass(frozen=True)
class VisionProfile:
    """min/opt/max of batch, height and width for the `pixel_values` input."""

    min_hw: tuple[int, int] = (64, 64)
    opt_hw: tuple[int, int] = (1536, 1536)
    max_hw: tuple[int, int] = (2048, 2048)
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 4

    @classmethod
    def from_strings(cls, min_size: str, opt_size: str, max_size: str, batch: tuple[int, int, int] = (1, 1, 4)) -> VisionProfile:
        prof = cls(parse_hw(min_size, "--min-size"), parse_hw(opt_size, "--opt-size"), parse_hw(max_size, "--max-size"), *batch)
        prof.validate()
        return prof

    def validate(self) -> None:
        for axis, name in ((0, "height"), (1, "width")):
            lo, opt, hi = self.min_hw[axis], self.opt_hw[axis], self.max_hw[axis]
            if not lo <= opt <= hi:
                raise ExportError(f"profile {name}: need min <= opt <= max, got {lo} / {opt} / {hi}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ExportError(f"profile batch: need 1 <= min <= opt <= max, got {self.min_batch} / {self.opt_batch} / {self.max_batch}")

    def shapes(self) -> tuple[Shape, Shape, Shape]:
        return (
            (self.min_batch, 3, *self.min_hw),
            (self.opt_batch, 3, *self.opt_hw),
            (self.max_batch, 3, *self.max_hw),
        )

    def contains(self, shape: tuple[int, ...]) -> bool:
        lo, _, hi = self.shapes()
        return len(shape) == 4 and all(a <= s <= b for a, s, b in zip(lo, shape, hi))

    def check(self, shape: tuple[int, ...]) -> None:
        """Refuse a shape outside the profile, naming the allowed range."""
        if not self.contains(shape):
            lo, _, hi = self.shapes()
            raise ExportError(
                f"input shape {tuple(shape)} is outside the engine's profile: batch {lo[0]}..{hi[0]}, "
                f"height {lo[2]}..{hi[2]}, width {lo[3]}..{hi[3]} (rebuild with a wider --min-size/--max-size)"
            )

    @property
    def max_visual_tokens(self) -> int:
        return visual_tokens(*self.max_hw)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VisionProfile:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
