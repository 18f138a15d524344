"""TensorRT-LLM for the language model: two routes over one ModelOpt quantizer.

Engine flow (TensorRT-LLM 0.12.0-jetson up to 1.2.x; removed after 1.2):
1. ModelOpt quantizes the LLaMA decoder, calibrated on *multimodal* prompts (image features
   spliced into templated prompts: what the model will see), and writes a TensorRT-LLM
   checkpoint (`export_checkpoint(fmt="engine")`).
2. `trtllm-build` with a prompt-embedding table sized for max batch x visual tokens, and context
   logits gathered so a build can be measured teacher-forced (`build_trtllm_engine`).
3. At run time image rows become ids `table_base + i` into that table (`prompt.prompt_table_ids`)
   and `TrtLlmGenerator` runs the engine behind the runtime's `Generator` contract.

PyTorch backend (TensorRT-LLM 1.x, the only flow from 1.3): ModelOpt's unified Hugging Face
checkpoint (`export_checkpoint(fmt="hf")`) for `tensorrt_llm.LLM` / `trtllm-serve`; docs/tensorrt-llm.md.

Nothing here has run on a GPU in this project's CI: what needs no GPU (version gates, configs,
the build command, ModelOpt checkpoints of small models on CPU, output slicing) is tested.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BuildError, ConvLlavaError, ExportError, first_line
from ..extras import require
from ..precisions import AWQ, MODELOPT, TRTLLM_HF
from ..precisions import precision as precision_row
from ..targets import sm

META = "convllava_trtllm.json"  # written beside a checkpoint / engine: precision, table base, calibration
BUILD_META = "convllava_build.json"  # the TrtLlmBuildConfig an engine was built with
ENGINE_FLOW_FIRST = (0, 12)  # v0.12.0-jetson: the last TensorRT-LLM for Jetson Orin
ENGINE_FLOW_LAST = (1, 2)  # trtllm-build and the TensorRT engine flow are gone from 1.3.0rc on
ROUTE_HINT = (
    "for TensorRT-LLM 1.3 and newer use the PyTorch-backend route: `convllava-export export llm CHECKPOINT --backend tensorrt-llm "
    f"--format hf --precision {'|'.join(TRTLLM_HF)} -o DIR`, then `trtllm-serve DIR` (docs/tensorrt-llm.md)"
)
Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# versions, precisions and GPUs


def parse_trtllm_version(version: str) -> tuple[int, int, int]:
    """'1.2.0rc6' -> (1, 2, 0); '0.12.0.dev2024073000' -> (0, 12, 0); '1.3.0rc1' -> (1, 3, 0)."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if not m:
        raise BuildError(f"cannot read the TensorRT-LLM version '{version}' (expected MAJOR.MINOR[.PATCH])")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def check_trtllm_version(version: str, target: str = "tensorrt") -> tuple[int, int, int]:
    """Refuse a TensorRT-LLM this engine flow does not run on, in one line naming what does."""
    v = parse_trtllm_version(version)
    supported = f"{'.'.join(map(str, ENGINE_FLOW_FIRST))} (v0.12.0-jetson) to {'.'.join(map(str, ENGINE_FLOW_LAST))}.x"
    if v[:2] > ENGINE_FLOW_LAST:
        raise BuildError(
            f"TensorRT-LLM {version} is past the engine flow this backend runs ({supported}: 1.3 release candidates deprecate "
            f"trtllm-build and it is removed after 1.3.0rc20). {ROUTE_HINT[0].upper()}{ROUTE_HINT[1:]}"
        )
    if v[:2] < ENGINE_FLOW_FIRST:
        raise BuildError(f"TensorRT-LLM {version} is older than this backend supports ({supported}); upgrade TensorRT-LLM")
    if target == "orin" and v[:2] != ENGINE_FLOW_FIRST:
        raise BuildError(
            f"TensorRT-LLM {version} does not support Jetson Orin: its last TensorRT-LLM is the v0.12.0-jetson branch "
            "(JetPack 6); NVIDIA points newer Jetson LLM work to TensorRT Edge-LLM"
        )
    if target == "thor":
        raise BuildError(
            "the TensorRT-LLM engine flow is not a Jetson Thor route: NVIDIA's LLM path on Thor (JetPack 7) is TensorRT Edge-LLM "
            "or TensorRT-LLM's PyTorch backend; build the vision engine with --target thor and the LLM with --llm-backend onnxruntime, "
            f"or {ROUTE_HINT}"
        )
    return v


