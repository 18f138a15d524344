"""ConvLLaVA for TensorRT-LLM's PyTorch backend: our ConvNeXt† and projector (the reference's
modules), TensorRT-LLM's own LlamaForCausalLM for the language model.

Imported inside TensorRT-LLM only (the package `convllava_export.plugins.trtllm`). Every decision
is a plain function of `plugins/trtllm_core.py`, tested on CPU; the classes here only wire those
into TensorRT-LLM's interfaces, written against TensorRT-LLM 1.2.x / 1.3.x (sources read in
docs/tensorrt-llm.md). NOT yet run on a GPU.

- The input processor preprocesses with our `preprocess` (pad or native, per folder or per request
  `mm_processor_kwargs={"mode": ...}`), gives each image (H/64)·(W/64) placeholders with id
  `image_token_id` (the first id past the tokenizer's: 32000 for Vicuna, out of vocabulary) and re-tokenizes the prompt the
  official way; precomputed embeddings (`multi_modal_embeddings={"image": [Tensor[tokens, hidden]]}`)
  skip the tower.
- The model encodes the pixels, and TensorRT-LLM's `fuse_input_embeds` puts the rows at the
  placeholder positions before its Llama runs.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import tensorrt_llm
import torch
from transformers import AutoTokenizer, ConvNextConfig, LlavaConfig, PreTrainedModel

from convllava_export.plugins.trtllm_core import check_version

check_version(tensorrt_llm.__version__)  # before any of TensorRT-LLM's internals are imported

from tensorrt_llm._torch.models.modeling_auto import AutoModelForCausalLM
from tensorrt_llm._torch.models.modeling_llama import LlamaForCausalLM  # noqa: F401  (registers "LlamaForCausalLM": the model zoo is lazy in 1.3)
from tensorrt_llm._torch.models.modeling_multimodal_utils import fuse_input_embeds
from tensorrt_llm._torch.models.modeling_utils import register_auto_model
from tensorrt_llm.inputs import (
    BaseMultimodalInputProcessor,
    MultimodalPlaceholderMetadata,
    MultimodalPlaceholderPlacement,
    register_input_processor,
)

try:  # 1.2 / 1.3: the encoder cache and the slicing for KV reuse / chunked prefill
    from tensorrt_llm._torch.models.modeling_multimodal_utils import (
        find_input_mm_embeds,
        get_multimodal_embeddings,
    )
except ImportError:  # pragma: no cover - older layouts: the tower runs on every context step
    find_input_mm_embeds = get_multimodal_embeddings = None
try:  # 1.3: a processor without it in its MRO fails (PR #16696); 1.2 names it BaseDummyInputsBuilder
    from tensorrt_llm.inputs import BaseMultimodalDummyInputsBuilder as _DummyBuilder
except ImportError:
    try:
        from tensorrt_llm.inputs import BaseDummyInputsBuilder as _DummyBuilder
    except ImportError:
        _DummyBuilder = None

from convllava_export.model.vision import (
    ConvNextFeatures,
    build_projector,
    flatten_features,
)
from convllava_export.plugins.common import (
    ARCHITECTURE,
    FolderError,
    FolderSpec,
    image_tokens,
)
from convllava_export.plugins.trtllm_core import (
    MODEL_TYPE,
    embeddings_request,
    pack_pixels,
    process_request,
    split_weights,
    to_pil,
    unpack_pixels,
)
from convllava_export.prompt import IMAGE_TOKEN


def _dtype(config: Any) -> torch.dtype:
    """The folder's dtype (config.json `torch_dtype`; the text config's is often unset)."""
    for c in (config.text_config, config):
        d = getattr(c, "torch_dtype", None) or getattr(c, "dtype", None)
        if isinstance(d, str):
            d = getattr(torch, d)
        if isinstance(d, torch.dtype):
            return d
    return torch.float16


_BASES = tuple(b for b in (BaseMultimodalInputProcessor, _DummyBuilder) if b is not None)


class ConvLlavaInputProcessor(*_BASES):
    """`(prompt_token_ids, {"multimodal_data": {"image": {pixel_values, image_sizes}}})` per request.

    Works with both shapes of TensorRT-LLM's base: the 1.2 mixin (no __init__, reads
    `self.model_config`) and the 1.3 ABC (abstract `config` / `tokenizer` / `processor` / `dtype`).
    """

    def __init__(self, model_path: str, config: Any = None, tokenizer: Any = None, trust_remote_code: bool = True, **kwargs: Any) -> None:
        config = config if config is not None else kwargs.pop("model_config", None)  # 1.2 names it model_config
        try:
            super().__init__(model_path=model_path, config=config, tokenizer=tokenizer, trust_remote_code=trust_remote_code, **kwargs)
        except TypeError:  # 1.2: object's __init__
            pass
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._model_path, self._config, self._tokenizer = model_path, config, tokenizer
        self._dtype = _dtype(config)
        self._spec = FolderSpec.from_config(config)
        self._hidden = int(config.text_config.hidden_size)
        self.__dict__["model_config"] = config  # 1.2's helpers (get_vocab_size) read it; not a property anywhere

    # the 1.3 ABC's abstract properties
    @property
    def config(self) -> Any:
        return self._config

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def processor(self) -> Any:
        return None  # no Hugging Face processor: our preprocessing

    @property
    def model_path(self) -> str:
        return self._model_path

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def get_vocab_size(self) -> int:
        return int(self._config.text_config.vocab_size)

    def get_mm_token_ids(self) -> torch.Tensor:
        return torch.tensor([self._spec.image_token_id], dtype=torch.int32)

    def get_num_tokens_per_image(self, *, image: Any, **kwargs: Any) -> int:
        """What multimodal hashing asks: the placeholders `__call__` gives this image."""
        img = to_pil(image)
        return image_tokens(img.width, img.height, self._spec.with_overrides(kwargs), self._spec.max_image_tokens)

    def get_preferred_media_io_kwargs(self) -> dict[str, dict[str, Any]]:
        return {"image": {"format": "pil"}}  # our preprocessing reads PIL images; tensors are converted back exactly

    @staticmethod
    def _prompt(inputs: Any) -> Any:
        prompt = inputs.get("prompt")
        if prompt is None:
            prompt = inputs.get("prompt_token_ids")
        if prompt is None:
            raise FolderError("a request needs a prompt or prompt_token_ids")
        return prompt

    @torch.inference_mode()
    def __call__(self, inputs: Any, sampling_params: Any) -> tuple[list[int], dict[str, Any] | None]:
        images = (inputs.get("multi_modal_data") or {}).get("image")
        req = process_request(self._tokenizer, self._spec, self._prompt(inputs), images, inputs.get("mm_processor_kwargs"))
        if not req.pixels:
            return req.ids, {}
        return req.ids, {"multimodal_data": {"image": pack_pixels(req.pixels)}}

    def attach_multimodal_embeddings(self, inputs: Any, multimodal_embedding: dict[str, Any], sampling_params: Any) -> tuple[list[int], dict[str, Any] | None]:
        if not isinstance(multimodal_embedding, dict) or "image" not in multimodal_embedding:
            raise FolderError("ConvLLaVA takes image embeddings only: {'image': [Tensor[tokens, hidden], ...]}")
        ids, rows = embeddings_request(self._tokenizer, self._spec, self._hidden, self._prompt(inputs), multimodal_embedding["image"])
        return ids, {"multimodal_data": {"multimodal_embedding": torch.cat(rows).to(self._dtype)}}


_FUSE_PARAMS = inspect.signature(fuse_input_embeds).parameters
_FUSE_VARKW = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _FUSE_PARAMS.values())


@register_auto_model(ARCHITECTURE)
@register_input_processor(
    ConvLlavaInputProcessor,
    model_type=MODEL_TYPE,
    placeholder_metadata=MultimodalPlaceholderMetadata(
        placeholder_map={"image": IMAGE_TOKEN},
        placeholder_placement=MultimodalPlaceholderPlacement.BEFORE_TEXT,  # LLaVA: "<image>\n" + question
        placeholders_separator="\n",
    ),
)
class ConvLlavaForConditionalGeneration(PreTrainedModel):
    config_class = LlavaConfig

    def __init__(self, model_config: Any, *args: Any, **kwargs: Any) -> None:
        config = model_config.pretrained_config
        super().__init__(config)
        if hasattr(self, "llm"):
            return
        self.spec = FolderSpec.from_config(config)
        self.model_dtype = _dtype(config)
        text = copy.deepcopy(config.text_config)
        text.torch_dtype = self.model_dtype
        self.vision_tower = ConvNextFeatures(ConvNextConfig(**config.vision_config.to_dict())).to(self.model_dtype)
        self.multi_modal_projector = build_projector(self.spec.projector, config.vision_config.hidden_sizes[-1], text.hidden_size).to(self.model_dtype)
        llm_config = copy.deepcopy(model_config)
        llm_config.pretrained_config = text  # settable on a frozen ModelConfig
        self.llm = AutoModelForCausalLM.from_config(llm_config)
        self.model_config = model_config
        self._mm_token_ids = torch.tensor([self.spec.image_token_id], dtype=torch.int32)
        self.post_config()
        self.is_loaded = True

    def post_config(self) -> None:
        """The engine sizes the KV cache and logits from the text config."""
        self.config = self.llm.config
        self.model_config.pretrained_config = self.llm.config

    def infer_max_seq_len(self) -> int:
        return self.llm.infer_max_seq_len()

    def load_weights(self, weights: Any) -> None:
        """Released names: the tower and projector into our modules (every weight, no extra), the
        LLM's under their Hugging Face names to TensorRT-LLM's Llama loader."""
        split = split_weights(weights)
        for module, part, what in ((self.vision_tower, split.vision, "vision tower"), (self.multi_modal_projector, split.projector, "projector")):
            missing, unexpected = module.load_state_dict(dict(part), strict=False)
            if missing or unexpected:
                raise FolderError(f"the folder's {what} weights do not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        self.vision_tower.to(self.model_dtype)
        self.multi_modal_projector.to(self.model_dtype)
        self.llm.load_weights(split.llm)

    def _encode_one(self, pixels: torch.Tensor) -> torch.Tensor:
        p = next(self.multi_modal_projector.parameters())
        return self.multi_modal_projector(flatten_features(self.vision_tower(pixels[None].to(p.device, p.dtype))))[0]

    @torch.inference_mode()
    def encode(self, multimodal_params: list[Any]) -> list[torch.Tensor]:
        """Every image of these requests, in order, as one [tokens, hidden] tensor (the encoder
        contract of the in-tree LLaVA-NeXT); one image at a time, since native images differ in size."""
        rows = []
        for param in multimodal_params:
            data = param.multimodal_data
            if data.get("multimodal_embedding") is not None:  # precomputed (attach_multimodal_embeddings)
                rows.append(data["multimodal_embedding"])
                continue
            image = data["image"]
            rows += [self._encode_one(px) for px in unpack_pixels(image["pixel_values"], image["image_sizes"])]
        return [torch.cat(rows)] if rows else []

    @torch.inference_mode()
    def forward(self, attn_metadata: Any, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, return_context_logits: bool = False, **kwargs: Any) -> torch.Tensor:
        params = (kwargs.get("multimodal_params") or [])[: attn_metadata.num_contexts]
        mm_embeds: list[torch.Tensor] = []
        if params:
            if get_multimodal_embeddings is not None:
                mm_embeds = get_multimodal_embeddings(encoder_forward_fn=self.encode, multimodal_params=params)
                mm_embeds = find_input_mm_embeds(mm_embeds, params)
            else:
                mm_embeds = self.encode(params)
        fuse_kw = {k: v for k, v in kwargs.items() if _FUSE_VARKW or k in _FUSE_PARAMS}
        if "mm_token_ids" in _FUSE_PARAMS:  # the placeholder id, not "every id past the embedding table" (which TP may pad)
            fuse_kw["mm_token_ids"] = self._mm_token_ids.to(input_ids.device if input_ids is not None else "cuda")
        input_ids, inputs_embeds = fuse_input_embeds(self.llm.model.embed_tokens, input_ids, mm_embeds, **fuse_kw)
        return self.llm.forward(attn_metadata, input_ids, position_ids, inputs_embeds, return_context_logits=return_context_logits)
