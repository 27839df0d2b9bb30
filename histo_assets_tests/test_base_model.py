"""Base-model loading: the seeded tiny model, diffusers folders and single files, all offline."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from histo_assets.core.base_model import (
    TINY_HYPERNETWORK_SIZES,
    BaseModelError,
    _build_tiny_once,
    attention_context_widths,
    build_tiny_model,
    check_hypernetwork_sizes,
    describe_base_model,
    folder_weights_sha256,
    load_base_model,
    resolve_device,
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
