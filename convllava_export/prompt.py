"""The vicuna_v1 conversation template, `<image>` tokenization and embedding splicing.

Plain code shared by every backend: the torch reference, ONNX Runtime and TensorRT-LLM
(whose prompt-table ids are derived here too) all splice images the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import PromptError

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200
SYSTEM_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES = ("vicuna_v1",)


@dataclass
class Conversation:
    """vicuna_v1 (`conv_vicuna_v1`): sep " ", sep2 "</s>", roles USER / ASSISTANT."""

    system: str = SYSTEM_V1
    messages: list[tuple[str, str | None]] = field(default_factory=list)
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    seps: tuple[str, str] = (" ", "</s>")

    def add_user(self, text: str, num_images: int = 0) -> None:
        """Images go first, each on its own line, as LLaVA places them (`<image>\\n` + question)."""
        self.messages.append((self.roles[0], (IMAGE_TOKEN + "\n") * num_images + text))

    def add_assistant(self, text: str | None) -> None:
        self.messages.append((self.roles[1], text))

    def render(self) -> str:
        """The prompt string; ends with 'ASSISTANT:' when the last turn awaits an answer."""
        out = self.system + self.seps[0]
        for i, (role, message) in enumerate(self.messages):
            if message:
                out += f"{role}: {message}{self.seps[i % 2]}"
            else:
                out += f"{role}:"
        return out


def build_prompt(question: str, num_images: int = 1, template: str = "vicuna_v1") -> str:
    """Single-turn prompt. Questions that already contain `<image>` place images themselves."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template '{template}' (known: {', '.join(TEMPLATES)})")
    conv = Conversation()
    if IMAGE_TOKEN in question:
        conv.messages.append((conv.roles[0], question))
    else:
        conv.add_user(question, num_images)
    conv.add_assistant(None)
    return conv.render()


def tokenize_with_images(tokenizer, prompt: str) -> list[int]:
    """LLaVA's `tokenizer_image_token`: tokenize around `<image>`, one BOS, -200 at each image."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


def count_images(ids: Sequence[int]) -> int:
    return sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)


def check_image_count(ids: Sequence[int], num_images: int) -> None:
    """Refuse a prompt whose `<image>` placeholders do not match the images: a user error, so
    callers can check it before encoding any image."""
    n = count_images(ids)
    if n != num_images:
        raise PromptError(
            f"the prompt has {n} <image> placeholder(s) but {num_images} image(s) were given; "
            "use one <image> per image, or none to put the images before the question"
        )


def splice_embeddings(
    ids: Sequence[int], images: Sequence[np.ndarray], embed: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Text embeddings with each -200 replaced by that image's rows ([N_i, hidden] each)."""
    check_image_count(ids, len(images))
    arr = np.asarray(ids, dtype=np.int64)
    cuts = np.flatnonzero(arr == IMAGE_TOKEN_INDEX)
    pieces: list[np.ndarray] = []
    start = 0
    for k, cut in enumerate(cuts):
        if cut > start:
            pieces.append(embed(arr[start:cut]))
        pieces.append(np.asarray(images[k], dtype=np.float32))
        start = cut + 1
    if start < len(arr):
        pieces.append(embed(arr[start:]))
    return np.concatenate(pieces, axis=0)


def prompt_table_ids(ids: Sequence[int], image_token_counts: Sequence[int], vocab_size: int) -> list[int]:
    """TensorRT-LLM's layout: image rows become fake ids vocab_size + i into the prompt table.

    The table is all images' rows stacked in order, so row i of the table is fake id
    `vocab_size + i`; the sequence is then exactly as long as the spliced embeddings.
    """
    if count_images(ids) != len(image_token_counts):
        raise PromptError(f"one token count per <image> placeholder is needed: {count_images(ids)} placeholder(s), {len(image_token_counts)} count(s)")
    out: list[int] = []
    row = 0
    k = 0
    for t in ids:
        if t == IMAGE_TOKEN_INDEX:
            out.extend(range(vocab_size + row, vocab_size + row + image_token_counts[k]))
            row += image_token_counts[k]
            k += 1
        else:
            out.append(int(t))
    return out
