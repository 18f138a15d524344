"""The checkpoint's LLaMA sentencepiece tokenizer, loaded offline."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from .errors import CheckpointError


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """Load the tokenizer from a local folder (never the hub), with a clear error if it is absent."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), use_fast=False, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise CheckpointError(f"cannot load the tokenizer from {folder}: {type(exc).__name__}: {exc}") from None
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise CheckpointError(f"tokenizer in {folder} defines no <s>/</s> tokens")
    return tok


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def copy_tokenizer(src: Path, dest: Path) -> None:
    """The checkpoint's tokenizer files into `dest` (made, or added to)."""
    dest.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)  # not copy2: the checkpoint's modes would override the umask
