"""No data lost, integrity of build folders, and one-line CLI errors."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from convllava_export.build import BuildOptions, build, file_entries
from convllava_export.cli import cli
from convllava_export.errors import BuildError, ConvLlavaError, ExportError
from convllava_export.fsutil import atomic_output_dir, spot_offsets
from convllava_export.runtime.build_loader import check_files, verify_files
from convllava_export.runtime.netutil import bind_listen_socket

BLOCK, BLOCKS, LIMIT = 64 << 10, 4, 1 << 20  # small spot-check sampling so a 4 MiB file is "large"


def one_line_error(res, fragment: str) -> None:
    assert res.exit_code == 2, res.output
    assert fragment in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


@pytest.fixture()
def synthetic_build(tmp_path) -> Path:
    """A build-shaped folder: one 4 MiB file (spot-checked with LIMIT) and two small ones."""
    folder = tmp_path / "build"
    (folder / "llm").mkdir(parents=True)
    (folder / "llm" / "big.bin").write_bytes(os.urandom(4 << 20))
    (folder / "llm" / "decoder.json").write_text("{}")
    (folder / "preprocessor_config.json").write_text("{}")
    files, integrity = file_entries(folder, BLOCK, BLOCKS)
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 1, "files": files, "integrity": integrity}))
    return folder


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def listing(folder: Path) -> tuple[dict, dict | None]:
    """The manifest's file list and its integrity section: what verify_files checks."""
    m = manifest_of(folder)
    return m["files"], m.get("integrity")


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


# -- integrity ---------------------------------------------------------------------------


def test_flipped_byte_found_at_load_in_a_sampled_block_and_always_by_verify(synthetic_build):
    big = synthetic_build / "llm" / "big.bin"
    verify_files(synthetic_build, *listing(synthetic_build), full_hash_limit=LIMIT)
    sampled = spot_offsets(4 << 20, BLOCK, BLOCKS)[1] + 100
    flip(big, sampled)
    with pytest.raises(BuildError, match="big.bin has a different checksum \\(sampled blocks\\)"):
        verify_files(synthetic_build, *listing(synthetic_build), full_hash_limit=LIMIT)
    flip(big, sampled)
    between = (2 << 20) + 12345  # in the middle, between sampled blocks
    assert not any(o <= between < o + BLOCK for o in spot_offsets(4 << 20, BLOCK, BLOCKS))
    flip(big, between)
    verify_files(synthetic_build, *listing(synthetic_build), full_hash_limit=LIMIT)  # the spot check's known blind spot
    with pytest.raises(BuildError, match="big.bin has a different checksum"):
        verify_files(synthetic_build, *listing(synthetic_build), "full")
    res = CliRunner().invoke(cli, ["verify", str(synthetic_build)])
    one_line_error(res, "llm/big.bin has a different checksum")


def test_unlisted_missing_and_resized_files_refused(synthetic_build):
    (synthetic_build / "llm" / "extra.onnx").write_bytes(b"x")
    os.symlink("/etc", synthetic_build / "linked")
    with pytest.raises(BuildError, match="linked is not part of the build.*llm/extra.onnx is not part of the build"):
        verify_files(synthetic_build, *listing(synthetic_build))
    (synthetic_build / "llm" / "extra.onnx").unlink()
    (synthetic_build / "linked").unlink()
    (synthetic_build / "preprocessor_config.json").write_text("{ }")
    (synthetic_build / "llm" / "decoder.json").unlink()
    with pytest.raises(BuildError, match="llm/decoder.json is missing; preprocessor_config.json is 3 bytes, expected 2"):
        verify_files(synthetic_build, *listing(synthetic_build))


def test_edited_manifest_file_list_refused(synthetic_build):
    manifest = manifest_of(synthetic_build)
    del manifest["files"]["preprocessor_config.json"]  # and the file removed: consistent but for the digest
    (synthetic_build / "preprocessor_config.json").unlink()
    (synthetic_build / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BuildError, match="manifest.json's file list was edited"):
        verify_files(synthetic_build, manifest["files"], manifest.get("integrity"))


