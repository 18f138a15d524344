"""`convllava-export`: export, build, run and check ConvLLaVA engines."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import set_kernel_env
from .errors import ConvLlavaError
from . import precisions
from .precisions import CALIB_METHODS, DEVICES, KV_CACHES, LLM_GRAPHS, LLM_RUNTIMES, PREFILL_KERNELS, REFERENCE_DTYPES, TRTLLM_FORMATS, VISION_RUNTIMES
from .preprocess import MODES
from .targets import TARGET_NAMES

LLM_KERNEL_HELP = "how an int4/int8 gqa build's LLM runs on the CPU. q4: every step, prompt and batched decode, on our int4 x int8 VNNI kernel (no ONNX Runtime session); bf16/int8: prompt chunks on torch GEMMs over unpacked tiles, decode on ONNX Runtime; auto: bf16 where the CPU has AMX-BF16, q4 where it has AVX-512 VNNI (int4 builds), else onnxruntime. --prefill: its old name"

set_kernel_env()  # before anything loads torch

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


class TableChoice(click.Choice):
    """A click.Choice read from the precision table (precisions.py) each time click uses it, so
    the choices, the help and the refusals follow the table's rows."""

    def __init__(self, read) -> None:
        self._read = read
        super().__init__((), case_sensitive=True)

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._read())

    @choices.setter
    def choices(self, _value) -> None:
        pass


VISION_CHOICE = TableChoice(lambda: precisions.names("vision"))
LLM_CHOICE = TableChoice(lambda: precisions.names("llm"))
LLM_BACKEND_CHOICE = TableChoice(lambda: precisions.backend_names("llm"))


class Cli(click.Group):
    """Turns our errors into one clear line and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConvLlavaError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)  # escaped: "[gpu]" is not markup
            ctx.exit(getattr(exc, "exit_code", 2))
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            ctx.exit(130)


@click.group(cls=Cli)
@click.version_option(package_name="convllava-export")
def cli() -> None:
    """Export ConvLLaVA checkpoints to ONNX Runtime, TensorRT and TensorRT-LLM."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")


def say(msg: str) -> None:
    console.print(f"[dim]{msg}[/]", highlight=False)


def sampling_options(f):
    f = click.option("--max-new-tokens", type=click.IntRange(1), default=256, show_default=True)(f)
    f = click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy")(f)
    f = click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)(f)
    f = click.option("--seed", type=int, default=None)(f)
    f = click.option("--stop", multiple=True, help="stop string (repeatable)")(f)
    return f


def preprocess_options(f):
    f = click.option("--mode", type=click.Choice(list(MODES)), default=None, help="pad (official) or native aspect ratio")(f)
    f = click.option("--resolution", type=click.IntRange(64), default=None, help="short side / square side (default: the tower's)")(f)
    f = click.option("--max-tokens", type=click.IntRange(1), default=None, help="native mode: bound on visual tokens per image")(f)
    f = click.option("--size", default=None, help="explicit HxW (multiples of 64), overrides --mode")(f)
    return f


def make_preprocess_cfg(base: dict, mode, resolution, max_tokens, size):
    from .preprocess import PreprocessConfig, parse_size

    return PreprocessConfig.from_preprocessor_config(
        base, mode=mode, resolution=resolution, max_tokens=max_tokens, size=parse_size(size) if size else None
    )


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None, help="tower folder (overrides mm_vision_tower)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def inspect(path: Path, vision_tower: Path | None, as_json: bool) -> None:
    """Describe a checkpoint folder or a build folder."""
    from .inspect import inspect_path

    report = inspect_path(path, vision_tower)
    if as_json:
        out.print_json(json.dumps(report))
        return
    table = Table(show_header=False, box=None)
    for key, value in report.items():
        table.add_row(f"[bold]{key}[/]", value if isinstance(value, str) else json.dumps(value))
    out.print(table)


@cli.command("precisions")
@click.option("--json", "as_json", is_flag=True)
def precisions_cmd(as_json: bool) -> None:
    """What each backend builds: every precision row, its gate, GPU and targets (precisions.py)."""
    rows = precisions.table_rows()
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("part", "backend", "precision", "calibrated", "bytes/weight", "gate", "min GPU", "graphs / formats", "targets")
    for r in rows:
        table.add_row(r["part"], r["backend"], r["precision"], "yes" if r["calibrated"] else "", f"{r['bytes_per_weight']:g}", f"{r['gate']:g}",
                      r["min_gpu"] or "", ", ".join(r["graphs"] or r["formats"]), ", ".join(r["targets"]))
    out.print(table)


