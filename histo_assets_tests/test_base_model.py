"""core/base_model.py: loading the seeded tiny model, diffusers folders and single files, all offline; and SD 1.x
from nothing but its checkpoint file, with the shipped component configs and the real CLIP tokenizer.

The SD 1.5 tensor table (data/sd15_ldm_layout.txt) was read from real checkpoints
by an independent tool, so these tests check the shipped configs against what a
v1-5-pruned-emaonly.safetensors actually holds, not against diffusers' own idea of it.
"""

import gzip
import html
import json
import math
import re
import shutil
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from histo_assets.core.base_model import (
    BaseModelError,
    CLIP_BPE_VOCABULARY,
    SD1_CONFIG_DIR,
    TINY_HYPERNETWORK_SIZES,
    _build_tiny_once,
    attention_context_widths,
    build_tiny_model,
    check_hypernetwork_sizes,
    checkpoint_shapes,
    clip_tokenizer,
    describe_architecture,
    describe_base_model,
    folder_weights_sha256,
    load_base_model,
    resolve_device,
    sd1_mismatch,
    tiny_model_dir,
    tiny_tokenizer,
)
from histo_assets.core.io import sha256_file
from histo_assets_tests.conftest import TINY_MODEL_SEED

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _weight_files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*.safetensors"))}


def test_tiny_model_builds_deterministically(tmp_path, tiny_model_cache):
    again = build_tiny_model(tmp_path / "again", seed=TINY_MODEL_SEED)
    other = build_tiny_model(tmp_path / "other", seed=TINY_MODEL_SEED + 1)
    reference = tiny_model_dir(tiny_model_cache, TINY_MODEL_SEED)

    assert set(_weight_files(again)) == {"unet/diffusion_pytorch_model.safetensors",
                                         "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}
    assert _weight_files(again) == _weight_files(reference)
    assert folder_weights_sha256(again) == folder_weights_sha256(reference)
    assert folder_weights_sha256(other) != folder_weights_sha256(reference)
    # Building swaps the folder in whole: no staging directories are left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]


def test_tiny_tokenizer_is_byte_level_clip():
    tokenizer = tiny_tokenizer()
    assert len(tokenizer) == 514
    assert tokenizer("a photo of a cat").input_ids == [512, 320, 79, 71, 78, 83, 334, 78, 325, 320, 66, 64, 339, 513]
    assert tokenizer.model_max_length == 77


def test_tiny_model_loads_offline_and_generates_deterministically(tiny_base, tiny_model_cache):
    assert tiny_base.source == "tiny"
    assert tiny_base.sha256 == folder_weights_sha256(tiny_model_dir(tiny_model_cache, TINY_MODEL_SEED))
    assert tiny_base.short_hash == tiny_base.sha256[:10]
    assert tiny_base.name == f"tiny-sd-seed{TINY_MODEL_SEED}"
    assert tiny_base.device == torch.device("cpu") and tiny_base.dtype == torch.float32
    assert not any(p.requires_grad for m in (tiny_base.unet, tiny_base.vae, tiny_base.text_encoder)
                   for p in m.parameters())

    def generate(seed: int) -> np.ndarray:
        return tiny_base.pipeline("pink tissue", num_inference_steps=3, guidance_scale=7.0,
                                  generator=torch.Generator().manual_seed(seed), output_type="np").images[0]

    first, again, other = generate(1), generate(1), generate(2)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_tiny_model_is_reused_from_cache(tiny_model_cache):
    weights = tiny_model_dir(tiny_model_cache, TINY_MODEL_SEED) / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    base = load_base_model("tiny", tiny_cache_dir=tiny_model_cache, seed=TINY_MODEL_SEED, device="cpu",
                           name="my-tiny")
    assert weights.stat().st_mtime_ns == before
    assert base.name == "my-tiny"


def test_tiny_cache_build_never_replaces_a_model_in_use(tmp_path):
    target = build_tiny_model(tmp_path / "tiny-sd-seed3", seed=3)
    weights = target / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    # What a second process does when the first finished building while it was building too.
    _build_tiny_once(target, seed=3)
    assert weights.stat().st_mtime_ns == before
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd-seed3"]
    fresh = tmp_path / "cache" / "tiny-sd-seed3"
    _build_tiny_once(fresh, seed=3)
    assert _weight_files(fresh) == _weight_files(target)
    assert [p.name for p in fresh.parent.iterdir()] == ["tiny-sd-seed3"]


def test_attention_context_widths_of_tiny_unet(tiny_base):
    widths = attention_context_widths(tiny_base.unet)
    assert widths == [32, 48, 64]
    assert sorted(TINY_HYPERNETWORK_SIZES) == widths
    check_hypernetwork_sizes(TINY_HYPERNETWORK_SIZES, tiny_base.unet)
    with pytest.raises(BaseModelError, match=r"\[768, 320\].*\[32, 48, 64\]"):
        check_hypernetwork_sizes((48, 768, 320), tiny_base.unet)


def test_description_names_the_model_and_its_architecture(tiny_base):
    described = describe_base_model(tiny_base)
    assert {key: described[key] for key in ("source", "name", "sha256", "short_hash", "path")} == {
        "source": "tiny", "name": tiny_base.name, "sha256": tiny_base.sha256,
        "short_hash": tiny_base.sha256[:10], "path": str(tiny_base.path)}
    assert described["architecture"]["attention_context_widths"] == [32, 48, 64]
    assert json.loads(json.dumps(described)) == described


def test_diffusers_folder_loads_and_verifies_sha256(tiny_model_cache):
    folder = tiny_model_dir(tiny_model_cache, TINY_MODEL_SEED)
    expected = folder_weights_sha256(folder)
    base = load_base_model("diffusers", folder, expected_sha256=expected.upper(), device="cpu")
    assert base.sha256 == expected and base.name == folder.name and base.path == folder
    with pytest.raises(BaseModelError, match="SHA-256 mismatch"):
        load_base_model("diffusers", folder, expected_sha256="0" * 64, device="cpu")


def test_folder_hash_covers_exactly_the_weights_that_load(tmp_path, tiny_model_cache):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir(tiny_model_cache, TINY_MODEL_SEED), folder)
    before = folder_weights_sha256(folder)
    (folder / "v1-5-pruned-emaonly.ckpt").write_bytes(b"a single-file checkpoint beside the folder")
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"a variant that is not loaded")
    (folder / "unet" / "config.json").write_text((folder / "unet" / "config.json").read_text() + "\n")
    assert folder_weights_sha256(folder) == before
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b" ")
    assert folder_weights_sha256(folder) != before


