"""vLLM with our plugin reproduces the official model (issue 22). Runs in vLLM's venv: `.ci/vllm`."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import CHECKPOINT, FIXTURES

MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
IMAGES = sorted(MANIFEST["images"])
QUESTION = MANIFEST["prompt"]["question"]
PROMPT = MANIFEST["prompt"]["prompt_string"]
IMAGE_ID = 1000  # the tiny vocabulary's size: the folder's placeholder id


def image(name: str) -> Image.Image:
    return Image.open(FIXTURES / "images" / name).convert("RGB")


def golden(name: str) -> list[int]:
    return np.load(FIXTURES / "golden" / MANIFEST["images"][name]["npz"])["gen_ids_16"].tolist()


def official_prompt(tokens: int) -> list[int]:
    out: list[int] = []
    for t in MANIFEST["prompt"]["input_ids"]:
        out.extend([IMAGE_ID] * tokens if t == -200 else [t])
    return out


def greedy(max_tokens: int = 16):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens)


def test_offline_generate_equals_the_official_recordings(pad_llm):
    """Every conformance image, one after another with prefix caching on: the prompt ids are the
    official ones (16 placeholders for the image), and the greedy ids equal the recordings. The
    prompts share all text, so an image hash that prefix caching ignored would repeat one answer.
    vLLM runs the checkpoint's dtype (bf16), not a cast of its choosing."""
    assert pad_llm.llm_engine.model_config.dtype == torch.bfloat16
    for name in IMAGES:
        out = pad_llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": image(name)}}, greedy(), use_tqdm=False)[0]
        assert list(out.prompt_token_ids) == official_prompt(16), name
        assert list(out.outputs[0].token_ids) == golden(name), name


def test_image_embeds_skip_the_tower(pad_llm):
    """Precomputed embeddings (here: our torch reference's projector output, as our TensorRT vision
    engine would give them) answer as the pixels do."""
    from convllava_export.model.reference import ReferenceModel
    from convllava_export.preprocess import PreprocessConfig, preprocess

    ref = ReferenceModel.load(CHECKPOINT, dtype="fp32", load_llm=False)
    cfg = PreprocessConfig.from_preprocessor_config(ref.info.preprocessor_config)
    for name in IMAGES[:2]:
        embeds = torch.from_numpy(ref.encode_images(preprocess(image(name), cfg)[None]))  # [1 image, 16, 64]
        out = pad_llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": embeds}}, greedy(), use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == golden(name), name


def test_embeds_past_the_bound_are_refused(pad_llm):
    with pytest.raises(ValueError, match="at most 16|1 to 16"):
        pad_llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": torch.zeros(1, 17, 64)}}, greedy(), use_tqdm=False)


@pytest.fixture(scope="module")
def native(native_folder):
    """vLLM (fp32) and our torch reference pipeline, both in native mode with the folder's bound."""
    from transformers import AutoTokenizer
    from vllm import LLM

    from convllava_export.model.reference import ReferenceModel, TorchDecoder, TorchVision
    from convllava_export.preprocess import PreprocessConfig
    from convllava_export.runtime.pipeline import Pipeline

    ref = ReferenceModel.load(CHECKPOINT, dtype="fp32")
    cfg = PreprocessConfig.from_preprocessor_config(ref.info.preprocessor_config, mode="native", max_tokens=64)
    # the folder's tokenizer: this venv's transformers (< 5.20) converts the checkpoint's own wrongly
    pipe = Pipeline(TorchVision(ref), TorchDecoder(ref), AutoTokenizer.from_pretrained(native_folder), cfg)
    llm = LLM(model=str(native_folder), enforce_eager=True, max_model_len=512, dtype="float32")
    return llm, pipe


def test_native_mode_matches_the_torch_reference(native):
    """Mixed aspect ratios, each at its own (H/64)x(W/64) grid: vLLM's greedy ids equal our
    reference pipeline's in native mode (the official code has no native mode to record)."""
    llm, pipe = native
    lengths = set()
    for name in IMAGES:
        want = pipe.generate(image(name), QUESTION, max_new_tokens=16).token_ids
        out = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": image(name)}}, greedy(), use_tqdm=False)[0]
        lengths.add(len(out.prompt_token_ids))
        assert list(out.outputs[0].token_ids) == want, name
    assert len(lengths) > 1, "native mode gave every image the same token count"


def test_several_images_of_different_sizes_in_one_prompt(native):
    llm, pipe = native
    names = ["wide_512x192.png", "tall_160x448.png", "small_100x60.png"]
    want = pipe.generate([image(n) for n in names], QUESTION, max_new_tokens=16).token_ids
    prompt = PROMPT.replace("<image>\n", "<image>\n" * len(names))
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": [image(n) for n in names]}}, greedy(), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == want


def _data_url(name: str) -> str:
    buf = io.BytesIO()
    image(name).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(client, name: str, **extra):
    return client.chat.completions.create(
        model=client.models.list().data[0].id, temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(name)}}, {"type": "text", "text": QUESTION}]}],
        extra_body={"return_token_ids": True, **extra},
    )


def test_openai_server_image_url_equals_the_official_recordings(server):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="none")
    for name in IMAGES:
        reply = _ask(client, name)
        assert reply.prompt_token_ids == official_prompt(16), name
        assert reply.choices[0].token_ids == golden(name), name


def test_openai_server_refuses_embeddings_past_the_bound_and_keeps_serving(server):
    """17 image tokens on a folder whose bound is 16: vLLM's 400 with our reason, then the next
    request is answered as before."""
    from openai import BadRequestError, OpenAI

    buf = io.BytesIO()
    np.save(buf, np.zeros((17, 64), dtype=np.float32))
    client = OpenAI(base_url=server + "/v1", api_key="none")
    with pytest.raises(BadRequestError, match="1 to 16"):
        client.chat.completions.create(
            model=client.models.list().data[0].id, max_tokens=4,
            messages=[{"role": "user", "content": [{"type": "image_embeds", "image_embeds": base64.b64encode(buf.getvalue()).decode()},
                                                   {"type": "text", "text": QUESTION}]}],
        )
    assert _ask(client, "square_256x256.png").choices[0].token_ids == golden("square_256x256.png")