@cli.command("verify")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="machine-readable result on stdout")
def verify_cmd(build_dir: Path, as_json: bool) -> None:
    """Hash every file of a build in full against its manifest (loading only samples large files)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    from .manifest import read_file_list
    from .runtime.build_loader import listed_bytes, verify_build

    files, integrity = read_file_list(build_dir)
    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("sha256", total=listed_bytes(files))
        check = verify_build(build_dir, files, integrity, progress=lambda n: bar.advance(task, n))
    if as_json:
        out.print_json(json.dumps(check.report()))
    check.raise_if_damaged()
    say(check.summary())


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="image file (repeatable)")
@click.option("--prompt", required=True, help="question; images are placed before it unless it contains <image>")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None)
@click.option("--dtype", type=click.Choice(list(REFERENCE_DTYPES)), default="auto", show_default=True, help="auto: fp32 when it fits in memory, else the checkpoint's dtype")
@preprocess_options
@sampling_options
def generate(checkpoint, images, prompt, vision_tower, dtype, mode, resolution, max_tokens, size, **sampling) -> None:
    """Answer a prompt with the PyTorch reference model, streaming tokens to stdout."""
    from .model.reference import ReferenceModel
    from .runtime.chat import stream_answer
    from .runtime.pipeline import Pipeline, Request

    ref = ReferenceModel.load(checkpoint, vision_tower=vision_tower, dtype=dtype, progress=say)
    say(f"vision tower weights from {ref.info.tower_weights_source} ({ref.info.tower_path})")
    cfg = make_preprocess_cfg(ref.info.preprocessor_config, mode, resolution, max_tokens, size)
    stream_answer(Pipeline.from_reference(ref, cfg), Request(prompt, [str(i) for i in images]), _sampling_params(sampling), say)


def _sampling_params(opts: dict):
    """sampling_options' values → SamplingParams."""
    from .runtime.sampling import SamplingParams

    return SamplingParams(max_new_tokens=opts["max_new_tokens"], temperature=opts["temperature"], top_p=opts["top_p"], seed=opts["seed"], stop=tuple(opts["stop"]))


@cli.command("tiny")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", default=600, show_default=True, help="training steps (0: random weights)")
@click.option("--shape", type=click.Choice(["tiny", "mid"]), default="tiny", show_default=True, help="mid: 512 px tower, 4-layer 256-wide LLM (minutes of CPU)")
def tiny(dest: Path, seed: int, steps: int, shape: str) -> None:
    """Write a small trained checkpoint (released layout) under DEST."""
    from .tiny import ModelShape, write_tiny_checkpoint

    path = write_tiny_checkpoint(dest, seed=seed, train_steps=steps, progress=say, shape=ModelShape.preset(shape))
    out.print(str(path))


@cli.group()
def export() -> None:
    """Export one model part (vision or llm) to a folder."""


@export.command("vision")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="destination folder (must not exist)")
@click.option("--precision", type=VISION_CHOICE, default="fp32", show_default=True)
@click.option("--calib-images", "--calib", "calib_images", default=None, help="calibration images folder, a `calibrate` set, or 'builtin'")
@click.option("--calib-method", type=click.Choice(list(CALIB_METHODS)), default="minmax", show_default=True)
@click.option("--calib-limit", type=click.IntRange(1), default=64, show_default=True)
@click.option("--min-size", default="64x64", show_default=True, help="TensorRT profile: smallest HxW")
@click.option("--opt-size", default=None, help="TensorRT profile: HxW to tune for (default: native resolution)")
@click.option("--max-size", default="2048x2048", show_default=True, help="TensorRT profile: largest HxW")
@click.option("--max-batch", type=click.IntRange(1), default=4, show_default=True)
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None)
@click.option("--threads", type=click.IntRange(1), default=None)
@click.option("--force", is_flag=True, help="replace an existing output folder")
@preprocess_options
def export_vision_cmd(checkpoint, output, precision, calib_images, calib_method, calib_limit, min_size, opt_size, max_size, max_batch, vision_tower, threads, force, mode, resolution, max_tokens, size) -> None:
    """ConvNeXt†+projector → dynamic-shape ONNX (fp32/fp16/int8/fp8) with an accuracy report."""
    from .export.vision import export_vision_from_checkpoint
    from .preprocess import parse_size

    result = export_vision_from_checkpoint(
        checkpoint, output, precision, calib_images, calib_method, calib_limit, (min_size, opt_size, max_size, max_batch),
        vision_tower, threads, force, mode or "native", resolution, max_tokens, parse_size(size) if size else None, progress=say,
    )
    _print_vision_report(result.report)
    out.print(str(output))


@export.command("llm")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--backend", type=LLM_BACKEND_CHOICE, default="onnxruntime", show_default=True)
@click.option("--format", "fmt", type=click.Choice(list(TRTLLM_FORMATS)), default="engine", show_default=True,
              help="tensorrt-llm: engine = checkpoint for trtllm-build (TensorRT-LLM 0.12-1.2.x); hf = ModelOpt unified HF checkpoint for the PyTorch backend (1.x)")
