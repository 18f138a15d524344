"""`bench faults` against the real `serve` of the tiny build: every check holds, and the checks
see real answers (each one compares what the server sent, so a regressed fix fails it)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from convllava_export.benchmarks.faults import _native_out_of_profile, run_faults
from convllava_export.manifest import read_manifest


@pytest.fixture(scope="module")
def native_build(tiny_checkpoint, tmp_path_factory):
    """The tiny model built for native aspect ratios with a vision profile that stops at 640 px,
    so a client can send an image beyond it."""
    from convllava_export.build import BuildOptions, build

    dest = tmp_path_factory.mktemp("builds") / "native-640"
    build(tiny_checkpoint, dest, BuildOptions(target="cpu", mode="native", max_size="640x640", smoke_test=False), progress=lambda m: None)
    return dest


def test_every_fault_holds_on_the_tiny_server(native_build, tiny_build):
    assert _native_out_of_profile(read_manifest(tiny_build)) is None  # pad: every image is resized into the profile
    assert _native_out_of_profile(read_manifest(native_build)) is not None  # the profile check runs here, not skipped
    result = run_faults(native_build, threads=1, max_tokens=8, drain_s=2.0, progress=lambda _: None)
    failed = [c for c in result["checks"] if not c["passed"]]
    assert not failed, json.dumps(failed, indent=1)
    names = " / ".join(c["name"] for c in result["checks"])
    for part in ("temperature NaN", "max_tokens", "beyond the profile", "decompression bomb", "leaves mid-stream", "capacity 4", "again", "SIGTERM"):
        assert part in names
    assert result["baseline"]["text"]["usage"]["completion_tokens"] == 8 and result["port_closed"]
    context = next(c for c in result["checks"] if c["name"].startswith("prompt of"))
    assert f"= {result['max_context']} of {result['max_context']}" in context["observed"]


def test_bench_faults_refuses_a_folder_that_is_no_build(tmp_path):
    from convllava_export.cli import cli

    res = CliRunner().invoke(cli, ["bench", "faults", str(tmp_path)])
    assert res.exit_code == 2 and "manifest" in res.output.lower()