def check_precision(precision: str, fmt: str = "engine") -> None:
    """`precision` is made by this route (`engine` or `hf`): the table's one refusal."""
    _row(precision, format=fmt)


def _row(name: str, **where: str):
    return precision_row("llm", "tensorrt-llm", name, **where)


def gpu_note(precision: str, compute_capability: tuple[int, int] | None) -> str | None:
    """Why `precision` cannot *run* on this GPU (None: it can, or it needs no particular GPU).

    Making the checkpoint needs no GPU: ModelOpt 0.47 calibrates and packs fp8, nvfp4 and
    w4a8-awq on the CPU too (tests/test_trtllm.py); running them needs the tensor cores."""
    need = _row(precision).min_cc
    if need and (compute_capability is None or tuple(compute_capability) < need):
        return f"{precision} runs on GPUs of {sm(need)} or newer, and this machine has {sm(compute_capability)}"
    return None


def check_runs_here(precision: str, compute_capability: tuple[int, int] | None) -> None:
    """Refuse to build an engine that this GPU (where it is built, and runs) cannot run."""
    note = gpu_note(precision, compute_capability)
    if note:
        raise ExportError(f"{note}; use int4-awq or int8-sq here, or build on the GPU that will run it")


def local_compute_capability() -> tuple[int, int] | None:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return (p.major, p.minor)
    return None


def modelopt_config(precision: str, awq_block_size: int) -> dict[str, Any]:
    """A copy of the format's ModelOpt config; AWQ formats use `awq_block_size` as group size."""
    mtq = require("modelopt.torch.quantization", "quant", "TensorRT-LLM quantization")
    cfg = copy.deepcopy(getattr(mtq, MODELOPT[precision].config))
    if precision in AWQ:
        entries = cfg["quant_cfg"]
        items = entries if isinstance(entries, list) else [{"quantizer_name": k, "cfg": v} for k, v in entries.items()]
        for item in items:
            if item.get("quantizer_name") != "*weight_quantizer":
                continue
            cfgs = item.get("cfg")
            for c in cfgs if isinstance(cfgs, list) else [cfgs]:  # w4a8: [int4 blockwise, fp8]
                if isinstance(c, dict) and isinstance(c.get("block_sizes"), dict) and -1 in c["block_sizes"]:
                    c["block_sizes"] = {**c["block_sizes"], -1: awq_block_size}
        if not isinstance(entries, list):
            cfg["quant_cfg"] = {i["quantizer_name"]: i["cfg"] for i in items}
    return cfg


def quantize(llm: torch.nn.Module, calib_sequences: Sequence[np.ndarray], precision: str, awq_block_size: int, progress: Progress) -> torch.nn.Module:
    """ModelOpt-quantize `llm` in place, calibrated on spliced multimodal embedding sequences."""
    if MODELOPT[precision].config is None:
        return llm
    cfg = llm.config
    if precision in AWQ and (cfg.hidden_size % awq_block_size or cfg.intermediate_size % awq_block_size):
        raise ExportError(f"{precision} block size {awq_block_size} must divide hidden {cfg.hidden_size} and intermediate {cfg.intermediate_size}")
    if not calib_sequences:
        raise ExportError(f"{precision} needs calibration prompts (images spliced into templated prompts)")
    mtq = require("modelopt.torch.quantization", "quant", "TensorRT-LLM quantization")
    from ..progress import Meter

    def forward_loop(m: torch.nn.Module) -> None:
        meter = Meter(f"calibrating {precision}", len(calib_sequences), "prompts", progress)
        param = next(m.parameters())
        with torch.no_grad():
            for seq in calib_sequences:
                m(inputs_embeds=torch.from_numpy(np.asarray(seq, np.float32))[None].to(param.device, param.dtype))
                meter.advance()
        meter.done()

    return _modelopt_call("quantize", mtq.quantize, llm, modelopt_config(precision, awq_block_size), forward_loop)