@click.option("--precision", type=LLM_CHOICE, default="fp32", show_default=True, help="which backend, graph and format make each: `convllava-export precisions`")
@click.option("--int4-block-size", type=click.IntRange(16), default=128, show_default=True, help="onnxruntime int4/int8 (MatMulNBits): weights per scale")
@click.option("--graph", "llm_graph", type=click.Choice(list(LLM_GRAPHS)), default="dynamo", show_default=True, help="onnxruntime: our exact export, or ORT's fused-attention layout (fp32/int8/int4; needs onnxruntime-genai)")
@click.option("--awq-block-size", type=click.IntRange(8), default=128, show_default=True, help="tensorrt-llm int4-awq / w4a8-awq group size")
@click.option("--calib-images", "--calib", "calib_images", default=None, help="tensorrt-llm: images for multimodal calibration prompts (folder, `calibrate` set, or 'builtin')")
@click.option("--prompts", type=click.Path(path_type=Path), default=None, help="JSONL of calibration questions")
@click.option("--calib-limit", type=click.IntRange(1), default=32, show_default=True)
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None)
@click.option("--force", is_flag=True)
def export_llm_cmd(checkpoint, output, backend, fmt, precision, int4_block_size, llm_graph, awq_block_size, calib_images, prompts, calib_limit, vision_tower, force) -> None:
    """Vicuna → ONNX Runtime decoder (KV cache, inputs_embeds) or a TensorRT-LLM checkpoint."""
    from .export.llm_folder import export_llm_folder

    export_llm_folder(checkpoint, output, backend, fmt, precision, int4_block_size, llm_graph, awq_block_size, calib_images, prompts, calib_limit, vision_tower, force, say)
    out.print(str(output))


@export.command("vllm")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--mode", type=click.Choice(["pad", "native"]), default=None, help="preprocessing served (default: the checkpoint's, pad); a request may pick the other with mm_processor_kwargs")
@click.option("--max-image-tokens", type=click.IntRange(1), default=None, help="visual tokens per image (pad: the resolution's; native: 2048): native images are scaled to fit, embeddings past it refused")
@click.option("--max-images", type=click.IntRange(1), default=8, show_default=True, help="images per prompt")
@click.option("--resolution", type=click.IntRange(64), default=None, help="short side images are resized to (default: the tower's, e.g. 1536); 768 / 1024 are the released variants")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None)
@click.option("--force", is_flag=True)
def export_vllm_cmd(checkpoint, output, mode, max_image_tokens, max_images, resolution, vision_tower, force) -> None:
    """The whole model as one folder for vLLM (plugin: pip install 'convllava-export[vllm]') and TensorRT-LLM's PyTorch backend."""
    from .export.hf_folder import export_hf_folder

    export_hf_folder(checkpoint, output, vision_tower, mode, max_image_tokens, max_images, force, say, resolution)
    out.print(str(output))


def _print_vision_report(report: dict) -> None:
    held = report.get("heldout")
    if held:
        say(
            f"{report['precision']}: image_embeds cosine vs torch fp32 on {held['images']} held-out images: "
            f"mean {held['cosine_mean']:.6f}, min {held['cosine_min']:.6f}"
        )
    over = report.get("fp16_overflow")
    if over and over["count"]:
        console.print(f"[yellow]fp16: {over['count']} activations exceed fp16's range (kept safe only where noted):[/] {', '.join(over['overflows_fp16'][:5])}")
    if report.get("warning"):
        console.print(f"[bold red]warning:[/] {report['warning']}")


