"""`convllava-export`: export, build, run and check ConvLLaVA engines."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from .errors import ConvLlavaError

console = Console(stderr=True)
out = Console()


class Cli(click.Group):
    """Turns our errors into one clear line and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConvLlavaError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            ctx.exit(2)
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
    f = click.option("--mode", type=click.Choice(["pad", "native"]), default=None, help="pad (official) or native aspect ratio")(f)
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
    if (path / "manifest.json").is_file():
        from .build import inspect_build

        report = inspect_build(path)
    else:
        from .inspect import inspect_checkpoint

        report = inspect_checkpoint(path, vision_tower)
    if as_json:
        out.print_json(json.dumps(report))
        return
    table = Table(show_header=False, box=None)
    for key, value in report.items():
        table.add_row(f"[bold]{key}[/]", value if isinstance(value, str) else json.dumps(value))
    out.print(table)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="image file (repeatable)")
@click.option("--prompt", required=True, help="question; images are placed before it unless it contains <image>")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@preprocess_options
@sampling_options
def generate(checkpoint, images, prompt, vision_tower, dtype, mode, resolution, max_tokens, size, **sampling) -> None:
    """Answer a prompt with the PyTorch reference model, streaming tokens to stdout."""
    from .model.reference import ReferenceModel
    from .runtime.pipeline import Pipeline, Request
    from .runtime.sampling import SamplingParams

    ref = ReferenceModel.load(checkpoint, vision_tower=vision_tower, dtype=dtype, progress=say)
    say(f"vision tower weights from {ref.info.tower_weights_source} ({ref.info.tower_path})")
    cfg = make_preprocess_cfg(ref.info.preprocessor_config, mode, resolution, max_tokens, size)
    pipe = Pipeline.from_reference(ref, cfg)
    _stream_to_stdout(pipe, Request(prompt, [str(i) for i in images]), SamplingParams(**_sampling(sampling)))


def _sampling(opts: dict) -> dict:
    return {
        "max_new_tokens": opts["max_new_tokens"],
        "temperature": opts["temperature"],
        "top_p": opts["top_p"],
        "seed": opts["seed"],
        "stop": tuple(opts["stop"]),
    }


def _stream_to_stdout(pipe, request, params) -> str:
    text = ""
    for ev in pipe.stream(request, params):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        text += ev.text
    sys.stdout.write("\n")
    t = pipe.last_timings[0]
    say(
        f"preprocess {t.preprocess_s * 1e3:.1f} ms · vision {t.vision_s * 1e3:.1f} ms · "
        f"TTFT {t.ttft_s * 1e3:.1f} ms · decode {t.decode_tokens_per_s:.1f} tok/s"
    )
    return text


@cli.command("tiny")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", default=600, show_default=True, help="training steps (0: random weights)")
def tiny(dest: Path, seed: int, steps: int) -> None:
    """Write the tiny trained demo checkpoint (released layout) under DEST."""
    from .tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(dest, seed=seed, train_steps=steps, progress=say)
    out.print(str(path))


def main() -> None:
    cli(prog_name="convllava-export")


if __name__ == "__main__":
    main()
