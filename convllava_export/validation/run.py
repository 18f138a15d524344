"""`validate`: every build against the torch fp32 reference on the same inputs, in one run."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConvLlavaError
from ..checkpoint import dtype_name
from ..model.reference import ReferenceModel, TorchDecoder
from ..progress import release_memory
from ..preprocess import PreprocessConfig, load_image, preprocess
from ..prompt import build_prompt, splice_embeddings, tokenize_with_images
from ..runtime.generation import Timings
from ..runtime.scheduler import generate
from ..runtime.build_loader import load_pipeline
from ..runtime.pipeline import Pipeline
from ..runtime.sampling import SamplingParams
from .data import Item
from .metrics import anls, cosine_per_image, exact_match, first_divergence, logits_agreement, summarize, teacher_forced_logits, token_agreement

Progress = Callable[[str], None]


@dataclass
class Gates:
    min_cosine: float | None = None
    min_agreement: float | None = None
    max_kl: float | None = None
    min_accuracy: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return dict(self.__dict__)


class _ReferenceCache:
    """Reference outputs per (preprocess config, item), computed once for all builds."""

    def __init__(self, model: ReferenceModel, max_new_tokens: int) -> None:
        self.model = model
        self.decoder = TorchDecoder(model)
        self.max_new_tokens = max_new_tokens
        self.cache: dict[tuple, dict[str, Any]] = {}

    def release(self) -> None:
        """Drop the model: only the cached outputs are used from here on."""
        self.model = self.decoder = None

    def get(self, item: Item, image, cfg: PreprocessConfig) -> dict[str, Any]:
        key = (item.id, repr(cfg))
        if key not in self.cache:
            if self.model is None:
                raise ConvLlavaError(f"no reference output for item {item.id} at {cfg}: it was not computed before the reference was released")
            t = Timings()
            t0 = time.perf_counter()
            px = preprocess(image, cfg)[None]
            t1 = time.perf_counter()
            emb = self.model.encode_images(px)
            t.preprocess_s, t.vision_s = t1 - t0, time.perf_counter() - t1
            ids = tokenize_with_images(self.model.tokenizer, build_prompt(item.question))
            seq = splice_embeddings(ids, [emb[0]], self.model.embed_tokens)
            res = generate(self.decoder, self.model.tokenizer, [seq], SamplingParams(max_new_tokens=self.max_new_tokens), [t])[0]
            logits = teacher_forced_logits(self.decoder, seq, res.token_ids)
            self.cache[key] = {"pixels": px, "embeds": emb, "ids": ids, "answer": res, "logits": logits}
        return self.cache[key]


def _accuracy(item: Item, text: str) -> float | None:
    if not item.answers:
        return None
    return anls(text, item.answers) if item.metric == "anls" else exact_match(text, item.answers)


def _latency(timings: Sequence[Timings]) -> dict[str, float]:
    keys = ("preprocess_s", "vision_s", "prefill_s", "ttft_s", "decode_tokens_per_s")
    return {k: float(np.mean([t.to_dict()[k] for t in timings])) for k in keys}


def evaluate_build(name: str, pipe: Pipeline, items: Sequence[Item], images: dict[str, Any], ref: _ReferenceCache, progress: Progress) -> dict[str, Any]:
    rows, timings = [], []
    for n, item in enumerate(items, 1):
        r = ref.get(item, images[item.id], pipe.preprocess_cfg)
        t = Timings()
        t0 = time.perf_counter()
        px = preprocess(images[item.id], pipe.preprocess_cfg)[None]
        t1 = time.perf_counter()
        emb = pipe.vision.encode(px)
        t.preprocess_s, t.vision_s = t1 - t0, time.perf_counter() - t1
        seq = pipe.splice(r["ids"], [emb[0]])  # spliced embeddings, or a TablePrompt for a Generator backend
        got = generate(pipe.decoder, pipe.tokenizer, [seq], SamplingParams(max_new_tokens=ref.max_new_tokens), [t])[0]
        timings.append(t)
        agree = logits_agreement(r["logits"], teacher_forced_logits(pipe.decoder, seq, r["answer"].token_ids))
        want = r["answer"]
        rows.append(
            {
                "id": item.id,
                "kind": item.kind,
                "question": item.question,
                "answers": item.answers,
                "shape": list(px.shape[2:]),
                "cosine": cosine_per_image(r["embeds"], emb),
                "kl": agree["kl_mean"],
                "top1_agreement": agree["top1_agreement"],
                "reference_answer": want.text,
                "answer": got.text,
                "exact_match_reference": got.token_ids == want.token_ids,
                "token_agreement": token_agreement(want.token_ids, got.token_ids),
                "first_divergence": first_divergence(want.token_ids, got.token_ids),
                "accuracy": _accuracy(item, got.text),
                "reference_accuracy": _accuracy(item, want.text),
            }
        )
        if n % 8 == 0 or n == len(items):
            progress(f"{name}: {n}/{len(items)} items")
    acc = [r["accuracy"] for r in rows if r["accuracy"] is not None]
    by_kind: dict[str, list[float]] = {}
    for r in rows:
        if r["accuracy"] is not None:
            by_kind.setdefault(r["kind"], []).append(r["accuracy"])
    return {
        "name": name,
        "simulated": bool(pipe.info.get("simulated", False)),
        "info": pipe.info,
        "metrics": {
            "vision_cosine": summarize([r["cosine"] for r in rows]),
            "kl_mean": float(np.mean([r["kl"] for r in rows])),
            "top1_agreement": float(np.mean([r["top1_agreement"] for r in rows])),
            "greedy_exact_match": float(np.mean([r["exact_match_reference"] for r in rows])),
            "token_agreement": float(np.mean([r["token_agreement"] for r in rows])),
            "task_accuracy": float(np.mean(acc)) if acc else None,
            "task_accuracy_by_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
            "latency": _latency(timings),
        },
        "items": rows,
    }


def check_gates(builds: Sequence[dict[str, Any]], gates: Gates) -> list[dict[str, Any]]:
    """Every gate a build misses: which build, which metric, its value, the threshold, worst item."""
    failures = []
    for b in builds:
        m, items = b["metrics"], b["items"]
        checks = [
            ("vision_cosine_mean", gates.min_cosine, m["vision_cosine"]["mean"], ">=", min(items, key=lambda r: r["cosine"])),
            ("top1_agreement", gates.min_agreement, m["top1_agreement"], ">=", min(items, key=lambda r: r["top1_agreement"])),
            ("kl_mean", gates.max_kl, m["kl_mean"], "<=", max(items, key=lambda r: r["kl"])),
            ("task_accuracy", gates.min_accuracy, m["task_accuracy"], ">=", None),
        ]
        for metric, threshold, value, op, worst in checks:
            if threshold is None or value is None:
                continue
            ok = value >= threshold if op == ">=" else value <= threshold
            if not ok:
                failures.append({"build": b["name"], "metric": metric, "value": value, "threshold": threshold, "op": op, "worst_item": worst["id"] if worst else None})
    return failures


def validate(
    builds: Sequence[str | Path],
    reference: str | Path,
    items: Sequence[Item],
    gates: Gates,
    max_new_tokens: int = 32,
    vision_tower: str | None = None,
    progress: Progress = print,
    simulate: Sequence[str] = (),
    calib: str | Path | None = "builtin",
    calib_limit: int = 32,
    prompts: str | Path | None = None,
    awq_block_size: int | None = None,
    reference_dtype: str = "auto",
    device: str = "cpu",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (report, images by item id).

    `simulate`: formats (precisions.SIMULATED) evaluated as simulated builds
    named `simulated:FORMAT` after the real ones: the reference with ModelOpt fake quantization,
    on `device` (the reference's: nvfp4 needs "cuda"), calibrated on `calib` ('builtin', a folder of images or a `calibrate` set; at most
    `calib_limit` images, one multimodal prompt each, questions from `prompts`). `builds` may be
    empty when `simulate` is not. `awq_block_size` (int4-awq): None picks the largest of
    128/64/32/16/8 that divides the LLM's hidden and intermediate sizes.
    """
    formats = _simulated_formats(simulate, device)
    if not builds and not formats:
        raise ConvLlavaError("nothing to validate: give build folders and/or formats to simulate")
    progress(f"loading the reference {reference}")
    model = ReferenceModel.load(reference, vision_tower=vision_tower, dtype=reference_dtype, device=device, progress=progress)
    ref_dtype = dtype_name(model.dtype)
    ref = _ReferenceCache(model, max_new_tokens)
    images = {it.id: load_image(it.image) for it in items}
    if not formats:
        # every reference answer first, then the reference goes: a 7B reference and a build
        # are never in memory together
        _reference_answers(ref, builds, items, images, progress)
        ref.release()
        del model
        release_memory()
    results = []
    for b in builds:
        progress(f"validating {b}")
        pipe = load_pipeline(b)
        results.append(evaluate_build(Path(b).name, pipe, items, images, ref, progress))
    simulation: dict[str, Any] | None = None
    if formats:
        simulation = _evaluate_simulated(model, formats, items, images, ref, results, calib, calib_limit, prompts, awq_block_size, device, progress)
    report = _report(reference, ref_dtype, device, ref, items, max_new_tokens, results, gates)
    if simulation is not None:
        report["simulation"] = simulation
    return report, images