def test_sha256_is_checked_before_weights_are_read(tmp_path, tiny_model_cache):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dir(tiny_model_cache, TINY_MODEL_SEED), folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(BaseModelError, match="SHA-256 mismatch"):
        load_base_model("diffusers", folder, expected_sha256="0" * 64, device="cpu")


@pytest.mark.parametrize(
    ("source", "make", "message"),
    [
        ("diffusers", lambda tmp: tmp / "nowhere", "is not a directory"),
        ("single_file", lambda tmp: tmp / "nowhere.safetensors", "does not exist"),
        ("diffusers", None, "needs a path"),
        ("magic", lambda tmp: tmp, "unknown base model source"),
    ],
)
def test_bad_source_or_path_gives_clear_error(tmp_path, source, make, message):
    with pytest.raises(BaseModelError, match=message):
        load_base_model(source, None if make is None else make(tmp_path), device="cpu")


def test_incomplete_diffusers_folder_names_what_is_missing(tmp_path, tiny_model_cache):
    folder = tmp_path / "partial"
    shutil.copytree(tiny_model_dir(tiny_model_cache, TINY_MODEL_SEED), folder)
    (folder / "vae" / "config.json").unlink()
    (folder / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(BaseModelError, match=r"missing: vae/config\.json, text_encoder/<weights>"):
        load_base_model("diffusers", folder, device="cpu")


def test_tiny_source_needs_a_cache_dir():
    with pytest.raises(BaseModelError, match="tiny_cache_dir"):
        load_base_model("tiny", seed=0, device="cpu")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("meta", "gpu0"):
        with pytest.raises(BaseModelError, match="unsupported device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(BaseModelError, match="CUDA is not available"):
            resolve_device("cuda")


# --- single file -------------------------------------------------------------------------------------------
# The tiny model is written as an original-layout (LDM) checkpoint, the form of v1-5-pruned-emaonly.safetensors,
# to check that diffusers' single-file loader rebuilds it offline from a local config folder. The key layout
# follows the CompVis model definitions (model.diffusion_model / first_stage_model / cond_stage_model).

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _renamed(rest: str, names: dict[str, str]) -> str:
    for new, old in names.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _ldm_unet_key(key: str, per_block: int, up_with_attention: set[int]) -> str:
    fixed = _renamed(key, _UNET_FIXED)
    if fixed != key:
        return fixed
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        index = int(m[1]) * (per_block + 1) + int(m[3]) + 1
        return (f"input_blocks.{index}.0.{_renamed(m[4], _UNET_RESNET)}" if m[2] == "resnets"
                else f"input_blocks.{index}.1.{m[4]}")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (per_block + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_renamed(m[2], _UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        index = int(m[1]) * (per_block + 1) + int(m[3])
        return (f"output_blocks.{index}.0.{_renamed(m[4], _UNET_RESNET)}" if m[2] == "resnets"
                else f"output_blocks.{index}.1.{m[4]}")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        slot = 2 if int(m[1]) in up_with_attention else 1
        return f"output_blocks.{int(m[1]) * (per_block + 1) + per_block}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def _ldm_vae_key(key: str, n_blocks: int) -> str:
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        return f"{m[1]}.mid.attn_1.{_renamed(m[2], _VAE_ATTENTION)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{n_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return key


def _write_ldm_checkpoint(folder: Path, target: Path) -> None:
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    with_attention = {i for i, kind in enumerate(unet_config["up_block_types"]) if "CrossAttn" in kind}
    state = {}
    for key, value in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        ldm = _ldm_unet_key(key, unet_config["layers_per_block"], with_attention)
        state[f"model.diffusion_model.{ldm}"] = value
    for key, value in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        ldm = _ldm_vae_key(key, len(vae_config["down_block_types"]))
        if ".mid.attn_1." in ldm and ldm.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        state[f"first_stage_model.{ldm}"] = value
    for key, value in load_file(folder / "text_encoder" / "model.safetensors").items():
        state[f"cond_stage_model.transformer.text_model.{key}"] = value
    save_file({key: value.contiguous() for key, value in state.items()}, str(target))


@pytest.fixture(scope="module")
def single_file_model(tmp_path_factory, tiny_model_cache) -> tuple[Path, Path]:
    """The tiny model as one LDM ``.safetensors`` plus a weight-free diffusers config folder."""
    root = tmp_path_factory.mktemp("single-file")
    source = tiny_model_dir(tiny_model_cache, TINY_MODEL_SEED)
    checkpoint = root / "tiny-ldm.safetensors"
    _write_ldm_checkpoint(source, checkpoint)
    config = root / "config"
    shutil.copytree(source, config, ignore=shutil.ignore_patterns("*.safetensors"))
    return checkpoint, config


def test_single_file_loads_offline_with_local_config(single_file_model, tiny_base):
    checkpoint, config = single_file_model
    base = load_base_model("single_file", checkpoint, config, expected_sha256=sha256_file(checkpoint),
                           device="cpu", name="v1-5-pruned-emaonly.safetensors")
    assert base.sha256 == sha256_file(checkpoint) and base.short_hash == base.sha256[:10]
    assert base.name == "v1-5-pruned-emaonly", "the WebUI names models without their extension"
    for component in ("unet", "vae", "text_encoder"):
        loaded, reference = getattr(base, component).state_dict(), getattr(tiny_base, component).state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[key], reference[key]) for key in reference), component


def test_single_file_errors_name_what_is_missing(tmp_path, single_file_model):
    checkpoint, config = single_file_model
    with pytest.raises(BaseModelError, match="needs config: a local diffusers folder"):
        load_base_model("single_file", checkpoint, None, device="cpu")
    with pytest.raises(BaseModelError, match="config folder .* is not a directory"):
        load_base_model("single_file", checkpoint, tmp_path / "no-config", device="cpu")
    partial = tmp_path / "partial-config"
    shutil.copytree(config, partial, ignore=shutil.ignore_patterns("tokenizer*", "scheduler_config.json"))
    with pytest.raises(BaseModelError, match=r"missing: scheduler/scheduler_config\.json, tokenizer/tokenizer\.json"):
        load_base_model("single_file", checkpoint, partial, device="cpu")
    with pytest.raises(BaseModelError, match="SHA-256 mismatch"):
        load_base_model("single_file", checkpoint, config, expected_sha256="f" * 64, device="cpu")
    wrong_suffix = tmp_path / "model.bin"
    wrong_suffix.write_bytes(b"x")
    with pytest.raises(BaseModelError, match=r"must end in one of \.safetensors, \.ckpt"):
        load_base_model("single_file", wrong_suffix, config, device="cpu")


# --- SD 1.x from its checkpoint file alone ---------------------------------------------------------


SD15_LAYOUT = Path(__file__).with_name("data") / "sd15_ldm_layout.txt"
# Parameter counts of the released SD 1.5 components, as diffusers reports them for stable-diffusion-v1-5.
SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
LDM_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                "text_encoder": "cond_stage_model.transformer."}
# CLIP's position ids are a constant that transformers rebuilds rather than loads, so the converted
# checkpoint may carry them without the model having a place for them.
UNUSED_BY_DESIGN = {"text_encoder": {"embeddings.position_ids"}}
SD15_ATTENTION_CONTEXT_WIDTHS = [320, 640, 768, 1280]

CANONICAL_PROMPT_IDS = ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407])
PROMPTS = [
    "an H&E histology tile of fibrocystic breast tissue",
    "immunohistochemistry, DAB stain, nuclei",
    "Hematoxylin and eosin (H&E) stained section of colon adenocarcinoma, 40x magnification",
    "Ki-67 positive nuclei in an IHC-stained slide; 0.5 µm/px",
    "CMU-1-Small-Region.svs   tumour\tstroma\n lymphocytes",
    "skimage_ihc, cmu_wsi_he, <lora:histo:0.8>",
    "it's eosinophilic, don't over-stain the mitoses!!",
    "Gleason 3+4=7 prostatic acinar adenocarcinoma, cribriform glands",
]


