"""The TensorRT-LLM custom module (issue 22, part 4), on CPU without TensorRT-LLM.

What runs here is the engine-independent half (`plugins/trtllm_core.py`), on real data: a folder
written by `export vllm` from the tiny conformance checkpoint, its tokenizer, the fixture images
and the conformance manifest. The TensorRT-LLM-bound classes (`plugins/trtllm/model.py`) are thin
wiring of these functions; importing them needs TensorRT-LLM, so that test skips here.
NOTHING here has run TensorRT-LLM: the attention, the Llama loader, `fuse_input_embeds` and the
request plumbing are TensorRT-LLM's, and are checked only by benchmarks/gpu_check.py on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoTokenizer, ConvNextConfig, LlamaConfig, LlamaForCausalLM

from convllava_export.model.vision import (
    ConvNextFeatures,
    build_projector,
    flatten_features,
)
from convllava_export.plugins import trtllm_core as core
from convllava_export.plugins.common import FolderError, FolderSpec

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "conformance"
MANIFEST = json.loads((FIX / "manifest.json").read_text())
SIZES = [(100, 60), (256, 256), (160, 448), (512, 192), (1000, 300), (64, 640), (65, 65), (700, 90)]


def _export(dest: Path, **kw) -> Path:
    from convllava_export.export.hf_folder import export_hf_folder

    export_hf_folder(FIX / "convllava-tiny-a", dest, vision_tower=FIX / "convnext-tiny-a", progress=lambda m: None, **kw)
    return dest


@pytest.fixture(scope="module")
def pad_folder(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("trt") / "pad")


@pytest.fixture(scope="module")
def native_folder(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("trt") / "native", mode="native", max_image_tokens=64)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open, not a dict
    return out


def _vision(folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our tower and projector with the folder's weights, loaded through the plugin's split (strict)."""
    cfg = _config(folder)
    spec = FolderSpec.from_config(cfg)
    tower = ConvNextFeatures(ConvNextConfig(**cfg["vision_config"])).eval()
    proj = build_projector(spec.projector, cfg["vision_config"]["hidden_sizes"][-1], cfg["text_config"]["hidden_size"]).eval()
    split = core.split_weights(_weights(folder))
    tower.load_state_dict({k: v.float() for k, v in split.vision.items()}, strict=True)
    proj.load_state_dict({k: v.float() for k, v in split.projector.items()}, strict=True)
    return tower, proj


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _want_ids(n_tokens: int, image_token_id: int) -> list[int]:
    ids = []
    for t in MANIFEST["prompt"]["input_ids"]:
        ids += [image_token_id] * n_tokens if t == -200 else [t]
    return ids


@pytest.mark.parametrize("mode", ["pad", "native"])
def test_placeholders_per_image_equal_the_towers_output(mode, pad_folder, native_folder):
    """The processor's placeholder count per image is the number of rows our tower + projector
    actually produce from the pixels it made, for pad and native images of several aspect ratios
    (a count off by one row or column would fail fuse_input_embeds on the GPU)."""
    folder = pad_folder if mode == "pad" else native_folder
    spec = FolderSpec.from_config(_config(folder))
    tok = AutoTokenizer.from_pretrained(folder)
    tower, proj = _vision(folder)
    prompt = MANIFEST["prompt"]["prompt_string"]
    counts = set()
    for i, (w, h) in enumerate(SIZES):
        req = core.process_request(tok, spec, prompt, [_image(w, h, i)])
        with torch.no_grad():
            rows = proj(flatten_features(tower(torch.from_numpy(req.pixels[0])[None])))[0]
        assert rows.shape == (req.counts[0], 64)
        assert req.ids.count(spec.image_token_id) == rows.shape[0]
        assert req.ids == _want_ids(rows.shape[0], spec.image_token_id)
        counts.add(req.counts[0])
    if mode == "pad":
        assert counts == {16}  # 256/64 squared, whatever the aspect
    else:
        assert len(counts) > 3 and max(counts) <= spec.max_image_tokens  # the sizes differ per aspect ratio, within the bound


