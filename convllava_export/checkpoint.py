"""Read a released ConvLLaVA checkpoint: LLaVA folder + ConvNeXt tower folder.

Everything here validates before it allocates: configs and the shard index are checked, the
tower is located, and weights are streamed one shard at a time so peak memory stays near one
copy of the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

SUPPORTED_PROJECTORS = ("mlp2x_gelu",)
SUPPORTED_LLAVA_TYPES = ("llava", "llava_llama")
SUPPORTED_TOWER_TYPES = ("convnext",)
TOWER_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EMBED_KEY = "model.embed_tokens.weight"


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 → 'bf16': the names of DTYPES."""
    return next(k for k, v in DTYPES.items() if v == dtype)


@dataclass
class CheckpointInfo:
    """What a checkpoint folder holds, resolved and validated, with no weights loaded."""

    path: Path
    config: dict[str, Any]
    weight_files: list[Path]
    weight_map: dict[str, str]  # key -> file name (from the index or from reading a single file)
    tower_path: Path
    tower_config: dict[str, Any]
    tower_weight_file: Path | None
    preprocessor_config: dict[str, Any]
    tower_weights_source: str  # "llava-shards" or "tower-folder"
    tower_search: list[str] = field(default_factory=list)

    @property
    def projector_type(self) -> str:
        return self.config.get("mm_projector_type", "linear")

    @property
    def native_resolution(self) -> int:
        size = self.preprocessor_config.get("size", {})
        if isinstance(size, dict):
            return int(size.get("shortest_edge") or size.get("height"))
        return int(size)

    @property
    def image_aspect_ratio(self) -> str:
        return self.config.get("image_aspect_ratio", "pad")

    def fingerprint(self) -> str:
        """sha256 over the config and weight index: identifies the source of a build."""
        h = hashlib.sha256()
        h.update((self.path / "config.json").read_bytes())
        for name in WEIGHT_INDEX_NAMES:
            if (self.path / name).is_file():
                h.update((self.path / name).read_bytes())
        h.update((self.tower_path / "config.json").read_bytes())
        return h.hexdigest()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} at {path} is not valid JSON: {exc}") from None