def test_old_manifest_checks_large_files_by_size_and_says_so(synthetic_build, caplog):
    manifest = manifest_of(synthetic_build)
    del manifest["integrity"]
    for entry in manifest["files"].values():
        del entry["spot_sha256"]
    flip(synthetic_build / "llm" / "big.bin", 0)
    with caplog.at_level(logging.WARNING):
        verify_files(synthetic_build, manifest["files"], manifest.get("integrity"), full_hash_limit=LIMIT)
    assert "predates spot checks" in caplog.text and "llm/big.bin" in caplog.text
    assert check_files(synthetic_build, manifest["files"], manifest.get("integrity"), full=True).problems == ["llm/big.bin has a different checksum"]


def test_verify_cli_exit_codes(synthetic_build):
    runner = CliRunner()
    res = runner.invoke(cli, ["verify", str(synthetic_build)])
    assert res.exit_code == 0 and "intact" in res.output, res.output
    res = runner.invoke(cli, ["verify", str(synthetic_build), "--json"])
    report = json.loads(res.stdout)
    assert res.exit_code == 0 and report["intact"] and report["problems"] == [] and report["bytes"] == (4 << 20) + 4
    (synthetic_build / "stray.txt").write_text("?")
    res = runner.invoke(cli, ["verify", str(synthetic_build), "--json"])
    assert res.exit_code == 2 and json.loads(res.stdout)["problems"] == ["stray.txt is not part of the build"]
    one_line_error(runner.invoke(cli, ["verify", str(synthetic_build)]), "stray.txt is not part of the build")
    one_line_error(runner.invoke(cli, ["verify", str(synthetic_build.parent)]), "not a build folder")


def test_real_build_is_verified_and_health_info_has_no_path(tiny_build, tiny_pipeline):
    m = manifest_of(tiny_build)
    assert m["integrity"]["spot_blocks"] == 16 and all(len(e["spot_sha256"]) == 64 for e in m["files"].values())
    assert CliRunner().invoke(cli, ["verify", str(tiny_build)]).exit_code == 0
    assert tiny_pipeline.info["build"] == tiny_build.name and tiny_pipeline.info["max_images"] == 4


# -- output folders: --force, umask, unwritable destinations --------------------------------


def test_force_replaces_only_our_folders(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    afile = tmp_path / "afile"
    afile.write_text("data")
    link = tmp_path / "link"
    link.symlink_to(theirs)
    for dest, fragment in ((theirs, "not a build or export"), (afile, "is a file"), (link, "is a symbolic link")):
        with pytest.raises(ExportError, match=fragment):
            with atomic_output_dir(dest, force=True):
                pass
    assert (theirs / "thesis.tex").read_text() == "years of work" and afile.read_text() == "data"
    for marker, body in (("vision.json", {"part": "vision", "graph": "vision.onnx", "opset": 18, "inputs": []}), (None, None)):
        ours = tmp_path / f"ours-{marker}"
        ours.mkdir()
        if marker:
            (ours / marker).write_text(json.dumps(body))
        with atomic_output_dir(ours, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
        assert sorted(p.name for p in ours.iterdir()) == ["new.txt"]


def test_cli_force_refuses_foreign_folders(tiny_checkpoint, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep")
    runner = CliRunner()
    for args in (["build"], ["export", "vision"], ["export", "llm"]):
        one_line_error(runner.invoke(cli, [*args, str(tiny_checkpoint), "-o", str(theirs), "--force"]), "not a build or export")
    assert [p.name for p in tmp_path.iterdir()] == ["theirs"] and (theirs / "notes.txt").read_text() == "keep"


@pytest.fixture()
def restore_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_output_folders_respect_the_umask(restore_umask, tiny_checkpoint, tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    os.umask(0o027)
    build(tiny_checkpoint, tmp_path / "b", BuildOptions(smoke_test=False), progress=lambda m: None)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "b", *(tmp_path / "b").rglob("*")] if p.is_dir()}
    assert modes == {0o750}
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "b").rglob("*") if p.is_file()} == {0o640}


