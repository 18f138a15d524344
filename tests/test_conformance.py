"""Every tensor recorded from the official implementation, reproduced by the torch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convllava_export.model.reference import TorchDecoder
from convllava_export.preprocess import PreprocessConfig, load_image, preprocess
from convllava_export.prompt import build_prompt, splice_embeddings, tokenize_with_images
from convllava_export.runtime.scheduler import generate
from convllava_export.runtime.sampling import SamplingParams

IMAGES = ["small_100x60.png", "square_256x256.png", "tall_160x448.png", "wide_512x192.png"]


def golden(conformance, manifest, name):
    return np.load(conformance / "golden" / manifest["images"][name]["npz"])


def tol(manifest, key):
    return manifest["suggested_tolerances"]["float32_reimplementation"][key]


def test_prompt_ids(reference, manifest):
    prompt = build_prompt(manifest["prompt"]["question"])
    assert prompt == manifest["prompt"]["prompt_string"]
    assert tokenize_with_images(reference.tokenizer, prompt) == manifest["prompt"]["input_ids"]


@pytest.mark.parametrize("name", IMAGES)
def test_pixels_features_embeds(reference, conformance, manifest, name):
    g = golden(conformance, manifest, name)
    cfg = PreprocessConfig.from_preprocessor_config(reference.info.preprocessor_config)
    px = preprocess(load_image(conformance / "images" / name), cfg)[None]
    np.testing.assert_allclose(px, g["pixel_values"], atol=tol(manifest, "pixel_values")["atol"], rtol=0)
    t = tol(manifest, "vision_features")
    with torch.no_grad():
        feats = reference.vision.features(torch.from_numpy(px)).numpy()
        np.testing.assert_allclose(feats, g["vision_features"], atol=t["atol"], rtol=t["rtol"])
        if "tower_hidden_state_0" in g.files:
            for k, state in enumerate(reference.vision.tower(torch.from_numpy(px), return_stages=True)):
                np.testing.assert_allclose(state.numpy(), g[f"tower_hidden_state_{k}"], atol=t["atol"], rtol=t["rtol"])
    t = tol(manifest, "projected_features/inputs_embeds")
    embeds = reference.encode_images(px)
    np.testing.assert_allclose(embeds, g["projected_features"], atol=t["atol"], rtol=t["rtol"])
    seq = splice_embeddings(g["input_ids"][0].tolist(), [embeds[0]], reference.embed_tokens)
    np.testing.assert_allclose(seq, g["inputs_embeds"][0], atol=t["atol"], rtol=t["rtol"])


@pytest.mark.parametrize("name", IMAGES)
def test_logits_and_greedy_tokens(reference, conformance, manifest, name):
    g = golden(conformance, manifest, name)
    t = tol(manifest, "logits")
    dec = TorchDecoder(reference)
    seq = g["inputs_embeds"][0]
    # teacher-forced step logits with the KV cache, against the recorded greedy steps
    first, kv = dec.extend(seq)
    logits = [first]
    np.testing.assert_allclose(logits[0], g["first_forward_last_logits"], atol=t["atol"], rtol=t["rtol"])
    for tok in g["gen_ids_16"][:-1]:
        step, kv = dec.extend(dec.embed(np.array([tok])), kv)
        logits.append(step)
    np.testing.assert_allclose(np.stack(logits), g["gen_step_logits_16"], atol=t["atol"], rtol=t["rtol"])
    # free-running greedy decode
    for key, n in (("gen_ids_16", 16), ("gen_ids_until_eos", 64)):
        res = generate(dec, reference.tokenizer, [seq], SamplingParams(max_new_tokens=n))[0]
        assert res.token_ids == g[key].tolist()
        assert res.text == manifest["images"][name]["gen_text_16" if n == 16 else "gen_text_until_eos"]
    assert res.finish_reason == "stop"
