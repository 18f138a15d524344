"""The llama.cpp comparison path: our GGUF writer, checked against transformers.

The GGUF layout tests need only `gguf` (in the `test` extra). The llama.cpp test needs
llama-cpp-python (the `bench` extra; it compiles llama.cpp, ~4 minutes on 2 cores): CI installs
it, so under CI a missing or broken install fails the test; elsewhere it skips with the reason.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from conftest import needs
from convllava_export.engines.llama_cpp import permute_for_rope, write_gguf


def small_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=320, rms_norm_eps=1e-5, tie_word_embeddings=False)
    with torch.no_grad():
        model = LlamaForCausalLM(cfg).eval()
        for p in model.parameters():  # larger weights: a clear argmax at every step
            p.mul_(4.0)
    return model


def test_gguf_layout(tmp_path):
    model = small_llama()
    path = write_gguf(model, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9 * 2
    assert tuple(int(d) for d in tensors["blk.0.attn_k.weight"].shape) == (64, 32)  # gguf lists dims innermost first
    q = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    stored = np.asarray(tensors["blk.1.attn_q.weight"].data, dtype=np.float32).reshape(q.shape)
    np.testing.assert_allclose(stored, permute_for_rope(q, 4), atol=2e-3)
    fields = {f.name: f for f in reader.fields.values()}
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == 2 and int(fields["llama.block_count"].parts[-1][0]) == 2


def test_permute_for_rope_pairs_the_rotary_halves():
    w = np.arange(8)[:, None].repeat(3, 1)  # one head of dim 8: rows 0-3 pair with rows 4-7
    assert permute_for_rope(w, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@needs("llama_cpp", "bench")
def test_f16_gguf_greedy_matches_transformers(tmp_path):
    from convllava_export.engines.llama_cpp import LlamaCppTimer

    model = small_llama()
    path = write_gguf(model, tmp_path / "m.gguf")
    prompt = np.random.default_rng(0).integers(260, 320, 24).tolist()
    got = LlamaCppTimer(path, threads=2, n_ctx=128).run(prompt, 12)["tokens"]
    ids, want = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(model(ids).logits[0, -1].argmax())
            want.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert got == want