def test_per_request_mode_and_several_images(native_folder):
    spec = FolderSpec.from_config(_config(native_folder))
    tok = AutoTokenizer.from_pretrained(native_folder)
    prompt = "USER: <image>\n<image>\nCompare. ASSISTANT:"
    images = [_image(512, 192), _image(100, 60)]
    native = core.process_request(tok, spec, prompt, images)
    h, w = native.pixels[0].shape[1:]
    assert w > h and native.counts == [(p.shape[1] // 64) * (p.shape[2] // 64) for p in native.pixels]  # the aspect kept
    pad = core.process_request(tok, spec, prompt, images, {"mode": "pad"})
    assert [p.shape[1:] for p in pad.pixels] == [(256, 256)] * 2 and pad.counts == [16, 16]
    for req in (native, pad):
        assert req.ids.count(spec.image_token_id) == sum(req.counts)
        first = req.ids.index(spec.image_token_id)
        n = req.counts[0]
        assert req.ids[first:first + n] == [spec.image_token_id] * n and req.ids[first + n] != spec.image_token_id  # "\n" between the images


def test_pixels_and_features_equal_the_golden(pad_folder):
    """The processor's pixels are the official preprocessing (the golden pixel_values), and our
    modules loaded through the plugin's weight split give the golden projected features."""
    spec = FolderSpec.from_config(_config(pad_folder))
    tok = AutoTokenizer.from_pretrained(pad_folder)
    tower, proj = _vision(pad_folder)
    for name, entry in MANIFEST["images"].items():
        g = np.load(FIX / "golden" / entry["npz"])
        req = core.process_request(tok, spec, MANIFEST["prompt"]["prompt_string"], Image.open(FIX / "images" / name))
        np.testing.assert_allclose(req.pixels[0], g["pixel_values"][0], atol=1e-5)
        with torch.no_grad():
            rows = proj(flatten_features(tower(torch.from_numpy(req.pixels[0])[None])))[0].numpy()
        np.testing.assert_allclose(rows, g["projected_features"][0], atol=1e-4, rtol=1e-4)


def test_prompt_ids_equal_the_manifest(pad_folder):
    """The official token ids (the manifest's `prompt.input_ids`, -200 -> the placeholder id,
    expanded to the image's 16 rows) from every form a prompt reaches the processor in: the raw
    LLM API string, the chat template's rendering ("<s> " written by the template), client token
    ids, and TensorRT-LLM's tokenizer wrapper (the Hugging Face one under `.tokenizer`)."""
    spec = FolderSpec.from_config(_config(pad_folder))
    tok = AutoTokenizer.from_pretrained(pad_folder)
    want = _want_ids(16, spec.image_token_id)
    raw = MANIFEST["prompt"]["prompt_string"]
    chat = tok.apply_chat_template([{"role": "user", "content": "<image>\n" + MANIFEST["prompt"]["question"]}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith(tok.bos_token)

    class Wrapper:  # tensorrt_llm.tokenizer.TransformersTokenizer keeps the HF tokenizer here
        def __init__(self, inner):
            self.tokenizer = inner

    image = Image.open(FIX / "images" / "square_256x256.png")
    for prompt in (raw, chat, tok(chat, add_special_tokens=False).input_ids, tok(raw).input_ids):
        for t in (tok, Wrapper(tok)):
            assert core.process_request(t, spec, prompt, image).ids == want
    assert core.prompt_ids(tok, raw, spec.image_token_id)[0] == tok.bos_token_id  # one BOS, never two


def test_precomputed_embeddings(pad_folder):
    spec = FolderSpec.from_config(_config(pad_folder))
    tok = AutoTokenizer.from_pretrained(pad_folder)
    g = np.load(FIX / "golden" / "tall_160x448.npz")
    feats = torch.from_numpy(g["projected_features"][0])
    ids, rows = core.embeddings_request(tok, spec, 64, MANIFEST["prompt"]["prompt_string"], [feats])
    assert ids == _want_ids(16, spec.image_token_id) and torch.equal(rows[0], feats)
    ids3, rows3 = core.embeddings_request(tok, spec, 64, MANIFEST["prompt"]["prompt_string"], feats[None])  # [N, T, H]
    assert ids3 == ids and len(rows3) == 1
    with pytest.raises(FolderError, match=r"\[tokens, 64\]"):
        core.embeddings_request(tok, spec, 64, MANIFEST["prompt"]["prompt_string"], [feats[:, :32]])
    with pytest.raises(FolderError, match="1 to 16"):
        core.embeddings_request(tok, spec, 64, MANIFEST["prompt"]["prompt_string"], [torch.zeros(17, 64)])


def test_refusals(pad_folder, native_folder):
    spec = FolderSpec.from_config(_config(pad_folder))
    tok = AutoTokenizer.from_pretrained(pad_folder)
    with pytest.raises(FolderError, match="1 <image> placeholder"):
        core.process_request(tok, spec, "USER: <image>\nHi ASSISTANT:", [_image(64, 64), _image(64, 64)])
    with pytest.raises(FolderError, match="at most 8"):
        core.process_request(tok, spec, "<image>" * 9, [_image(64, 64)] * 9)
    nat = FolderSpec.from_config(_config(native_folder))
    big = core.process_request(tok, nat, "<image>\nHi", _image(4000, 4000))  # scaled down to the bound, never cut
    assert big.counts[0] <= 64
    with pytest.raises(FolderError, match="at most 16"):
        core.process_request(tok, spec, "<image>\nHi", _image(4000, 1000), {"mode": "native"})  # native past the pad folder's bound
    with pytest.raises(FolderError, match="not part of a ConvLLaVA checkpoint"):
        core.split_weights({"vision_model.x": torch.zeros(1)})


def test_image_forms_give_the_same_pixels(pad_folder):
    """PIL, ToTensor's float CHW (TensorRT-LLM's `image_format="pt"`), uint8 tensors and numpy all
    give the same pixels: a float tensor goes back to exactly the source bytes."""
    spec = FolderSpec.from_config(_config(pad_folder))
    img = _image(160, 448, 3)
    arr = np.array(img)
    as_float = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    ref, n = core.pixel_values(img, spec.preprocess, 16)
    for form in (as_float, as_float[None], torch.from_numpy(arr).permute(2, 0, 1), arr):
        px, m = core.pixel_values(form, spec.preprocess, 16)
        assert m == n and np.array_equal(px, ref)


def test_pack_pixels_round_trip():
    rng = np.random.default_rng(0)
    pixels = [rng.standard_normal((3, h, w)).astype(np.float32) for h, w in ((64, 128), (192, 64), (64, 64))]
    packed = core.pack_pixels(pixels)
    assert packed["pixel_values"].dim() == 1 and packed["image_sizes"].tolist() == [[64, 128], [192, 64], [64, 64]]
    back = core.unpack_pixels(packed["pixel_values"], packed["image_sizes"])
    assert all(np.array_equal(b.numpy(), p) for b, p in zip(back, pixels))
    with pytest.raises(FolderError, match="packed pixels"):
        core.unpack_pixels(packed["pixel_values"][:-1], packed["image_sizes"])


def test_every_weight_maps_to_a_parameter_with_its_shape(pad_folder):
    """Every weight of an exported folder lands on a parameter of the module tree the custom module
    builds, with the parameter's shape, and every parameter gets a weight.

    Proves: the released-name split (`split_weights`) is complete and consistent with our
    ConvNextFeatures / projector (real modules, loaded strictly elsewhere in this file) and with the
    Hugging Face Llama names and shapes. The LLM side uses transformers' LlamaForCausalLM on the
    meta device as a stand-in for the *names*: TensorRT-LLM's Llama loader takes HF names (it fuses
    q/k/v and gate/up itself).
    Does NOT prove: that TensorRT-LLM's loader accepts them (its fused layouts, its head_dim handling
    of a folder whose heads were padded for vLLM-CPU, quantized weights) - that needs TensorRT-LLM.
    """
    cfg = _config(pad_folder)
    index = json.loads((pad_folder / "model.safetensors.index.json").read_text())["weight_map"]
    shapes = {}
    for shard in set(index.values()):
        with safe_open(str(pad_folder / shard), "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118 - safe_open, not a dict
    assert set(shapes) == set(index)
    split = core.split_weights(shapes)
    assert len(split.vision) + len(split.projector) + len(split.llm) == len(shapes)

    spec = FolderSpec.from_config(cfg)
    tower = ConvNextFeatures(ConvNextConfig(**cfg["vision_config"]))
    proj = build_projector(spec.projector, cfg["vision_config"]["hidden_sizes"][-1], cfg["text_config"]["hidden_size"])
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(**cfg["text_config"]))
    for part, module in (("vision", tower), ("projector", proj), ("llm", llm)):
        params = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = getattr(split, part)
        assert got == params, f"{part}: only in the folder {sorted(set(got) - set(params))[:5]}, only in the model {sorted(set(params) - set(got))[:5]}"
    assert "model.embed_tokens.weight" in split.llm and "lm_head.weight" in split.llm and "0.weight" in split.projector


def test_version_gate():
    assert core.check_version("1.2.0", env={}) == (1, 2, 0)
    assert core.check_version("1.2.1", env={}) == (1, 2, 1)
    assert core.check_version("1.3.0rc22", env={}) == (1, 3, 0)
    with pytest.raises(core.TrtLlmVersionError, match=r"1\.2\.x, 1\.3\.x; this is 1\.1\.0: older"):
        core.check_version("1.1.0", env={})
    with pytest.raises(core.TrtLlmVersionError, match="newer releases have not been checked.*CONVLLAVA_TRTLLM_ANY_VERSION=1"):
        core.check_version("1.4.0.dev2026", env={})
    assert core.check_version("1.4.0", env={core.ANY_VERSION_ENV: "1"}) == (1, 4, 0)
    with pytest.raises(core.TrtLlmVersionError, match="cannot read"):
        core.check_version("main", env={})


def test_custom_module_dir_is_a_package_trtllm_serve_can_import():
    d = core.custom_module_dir()
    assert d.is_dir() and (d / "__init__.py").is_file() and (d / "model.py").is_file()
    cmd = core.serve_command("/models/convllava-hf")
    assert cmd == ["trtllm-serve", "/models/convllava-hf", "--custom_module_dirs", str(d)]
    assert "from convllava_export.plugins.trtllm import model" in (d / "__init__.py").read_text()  # absolute: the dir is imported as top-level `trtllm`


def test_export_llm_hf_records_how_to_serve_images(tmp_path, monkeypatch):
    """`export llm --backend tensorrt-llm --format hf` writes, beside the (text-only) checkpoint,
    the serve commands: text as before, images through `export vllm` + the custom module dir.
    ModelOpt's quantization is replaced by a stub here (tests/test_trtllm.py runs it for real)."""
    from convllava_export.engines.tensorrt_llm import META
    from convllava_export.export import llm_folder, trtllm

    def fake_export(checkpoint, folder, precision, fmt, *args):
        meta = {"format": fmt, "precision": precision, "quant_algo": "FP8"}
        (folder / META).write_text(json.dumps(meta))
        return meta

    monkeypatch.setattr(trtllm, "export_llm_tensorrt", fake_export)
    lines: list[str] = []
    out = tmp_path / "llm-fp8"
    llm_folder.export_llm_folder(FIX / "convllava-tiny-a", out, "tensorrt-llm", "hf", "fp8", 32, "default", 128, "builtin", None, 8,
                                 FIX / "convnext-tiny-a", False, lines.append)
    serve = json.loads((out / META).read_text())["serve"]
    assert serve["text"] == f"trtllm-serve {out}"
    assert serve["images"].startswith(f"convllava-export export vllm {FIX / 'convllava-tiny-a'} -o FOLDER && trtllm-serve FOLDER --custom_module_dirs ")
    assert "custom_module_dir()" in serve["custom_module_dirs"]
    assert any("--custom_module_dirs" in line and f"trtllm-serve {out}" in line for line in lines)
    # the shell form names the same directory as serve_command
    import subprocess

    printed = subprocess.run(["bash", "-c", f"echo {core.MODULE_DIR_SHELL}"], capture_output=True, text=True, check=True).stdout.strip()
    assert Path(printed) == core.custom_module_dir()


def test_registration_inside_tensorrt_llm(pad_folder):
    """Inside a TensorRT-LLM install: importing the package registers the architecture and the
    input processor, and the processor gives the manifest's ids. Skipped without TensorRT-LLM
    (a GPU-only dependency)."""
    pytest.importorskip("tensorrt_llm", reason="TensorRT-LLM is not installed (GPU machines only)")
    from tensorrt_llm.inputs import create_input_processor

    import convllava_export.plugins.trtllm as plugin

    model_cls = plugin.model.ConvLlavaForConditionalGeneration
    from tensorrt_llm._torch.model_config import ModelConfig
    from tensorrt_llm._torch.models.modeling_utils import get_model_architecture

    cfg = ModelConfig.from_pretrained(str(pad_folder), trust_remote_code=True).pretrained_config
    assert get_model_architecture(cfg)[0] is model_cls
    proc = create_input_processor(str(pad_folder), AutoTokenizer.from_pretrained(pad_folder))
    ids, extra = proc({"prompt": MANIFEST["prompt"]["prompt_string"], "multi_modal_data": {"image": [Image.open(FIX / "images" / "wide_512x192.png")]}}, None)
    assert ids == _want_ids(16, 1000) and extra["multimodal_data"]["image"]["image_sizes"].tolist() == [[256, 256]]


def test_gpu_check_step_skips_without_tensorrt_llm(tmp_path, monkeypatch):
    """benchmarks/gpu_check.py's `trtllm_custom_module` step: on a GPU machine without TensorRT-LLM
    it is recorded as skipped with that reason (here the GPU is faked; TensorRT-LLM is absent)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("TensorRT-LLM is installed: the step runs (benchmarks/gpu_check.py)")
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    assert "trtllm_custom_module:" in gc.__doc__ and "trtllm_custom_module" in gc.CHECKS
    monkeypatch.setattr(gc.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gc.torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    monkeypatch.setattr(gc.torch.cuda, "get_device_name", lambda i=0: "fake")
    results = gc.main(tmp_path / "out.json", ["trtllm_custom_module"])
    assert results["skipped"] == {"trtllm_custom_module": "tensorrt_llm not installed"}