def sd15_layout() -> dict[str, tuple[int, ...]]:
    layout = {}
    for line in SD15_LAYOUT.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split(" ")
            layout[key] = tuple(json.loads(shape))
    return layout


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A genuine fp16 safetensors file of these tensors, all zeros, whose data is a hole in the file.

    A full SD 1.5 checkpoint then takes no disk space and no time to write,
    yet every byte of it is read back through the real loaders.
    """
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        handle.truncate(8 + len(encoded) + offset)


@pytest.fixture(scope="module")
def sd15_meta_checkpoint() -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, dtype=torch.float16, device="meta") for key, shape in sd15_layout().items()}


def empty_component(component: str) -> torch.nn.Module:
    """The component as the shipped config describes it, with no memory behind its weights."""
    with init_empty_weights():
        if component == "text_encoder":
            return CLIPTextModel(CLIPTextConfig.from_pretrained(str(SD1_CONFIG_DIR), subfolder="text_encoder"))
        model_class = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[component]
        return model_class.from_config(model_class.load_config(str(SD1_CONFIG_DIR), subfolder=component))


def converted_state_dict(component: str, model: torch.nn.Module, checkpoint: dict) -> dict[str, torch.Tensor]:
    """The state dict diffusers' single-file loader would load into ``model``, by its own conversion functions."""
    if component == "text_encoder":
        converted = convert_ldm_clip_checkpoint(dict(checkpoint))
        # As create_diffusers_clip_model_from_ldm does for the CLIPTextModel that transformers 5.6+ flattened.
        if not hasattr(model, "text_model"):
            converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
        return converted
    mapping = SINGLE_FILE_LOADABLE_CLASSES[type(model).__name__]["checkpoint_mapping_fn"]
    return mapping(config=dict(model.config), checkpoint=dict(checkpoint))