@pytest.mark.parametrize("parent", ["/proc/x", "FILE", "FILE/deeper"])
def test_unwritable_output_is_one_line(tiny_checkpoint, tmp_path, parent):
    (tmp_path / "FILE").write_text("a regular file")
    out = parent.replace("FILE", str(tmp_path / "FILE")) + "/out"
    runner = CliRunner()
    for args in (
        ["build", str(tiny_checkpoint)],
        ["export", "vision", str(tiny_checkpoint)],
        ["export", "llm", str(tiny_checkpoint)],
        ["calibrate", str(tiny_checkpoint), "--images", str(tmp_path)],
        ["validate", str(tmp_path), "--reference", str(tiny_checkpoint)],
    ):
        one_line_error(runner.invoke(cli, [*args, "-o", out]), "cannot create folder")


# -- prompts and serving ------------------------------------------------------------------


def test_image_placeholder_mismatch_is_one_line(tiny_build, tiny_checkpoint, tmp_path):
    from convllava_export.synthetic import colour_samples

    img = tmp_path / "one.png"
    colour_samples(1, seed=3)[0].image.save(img)
    runner = CliRunner()
    for cmd, src in (("run", tiny_build), ("generate", tiny_checkpoint)):
        res = runner.invoke(cli, [cmd, str(src), "--prompt", "<image> <image> what", "--image", str(img), "--max-new-tokens", "4"])
        assert res.exit_code == 2 and "2 <image> placeholder(s) but 1 image(s)" in res.output and "Traceback" not in res.output, res.output


def test_bind_listen_socket():
    with bind_listen_socket("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]
        with pytest.raises(ConvLlavaError, match=f"cannot listen on 127.0.0.1:{port}: address already in use — pick another --port"):
            bind_listen_socket("127.0.0.1", port)
    with pytest.raises(ConvLlavaError, match="cannot resolve host 'no-such-host.invalid'"):
        bind_listen_socket("no-such-host.invalid", 8000)
    if socket.has_ipv6:
        try:
            sock = bind_listen_socket("::1", 0)
        except ConvLlavaError as exc:
            assert "not an address of this machine" in str(exc)  # IPv6 disabled here
        else:
            assert sock.family == socket.AF_INET6
            sock.close()
    if os.geteuid() != 0:
        with pytest.raises(ConvLlavaError, match="ports below 1024 need root"):
            bind_listen_socket("127.0.0.1", 80)


def test_serve_on_a_busy_port_fails_before_loading(tiny_build, monkeypatch):
    import convllava_export.runtime.launch as launch_mod

    monkeypatch.setattr(launch_mod, "open_build", lambda *a, **k: pytest.fail("the build was loaded before the port was checked"))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for engine in ("local", "ray"):
            res = CliRunner().invoke(cli, ["serve", str(tiny_build), "--port", str(port), "--engine", engine])
            one_line_error(res, f"cannot listen on 127.0.0.1:{port}: address already in use")


def test_serve_passes_the_bound_socket_and_limits(tiny_build, monkeypatch):
    import convllava_export.runtime.server as server_mod

    seen = {}

    def fake_serve(pipe, host, port, model_name, limits, sock=None, loop_settings=None, drain_s=None):
        seen.update(info=pipe.info, limits=limits, listening=sock.getsockname()[1], port=port, engine=loop_settings, drain_s=drain_s)

    monkeypatch.setattr(server_mod, "serve", fake_serve)
    res = CliRunner().invoke(cli, ["serve", str(tiny_build), "--port", "0"])
    assert res.exit_code == 0, res.output
    assert seen["limits"].max_images is None and seen["listening"] > 0 and str(tiny_build) not in json.dumps(seen["info"])
    res = CliRunner().invoke(cli, ["serve", str(tiny_build), "--port", "0", "--max-images", "3"])
    assert res.exit_code == 0 and seen["limits"].max_images == 3, res.output
    assert seen["engine"].max_running == 32 and seen["engine"].max_waiting == seen["limits"].max_queue
    assert seen["engine"].kv_cache_mb is None and seen["drain_s"] == 30.0  # budget from memory at start; bounded drain