def _report(
    reference: str | Path, ref_dtype: str, device: str, ref: _ReferenceCache, items: Sequence[Item], max_new_tokens: int, results: list[dict[str, Any]], gates: Gates
) -> dict[str, Any]:
    """The report: the reference's accuracy and latency, the data, each build's results, and the gates they miss."""
    ref_rows = [c for c in ref.cache.values()]
    ref_acc = [r["reference_accuracy"] for r in results[0]["items"] if r["reference_accuracy"] is not None] if results else []
    failures = check_gates(results, gates)
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reference": {"checkpoint": str(reference), "dtype": ref_dtype, "backend": "torch", "device": device, "task_accuracy": float(np.mean(ref_acc)) if ref_acc else None,
                      "latency": _latency([r["answer"].timings for r in ref_rows])},
        "data": {"items": len(items), "kinds": sorted({it.kind for it in items}), "max_new_tokens": max_new_tokens},
        "builds": results,
        "gates": gates.to_dict(),
        "failures": failures,
        "passed": not failures,
    }


def _simulated_formats(simulate: Sequence[str], device: str) -> list[str]:
    """The formats to simulate, each checked to run on this device before minutes of loading and calibration."""
    if not simulate:
        return []
    from .simulate import check_cpu_support, parse_formats

    formats = parse_formats(simulate)
    for f in formats:  # fail before minutes of loading and calibration
        if device == "cpu":
            check_cpu_support(f)
    return formats