def build_options(f):
    opts = [
        click.option("--target", type=click.Choice(list(TARGET_NAMES)), default=None, help="default: jetson on a Jetson, tensorrt when a GPU and TensorRT are present, else cpu; jetson picks orin (sm_87) or thor (sm_110) by the GPU found"),
        click.option("--vision-precision", type=VISION_CHOICE, default="fp32", show_default=True, help="which targets take each: `convllava-export precisions`"),
        click.option("--llm-backend", type=LLM_BACKEND_CHOICE, default="onnxruntime", show_default=True, help="tensorrt-llm: ModelOpt + trtllm-build engine flow, on the GPU (TensorRT-LLM 0.12-1.2.x)"),
        click.option("--llm-precision", type=LLM_CHOICE, default="fp32", show_default=True, help="which backend and graph make each: `convllava-export precisions`"),
        click.option("--awq-block-size", type=click.IntRange(8), default=128, show_default=True, help="tensorrt-llm int4-awq group size"),
        click.option("--calib-prompts", type=click.Path(path_type=str), default=None, help="tensorrt-llm: JSONL of calibration questions (default: built in)"),
        click.option("--mode", type=click.Choice(list(MODES)), default="pad", show_default=True),
        click.option("--resolution", type=click.IntRange(64), default=None, help="default: the tower's native resolution"),
        click.option("--max-tokens", type=click.IntRange(1), default=None, help="native mode: visual-token budget per image"),
        click.option("--calib-images", "--calib", "calib_images", default=None, help="calibration images folder, a `calibrate` set, or 'builtin'"),
        click.option("--calib-method", type=click.Choice(list(CALIB_METHODS)), default="minmax", show_default=True),
        click.option("--calib-limit", type=click.IntRange(1), default=64, show_default=True, help="at most this many calibration images (a quarter held out for the report)"),
        click.option("--min-size", default="64x64", show_default=True),
        click.option("--opt-size", default=None),
        click.option("--max-size", default="2048x2048", show_default=True),
        click.option("--max-batch", type=click.IntRange(1), default=4, show_default=True),
        click.option("--int4-block-size", type=click.IntRange(16), default=128, show_default=True, help="int4/int8 LLM weights per scale (MatMulNBits)"),
        click.option("--llm-graph", type=click.Choice(["auto", *LLM_GRAPHS]), default="auto", show_default=True, help="auto: gqa (ORT's fused-attention layout) for int4/int8 when onnxruntime-genai is installed, else dynamo (our exact export)"),
        click.option("--kv-cache", type=click.Choice(list(KV_CACHES)), default="auto", show_default=True, help="KV cache of an int4/int8 gqa LLM: auto = fp16; int8 halves it (per-channel scales calibrated on --calib-images prompts), so twice the requests decode together in the same memory"),
        click.option("--reference-dtype", type=click.Choice(list(REFERENCE_DTYPES)), default="auto", show_default=True, help="torch reference for the smoke test; auto: fp32 when it fits in memory, else the checkpoint's dtype"),
        click.option("--smoke-test/--no-smoke-test", default=True, show_default=True, help="run the build once and compare it with the torch reference"),
        click.option("--min-vision-cosine", type=click.FloatRange(-1, 1), default=None, help="smoke-test gate: image_embeds cosine to the reference (default: the vision precision's own, `convllava-export precisions`)"),
        click.option("--min-token-agreement", type=click.FloatRange(0, 1), default=None, help="smoke-test gate: teacher-forced top-1 agreement with the reference's greedy answer (default: the LLM precision's own, `convllava-export precisions`); 0 turns it off"),
        click.option("--threads", type=click.IntRange(1), default=None),
        click.option("--vision-tower", default=None),
        click.option("--force", is_flag=True, help="replace an existing build folder once the new one is complete"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@cli.command("build")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="build folder to create")
@build_options
def build_cmd(checkpoint: Path, output: Path, **kw) -> None:
    """Export, build engines, smoke-test and write a self-describing BUILD_DIR."""
    from .build import BuildOptions, build, default_target

    kw["target"] = kw["target"] or default_target()
    manifest = build(checkpoint, output, BuildOptions(**kw), progress=say)
    checks = manifest.checks
    if checks:
        say(f"smoke test answer: {checks['smoke_answer']!r}; top-1 agreement with the reference {checks['token_agreement']:.3f} (gate {checks['gates']['thresholds']['token_agreement']}), vision cosine {checks['vision_cosine']:.5f} (gate {checks['gates']['thresholds']['vision_cosine']})")
    out.print(str(output))


def backend_options(f):
    """Run one part of a build on another backend: `torch` puts the source checkpoint's reference
    beside the other part, to find which part a difference comes from."""
    f = click.option("--llm-backend", type=click.Choice(list(LLM_RUNTIMES)), default=None, help="override the manifest's LLM backend (torch: the source checkpoint)")(f)
    f = click.option("--vision-backend", type=click.Choice(list(VISION_RUNTIMES)), default=None, help="override the manifest's vision backend (torch: the source checkpoint)")(f)
    return f


@cli.command("run")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="image file (repeatable)")
@click.option("--prompt", required=True)
@click.option("--threads", type=click.IntRange(1), default=None)
@click.option("--llm-kernel", "--prefill", "prefill", type=click.Choice(list(PREFILL_KERNELS)), default="auto", show_default=True, help=LLM_KERNEL_HELP)
@backend_options
@sampling_options
def run_cmd(build_dir: Path, images, prompt: str, threads, prefill, vision_backend, llm_backend, **sampling) -> None:
    """Answer a prompt with a build's engines, streaming tokens."""
    from .runtime.build_loader import open_build
    from .runtime.chat import stream_answer
    from .runtime.pipeline import Request

    pipe = open_build(build_dir, threads, vision_backend, llm_backend, prefill=prefill)
    say(f"vision: {pipe.info.get('vision')}; LLM: {pipe.info.get('llm')}")
    stream_answer(pipe, Request(prompt, [str(i) for i in images]), _sampling_params(sampling), say)


@cli.command("chat")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--threads", type=click.IntRange(1), default=None)
@sampling_options
def chat_cmd(build_dir: Path, threads, **sampling) -> None:
    """Multi-turn chat. `/image PATH` attaches an image to your next message; `/reset`, `/quit`."""
    from .runtime.build_loader import open_build
    from .runtime.chat import chat

    pipe = open_build(build_dir, threads)
    chat(pipe, _sampling_params(sampling), say, warn=lambda msg: console.print(f"[red]{msg}[/]"))


