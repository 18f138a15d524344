"""Template, multi-image splicing, TensorRT-LLM prompt-table ids, batching, sampling and stops."""

from __future__ import annotations

import numpy as np
import pytest

from convllava_export.errors import PromptError
from convllava_export.model.reference import TorchDecoder
from convllava_export.prompt import (
    IMAGE_TOKEN_INDEX,
    Conversation,
    build_prompt,
    prompt_table_ids,
    splice_embeddings,
    tokenize_with_images,
)
from convllava_export.runtime.scheduler import generate, stream_tokens
from convllava_export.runtime.pipeline import Pipeline, Request
from convllava_export.runtime.sampling import SamplingParams
from convllava_export.synthetic import colour_samples


def test_multi_turn_template():
    conv = Conversation()
    conv.add_user("What colour?", num_images=1)
    conv.add_assistant("Red.")
    conv.add_user("And the shape?")
    conv.add_assistant(None)
    assert conv.render().endswith(" USER: <image>\nWhat colour? ASSISTANT: Red.</s>USER: And the shape? ASSISTANT:")


def test_two_images_splice(reference):
    prompt = build_prompt("Compare them.", num_images=2)
    ids = tokenize_with_images(reference.tokenizer, prompt)
    assert ids.count(IMAGE_TOKEN_INDEX) == 2 and ids[0] == reference.tokenizer.bos_token_id
    a, b = np.full((3, 64), 1.0, np.float32), np.full((5, 64), 2.0, np.float32)
    seq = splice_embeddings(ids, [a, b], reference.embed_tokens)
    assert seq.shape == (len(ids) - 2 + 8, 64)
    first = ids.index(IMAGE_TOKEN_INDEX)
    np.testing.assert_array_equal(seq[first : first + 3], a)
    with pytest.raises(PromptError, match="2 <image> placeholder"):
        splice_embeddings(ids, [a], reference.embed_tokens)


def test_prompt_table_ids_match_splice(reference):
    """TensorRT-LLM fake ids: looking them up in [vocab table; prompt table] equals the splice."""
    ids = tokenize_with_images(reference.tokenizer, build_prompt("Compare them.", num_images=2))
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((4, 64)).astype(np.float32), rng.standard_normal((6, 64)).astype(np.float32)]
    vocab = reference.llm.config.vocab_size
    fake = prompt_table_ids(ids, [4, 6], vocab)
    table = np.concatenate([reference.embed_tokens(np.arange(vocab)), *images])
    np.testing.assert_array_equal(table[np.array(fake)], splice_embeddings(ids, images, reference.embed_tokens))
    assert max(fake) == vocab + 9 and len(fake) == len(ids) - 2 + 10


def test_batch_of_different_lengths_equals_single(tiny_reference):
    pipe = Pipeline.from_reference(tiny_reference)
    samples = colour_samples(3, seed=7)
    reqs = [
        Request("What is shown in this image?", [samples[0].image]),
        Request("Describe the picture. What is shown in this image?", [samples[1].image]),
        Request("What is shown in this image?", [samples[2].image, samples[0].image]),
    ]
    batch = pipe.generate_batch(reqs, max_new_tokens=20)
    for req, got in zip(reqs, batch):
        single = pipe.generate_batch([req], max_new_tokens=20)[0]
        assert got.token_ids == single.token_ids
        assert got.text == single.text
    assert batch[0].text == samples[0].answer


def test_tiny_model_answers_correctly(tiny_reference):
    pipe = Pipeline.from_reference(tiny_reference)
    samples = colour_samples(12, seed=99)
    correct = sum(pipe.generate(s.image, s.question, max_new_tokens=24).text == s.answer for s in samples)
    assert correct >= 11


def test_sampling_is_seeded_and_varies(tiny_reference):
    pipe = Pipeline.from_reference(tiny_reference)
    img = colour_samples(1, seed=3)[0].image
    kw = dict(max_new_tokens=12, temperature=5.0, top_p=0.99)
    a = pipe.generate(img, "What is shown in this image?", seed=1, **kw).token_ids
    b = pipe.generate(img, "What is shown in this image?", seed=1, **kw).token_ids
    c = pipe.generate(img, "What is shown in this image?", seed=2, **kw).token_ids
    assert a == b and a != c


def test_top_p_tiny_is_greedy(tiny_reference):
    pipe = Pipeline.from_reference(tiny_reference)
    img = colour_samples(1, seed=3)[0].image
    greedy = pipe.generate(img, "What is shown in this image?", max_new_tokens=12).token_ids
    nucleus = pipe.generate(img, "What is shown in this image?", max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=5).token_ids
    assert greedy == nucleus


def test_stop_strings_and_streaming(tiny_reference):
    pipe = Pipeline.from_reference(tiny_reference)
    s = colour_samples(1, seed=11)[0]
    full = pipe.generate(s.image, s.question, max_new_tokens=24).text
    res = pipe.generate(s.image, s.question, max_new_tokens=24, stop=(". It",))
    assert res.text == full.split(". It")[0] and res.finish_reason == "stop"
    events = list(pipe.stream(Request(s.question, [s.image]), SamplingParams(max_new_tokens=24)))
    assert "".join(e.text for e in events) == full
    assert events[-1].finish_reason == "stop" and sum(bool(e.text) for e in events) > 3
    res = pipe.generate(s.image, s.question, max_new_tokens=3)
    assert res.finish_reason == "length" and len(res.token_ids) == 3
    t = res.timings
    assert t.preprocess_s > 0 and t.vision_s > 0 and t.prefill_s > 0 and t.decode_tokens == 2


def test_sampling_params_validated(tiny_reference):
    dec = TorchDecoder(tiny_reference)
    with pytest.raises(ValueError, match="top_p"):
        list(stream_tokens(dec, tiny_reference.tokenizer, [np.zeros((2, 64), np.float32)], SamplingParams(top_p=0)))
    assert generate(dec, tiny_reference.tokenizer, [np.zeros((2, 64), np.float32)], SamplingParams(max_new_tokens=2))
