"""ConvLLaVA as a vLLM model: our ConvNeXt† and projector (the reference's modules), vLLM's Llama.

Imported by vLLM only (the plugin registers this path). The processor preprocesses with our
`preprocess` (pad or native, per folder or per request `mm_processor_kwargs={"mode": ...}`), gives
(H/64)·(W/64) placeholders per image and re-tokenizes the prompt the official way, so greedy
tokens equal the reference's. Precomputed `image_embeds` ([tokens, hidden] per image, e.g. from
our TensorRT vision engine) skip the tower.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import BatchFeature, ConvNextConfig
from vllm.config import VllmConfig
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo, PromptReplacement, PromptUpdate
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model, maybe_prefix

from ..model.vision import ConvNextFeatures, build_projector, flatten_features
from ..preprocess import PreprocessConfig, preprocess
from ..prompt import IMAGE_TOKEN
from .common import FolderSpec, check_embeds, image_tokens, largest_image, module_name, official_prompt_ids


def _mode_kwargs(kwargs: Mapping[str, object]) -> Mapping[str, object]:
    scoped = kwargs.get("images_kwargs")
    return {**(scoped if isinstance(scoped, Mapping) else {}), **kwargs}


class ConvLlavaProcessingInfo(BaseProcessingInfo):
    def spec(self) -> FolderSpec:
        return FolderSpec.from_config(self.get_hf_config())

    def preprocessing(self, kwargs: Mapping[str, object]) -> PreprocessConfig:
        return self.spec().with_overrides(_mode_kwargs(kwargs))

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": self.spec().max_images}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}  # no Hugging Face processor: `mode` stays a flat kwarg

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.spec().max_image_tokens}

    def num_image_tokens(self, width: int, height: int, kwargs: Mapping[str, object]) -> int:
        return image_tokens(width, height, self.preprocessing(kwargs), self.spec().max_image_tokens)


class ConvLlavaDummyInputs(BaseDummyInputsBuilder[ConvLlavaProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_TOKEN * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        spec = self.info.spec()
        width, height = largest_image(spec.preprocess, spec.max_image_tokens)
        overrides = mm_options.get("image") if mm_options else None
        return {"image": self._get_dummy_images(width=width, height=height, num_images=mm_counts.get("image", 0), overrides=overrides)}


class ConvLlavaProcessor(BaseMultiModalProcessor[ConvLlavaProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        cfg = self.info.preprocessing(hf_kwargs)
        images = hf_data.get("images") or []
        pixels = [torch.from_numpy(preprocess(img.convert("RGB"), cfg)) for img in images]
        return BatchFeature({"pixel_values": pixels})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image"), "image_embeds": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        spec = self.info.spec()
        hidden = self.info.get_hf_config().text_config.hidden_size

        def replacement(i: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                check_embeds(tuple(images.get(i).shape), hidden, spec.max_image_tokens)
                n = images.get_feature_size(i)
            else:
                size = images.get_image_size(i)
                n = self.info.num_image_tokens(size.width, size.height, hf_processor_mm_kwargs)
            return [spec.image_token_id] * n

        return [PromptReplacement(modality="image", target=[spec.image_token_id], replacement=replacement)]

    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        return official_prompt_ids(self.info.get_tokenizer(), prompt, self.info.spec().image_token_id)


@MULTIMODAL_REGISTRY.register_processor(ConvLlavaProcessor, info=ConvLlavaProcessingInfo, dummy_inputs=ConvLlavaDummyInputs)
class ConvLlavaForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TOKEN
        raise ValueError("ConvLLaVA takes images only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.spec = FolderSpec.from_config(config)
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size, mm_token_ids=[self.spec.image_token_id])
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = ConvNextFeatures(ConvNextConfig(**config.vision_config.to_dict()))
            self.multi_modal_projector = build_projector(self.spec.projector, config.vision_config.hidden_sizes[-1], config.text_config.hidden_size)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.text_config, prefix=maybe_prefix(prefix, "language_model")
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.multi_modal_projector.parameters()).dtype
        return self.multi_modal_projector(flatten_features(self.vision_tower(pixel_values[None].to(dtype))))[0]

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values, embeds = kwargs.get("pixel_values"), kwargs.get("image_embeds")
        if embeds is not None:
            hidden = self.config.text_config.hidden_size
            out = list(embeds)
            for e in out:
                check_embeds(tuple(e.shape), hidden, self.spec.max_image_tokens)
            return out
        if pixel_values is None:
            return []
        return [self._encode(p) for p in pixel_values]  # one at a time: native images differ in size

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None, inputs_embeds: torch.Tensor | None = None, **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Released names (`model.layers…`, `model.mm_projector…`, `model.vision_tower.vision_tower…`)."""
        return AutoWeightsLoader(self).load_weights((module_name(k), v) for k, v in weights)
