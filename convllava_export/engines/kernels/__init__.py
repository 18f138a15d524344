"""Native kernels compiled on first use for this machine's CPU (`cc -O3 -march=native`), cached.

Why compile here: the kernel is a few lines of C that gcc vectorizes for whatever this CPU has
(AVX-512 here, AVX2 elsewhere); no library ships an int4-blocks → bf16 unpacker, and torch's
eager ops take five passes over the weights where this takes one (7.9 vs ~1.6 G weights/s on 2
cores, BENCHMARKS.md). Without a C compiler, or with CONVLLAVA_NATIVE_KERNELS=0, callers use
their torch fallback, which computes the same values.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).with_name("dequant.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp-simd", "-shared", "-fPIC"]  # no FMA contraction: the torch fallbacks round the same


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "convllava-export" / "kernels"


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


@lru_cache(maxsize=1)
def dequant_library() -> ctypes.CDLL | None:
    """The compiled dequant kernels, or None (disabled, no compiler, or the compile failed)."""
    if os.environ.get("CONVLLAVA_NATIVE_KERNELS", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"dequant-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run([cc, *FLAGS, "-o", str(built), str(SOURCE)], check=True, capture_output=True, timeout=120)
                os.replace(built, target)  # atomic: a concurrent process sees the whole file or none
        except (OSError, subprocess.SubprocessError):
            return None
    lib = ctypes.CDLL(str(target))
    args = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    for fn in (lib.dequant_bf16, lib.dequant_f32):
        fn.argtypes, fn.restype = args, None
    lib.quant_i8.argtypes, lib.quant_i8.restype = [*args[:3], ctypes.c_void_p, *args[3:]], None
    lib.scale_i32.restype = None
    lib.scale_i32.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long]
    lib.quant_act_i8.restype = None
    lib.quant_act_i8.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long]
    ptr, n = ctypes.c_void_p, ctypes.c_long
    lib.pack_q4.restype = lib.quant_act_q4.restype = lib.gemm_q4.restype = lib.gemm_q4_ref.restype = None
    lib.pack_q4.argtypes = [ptr, ptr, ptr, ptr, n, n, n]
    lib.quant_act_q4.argtypes = [ptr, n, ptr, ptr, ptr, n, n, n]
    lib.gemm_q4_ref.argtypes = [ptr, ptr, ptr, n, ptr, ptr, n, n, n, n, ptr, n, n]
    lib.gemm_q4.argtypes = [*lib.gemm_q4_ref.argtypes, n]
    lib.q4_vnni.argtypes, lib.q4_vnni.restype = [], ctypes.c_int
    lib.attend_i8.restype = None
    lib.attend_i8.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, n, n, n, n, ctypes.c_float, ptr, ptr, n, n]
    return lib
