"""llama.cpp on the same weights, for side-by-side CPU benchmarks (`bench llm --with-llama-cpp`).

The users' CPU alternative to our ONNX Runtime decoder. `write_gguf` turns a transformers
LLaMA into an f16 GGUF with the `gguf` package (tensor names and the q/k row order that
llama.cpp's own converter uses), `quantize_gguf` calls llama.cpp's quantizer (Q4_0 by default)
through llama-cpp-python, and `LlamaCppTimer` measures prefill and decode on it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConvLlavaError
from ..extras import require

WHY = "--with-llama-cpp (llama-cpp-python compiles llama.cpp from source: several minutes)"


def require_llama_cpp() -> None:
    """One line naming the `bench` extra when llama-cpp-python or gguf is missing, before any work."""
    require("llama_cpp", purpose=WHY)
    require("gguf", purpose=WHY)


def permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k row order → llama.cpp's interleaved pairs (what convert_hf_to_gguf does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_tensors(items: Any, config: Any) -> dict[str, np.ndarray]:
    """(HF LLaMA name, tensor) pairs → {gguf tensor name: array}: norms f32, the rest f16,
    q/k rows permuted as llama.cpp expects; other keys (projector, tower) are skipped. fp16
    tensors become views (on memory-mapped shards: read only when the GGUF is written); only
    the permuted q/k and dtype conversions are copies."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    out: dict[str, np.ndarray] = {}
    for key, t in items:
        if key.startswith("model.layers."):
            i, rest = key[len("model.layers."):].split(".", 1)
            name = f"blk.{i}.{GGUF_NAMES[rest]}"
        elif key in TOP_NAMES:
            name, rest = TOP_NAMES[key], key
        else:
            continue
        t = t.detach()
        if rest.endswith("norm.weight"):
            out[name] = t.float().numpy()
            continue
        arr = (t if t.dtype == torch.float16 else t.to(torch.float16)).numpy()
        if rest.startswith("self_attn.q_proj"):
            arr = permute_for_rope(arr, config.num_attention_heads)
        elif rest.startswith("self_attn.k_proj"):
            arr = permute_for_rope(arr, kv_heads)
        out[name] = arr
    out.setdefault("output.weight", out["token_embd.weight"])  # tied embeddings
    return out


def checkpoint_items(info: Any) -> Any:
    """Every (name, tensor) of a checkpoint's shards, memory-mapped, one shard at a time."""
    from ..checkpoint import load_shard

    for f in info.weight_files:
        yield from load_shard(f, None).items()


def write_gguf(model: Any, path: Path, checkpoint: Any = None) -> Path:
    """An f16 GGUF of a LLaMA with a placeholder SentencePiece vocabulary of the model's size
    (byte tokens included, as llama.cpp's SPM vocabulary expects); for timing, not for text.
    `model` is a transformers LLaMA, or None with `checkpoint` (a CheckpointInfo) to read the
    shards tensor by tensor (7B)."""
    gguf = require("gguf", purpose=WHY)
    if checkpoint is not None:
        from ..model.config import llama_config

        cfg = llama_config(checkpoint.config)
    else:
        cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("convllava-bench")
    w.add_context_length(int(getattr(cfg, "max_position_embeddings", 4096)))
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(cfg.vocab_size - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (cfg.vocab_size - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    tensors = gguf_tensors(checkpoint_items(checkpoint) if checkpoint is not None else model.state_dict().items(), cfg)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantize_gguf(src: Path, dest: Path, kind: str = "q4_0", threads: int = 2) -> Path:
    """llama.cpp's own quantizer, through llama-cpp-python's C API."""
    llama_cpp = require("llama_cpp", purpose=WHY)
    ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[kind]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), params)
    if rc != 0:
        raise ConvLlavaError(f"llama.cpp could not quantize {src} to {kind} (code {rc})")
    return dest


class LlamaCppTimer:
    """Prefill a prompt, then decode one token at a time at that context."""

    def __init__(self, gguf_path: Path, threads: int, n_ctx: int = 2048) -> None:
        llama_cpp = require("llama_cpp", purpose=WHY)
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)

    def _last_argmax(self) -> int:
        """Greedy pick from the last evaluated position (the only one with logits)."""
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def run(self, prompt: list[int], decode_steps: int) -> dict[str, Any]:
        """Greedy: timed prefill of `prompt`, then `decode_steps` single-token evals."""
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(prompt)
        prefill = time.perf_counter() - t
        tokens = []
        t = time.perf_counter()
        for _ in range(decode_steps):
            tok = self._last_argmax()
            tokens.append(tok)
            self.llm.eval([tok])
        decode = time.perf_counter() - t
        return {"prefill_tokens_per_s": len(prompt) / prefill, "decode_tokens_per_s": decode_steps / decode, "tokens": tokens}
