"""SD 1.x from nothing but its checkpoint file: the shipped component configs and the real CLIP tokenizer, offline.

The SD 1.5 tensor table (data/sd15_ldm_layout.txt) was read from real checkpoints
by an independent tool, so these tests check the shipped configs against what a
v1-5-pruned-emaonly.safetensors actually holds, not against diffusers' own idea of it.
"""

import gzip
import html
import json
import math
import socket
import struct
from pathlib import Path

import pytest
import regex
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel

from histo_assets.core.base_model import (
    CLIP_BPE_VOCABULARY,
    SD1_CONFIG_DIR,
    BaseModelError,
    checkpoint_shapes,
    clip_tokenizer,
    describe_architecture,
    load_base_model,
    sd1_mismatch,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

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