def _write_meta(dest: Path, llm: torch.nn.Module, precision: str, quant_algo: str | None, table_base: int, calib: Sequence[np.ndarray], fmt: str) -> dict[str, Any]:
    meta = {
        "format": fmt,
        "precision": precision,
        "quant_algo": quant_algo,
        "vocab_size": llm.config.vocab_size,
        "prompt_table_base": table_base,
        "hidden_size": llm.config.hidden_size,
        "calibration": {"sequences": len(calib), "tokens": int(sum(len(s) for s in calib))},
    }
    (dest / META).write_text(json.dumps(meta, indent=2))
    return meta


def export_checkpoint(
    llm: torch.nn.Module,
    calib_sequences: Sequence[np.ndarray],
    precision: str,
    dest: Path,
    fmt: str = "engine",
    awq_block_size: int = 128,
    dtype: torch.dtype = torch.float16,
    progress: Progress = print,
) -> dict[str, Any]:
    """ModelOpt-quantize `llm` on multimodal prompts and write the checkpoint of `fmt`:
    `engine`, a TensorRT-LLM checkpoint for trtllm-build; `hf`, ModelOpt's unified Hugging Face
    checkpoint (config.json with the quantization config, safetensors, hf_quant_config.json) that
    `tensorrt_llm.LLM` loads. The quant_algo ModelOpt wrote is checked against the precision's."""
    check_precision(precision, fmt)
    me = require("modelopt.torch.export", "quant", "TensorRT-LLM checkpoints")
    dest.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = quantize(llm, calib_sequences, precision, awq_block_size, progress)
        progress(f"writing the {'TensorRT-LLM' if fmt == 'engine' else 'unified Hugging Face'} checkpoint to {dest}")
        if fmt == "engine":
            _modelopt_call("export_tensorrt_llm_checkpoint", me.export_tensorrt_llm_checkpoint, model, "llama", dtype, str(dest), inference_tensor_parallel=1)
        else:
            if not getattr(model.config, "architectures", None):  # our LlamaConfig is built from the LLaVA config, which names LLaVA
                model.config.architectures = ["LlamaForCausalLM"]
            model.to(dtype)  # calibrated in fp32 on CPU: ModelOpt converts only the quantized layers to `dtype`
            model.config.torch_dtype = dtype
            _modelopt_call("export_hf_checkpoint", me.export_hf_checkpoint, model, dtype=dtype, export_dir=str(dest))
    if fmt == "engine":
        config = json.loads((dest / "config.json").read_text())
        got = (config.get("quantization") or {}).get("quant_algo")
        # ModelOpt pads the vocabulary for some kernels (int4-awq: 1000 -> 1024); TensorRT-LLM's
        # prompt-table ids start at the *engine's* vocab size, so that is the table base.
        base = int(config["vocab_size"])
    else:
        got, base = hf_quant_algo(dest), llm.config.vocab_size
    want = MODELOPT[precision].quant_algo
    if got != want:
        raise ExportError(f"ModelOpt wrote quant_algo {got!r} for {precision}, expected {want!r}")
    return _write_meta(dest, llm, precision, got, base, calib_sequences, fmt)