# --- the shipped configs against the real SD 1.5 layout ----------------------------------------------------

def test_sd15_layout_table_is_sd1_and_complete():
    layout = sd15_layout()
    assert sd1_mismatch(layout) is None
    assert {prefix: sum(key.startswith(prefix) for key in layout) for prefix in LDM_PREFIXES.values()} == {
        "model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.transformer.": 197}


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_shipped_configs_take_every_tensor_of_the_sd15_single_file(component, sd15_meta_checkpoint):
    model = empty_component(component)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    converted = {key: tuple(value.shape)
                 for key, value in converted_state_dict(component, model, sd15_meta_checkpoint).items()}

    assert sorted(expected.keys() - converted.keys()) == [], "weights the checkpoint would leave unset"
    assert sorted(converted.keys() - expected.keys() - UNUSED_BY_DESIGN.get(component, set())) == [], \
        "checkpoint tensors the model has no place for"
    assert {key: (converted[key], shape) for key, shape in expected.items() if converted[key] != shape} == {}
    in_file = sum(key.startswith(LDM_PREFIXES[component]) for key in sd15_meta_checkpoint)
    assert len(converted) == in_file, "every tensor of the component in the file is converted, none dropped"
    assert sum(parameter.numel() for parameter in model.parameters()) == SD15_PARAMETERS[component]