@cli.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("convllava-demo"), show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None)
def demo_cmd(workdir: Path, threads) -> None:
    """Train the tiny model, build it for CPU and ask it about a bundled image."""
    from .demo import run_demo

    run_demo(workdir, threads, say)


@cli.command("serve")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="bind address (localhost by default)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--model-name", default="convllava", show_default=True)
@click.option("--allow-local-files", is_flag=True, help="accept image_url values that are local paths")
@click.option("--max-tokens", "max_tokens_limit", type=click.IntRange(1), default=1024, show_default=True)
@click.option("--max-queue", type=click.IntRange(0), default=8, show_default=True, help="waiting requests before 429")
@click.option("--max-body-mb", type=click.FloatRange(0.01), default=20.0, show_default=True)
@click.option("--max-image-pixels", type=click.IntRange(1), default=40_000_000, show_default=True)
@click.option("--max-images", type=click.IntRange(1), default=None, help="images per request (default: the build's vision engine batch)")
@click.option("--max-running", type=click.IntRange(1), default=32, show_default=True, help="sequences decoded together (in-flight batching; 1 turns batching off)")
@click.option("--max-batched-tokens", type=click.IntRange(1), default=None, help="prefill chunk: the most a decode step waits for a new prompt (default: 512 with a bf16/int8/q4 kernel, else 256)")
@click.option("--llm-kernel", "--prefill", "prefill", type=click.Choice(list(PREFILL_KERNELS)), default="auto", show_default=True, help=LLM_KERNEL_HELP)
@click.option("--encoder-cache-mb", type=click.FloatRange(0), default=256.0, show_default=True, help="image embeddings kept by content hash (LRU)")
@click.option("--prefix-cache-mb", type=click.FloatRange(0), default=256.0, show_default=True, help="KV caches kept for prompt-prefix reuse (LRU)")
@click.option("--kv-cache-mb", type=click.FloatRange(1), default=None, help="KV cache budget of the running requests; a request waits until its prompt + max_tokens fits, 400 when it never can (default: the smallest of 2048 MB, half the memory available after loading, and what max_running full-context rows take)")
@click.option("--drain-s", type=click.FloatRange(0), default=30.0, show_default=True, help="on SIGTERM/Ctrl-C: how long running streams may finish before they are ended")
@click.option("--threads", type=click.IntRange(1), default=None, help="intra-op threads (per replica with --engine ray)")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True, help="one process, or a Ray Serve application")
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True, help="[ray] LLM replicas")
@click.option("--min-replicas", type=click.IntRange(0), default=None, help="[ray] autoscale the LLM replicas from this many ...")
@click.option("--max-replicas", type=click.IntRange(1), default=None, help="[ray] ... to this many")
@click.option("--target-ongoing-requests", type=click.FloatRange(0.1), default=1.0, show_default=True, help="[ray] autoscaling target per LLM replica")
@click.option("--vision-replicas", type=click.IntRange(1), default=1, show_default=True, help="[ray] vision encoder replicas")
@click.option("--gpus-per-replica", type=click.FloatRange(0), default=None, help="[ray] GPUs per LLM replica (default 1 for GPU builds, 0 for CPU)")
@click.option("--vision-gpus", type=click.FloatRange(0), default=None, help="[ray] GPUs per vision replica (default 0.5 for GPU builds, 0 for CPU)")
@click.option("--cpus-per-replica", type=click.FloatRange(0), default=1.0, show_default=True, help="[ray] CPUs reserved per replica")
@click.option("--max-batch-size", type=click.IntRange(1), default=4, show_default=True, help="[ray] images per vision engine run")
@click.option("--batch-wait-ms", type=click.FloatRange(0), default=10.0, show_default=True, help="[ray] how long a vision batch waits to fill")
@click.option("--address", default=None, help="[ray] existing cluster: auto or ray://HOST:PORT (default: start a local Ray instance)")
@click.option("--write-config", type=click.Path(path_type=Path), default=None, help="[ray] write a Serve config YAML for `serve deploy` / KubeRay and exit")
def serve_cmd(build_dir: Path, **options) -> None:
    """OpenAI-compatible server: POST /v1/chat/completions, GET /v1/models, /health, /metrics."""
    from .runtime.launch import serve_build

    serve_build(build_dir, say=say, **options)


