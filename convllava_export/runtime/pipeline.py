"""Pipeline: images + prompt → preprocess → vision backend → splice → decoder, with timings.

Backends are anything with `encode(pixel_values) -> image_embeds` (vision: torch, ONNX Runtime,
TensorRT) and, for the LLM, the generation loop's `Decoder` protocol (torch, ONNX Runtime: the
prompt is spliced into embeddings here) or its `Generator` protocol (TensorRT-LLM: the prompt
goes in as ids plus the images' rows as a prompt table). engines/registry.py opens them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..errors import ConvLlavaError
from ..preprocess import PreprocessConfig, load_image, preprocess, visual_tokens
from ..prompt import IMAGE_TOKEN, Conversation, build_prompt, check_image_count, splice_embeddings, tokenize_with_images
from .generation import Decoder, GenerationResult, Generator, TablePrompt, Timings, TokenEvent
from .scheduler import generate, stream_events
from .sampling import SamplingParams

ImageInput = str | bytes | Image.Image | np.ndarray  # ndarray: preprocessed pixel values [3, H, W]


class VisionBackend(Protocol):
    def encode(self, pixel_values: np.ndarray) -> np.ndarray: ...


@dataclass
class Request:
    """One prompt with its images; `prompt` may hold `<image>` placeholders, else images lead."""

    prompt: str | Conversation
    images: Sequence[ImageInput] = ()


def max_piece_chars(tokenizer: Any) -> int:
    """The longest vocabulary piece in characters: a prompt of N characters has at least N/this tokens."""
    try:
        return max(1, max(len(p) for p in tokenizer.get_vocab()))
    except (AttributeError, TypeError, ValueError):
        return 64


class Pipeline:
    def __init__(
        self, vision: VisionBackend, decoder: Decoder | Generator, tokenizer: Any, preprocess_cfg: PreprocessConfig, info: dict | None = None
    ) -> None:
        self.vision = vision
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.preprocess_cfg = preprocess_cfg
        self.info = info or {}
        self.max_context: int | None = None
        self.piece_chars = max_piece_chars(tokenizer) if tokenizer is not None else 64

    @classmethod
    def from_reference(cls, model: Any, preprocess_cfg: PreprocessConfig | None = None) -> Pipeline:
        from ..model.reference import TorchDecoder, TorchVision  # torch only when asked for

        cfg = preprocess_cfg or PreprocessConfig.from_preprocessor_config(model.info.preprocessor_config)
        return cls(TorchVision(model), TorchDecoder(model), model.tokenizer, cfg, {"backend": "torch"})

    # -- preparing inputs -----------------------------------------------------------------
    def vision_batch(self) -> int | None:
        """Images per vision-engine run: the engine profile's max batch, when the build says."""
        return self.info.get("max_images")

    def pixel_values(self, images: Sequence[ImageInput]) -> list[np.ndarray]:
        """Each image decoded and preprocessed in turn, so one full-size decoded image is in
        memory at a time. An ndarray is taken as already-preprocessed pixel values [3, H, W]."""
        return [im if isinstance(im, np.ndarray) else preprocess(load_image(im), self.preprocess_cfg) for im in images]

    def encode_pixels(self, pixels: Sequence[np.ndarray], timings: Timings) -> list[np.ndarray]:
        """Images of equal shape go through the vision engine together, at most the engine
        profile's batch at a time."""
        t0 = time.perf_counter()
        out: list[np.ndarray | None] = [None] * len(pixels)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(pixels):
            by_shape.setdefault(p.shape, []).append(i)
        step = self.vision_batch() or len(pixels)
        for same in by_shape.values():
            for k in range(0, len(same), step):
                idx = same[k : k + step]
                embeds = self.vision.encode(np.stack([pixels[i] for i in idx]))
                for j, i in enumerate(idx):
                    out[i] = embeds[j] if len(idx) == 1 else embeds[j].copy()  # own memory: caches keep one image, not the batch
        timings.vision_s += time.perf_counter() - t0
        return [o for o in out if o is not None]

    def prompt_text(self, request: Request) -> str:
        if isinstance(request.prompt, Conversation):
            return request.prompt.render()
        if IMAGE_TOKEN in request.prompt and request.prompt.rstrip().endswith("ASSISTANT:"):
            return request.prompt  # already templated
        return build_prompt(request.prompt, num_images=len(request.images))

    def _context_error(self, what: str, visual: int) -> ConvLlavaError:
        return ConvLlavaError(
            f"the prompt is {what} ({visual} visual), above the model's context of {self.max_context} tokens; "
            "shorten the text or use fewer or smaller images (native mode: lower --max-tokens)"
        )

    def plan(self, request: Request, image_rows: Sequence[int]) -> list[int]:
        """Token ids of the prompt (-200 at each image), refused before anything costly when it
        cannot fit: by its length in characters before tokenizing (a prompt of N characters has
        at least N / longest-piece tokens), then by text + visual tokens (`image_rows`: each
        image's visual tokens) before any image is encoded or any embedding is looked up."""
        text = self.prompt_text(request)
        if self.max_context is not None and len(text) > 2 * self.max_context * self.piece_chars:
            raise self._context_error(f"{len(text)} characters, far", 0)
        ids = tokenize_with_images(self.tokenizer, text)
        check_image_count(ids, len(image_rows))
        total = len(ids) - len(image_rows) + sum(image_rows)
        if self.max_context is not None and total > self.max_context:
            raise self._context_error(f"{total} tokens", sum(image_rows))
        return ids

    def prepare(self, request: Request, timings: Timings, image_embeds: Sequence[np.ndarray] | None = None) -> np.ndarray | TablePrompt:
        """The spliced embedding sequence [S, hidden] for one request (a TablePrompt for a
        Generator backend, which splices inside its engine).

        `image_embeds` skips the vision engine (encoded elsewhere, e.g. by a Ray vision replica);
        `request.images` then only counts the images for the prompt template.
        """
        if image_embeds is not None:
            ids = self.plan(request, [len(e) for e in image_embeds])
            return self.splice(ids, list(image_embeds))
        t0 = time.perf_counter()
        pixels = self.pixel_values(request.images)
        timings.preprocess_s += time.perf_counter() - t0
        ids = self.plan(request, [visual_tokens(p.shape[1], p.shape[2]) for p in pixels])
        return self.splice(ids, self.encode_pixels(pixels, timings))

    def splice(self, ids: list[int], embeds: list[np.ndarray]) -> np.ndarray | TablePrompt:
        """Image embeddings into the prompt: here for a Decoder, in its engine for a Generator."""
        if self.decoder.runs_own_loop:
            return TablePrompt(ids, embeds)
        return splice_embeddings(ids, embeds, self.decoder.embed)

    # -- generation -----------------------------------------------------------------------
    def stream(
        self,
        requests: Sequence[Request] | Request,
        params: SamplingParams | None = None,
        image_embeds: Sequence[Sequence[np.ndarray]] | None = None,
        timings: Sequence[Timings] | None = None,
        **sampling: Any,
    ) -> Iterator[TokenEvent]:
        reqs = [requests] if isinstance(requests, Request) else list(requests)
        params = params or SamplingParams(**sampling)
        timings = list(timings) if timings is not None else [Timings() for _ in reqs]
        embeds = image_embeds if image_embeds is not None else [None] * len(reqs)
        seqs = [self.prepare(r, t, e) for r, t, e in zip(reqs, timings, embeds)]
        yield from stream_events(self.decoder, self.tokenizer, seqs, params, timings, self.max_context)

    def generate(
        self, images: Sequence[ImageInput] | ImageInput = (), prompt: str | Conversation = "", params: SamplingParams | None = None, **sampling: Any
    ) -> GenerationResult:
        if isinstance(images, (str, bytes, Image.Image)):
            images = [images]
        return self.generate_batch([Request(prompt, list(images))], params, **sampling)[0]

    def generate_batch(self, requests: Sequence[Request], params: SamplingParams | None = None, **sampling: Any) -> list[GenerationResult]:
        params = params or SamplingParams(**sampling)
        timings = [Timings() for _ in requests]
        seqs = [self.prepare(r, t) for r, t in zip(requests, timings)]
        return generate(self.decoder, self.tokenizer, seqs, params, timings, self.max_context)