def test_sd15_single_file_loads_with_nothing_else(tmp_path, monkeypatch):
    """The real loader, unpatched, on a full-size SD 1.5 file: shipped configs, built tokenizer, no network."""
    checkpoint = tmp_path / "v1-5-pruned-emaonly.safetensors"
    write_sparse_safetensors(checkpoint, sd15_layout())

    def refuse(*args, **kwargs):
        raise AssertionError("loading a single file must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    base = load_base_model("single_file", checkpoint, None, device="cpu", dtype="float16")

    assert base.name == "v1-5-pruned-emaonly" and base.source == "single_file"
    architecture = describe_architecture(base)
    assert architecture["parameters"] == SD15_PARAMETERS
    assert architecture["attention_context_widths"] == SD15_ATTENTION_CONTEXT_WIDTHS
    assert architecture["vocabulary"] == 49408 and architecture["vae_downsampling"] == 8
    for module in (base.unet, base.vae, base.text_encoder):
        tensors = module.state_dict().values()
        assert not any(tensor.is_meta for tensor in tensors), "a weight was left unloaded"
        assert all(not torch.is_floating_point(tensor) or not tensor.any() for tensor in tensors), \
            "weights come from the (all-zero) file, not from a random initialisation"
    assert type(base.scheduler).__name__ == "PNDMScheduler" and base.scheduler.config.steps_offset == 1
    assert base.vae.config.scaling_factor == 0.18215
    prompt, ids = CANONICAL_PROMPT_IDS
    assert base.tokenizer(prompt).input_ids == ids


@pytest.mark.parametrize(("key", "shape", "reason"), [
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 1024),
     r"attn2\.to_k\.weight has shape \[320, 1024\] where SD 1\.x has \[320, 768\]"),
    ("model.diffusion_model.input_blocks.0.0.weight", (320, 9, 3, 3),
     r"input_blocks\.0\.0\.weight has shape \[320, 9, 3, 3\]"),
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", None,
     r"it has no tensor cond_stage_model\.transformer\.text_model\.embeddings\.token_embedding\.weight"),
])
def test_other_architectures_need_a_config_folder(tmp_path, key, shape, reason):
    """SD 2.x context widths, inpainting inputs, a missing text encoder: each named, before hashing gigabytes."""
    layout = sd15_layout()
    if shape is None:
        del layout[key]
    else:
        layout[key] = shape
    checkpoint = tmp_path / "other-model.safetensors"
    write_sparse_safetensors(checkpoint, layout)
    with pytest.raises(BaseModelError, match=rf"other-model\.safetensors is not an SD 1\.x checkpoint .*{reason}.*"
                                             r"needs config: a local diffusers folder"):
        load_base_model("single_file", checkpoint, None, expected_sha256="0" * 64, device="cpu")


