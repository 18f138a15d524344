"""Which machine this is: the GPU's name and compute capability, and on a Jetson its L4T and
JetPack releases (recorded in an engine's metadata and checked when it loads)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any, Callable

from ...errors import BuildError


def gpu_identity(device: int | None = None) -> dict[str, Any]:
    """Name and compute capability of a GPU (the current one by default), through torch."""
    import torch

    if not torch.cuda.is_available():
        raise BuildError("no CUDA GPU is visible: TensorRT engines need one (use --target cpu for ONNX Runtime)")
    index = torch.cuda.current_device() if device is None else device
    props = torch.cuda.get_device_properties(index)
    return {"gpu_name": props.name, "compute_capability": [props.major, props.minor]}


NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
_L4T_LINE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")


def parse_l4t_release(text: str) -> str:
    """'# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, ...' -> '36.4.3'."""
    lines = text.strip().splitlines()
    first = lines[0].strip() if lines else ""
    m = _L4T_LINE.match(first)
    if not m:
        raise BuildError(
            f"cannot read the L4T release from '{first[:80]}' (expected '# R36 (release), REVISION: 4.3, ...' in "
            f"{NV_TEGRA_RELEASE}); is this Jetson's Jetson Linux installation intact?"
        )
    return f"{m.group(1)}.{m.group(2)}"


def parse_jetpack_version(text: str | None) -> str | None:
    """The `nvidia-jetpack` package version as a JetPack release: '6.2+b77' -> '6.2'; None when empty."""
    m = re.match(r"\s*(\d+(?:\.\d+)*)", text or "")
    return m.group(1) if m else None


def _dpkg_jetpack() -> str | None:
    """Version of the `nvidia-jetpack` meta package, if dpkg knows it (containers often lack it)."""
    try:
        done = subprocess.run(
            ["dpkg-query", "--showformat=${Version}", "--show", "nvidia-jetpack"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def jetson_identity(release_file: Path | str = NV_TEGRA_RELEASE, read_jetpack: Callable[[], str | None] | None = None) -> dict[str, Any] | None:
    """{'l4t': '36.4.3', 'jetpack': '6.2' or None} on a Jetson; None elsewhere (no L4T release file).

    L4T (Jetson Linux) comes from the first line of /etc/nv_tegra_release; JetPack from the
    `nvidia-jetpack` dpkg package when it is installed (`read_jetpack` replaces the dpkg query).
    A release file that exists but cannot be read is refused rather than guessed.
    """
    path = Path(release_file)
    if not path.is_file():
        return None
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise BuildError(f"cannot read {path} ({exc}): the L4T release of this Jetson is needed to build or load engines") from None
    return {"l4t": parse_l4t_release(text), "jetpack": parse_jetpack_version((read_jetpack or _dpkg_jetpack)())}