def _reference_answers(ref: _ReferenceCache, builds: Sequence[str | Path], items: Sequence[Item], images: dict[str, Any], progress: Progress) -> None:
    """The reference's outputs for every item, once per distinct preprocessing among the builds."""
    from ..manifest import read_manifest
    from ..runtime.build_loader import preprocess_config

    for cfg in {repr(c): c for c in (preprocess_config(read_manifest(Path(b))) for b in builds)}.values():
        for n, item in enumerate(items, 1):
            ref.get(item, images[item.id], cfg)
            if n % 8 == 0 or n == len(items):
                progress(f"reference: {n}/{len(items)} items")


def _evaluate_simulated(
    model: ReferenceModel, formats: Sequence[str], items: Sequence[Item], images: dict[str, Any], ref: _ReferenceCache, results: list[dict[str, Any]],
    calib: str | Path | None, calib_limit: int, prompts: str | Path | None, awq_block_size: int | None, device: str, progress: Progress,
) -> dict[str, Any]:
    """Each format as a simulated build of the reference (simulate.py), evaluated like a real one
    and appended to `results`; returns the report's "simulation" section."""
    from .report import simulated_note
    from .simulate import calibration_data, simulate_build

    cfg = PreprocessConfig.from_preprocessor_config(model.info.preprocessor_config)
    calibration = calibration_data(model, cfg, calib, calib_limit, prompts, progress)
    simulation = {"note": simulated_note(device), "formats": list(formats), "calibration": calibration.info}
    for f in formats:
        sim = simulate_build(model, f, calibration, awq_block_size, progress)
        progress(f"validating {sim.name}")
        results.append(evaluate_build(sim.name, sim.pipeline(cfg), items, images, ref, progress))
        del sim
    return simulation


def validate_to_folder(
    builds: Sequence[str | Path],
    reference: str | Path,
    data: str | Path,
    output: str | Path,
    gates: Gates,
    question: str | None = None,
    limit: int | None = None,
    progress: Progress = print,
    device: str = "cpu",
    simulate: Sequence[str] = (),
    **options: Any,
) -> tuple[dict[str, Any], Path, Path]:
    """`convllava-export validate`: (report, report.json, report.html) written under `output`.

    Refuses an unwritable `output`, a CUDA device torch cannot see, and nothing to validate
    before any model loads; `data` as validation/data.load_items reads it; `options`: `validate`'s.
    """
    from ..fsutil import writable_dir
    from .data import load_items
    from .report import write_reports

    writable_dir(output)  # before minutes of validation
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConvLlavaError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu")
    items = load_items(data, question, limit)
    if not builds and not simulate:
        raise ConvLlavaError("nothing to validate: give build folders and/or --simulate FORMAT")
    report, images = validate([str(b) for b in builds], reference, items, gates, progress=progress, simulate=simulate, device=device, **options)
    json_path, html_path = write_reports(report, images, output)
    return report, json_path, html_path