def test_unreadable_files_are_named(tmp_path):
    for name in ("broken.safetensors", "broken.ckpt"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
        with pytest.raises(BaseModelError, match=rf"{name} is not a readable checkpoint"):
            load_base_model("single_file", tmp_path / name, None, device="cpu")


def test_ckpt_shapes_are_read_without_loading_weights(tmp_path):
    checkpoint = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"first_stage_model.quant_conv.weight": torch.zeros(8, 8, 1, 1),
                               "model_ema.num_updates": torch.tensor(7)},
                "global_step": 7}, checkpoint)
    assert checkpoint_shapes(checkpoint) == {"first_stage_model.quant_conv.weight": (8, 8, 1, 1),
                                             "model_ema.num_updates": ()}
    plain = tmp_path / "plain.ckpt"
    torch.save({"model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}, plain)
    assert checkpoint_shapes(plain) == {"model.diffusion_model.out.2.weight": (4, 320, 3, 3)}


# --- the tokenizer against CLIP's own algorithm -------------------------------------------------------------

def reference_clip_ids(text: str) -> list[int]:
    """CLIP's classic BPE (OpenAI's simple tokenizer), written out independently of the package's tokenizer.

    Bytes map to printable stand-ins, text is cleaned and lower-cased, split by
    CLIP's pattern, and each piece merged greedily by lowest merge rank. ftfy's
    mojibake repair is left out (it is not installed and changes none of these prompts).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_to_symbol = {byte: chr(byte) for byte in printable}
    for shift, byte in enumerate(b for b in range(256) if b not in byte_to_symbol):
        byte_to_symbol[byte] = chr(256 + shift)
    with gzip.open(CLIP_BPE_VOCABULARY, "rt", encoding="utf-8") as handle:
        merge_lines = handle.read().split("\n")[1:49152 - 256 - 2 + 1]
    ranks = {tuple(line.split()): rank for rank, line in enumerate(merge_lines)}
    symbols = list(byte_to_symbol.values())
    vocabulary = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(pair) for pair in ranks]
    vocabulary += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {token: index for index, token in enumerate(vocabulary)}

    cleaned = " ".join(html.unescape(html.unescape(text)).split()).lower()
    pattern = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
                            r"|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
    ids = [encoder["<|startoftext|>"]]
    for piece in pattern.findall(cleaned):
        mapped = "".join(byte_to_symbol[byte] for byte in piece.encode("utf-8"))
        word = [*mapped[:-1], mapped[-1] + "</w>"]
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: ranks.get(pair, math.inf))
            if best not in ranks:
                break
            merged, index = [], 0
            while index < len(word):
                if index < len(word) - 1 and (word[index], word[index + 1]) == best:
                    merged.append(word[index] + word[index + 1])
                    index += 2
                else:
                    merged.append(word[index])
                    index += 1
            word = merged
        ids += [encoder[token] for token in word]
    return ids + [encoder["<|endoftext|>"]]


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def test_tokenizer_gives_clips_canonical_ids(tokenizer):
    prompt, ids = CANONICAL_PROMPT_IDS
    assert tokenizer(prompt).input_ids == ids
    assert reference_clip_ids(prompt) == ids, "the reference implementation itself matches CLIP"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_matches_clips_bpe_on_histology_prompts(tokenizer, prompt):
    ids = tokenizer(prompt).input_ids
    assert ids == reference_clip_ids(prompt)
    assert len(ids) < len(prompt.encode()), "real merges, not one token per byte"


def test_tokenizer_pads_and_truncates_as_sd_expects(tokenizer):
    """The pipeline pads to 77 with end-of-text and cuts long prompts, keeping the end-of-text token."""
    short = tokenizer(PROMPTS[0], padding="max_length", max_length=tokenizer.model_max_length,
                      truncation=True).input_ids
    reference = reference_clip_ids(PROMPTS[0])
    assert short == reference + [49407] * (77 - len(reference))
    long = tokenizer(" ".join(PROMPTS), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True).input_ids
    assert len(long) == 77 and long[-1] == 49407
    assert long[:-1] == reference_clip_ids(" ".join(PROMPTS))[:76]


def test_text_encoder_config_agrees_with_the_tokenizer(tokenizer):
    config = CLIPTextConfig.from_pretrained(str(SD1_CONFIG_DIR), subfolder="text_encoder")
    assert config.vocab_size == len(tokenizer) == 49408
    assert config.max_position_embeddings == tokenizer.model_max_length == 77
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
