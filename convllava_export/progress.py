"""Progress with an ETA, and per-stage wall time and peak memory, for long work.

Everything reports through a `Progress` callable (a line of text), so the CLI prints it, a
test collects it and a server logs it. `Meter` turns units of work into a throttled line with
rate and ETA; `StageLog` records each stage's seconds and peak RSS (the process's and its
largest child's) for the manifest.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Progress = Callable[[str], None]


def _fmt_s(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt_pair(done: float, total: float, unit: str) -> str:
    """`3.1/6.7G params`, `1.20/13.50 GB`: both numbers on the total's scale."""
    if unit == "bytes":
        return f"{done / 1e9:.2f}/{total / 1e9:.2f} GB"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if total >= div:
            return f"{done / div:.1f}/{total / div:.1f}{suffix} {unit}"
    return f"{done:.0f}/{total:.0f} {unit}"


class Meter:
    """`label: 3.1/6.7G params (46%), 1m20s, ETA 1m34s`, at most every `every` seconds."""

    def __init__(self, label: str, total: float, unit: str, say: Progress, every: float = 5.0) -> None:
        self.label, self.total, self.unit, self.say, self.every = label, max(float(total), 1.0), unit, say, every
        self.start = self.last = time.perf_counter()
        self.done_units = 0.0

    def advance(self, units: float = 1.0) -> None:
        self.done_units += units
        now = time.perf_counter()
        if now - self.last >= self.every and self.done_units < self.total:
            self.last = now
            self.say(self.line(now))

    def line(self, now: float | None = None) -> str:
        now = now or time.perf_counter()
        elapsed = now - self.start
        frac = min(self.done_units / self.total, 1.0)
        eta = elapsed / frac * (1 - frac) if frac > 0 else float("nan")
        eta_s = _fmt_s(eta) if eta == eta else "?"
        return f"{self.label}: {_fmt_pair(self.done_units, self.total, self.unit)} ({frac:.0%}), {_fmt_s(elapsed)}, ETA {eta_s}"

    def done(self) -> None:
        self.say(f"{self.label}: done in {_fmt_s(time.perf_counter() - self.start)}")


def peak_rss_bytes() -> int:
    """This process's peak resident set since start or the last `reset_peak_rss` (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs). False where unsupported."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise:
    after the vision phase the process would sit on gigabytes the next phase's child needs)."""
    import ctypes
    import gc
    import sys

    # torch.export leaves every traced node in this module-level map (torch 2.13), which keeps
    # the exported model's parameters alive: 2.8 GB after the 7B vision export
    leak = getattr(sys.modules.get("torch.fx.experimental.proxy_tensor"), "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if isinstance(leak, dict):
        leak.clear()
    # onnxscript's rewrite rules are module-level objects whose matchers keep the last graph
    # they matched (onnxscript 0.7): the whole exported model, weights included
    if "onnxscript.rewriter._matcher" in sys.modules:
        for obj in gc.get_objects():
            if type(obj).__name__ == "SimplePatternMatcher":
                for attr in ("_graph", "_match", "_current_node", "_tracer"):
                    if attr in getattr(obj, "__dict__", {}):
                        setattr(obj, attr, None)
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():  # the caching allocator keeps freed GPU memory otherwise
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def children_peak_rss_bytes() -> int:
    """The largest peak RSS of any child process waited for so far (subprocess tools)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


@dataclass
class StageLog:
    """Per-stage wall time and peak RSS. `stage(name)` closes the previous stage and opens one."""

    say: Progress
    total: int
    stages: list[dict[str, Any]] = field(default_factory=list)
    _open: dict[str, Any] | None = None

    def stage(self, name: str) -> None:
        self.close()
        release_memory()
        resettable = reset_peak_rss()
        self._open = {"name": name, "start": time.perf_counter(), "children_before": children_peak_rss_bytes(), "resettable": resettable}
        self.say(f"[{len(self.stages) + 1}/{self.total}] {name}")

    def close(self) -> None:
        if self._open is None:
            return
        o, self._open = self._open, None
        child = children_peak_rss_bytes()
        self.stages.append({
            "name": o["name"],
            "seconds": round(time.perf_counter() - o["start"], 2),
            "peak_rss_gb": round(peak_rss_bytes() / 1e9, 3) if o["resettable"] else None,
            # a child's peak shows only if it exceeded every earlier child's (getrusage is a max)
            "child_peak_rss_gb": round(child / 1e9, 3) if child > o["children_before"] else None,
        })

    def to_dict(self) -> list[dict[str, Any]]:
        return list(self.stages)