@cli.command("validate")
@click.argument("builds", nargs=-1, required=False, type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), required=True, help="the source checkpoint (torch fp32 reference)")
@click.option("--data", default="builtin", show_default=True, help="builtin[:kinds][:N], a JSONL file, or a folder of images")
@click.option("--question", default=None, help="question for a folder of images")
@click.option("--limit", type=click.IntRange(1), default=None)
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("validation"), show_default=True, help="folder for report.json and report.html")
@click.option("--min-cosine", type=float, default=None, help="gate: mean image_embeds cosine")
@click.option("--min-agreement", type=float, default=None, help="gate: teacher-forced top-1 agreement")
@click.option("--max-kl", type=float, default=None, help="gate: mean next-token KL divergence")
@click.option("--min-accuracy", type=float, default=None, help="gate: task accuracy (data with answers)")
@click.option("--vision-tower", default=None)
@click.option("--simulate", "simulate", multiple=True, help="also evaluate a GPU-only format simulated on CPU with ModelOpt fake quantization: fp8, int4-awq, int8-sq (nvfp4 needs CUDA)")
@click.option("--calib", "calib", default="builtin", show_default=True, help="--simulate: calibration images (folder, `calibrate` set, or 'builtin')")
@click.option("--calib-limit", type=click.IntRange(1), default=32, show_default=True, help="--simulate: calibration prompts")
@click.option("--prompts", type=click.Path(path_type=Path), default=None, help="--simulate: JSONL of calibration questions")
@click.option("--awq-block-size", type=click.IntRange(8), default=None, help="--simulate int4-awq: group size (default: the largest of 128/64/32/16/8 that divides the layers)")
@click.option("--reference-dtype", type=click.Choice(list(REFERENCE_DTYPES)), default="auto", show_default=True, help="auto: fp32 when it fits in memory, else the checkpoint's dtype (recorded in the report)")
@click.option("--device", type=click.Choice(list(DEVICES)), default="cpu", show_default=True, help="where the torch reference and the simulated builds run (cuda: nvfp4 can be simulated)")
def validate_cmd(builds, reference, data, question, limit, max_new_tokens, output, min_cosine, min_agreement, max_kl, min_accuracy, vision_tower,
                 simulate, calib, calib_limit, prompts, awq_block_size, reference_dtype, device) -> None:
    """Measure builds (and simulated GPU formats) against the fp32 reference; JSON + HTML report; gates set the exit code."""
    from .validation.report import SUMMARY_COLUMNS, describe_failure, summary_rows
    from .validation.run import Gates, validate_to_folder

    report, json_path, html_path = validate_to_folder(
        builds, reference, data, output, Gates(min_cosine, min_agreement, max_kl, min_accuracy), question, limit, progress=say, device=device, simulate=simulate,
        max_new_tokens=max_new_tokens, vision_tower=vision_tower, calib=calib, calib_limit=calib_limit, prompts=prompts, awq_block_size=awq_block_size, reference_dtype=reference_dtype,
    )
    table = Table(*SUMMARY_COLUMNS, title=f"validation against the torch {report['reference']['dtype']} reference")
    for row in summary_rows(report):
        table.add_row(*row)
    out.print(table)
    say(f"reports: {json_path} {html_path}")
    for f in report["failures"]:
        console.print(f"[bold red]gate failed:[/] {describe_failure(f)}", highlight=False)
    if report["failures"]:
        sys.exit(1)


@cli.command("calibrate")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--images", type=click.Path(path_type=Path), required=True, help="folder of calibration images (any Pillow format)")
@click.option("--prompts", type=click.Path(path_type=Path), default=None, help="JSONL of questions for the LLM prompts")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--limit", type=click.IntRange(1), default=64, show_default=True)
@click.option("--max-mb", type=click.FloatRange(1), default=512.0, show_default=True, help="bound on the preprocessed pixels")
@click.option("--mode", type=click.Choice(list(MODES)), default="pad", show_default=True)
@click.option("--resolution", type=click.IntRange(64), default=None)
@click.option("--max-tokens", type=click.IntRange(1), default=None)
@click.option("--vision-tower", default=None)
@click.option("--force", is_flag=True)
def calibrate_cmd(checkpoint, images, prompts, output, limit, max_mb, mode, resolution, max_tokens, vision_tower, force) -> None:
    """Make a reusable calibration set: preprocessed images + spliced multimodal prompts."""
    from .calibration.dataset import make_calibration_set

    meta = make_calibration_set(checkpoint, images, output, prompts, limit, max_mb, mode, resolution, max_tokens, vision_tower, force, progress=say)
    say(f"{len(meta['shapes'])} images ({meta['vision_bytes'] / 1e6:.1f} MB), {meta['llm_sequences']} multimodal prompts")
    out.print(str(output))


def _report(result: dict, json_path: Path | None, markdown) -> None:
    """A benchmark's result: as JSON to --json, as markdown to stdout."""
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
    out.print(markdown(result))


@cli.group()
def bench() -> None:
    """Benchmarks (ratios measured side by side in one run; see BENCHMARKS.md)."""