def _modelopt_call(name: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """A ModelOpt call (quantize, an export), its failure as one line naming it and ModelOpt's version."""
    try:
        return fn(*args, **kw)
    except Exception as exc:  # noqa: BLE001 - a third-party exporter raises anything; say which step failed
        import modelopt

        raise ExportError(f"ModelOpt {getattr(modelopt, '__version__', '?')} {name} failed: {type(exc).__name__}: {first_line(exc)}") from exc


def hf_quant_algo(folder: Path) -> str | None:
    """The quant_algo of a unified checkpoint: hf_quant_config.json, else config.json's quantization_config."""
    path = folder / "hf_quant_config.json"
    if path.is_file():
        return (json.loads(path.read_text()).get("quantization") or {}).get("quant_algo")
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    return qc.get("quant_algo")


# ---------------------------------------------------------------------------------------------
# trtllm-build


@dataclass
class TrtLlmBuildConfig:
    max_batch_size: int = 4
    max_input_len: int = 2048  # text + visual tokens of one prompt
    max_seq_len: int = 2560  # prompt + generated
    max_visual_tokens: int = 576  # per image
    max_images_per_prompt: int = 1
    gemm_plugin: str = "auto"
    gather_context_logits: bool = True  # teacher-forced checks (smoke test, validate); costs max_num_tokens x vocab fp32 of GPU memory

    @property
    def prompt_table_size(self) -> int:
        """Rows the engine's prompt table must hold: every image of every sequence in a batch."""
        return self.max_batch_size * self.max_visual_tokens * self.max_images_per_prompt

    def validate(self) -> None:
        if self.max_input_len <= self.max_visual_tokens * self.max_images_per_prompt:
            raise ExportError(f"max_input_len {self.max_input_len} leaves no room for text after {self.max_visual_tokens * self.max_images_per_prompt} visual tokens")
        if self.max_seq_len <= self.max_input_len:
            raise ExportError(f"max_seq_len {self.max_seq_len} must exceed max_input_len {self.max_input_len}")


def trtllm_build_command(checkpoint_dir: Path | str, engine_dir: Path | str, cfg: TrtLlmBuildConfig) -> list[str]:
    cfg.validate()
    cmd = [
        "trtllm-build",
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(engine_dir),
        "--max_batch_size", str(cfg.max_batch_size),
        "--max_input_len", str(cfg.max_input_len),
        "--max_seq_len", str(cfg.max_seq_len),
        "--max_prompt_embedding_table_size", str(cfg.prompt_table_size),
        "--gemm_plugin", cfg.gemm_plugin,
    ]  # fmt: skip
    if cfg.gather_context_logits:
        cmd.append("--gather_context_logits")
    return cmd


def build_trtllm_engine(checkpoint_dir: Path, engine_dir: Path, cfg: TrtLlmBuildConfig, progress: Progress = print) -> Path:
    """Run `trtllm-build` (stderr's tail in the error when it fails) and record its settings."""
    if shutil.which("trtllm-build") is None:
        raise BuildError("trtllm-build is not on PATH: install TensorRT-LLM 0.12-1.2.x on the GPU machine (pip install 'convllava-export[trtllm]')")
    cmd = trtllm_build_command(checkpoint_dir, engine_dir, cfg)
    progress(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"trtllm-build failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    (engine_dir / BUILD_META).write_text(json.dumps(asdict(cfg), indent=2))
    return engine_dir


def engine_dtype(engine_dir: Path) -> str:
    """The engine's activation dtype from its config.json ('float16', 'bfloat16', ...): what the
    prompt table must be fed as."""
    config = json.loads((Path(engine_dir) / "config.json").read_text())
    dtype = (config.get("pretrained_config") or {}).get("dtype") or (config.get("builder_config") or {}).get("precision")
    if not dtype:
        raise BuildError(f"{engine_dir}/config.json names no dtype (pretrained_config.dtype): not a TensorRT-LLM engine folder")
    return str(dtype)


# ---------------------------------------------------------------------------------------------
# runner


def generated_tokens(output_ids: np.ndarray, sequence_lengths: np.ndarray, input_lengths: Sequence[int]) -> list[list[int]]:
    """Exactly the generated tokens of each sequence, from ModelRunner's return_dict outputs:
    output_ids [batch, beams, max_len] (prompt + generated + end-id padding) and
    sequence_lengths [batch, beams] (prompt + generated). Beam 0."""
    out = []
    for b, n_in in enumerate(input_lengths):
        end = int(np.asarray(sequence_lengths)[b, 0])
        out.append([int(t) for t in np.asarray(output_ids)[b, 0, n_in:end]])
    return out


def batch_table_inputs(prompts: Sequence[Any], table_base: int) -> tuple[list[list[int]], np.ndarray | None]:
    """Token ids of each prompt and the one prompt table of the batch (None without images).

    ModelRunner's (Python session) p-tuning layout: one task whose table holds the rows of every
    image of the batch in order, and image rows as ids from `table_base` counted across the
    whole batch, so the second prompt's first image row is `table_base` + the first's rows.
    """
    from ..prompt import prompt_table_ids

    ids: list[list[int]] = []
    rows: list[np.ndarray] = []
    for p in prompts:
        ids.append(prompt_table_ids(p.ids, [len(e) for e in p.images], table_base + sum(len(r) for r in rows)))
        rows += [np.asarray(e) for e in p.images]
    return ids, (np.concatenate(rows) if rows else None)


def plan_batches(prompt_rows: Sequence[int], max_batch: int, max_rows: int) -> list[list[int]]:
    """Prompt indices in engine batches: at most `max_batch` prompts whose image rows together fit
    the engine's prompt table (`max_rows`); a prompt whose rows alone do not fit is refused."""
    batches: list[list[int]] = []
    rows = 0
    for i, n in enumerate(prompt_rows):
        if n > max_rows:
            raise ConvLlavaError(f"this prompt has {n} image rows and the engine's prompt table holds {max_rows}: use fewer or smaller images, or rebuild with a larger table")
        if not batches or len(batches[-1]) >= max_batch or rows + n > max_rows:
            batches.append([])
            rows = 0
        batches[-1].append(i)
        rows += n
    return batches


def new_token_budget(lengths: Sequence[int], max_new_tokens: int, max_input_len: int, max_seq_len: int) -> int:
    """`max_new_tokens` within the engine's limits (fewer when a long prompt leaves less room);
    a prompt longer than the engine's input is refused."""
    longest = max(lengths)
    if longest > max_input_len:
        raise ConvLlavaError(f"the prompt is {longest} tokens (visual included) and the engine takes at most {max_input_len}: shorten it or use fewer images")
    return max(1, min(max_new_tokens, max_seq_len - longest))


class TrtLlmGenerator:
    """A TensorRT-LLM engine behind the runtime's `Generator` contract (runtime/generation.py):
    prompts go in as token ids with image rows as prompt-table ids, tokens come out per step."""

    runs_own_loop = True

    def __init__(self, folder: Path) -> None:
        """`folder`: a build's llm/ (engine/ and convllava_trtllm.json)."""
        trtllm = require("tensorrt_llm", "trtllm", "TensorRT-LLM engines")
        check_trtllm_version(trtllm.__version__)
        from tensorrt_llm.runtime import ModelRunner

        self.engine_dir = Path(folder) / "engine"
        for path in (Path(folder) / META, self.engine_dir / BUILD_META):
            if not path.is_file():
                raise BuildError(f"{path} is missing: not a TensorRT-LLM build of convllava-export; rebuild it")
        meta = json.loads((Path(folder) / META).read_text())
        self.build = TrtLlmBuildConfig(**json.loads((self.engine_dir / BUILD_META).read_text()))
        self.dtype = getattr(torch, engine_dtype(self.engine_dir))  # 'float16' -> torch.float16
        self.vocab_size = int(meta["vocab_size"])
        self.table_base = int(meta["prompt_table_base"])
        try:
            self.runner = ModelRunner.from_dir(str(self.engine_dir))
        except Exception as exc:  # noqa: BLE001 - TensorRT raises RuntimeError/AssertionError for a foreign engine
            raise BuildError(
                f"TensorRT-LLM {trtllm.__version__} cannot load the engine in {self.engine_dir} ({type(exc).__name__}: {first_line(exc)}); "
                "an engine runs on the GPU model and TensorRT-LLM version that built it: rebuild it here"
            ) from None

    def check(self, prompt: Any) -> None:
        """A prompt that fits no batch of this engine is refused alone (the server's other
        requests go on): its image rows against the prompt table, its length against the input."""
        plan_batches([prompt.rows], 1, self.build.prompt_table_size)
        new_token_budget([prompt.length], 1, self.build.max_input_len, self.build.max_seq_len)

    def _inputs(self, prompts: Sequence[Any]) -> tuple[dict[str, Any], list[int]]:
        """ModelRunner inputs for a batch of TablePrompts, and each prompt's length."""
        ids, table = batch_table_inputs(prompts, self.table_base)
        kw: dict[str, Any] = {"batch_input_ids": [torch.tensor(i, dtype=torch.int32) for i in ids]}
        if table is not None:
            t = torch.from_numpy(table).to(self.dtype).cuda()  # the engine's dtype, not always fp16
            kw.update(prompt_table=t[None], prompt_tasks=",".join("0" for _ in prompts))
        return kw, [len(i) for i in ids]

    def stream(self, prompts: Sequence[Any], params: Any, end_id: int) -> Iterator[list[list[int]]]:
        """Per engine step, each prompt's new tokens (a list per prompt, maybe empty); batches
        within the engine's batch size and prompt table, one after another."""
        for batch in plan_batches([p.rows for p in prompts], self.build.max_batch_size, self.build.prompt_table_size):
            chunk = [prompts[i] for i in batch]
            inputs, lengths = self._inputs(chunk)
            budget = new_token_budget(lengths, params.max_new_tokens, self.build.max_input_len, self.build.max_seq_len)
            seen, toks = [0] * len(chunk), [[] for _ in chunk]
            for out in self.runner.generate(
                **inputs,
                max_new_tokens=budget,
                end_id=-1 if params.ignore_eos else end_id,
                pad_id=end_id if end_id >= 0 else 0,
                temperature=max(params.temperature, 1e-5),
                top_k=1 if params.temperature == 0 else 0,
                top_p=params.top_p,
                random_seed=params.seed,
                streaming=True,
                output_sequence_lengths=True,
                return_dict=True,
            ):
                toks = generated_tokens(out["output_ids"].cpu().numpy(), out["sequence_lengths"].cpu().numpy(), lengths)
                step: list[list[int]] = [[] for _ in prompts]
                for j, i in enumerate(batch):
                    step[i] = toks[j][seen[j] :]
                seen = [len(t) for t in toks]
                yield step
            if not params.ignore_eos and end_id >= 0:  # stopped at the end id, which the output does not hold
                step = [[] for _ in prompts]
                for j, i in enumerate(batch):
                    if seen[j] < budget and (not toks[j] or toks[j][-1] != end_id):
                        step[i] = [end_id]
                yield step

    def context_logits(self, prompt: Any) -> np.ndarray:
        """Logits [len(ids), V] at every prompt position (the engine gathers context logits)."""
        if not self.build.gather_context_logits:
            raise BuildError(f"{self.engine_dir} was built without --gather_context_logits; rebuild it to measure agreement")
        inputs, (length,) = self._inputs([prompt])
        new_token_budget([length], 1, self.build.max_input_len, self.build.max_seq_len)
        out = self.runner.generate(**inputs, max_new_tokens=1, end_id=-1, pad_id=0, top_k=1, output_sequence_lengths=True, return_dict=True)
        logits = out["context_logits"]
        logits = logits[0] if isinstance(logits, list) else logits
        return logits.float().reshape(length, -1)[:, : self.vocab_size].cpu().numpy()