def _find_weights(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """Return (files, key->file map). The map is empty for a single unindexed file."""
    for name in WEIGHT_INDEX_NAMES:
        index_path = folder / name
        if index_path.is_file():
            index = _read_json(index_path, "weight index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"weight index {index_path} has no 'weight_map'")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise CheckpointError(
                    f"{len(missing)} shard(s) named in {index_path.name} are missing from {folder}: "
                    f"{', '.join(missing[:10])}. Copy the complete checkpoint folder."
                )
            return [folder / f for f in files], dict(weight_map)
    for name in SINGLE_WEIGHT_NAMES:
        if (folder / name).is_file():
            return [folder / name], {}
    raise CheckpointError(
        f"no weights in {folder}: expected {' or '.join(WEIGHT_INDEX_NAMES)} with its shards, "
        f"or {' or '.join(SINGLE_WEIGHT_NAMES)}"
    )


def resolve_tower(checkpoint: Path, name: str, override: str | os.PathLike | None) -> tuple[Path, list[str]]:
    """Find the vision tower folder named by `mm_vision_tower`, or by --vision-tower.

    Hub names (`Org/Name`) resolve to a sibling folder `Name`; the official code resolves
    relative names against the working directory, which we try last.
    """
    if override is not None:
        candidates = [Path(override)]
    else:
        raw = Path(name)
        candidates = []
        if raw.is_absolute():
            candidates.append(raw)
        else:
            candidates += [checkpoint / raw, checkpoint.parent / raw]
            if len(raw.parts) > 1:
                candidates += [checkpoint.parent / raw.name, checkpoint / raw.name]
            candidates.append(Path.cwd() / raw)
    looked: list[str] = []
    for cand in candidates:
        looked.append(str(cand))
        if (cand / "config.json").is_file():
            return cand.resolve(), looked
    places = "\n  ".join(dict.fromkeys(looked))
    raise CheckpointError(
        f"vision tower '{override or name}' not found. Looked in:\n  {places}\n"
        "Pass the tower folder (config.json, pytorch_model.bin, preprocessor_config.json) "
        "with --vision-tower PATH."
    )


def read_checkpoint(path: str | os.PathLike, vision_tower: str | os.PathLike | None = None) -> CheckpointInfo:
    """Validate a LLaVA checkpoint folder and locate all its parts (no weights loaded)."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint path is not a folder: {folder}")
    config = _read_json(folder / "config.json", "checkpoint config.json")
    _check_llava_config(folder, config, vision_tower)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"no tokenizer in {folder}: expected {' or '.join(TOKENIZER_FILES)} (the Vicuna "
            "sentencepiece tokenizer ships with the released checkpoint)"
        )
    weight_files, weight_map = _find_weights(folder)
    tower_path, looked = resolve_tower(folder, str(config.get("mm_vision_tower", "")), vision_tower)
    tower_config = _read_json(tower_path / "config.json", "vision tower config.json")
    _check_tower_config(tower_path, tower_config)
    preproc = _read_json(tower_path / "preprocessor_config.json", "vision tower preprocessor_config.json")
    has_tower_keys = any(k.startswith(TOWER_PREFIX) for k in weight_map)
    if not weight_map:  # single file: we must peek at its keys
        has_tower_keys = any(k.startswith(TOWER_PREFIX) for k in _read_keys(weight_files[0]))
    return CheckpointInfo(
        path=folder.resolve(),
        config=config,
        weight_files=weight_files,
        weight_map=weight_map,
        tower_path=tower_path,
        tower_config=tower_config,
        tower_weight_file=None if has_tower_keys else _tower_weight_file(tower_path),
        preprocessor_config=preproc,
        tower_weights_source="llava-shards" if has_tower_keys else "tower-folder",
        tower_search=looked,
    )


def _check_llava_config(folder: Path, config: dict[str, Any], vision_tower: str | os.PathLike | None) -> None:
    """A LLaVA model type, a projector ConvLLaVA uses, and a tower named (or given)."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_LLAVA_TYPES:
        raise CheckpointError(
            f"{folder / 'config.json'}: model_type '{model_type}' is not a LLaVA checkpoint "
            f"(expected one of {', '.join(SUPPORTED_LLAVA_TYPES)})"
        )
    projector = config.get("mm_projector_type", "linear")
    if projector not in SUPPORTED_PROJECTORS:
        raise CheckpointError(
            f"unsupported mm_projector_type '{projector}' in {folder / 'config.json'}: "
            f"ConvLLaVA uses {', '.join(SUPPORTED_PROJECTORS)}"
        )
    if "mm_vision_tower" not in config and vision_tower is None:
        raise CheckpointError(f"{folder / 'config.json'} has no 'mm_vision_tower'; pass --vision-tower PATH")


def _check_tower_config(tower_path: Path, tower_config: dict[str, Any]) -> None:
    """A ConvNeXt tower whose stage count matches its depths."""
    tower_type = tower_config.get("model_type")
    if tower_type not in SUPPORTED_TOWER_TYPES:
        raise CheckpointError(
            f"unsupported vision tower type '{tower_type}' in {tower_path / 'config.json'}: "
            "ConvLLaVA uses a ConvNeXt tower (model_type 'convnext')"
        )
    if tower_config.get("num_stages", 4) != len(tower_config.get("depths", [])):
        raise CheckpointError(f"{tower_path / 'config.json'}: num_stages does not match the length of depths")


def _tower_weight_file(tower_path: Path) -> Path:
    """The tower folder's own weight file, for LLaVA shards that hold no tower keys."""
    for name in SINGLE_WEIGHT_NAMES:
        if (tower_path / name).is_file():
            return tower_path / name
    raise CheckpointError(
        f"no vision tower weights: the LLaVA shards hold no '{TOWER_PREFIX}*' keys and "
        f"{tower_path} has no {' or '.join(SINGLE_WEIGHT_NAMES)}"
    )


def _file_for(info: CheckpointInfo, key: str) -> Path:
    if info.weight_map:
        if key not in info.weight_map:
            raise CheckpointError(f"'{key}' is not in {info.path}'s weight index")
        return info.path / info.weight_map[key]
    return info.weight_files[0]


def read_tensor(info: CheckpointInfo, key: str) -> torch.Tensor:
    """One tensor from the shard that holds it (memory-mapped: the rest of the shard is not read)."""
    tensors = load_shard(_file_for(info, key), None)
    if key not in tensors:
        raise CheckpointError(f"'{key}' is not in {_file_for(info, key)}")
    return tensors[key]


def weights_dtype(info: CheckpointInfo) -> torch.dtype:
    """The dtype the LLM weights are stored in (that of its embedding table), read without loading."""
    return read_tensor(info, EMBED_KEY).dtype


def _read_keys(path: Path) -> list[str]:
    return list(load_shard(path, None).keys())


def load_shard(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Load one weight file safely (weights_only / safetensors), cast floats to `dtype`."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means a bad file
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(
            f"weight file {path} is corrupt or truncated ({size} bytes): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Re-download or re-copy it."
        ) from None
    if not isinstance(tensors, dict):
        raise CheckpointError(f"weight file {path} does not hold a state dict")
    if dtype is not None:
        for key, value in tensors.items():
            if value.is_floating_point() and value.dtype != dtype:
                tensors[key] = value.to(dtype)
    return tensors


def check_keys(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Raise a CheckpointError listing missing/unexpected keys (up to 10 each) or the first shape mismatch."""
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected and not k.startswith(ignore_prefixes))
    if missing or unexpected:
        parts = []
        if missing:
            more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
            parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:10])}{more}")
        if unexpected:
            more = f" (and {len(unexpected) - 10} more)" if len(unexpected) > 10 else ""
            parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:10])}{more}")
        raise CheckpointError(f"weights in {where} do not match the model config: " + "; ".join(parts))
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise CheckpointError(
                f"shape mismatch in {where} for '{key}': the config expects {tuple(shape)}, the file has "
                f"{tuple(found[key])}. Is config.json from the same checkpoint as the weights?"
            )
