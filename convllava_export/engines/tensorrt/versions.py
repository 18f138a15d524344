"""TensorRT version strings: parsing, comparing, and which versions load a version-compatible engine."""

from __future__ import annotations

from ...targets import parse_trt_version

VERSION_COMPAT_MIN = (8, 6)  # "Version compatibility is supported from version 8.6" (both builder and runtime)
# Across a major-version boundary only these (built major, runtime major) pairs load a
# version-compatible engine. TensorRT 10 docs (Version Compatibility): TensorRT 8 engines run on
# TensorRT 9 and 10; TensorRT 11.4 support matrix (Engine Portability): "TensorRT 10
# version-compatible engines can run with a TensorRT 11 runtime, and TensorRT 8 [...] with a
# TensorRT 10 runtime. No other combination across major versions is supported."
CROSS_MAJOR_COMPAT = frozenset({(8, 9), (8, 10), (10, 11)})

# parse_trt_version (re-exported by the package) lives in convllava_export.targets, beside the rules that use it.


def trt_major(version: str) -> int:
    return parse_trt_version(version)[0]


def version_str(version: str) -> str:
    return ".".join(map(str, parse_trt_version(version)))


def release(version: str) -> tuple[int, int, int]:
    """(major, minor, patch); a missing patch counts as 0."""
    p = parse_trt_version(version)
    return (p + (0, 0))[:3]  # type: ignore[return-value]


def same_version(a: str, b: str) -> bool:
    """Same release: equal major.minor.patch, and equal build numbers where both strings have one
    ('10.3.0' == '10.3.0.26': `tensorrt.__version__` is usually written without the build)."""
    pa, pb = parse_trt_version(a), parse_trt_version(b)
    if release(a) != release(b):
        return False
    return len(pa) < 4 or len(pb) < 4 or pa[3:] == pb[3:]
