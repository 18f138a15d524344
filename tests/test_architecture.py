"""The package's seams (issue 23): no import cycles, and one table of backends and precisions.

The cycle check reads every `import` in the package, function-level ones included (a cycle
hidden inside a function is still a cycle), and fails naming the modules of each cycle.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from convllava_export import precisions
from convllava_export.errors import BuildError

PACKAGE = Path(__file__).resolve().parents[1] / "convllava_export"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its body)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [f"{target}.{a.name}" for a in node.names]
                found = [n for n in names if n in mods] or ([target] if target in mods else [])
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names if a.name in mods]
            else:
                continue
            for t in found:  # importing a.b.c runs a/__init__ and a/b/__init__ too (its own packages already ran)
                parts = t.split(".")
                ancestors = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
                graph[mod].update(p for p in (".".join(parts[:i]) for i in range(2, len(parts) + 1)) if p in mods and p != mod and p not in ancestors)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    """The checker itself fails on a cycle, direct or through a third module."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "convllava_export.precisions" in graph["convllava_export.gates"]  # function and top-level imports are read


def test_target_names_agree():
    from convllava_export import targets

    assert precisions.TRT_TARGETS == targets.TRT_TARGETS and precisions.GPU_TARGETS == targets.GPU_TARGETS
    assert {t for b in precisions.BACKENDS for p in b.precisions for t in p.targets} <= set(targets.TARGET_NAMES)


def test_precisions_is_a_leaf():
    assert import_graph()["convllava_export.precisions"] <= {"convllava_export.errors"}


@pytest.fixture
def int3(monkeypatch):
    """A fake precision row added to the ONNX Runtime LLM backend, and nothing else edited."""
    ort = precisions.part_backend("llm", "onnxruntime")
    row = precisions.Precision("int3", "fake 3-bit weights", 0.375, 0.42, ("cpu",), block_scaled=True, graphs=("dynamo",))
    patched = dataclasses.replace(ort, precisions=ort.precisions + (row,))
    monkeypatch.setattr(precisions, "BACKENDS", tuple(patched if b is ort else b for b in precisions.BACKENDS))
    return row


def test_a_new_row_reaches_help_sizing_gates_and_refusals(int3):
    from convllava_export.cli import cli
    from convllava_export.gates import thresholds
    from convllava_export.sizing import ModelSize, estimate_build, quantized_llm_bytes
    import torch

    help_text = CliRunner().invoke(cli, ["build", "--help"]).output
    assert "int3" in help_text
    assert "int3" in CliRunner().invoke(cli, ["precisions", "--json"]).output
    # sizing reads the row's bytes per weight
    size = ModelSize(llm_params=7_000_000_000, vision_params=700_000_000, vocab=32000, hidden=4096, weights_dtype=torch.bfloat16)
    q4 = precisions.precision("llm", "onnxruntime", "int4")
    assert quantized_llm_bytes(size, int3) < quantized_llm_bytes(size, q4)
    v = precisions.precision("vision", "onnxruntime", "fp32")
    assert estimate_build(size, v, int3, "dynamo", 128, "auto", False, int(64e9)).disk > 0
    # the gate is the row's
    assert thresholds(("onnxruntime", "fp32"), ("onnxruntime", "int3"))["token_agreement"] == 0.42
    # refusals list it, and say which graph makes it
    with pytest.raises(BuildError, match=r"use fp32, fp16, int8, int4, int3"):
        precisions.precision("llm", "onnxruntime", "int2")
    with pytest.raises(BuildError, match=r"'int3' is not available for onnxruntime with graph 'gqa'.*made by graph dynamo"):
        precisions.precision("llm", "onnxruntime", "int3", graph="gqa")


def test_a_new_vision_row_reaches_the_targets(monkeypatch):
    from convllava_export.targets import check_target, get_target

    trt = precisions.part_backend("vision", "tensorrt")
    row = precisions.Precision("int4", "fake", 0.5, 0.9, ("orin",))
    monkeypatch.setattr(precisions, "BACKENDS", tuple(dataclasses.replace(b, precisions=b.precisions + (row,)) if b is trt else b for b in precisions.BACKENDS))
    assert "int4" in get_target("orin").vision_precisions and "int4" not in get_target("thor").vision_precisions
    check_target("orin", "int4")
    with pytest.raises(BuildError, match="not available on target 'thor'"):
        check_target("thor", "int4")


def test_build_refuses_a_combination_in_one_place(tiny_checkpoint, tmp_path):
    from convllava_export.cli import cli

    res = CliRunner().invoke(cli, ["build", str(tiny_checkpoint), "-o", str(tmp_path / "b"), "--llm-precision", "int8-sq"])
    assert res.exit_code == 2 and "'int8-sq' is not available for onnxruntime (use fp32, fp16, int8, int4); int8-sq is made by the tensorrt-llm backend" in res.output
    res = CliRunner().invoke(cli, ["build", str(tiny_checkpoint), "-o", str(tmp_path / "b"), "--llm-precision", "fp16", "--llm-graph", "gqa"])
    assert res.exit_code == 2 and "with graph 'gqa' (use fp32, int8, int4); fp16 is made by graph dynamo" in res.output
    assert not (tmp_path / "b").exists()


def test_typed_manifest_reads_schema_1_and_refuses_others(tiny_build, tmp_path):
    """A schema-1 build folder (no llm.graph / llm.format / max_context) still loads and runs."""
    import json
    import shutil

    from convllava_export.manifest import SCHEMA_VERSION, Manifest, read_manifest
    from convllava_export.runtime.build_loader import load_pipeline

    m = read_manifest(tiny_build)
    assert isinstance(m, Manifest) and m.schema_version == SCHEMA_VERSION == 2 and m.llm.format == "onnx" and m.llm.graph in ("dynamo", "gqa")
    old = tmp_path / "schema1"
    shutil.copytree(tiny_build, old)
    data = json.loads((old / "manifest.json").read_text())
    data["schema_version"] = 1
    for key in ("graph", "format", "graph_choice"):
        data["llm"].pop(key, None)
    data["token_budget"].pop("max_context")
    (old / "manifest.json").write_text(json.dumps(data))
    m1 = read_manifest(old)
    assert m1.llm.graph == "dynamo" and m1.llm.format == "onnx" and m1.max_context == 2048
    pipe = load_pipeline(old)
    assert pipe.max_context == 2048 and pipe.generate((), "Hi", max_new_tokens=2).token_ids
    data["schema_version"] = 3
    (old / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BuildError, match="schema version 3 is not one this version reads"):
        read_manifest(old)
    del data["vision"]
    data["schema_version"] = 2
    (old / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BuildError, match="malformed"):
        read_manifest(old)