@bench.command("vision")
@click.option("--reps", type=click.IntRange(1), default=3, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None)
@click.option("--shapes", default="768x768,1024x1024,1536x1536,1536x2560", show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="keep the exported graphs here (reused when present)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def bench_vision_cmd(reps, threads, shapes, workdir, json_path) -> None:
    """Full-size ConvNeXt†+projector: torch eager fp32 vs ONNX Runtime fp32 and int8."""
    from .benchmarks.vision import bench_vision, markdown
    from .engines.profiles import parse_hw

    result = bench_vision([parse_hw(s, "--shapes") for s in shapes.split(",")], reps, threads, str(workdir) if workdir else None, progress=say)
    _report(result, json_path, markdown)


@bench.command("llm")
@click.option("--shape", type=click.Choice(["tinyllama", "small"]), default="tinyllama", show_default=True)
@click.option("--prompt-len", type=click.IntRange(16), default=600, show_default=True)
@click.option("--decode-steps", type=click.IntRange(1), default=32, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None)
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="keep the exported graphs here (reused when present)")
@click.option("--with-llama-cpp", is_flag=True, help="also llama.cpp Q4_0 on the same weights (needs llama-cpp-python and gguf)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def bench_llm_cmd(shape, prompt_len, decode_steps, threads, workdir, with_llama_cpp, json_path) -> None:
    """Prefill/decode tokens/s: torch fp32 vs ONNX Runtime fp32/int8/int4, with the bandwidth bound."""
    from .benchmarks.llm import bench_llm, markdown

    if with_llama_cpp:
        from .engines.llama_cpp import require_llama_cpp

        require_llama_cpp()
    result = bench_llm(shape, prompt_len, decode_steps, threads, str(workdir) if workdir else None, with_llama_cpp, progress=say)
    _report(result, json_path, markdown)


@bench.command("e2e")
@click.argument("builds", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--clients", default="1,4,16", show_default=True)
@click.option("--requests-per-client", type=click.IntRange(1), default=4, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def bench_e2e_cmd(builds, clients, requests_per_client, max_new_tokens, threads, json_path) -> None:
    """Build TTFT / decode speed, and server throughput + p50/p95 under concurrent loopback clients."""
    from .benchmarks.e2e import bench_e2e, markdown

    result = bench_e2e(list(builds), [int(c) for c in clients.split(",")], requests_per_client, max_new_tokens, threads, progress=say)
    _report(result, json_path, markdown)


@bench.command("real-size")
@click.option("--workdir", type=click.Path(path_type=Path), required=True, help="checkpoint (written when absent, ~15 GB for 7B), build, GGUF and reports go here")
@click.option("--shape", type=click.Choice(["vicuna-7b", "tinyllama"]), default="vicuna-7b", show_default=True)
@click.option("--resolutions", default="768,1024,1536", show_default=True, help="`run` at each (the build is made at 768)")
@click.option("--tokens", type=click.IntRange(1), default=128, show_default=True, help="decode tokens per run (ignore_eos)")
@click.option("--torch-tokens", type=click.IntRange(1), default=16, show_default=True, help="decode tokens for the torch bf16 eager baseline")
@click.option("--with-llama-cpp/--without-llama-cpp", default=True, show_default=True, help="llama.cpp Q4_0 on the same weights (needs llama-cpp-python and gguf)")
@click.option("--reuse-build", is_flag=True, help="reuse WORKDIR/build-768-bBLOCK when present")
@click.option("--int4-block-size", type=click.IntRange(16), default=128, show_default=True)
@click.option("--steps", default=None, help="which steps to run, comma-separated (default: all but trtllm_hf)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def bench_real_size_cmd(workdir, shape, resolutions, tokens, torch_tokens, with_llama_cpp, reuse_build, int4_block_size, steps, json_path) -> None:
    """The 7B sequence on this machine: build, run at 768/1024/1536, torch bf16 and llama.cpp side by side, validate, serve."""
    from .benchmarks.real_size import parse_steps, real_size

    if with_llama_cpp:
        from .engines.llama_cpp import require_llama_cpp

        require_llama_cpp()
    chosen = parse_steps(steps)
    result = real_size(workdir, shape, tuple(int(r) for r in resolutions.split(",")), tokens, torch_tokens, with_llama_cpp, reuse_build, progress=say,
                       block=int4_block_size, steps=chosen)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
    out.print_json(json.dumps(result["summary"]))


@bench.command("serve")
@click.argument("build", type=click.Path(path_type=Path))
@click.option("--concurrency", default="1,4,16,32", show_default=True, help="client counts to sweep")
@click.option("--max-tokens", type=click.IntRange(1), default=128, show_default=True, help="output tokens per request (ignore_eos)")
@click.option("--prompts-per-level", type=click.IntRange(1), default=None, help="requests per level (default: 2 x clients, at least 8)")
@click.option("--requests-per-client", type=click.IntRange(1), default=None, help="requests per level = clients x this (overrides --prompts-per-level; 1 for a 7B sweep)")
@click.option("--time-limit-s", type=click.FloatRange(1), default=600.0, show_default=True, help="the most one level may take")
@click.option("--max-running", "max_running", type=click.IntRange(1), multiple=True, help="our configs (default: the largest concurrency; without --against also 1 = batching off)")
@click.option("--workload", "workloads", type=click.Choice(["text", "image"]), multiple=True,
              help="text: distinct random-word prompts; image: the image dataset (default: both with --against, image without)")
@click.option("--prompt-words", type=click.IntRange(1), default=300, show_default=True, help="words per text-workload prompt")
@click.option("--serve-arg", "serve_args", multiple=True, help="passed verbatim to our `serve` subprocess, e.g. --serve-arg=--kv-cache-mb=3000 (repeatable)")
@click.option("--against", default=None, metavar="URL", help="a peer OpenAI-compatible server (vLLM, llama-server, trtllm-serve), e.g. http://127.0.0.1:8011")
@click.option("--against-model", default=None, help="the model name the peer serves (default: the first id of URL/v1/models)")
@click.option("--against-cmd", default=None, metavar="CMD", help="shell command that starts the peer, run only after our server has stopped; its process group is ended afterwards")
@click.option("--against-start-timeout", type=click.FloatRange(1), default=900.0, show_default=True, help="seconds to wait for URL/v1/models after --against-cmd")
@click.option("--against-images", is_flag=True, help="the peer takes images (vLLM with our plugin): send it the image requests themselves, not text stand-ins")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def bench_serve_cmd(build, concurrency, max_tokens, prompts_per_level, requests_per_client, time_limit_s, max_running, workloads, prompt_words, serve_args, against, against_model, against_cmd,
                    against_start_timeout, against_images, json_path) -> None:
    """Concurrency sweep against `serve` (vllm bench serve's metrics): batching on vs off, or beside a peer server (--against) on the same workload."""
    from .benchmarks.serving import bench_serving, markdown
    from .manifest import read_manifest

    read_manifest(build)
    if (against_model or against_cmd) and not against:
        raise click.UsageError("--against-model and --against-cmd need --against URL")
    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise click.BadParameter(f"{concurrency!r} is not a comma-separated list of integers", param_hint="--concurrency") from None
    if not levels or min(levels) < 1:
        raise click.BadParameter("client counts must be at least 1", param_hint="--concurrency")
    configs = {f"max-running {n}": n for n in max_running} if max_running else None
    result = bench_serving(build, levels, max_tokens, prompts_per_level, configs, time_limit_s, progress=say, workloads=workloads or None, prompt_words=prompt_words,
                           serve_args=serve_args, against=against, against_model=against_model, against_cmd=against_cmd, against_start_timeout_s=against_start_timeout, against_images=against_images,
                           requests_per_client=requests_per_client)
    _report(result, json_path, markdown)


@bench.command("faults")
@click.argument("build", type=click.Path(path_type=Path))
@click.option("--max-tokens", type=click.IntRange(1), default=16, show_default=True, help="tokens of the greedy requests compared before and after the faults")
@click.option("--drain-s", type=click.FloatRange(0), default=5.0, show_default=True, help="the server's --drain-s for the SIGTERM check")
@click.option("--threads", type=click.IntRange(1), default=None)
@click.option("--serve-arg", "serve_args", multiple=True, help="passed verbatim to the `serve` subprocess (repeatable)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def bench_faults_cmd(build, max_tokens, drain_s, threads, serve_args, json_path) -> None:
    """Every fault a client can cause, against a real `serve` of BUILD, then the first requests again; exit 1 when a check fails."""
    from .benchmarks.faults import markdown, run_faults
    from .manifest import read_manifest

    read_manifest(build)
    result = run_faults(build, threads=threads, max_tokens=max_tokens, drain_s=drain_s, serve_args=serve_args, progress=say)
    _report(result, json_path, markdown)
    if not result["passed"]:
        sys.exit(1)


@bench.command("ray")
@click.argument("build", type=click.Path(path_type=Path))
@click.option("--replicas", default="1,2", show_default=True, help="Ray LLM replica counts to compare")
@click.option("--clients", type=click.IntRange(1), default=8, show_default=True)
@click.option("--requests-per-client", type=click.IntRange(1), default=4, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--no-local", is_flag=True, help="skip the single-process server baseline")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def bench_ray_cmd(build, replicas, clients, requests_per_client, max_new_tokens, no_local, json_path) -> None:
    """Throughput and p50/p95 under concurrent clients: single process vs Ray Serve with N replicas."""
    from .benchmarks.serve import bench_serve, markdown
    from .manifest import read_manifest

    read_manifest(build)
    result = bench_serve(build, [int(r) for r in replicas.split(",")], clients, requests_per_client, max_new_tokens, not no_local, progress=say)
    _report(result, json_path, markdown)


def main() -> None:
    cli(prog_name="convllava-export")


if __name__ == "__main__":
    main()
