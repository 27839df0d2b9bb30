"""The Stable Diffusion base model: a seeded miniature for demos and tests, or
real SD 1.x weights from local files.

Everything loads offline: these machines cannot reach a model hub, so every
loader passes ``local_files_only=True`` and every input is validated (paths,
config folders, SHA-256) before any weights are read, so that a wrong setting
fails in a second with a message naming the problem instead of minutes later
inside diffusers.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile

# Set before diffusers/transformers are imported by this module, so that
# huggingface_hub never tries the network; local_files_only=True below is the
# guard that holds even if they were imported earlier.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import Attention
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from histo_assets.core.a1111_text import short_hash
from histo_assets.core.errors import BaseModelError
from histo_assets.core.io import atomic_directory, sha256_file, stable_hash

SOURCES = ("tiny", "diffusers", "single_file")

# Weight formats diffusers loads from a component folder, in its order of preference.
COMPONENT_WEIGHT_SUFFIXES = (".safetensors", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# Components a StableDiffusionPipeline folder needs, and the file in each that
# proves the component is there. Tokenizers are checked separately because
# they come in two layouts.
_COMPONENT_CONFIGS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")

TINY_MAX_LENGTH = 77
# Cross-attention width chosen unlike every block width (32, 64), so that a
# hypernetwork's width-keyed modules are unambiguous between self- and
# cross-attention (a1111-hypernetwork.md §10).
TINY_CROSS_ATTENTION_DIM = 48
TINY_HYPERNETWORK_SIZES = (48, 32, 64)

# The SD 1.x component configs shipped with the package, so that a lone
# v1-5-pruned-emaonly.safetensors loads without a diffusers folder from a hub.
# Its tokenizer/ holds only CLIP's BPE vocabulary; see clip_tokenizer().
SD1_CONFIG_DIR = Path(__file__).with_name("sd1_config")
CLIP_BPE_VOCABULARY = SD1_CONFIG_DIR / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_MAX_LENGTH = 77
# CLIP's vocabulary is 49,408 tokens: 512 byte tokens, then this many merges, then the two specials.
CLIP_MERGE_COUNT = 49408 - 512 - 2

# Tensors whose shapes tell an SD 1.x checkpoint in the original (LDM/A1111) layout
# from SD 2.x (1024-wide OpenCLIP context, linear projections), SDXL, inpainting
# (9 input channels) and instruct-pix2pix (8) models, none of which the shipped
# configs describe.
SD1_SIGNATURE = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
}


@dataclass
class BaseModel:
    """A loaded pipeline plus the identity A1111 records in hypernetwork files.

    ``sha256`` is the hash of the weights: of the file for ``single_file``; for
    a diffusers folder (``diffusers`` and ``tiny``) it is :func:`folder_weights_sha256`.
    ``short_hash`` is its first 10 hex digits, A1111's ``sd_checkpoint``.
    ``name`` is the WebUI's model name: the file name without its extension.
    """

    pipeline: StableDiffusionPipeline
    sha256: str
    short_hash: str
    name: str
    source: str
    path: Path
    device: torch.device
    dtype: torch.dtype

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.pipeline.unet

    @property
    def vae(self) -> AutoencoderKL:
        return self.pipeline.vae

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self.pipeline.text_encoder

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return self.pipeline.tokenizer

    @property
    def scheduler(self) -> SchedulerMixin:
        return self.pipeline.scheduler


def resolve_device(preference: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA request without one is an error, not a silent CPU run."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise BaseModelError(f"unsupported device {preference!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BaseModelError(f"device {preference!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise BaseModelError(f"unsupported device {preference!r}; use auto, cpu or cuda[:N]")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``/None: fp16 on CUDA (as A1111 runs SD), fp32 on CPU, where half precision is slow and inexact."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise BaseModelError(f"unsupported dtype {dtype!r}; use auto or one of {sorted(names)}")
    return names[dtype]


def webui_model_name(name: str) -> str:
    """What the WebUI calls a checkpoint (``Model:``, ``sd_checkpoint_name``): its file name without the extension."""
    for suffix in SINGLE_FILE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def component_weight_files(folder: str | os.PathLike, component: str) -> list[Path]:
    """The weight files ``from_pretrained`` reads for one component (no variant requested).

    Safetensors win over ``.bin``; variant files such as
    ``diffusion_pytorch_model.fp16.safetensors`` (a dot in the stem) are not
    read, whereas shards (``...-00001-of-00002.safetensors``) all are.
    """
    sub = Path(folder) / component
    if not sub.is_dir():
        return []
    for suffix in COMPONENT_WEIGHT_SUFFIXES:
        files = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix == suffix and "." not in p.stem)
        if files:
            return files
    return []


def folder_weights_sha256(folder: str | os.PathLike) -> str:
    """Combined hash of the weights of a diffusers Stable Diffusion folder.

    It is the SHA-256 of the sorted JSON mapping ``{"<component>/<file>": file
    sha256}`` over :func:`component_weight_files` of the U-Net, VAE and text
    encoder, i.e. exactly the weights that load. Configs, tokenizer files and
    anything else in the folder (a repo clone may also hold single-file
    checkpoints) are left out, so the hash names the weights as the
    single-file hash does.
    """
    root = Path(folder)
    digests = {
        f"{component}/{path.name}": sha256_file(path)
        for component in WEIGHTED_COMPONENTS
        for path in component_weight_files(root, component)
    }
    if not digests:
        raise BaseModelError(f"no unet, vae or text_encoder weights under {root}")
    return stable_hash(digests)


def attention_context_widths(unet: torch.nn.Module) -> list[int]:
    """Sorted distinct widths of the contexts fed to ``to_k``/``to_v`` in every attention layer.

    These are the keys an A1111 hypernetwork must use to act on this model
    (768, 320, 640, 1280 for SD 1.5; 48, 32, 64 for the tiny model).
    """
    widths = {module.to_k.in_features for module in unet.modules() if isinstance(module, Attention)}
    if not widths:
        raise BaseModelError("the U-Net has no attention layers, so a hypernetwork cannot act on it")
    return sorted(widths)


def check_hypernetwork_sizes(sizes: Sequence[int], unet: torch.nn.Module) -> None:
    """Refuse sizes the model has no attention context for: their modules would never train."""
    widths = attention_context_widths(unet)
    unmatched = [size for size in sizes if size not in widths]
    if unmatched:
        raise BaseModelError(
            f"hypernetwork sizes {list(sizes)} include {unmatched}, which match no attention context width "
            f"of this model; its widths are {widths}"
        )


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2/CLIP order).

    Printable Latin-1 bytes stand for themselves; the rest are shifted past
    255 in byte order. The order fixes token ids, so it must stay exactly this.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(shifted))]


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with a 514-token byte-level vocabulary and no merges.

    The real CLIP vocabulary (:func:`clip_tokenizer`) would give the miniature a
    49k-row embedding, growing its text encoder over 40-fold; this one tokenises any
    text (one token per byte) with CLIP's normalisation and special tokens.
    """
    symbols = _byte_symbols()
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_MAX_LENGTH)


def clip_tokenizer() -> CLIPTokenizer:
    """The tokenizer of SD 1.x (OpenAI CLIP ViT-L/14), built from the BPE vocabulary shipped in the package.

    No released tokenizer file can be fetched offline, but the ids are fully
    determined by CLIP's merge list: the vocabulary is the 256 byte symbols,
    their end-of-word forms, one token per merge in rank order, then the two
    specials, the order OpenAI's own tokenizer assigns.
    """
    with gzip.open(CLIP_BPE_VOCABULARY, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    # Line 0 is the file's version header.
    merges = [tuple(line.split()) for line in lines[1:CLIP_MERGE_COUNT + 1]]
    symbols = _byte_symbols()
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols), *("".join(merge) for merge in merges),
              "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a single-file checkpoint, without reading its weights.

    Safetensors keep them in a small header; a ``.ckpt`` is unpickled onto the
    meta device, so a 4 GB file costs no memory either way. Lightning
    checkpoints nest the weights under ``state_dict``, possibly more than once
    (diffusers unwraps them the same way).
    """
    file = Path(path)
    # The parsers fail on a damaged or foreign file in many ways (KeyError,
    # UnpicklingError, SafetensorError...); all mean the same to the user.
    try:
        if file.name.endswith(".safetensors"):
            with safe_open(str(file), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        state = torch.load(file, map_location="meta", weights_only=True)
    except Exception as error:
        raise BaseModelError(f"base model file {file} is not a readable checkpoint: {error}") from error
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        return {}
    return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}


def sd1_mismatch(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why a checkpoint is not SD 1.x in the original layout, or None when it is."""
    for key, expected in SD1_SIGNATURE.items():
        if key not in shapes:
            return f"it has no tensor {key}"
        if shapes[key] != expected:
            return f"{key} has shape {list(shapes[key])} where SD 1.x has {list(expected)}"
    return None


def _tiny_pipeline(seed: int) -> StableDiffusionPipeline:
    tokenizer = tiny_tokenizer()
    # Diffusers and transformers initialise weights from the global RNG; fork it
    # so that building is seeded without disturbing the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32,) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=TINY_CROSS_ATTENTION_DIM,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=TINY_MAX_LENGTH,
                projection_dim=TINY_CROSS_ATTENTION_DIM,
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_model(path: str | os.PathLike, seed: int) -> Path:
    """Write a seeded, randomly initialised miniature SD 1.x in diffusers layout.

    It has the architecture of SD 1.5 at toy scale (64 px images, 8x8 latents),
    so the whole pipeline can run on a CPU in seconds. The folder is built in a
    temporary sibling and swapped in whole, so readers never see a partial
    model; the same seed gives byte-identical weight files. Weights are drawn
    from torch's global RNG (forked and seeded), so build from one thread at a
    time per process.
    """
    target = Path(path)
    pipeline = _tiny_pipeline(seed)
    with atomic_directory(target) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
    return target


def tiny_model_dir(cache_dir: str | os.PathLike, seed: int) -> Path:
    return Path(cache_dir) / f"tiny-sd-seed{seed}"


def _build_tiny_once(folder: Path, seed: int) -> None:
    """Build into the cache without ever replacing a model another process may be reading.

    Parallel runs (e.g. one per tissue class) may all find the cache empty;
    the first rename wins and the others, having built identical bytes, drop theirs.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".building", dir=folder.parent))
    try:
        build_tiny_model(staging / folder.name, seed)
        try:
            os.rename(staging / folder.name, folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _missing_diffusers_parts(folder: Path, *, need_weights: bool) -> list[str]:
    missing = [] if (folder / "model_index.json").is_file() else ["model_index.json"]
    for component, config in _COMPONENT_CONFIGS.items():
        if not (folder / component / config).is_file():
            missing.append(f"{component}/{config}")
    tokenizer = folder / "tokenizer"
    if not ((tokenizer / "tokenizer.json").is_file()
            or ((tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file())):
        missing.append("tokenizer/tokenizer.json (or tokenizer/vocab.json + tokenizer/merges.txt)")
    if need_weights:
        missing += [f"{component}/<weights>" for component in WEIGHTED_COMPONENTS
                    if (folder / component).is_dir() and not component_weight_files(folder, component)]
    return missing


def _require_diffusers_folder(folder: Path, role: str, *, need_weights: bool) -> None:
    if not folder.is_dir():
        raise BaseModelError(f"{role} {folder} is not a directory")
    missing = _missing_diffusers_parts(folder, need_weights=need_weights)
    if missing:
        raise BaseModelError(f"{role} {folder} is not a complete diffusers Stable Diffusion folder; missing: "
                             + ", ".join(missing))


def _verify_sha256(actual: str, expected: str | None, what: Path) -> None:
    if expected is not None and actual.lower() != expected.strip().lower():
        raise BaseModelError(f"SHA-256 mismatch for {what}: expected {expected.strip().lower()}, got {actual}")


def load_base_model(
    source: str,
    path: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    *,
    expected_sha256: str | None = None,
    name: str | None = None,
    tiny_cache_dir: str | os.PathLike | None = None,
    seed: int | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = "auto",
) -> BaseModel:
    """Load a Stable Diffusion 1.x pipeline from local files, offline.

    ``source``:
      * ``tiny``: the miniature of :func:`build_tiny_model`, built once per seed
        under ``tiny_cache_dir`` and then loaded like a diffusers folder;
      * ``diffusers``: ``path`` is a ``save_pretrained`` folder;
      * ``single_file``: ``path`` is an original (LDM/A1111) ``.safetensors``/``.ckpt``.
        For SD 1.x ``config`` may be None: the component configs shipped in
        :data:`SD1_CONFIG_DIR` and :func:`clip_tokenizer` stand in for the hub
        lookup diffusers would otherwise do, once the file's tensor shapes show
        it is SD 1.x. Any other architecture needs ``config``, a local diffusers
        folder giving every component's config (weights there are not needed).

    ``expected_sha256`` is checked against :attr:`BaseModel.sha256` before the
    weights load. ``name`` is what hypernetwork files record as
    ``sd_checkpoint_name`` and images as ``Model``; by default the file or
    folder name of the model actually loaded. Either way it is kept without a
    ``.safetensors``/``.ckpt`` extension, as the WebUI names checkpoints.
    """
    if source not in SOURCES:
        raise BaseModelError(f"unknown base model source {source!r}; use one of {', '.join(SOURCES)}")
    torch_device = resolve_device(device) if not isinstance(device, torch.device) else device
    torch_dtype = resolve_dtype(dtype, torch_device)

    if source == "tiny":
        return _load_tiny(tiny_cache_dir, seed, expected_sha256, name, torch_device, torch_dtype)

    if path is None:
        raise BaseModelError(f"base model source {source!r} needs a path")
    model_path = Path(path).expanduser()

    if source == "diffusers":
        _require_diffusers_folder(model_path, "base model folder", need_weights=True)
        return _load_folder(model_path, "diffusers", expected_sha256, name or model_path.name, torch_device,
                            torch_dtype)
    return _load_single_file(model_path, config, expected_sha256, name, torch_device, torch_dtype)


def _load_tiny(cache_dir: str | os.PathLike | None, seed: int | None, expected_sha256: str | None, name: str | None,
               device: torch.device, dtype: torch.dtype) -> BaseModel:
    if cache_dir is None or seed is None:
        raise BaseModelError("source 'tiny' needs tiny_cache_dir (where the built model is cached) and seed")
    folder = tiny_model_dir(cache_dir, seed)
    if not folder.is_dir():
        _build_tiny_once(folder, seed)
    elif _missing_diffusers_parts(folder, need_weights=True):
        build_tiny_model(folder, seed)
    return _load_folder(folder, "tiny", expected_sha256, name or folder.name, device, dtype)


def _load_single_file(model_path: Path, config: str | os.PathLike | None, expected_sha256: str | None,
                      name: str | None, device: torch.device, dtype: torch.dtype) -> BaseModel:
    if not model_path.is_file():
        raise BaseModelError(f"base model file {model_path} does not exist")
    if not model_path.name.endswith(SINGLE_FILE_SUFFIXES):
        raise BaseModelError(f"base model file {model_path} must end in one of {', '.join(SINGLE_FILE_SUFFIXES)}")
    if config is None:
        mismatch = sd1_mismatch(checkpoint_shapes(model_path))
        if mismatch is not None:
            raise BaseModelError(
                f"base model file {model_path} is not an SD 1.x checkpoint in the original layout ({mismatch}); "
                "only SD 1.x loads without a config folder, so for this file source 'single_file' needs config: "
                "a local diffusers folder with model_index.json and the unet, vae, text_encoder, tokenizer and "
                "scheduler configs, because the hub cannot be reached to fetch them"
            )
        config_dir = SD1_CONFIG_DIR
        components = {"tokenizer": clip_tokenizer()}
    else:
        config_dir = Path(config).expanduser()
        _require_diffusers_folder(config_dir, "base model config folder", need_weights=False)
        components = {}
    sha256 = sha256_file(model_path)
    _verify_sha256(sha256, expected_sha256, model_path)
    pipeline = StableDiffusionPipeline.from_single_file(
        str(model_path),
        config=str(config_dir),
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        dtype=dtype,
        **components,
    )
    return _finish(pipeline, sha256, name or model_path.name, "single_file", model_path, device, dtype)


def _load_folder(folder: Path, source: str, expected_sha256: str | None, name: str, device: torch.device,
                 dtype: torch.dtype) -> BaseModel:
    sha256 = folder_weights_sha256(folder)
    _verify_sha256(sha256, expected_sha256, folder)
    pipeline = StableDiffusionPipeline.from_pretrained(
        folder,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        dtype=dtype,
    )
    return _finish(pipeline, sha256, name, source, folder, device, dtype)


def _finish(pipeline: StableDiffusionPipeline, sha256: str, name: str, source: str, path: Path,
            device: torch.device, dtype: torch.dtype) -> BaseModel:
    """Freeze and place the pipeline: the base model is never trained here."""
    pipeline.to(device)
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(pipeline=pipeline, sha256=sha256, short_hash=short_hash(sha256), name=webui_model_name(name),
                     source=source, path=path, device=device, dtype=dtype)


def describe_architecture(base: BaseModel) -> dict:
    """The facts an auditor needs to tell which Stable Diffusion family a base model is, and what a hypernetwork can act on."""
    unet, vae, text_encoder = base.unet.config, base.vae.config, base.text_encoder.config
    return {
        "unet_block_out_channels": list(unet.block_out_channels),
        "cross_attention_dim": int(unet.cross_attention_dim),
        "attention_context_widths": attention_context_widths(base.unet),
        "latent_channels": int(vae.latent_channels),
        "vae_downsampling": 2 ** (len(vae.block_out_channels) - 1),
        "text_encoder_hidden_size": int(text_encoder.hidden_size),
        "text_encoder_layers": int(text_encoder.num_hidden_layers),
        "vocabulary": len(base.tokenizer),
        "parameters": {name: sum(t.numel() for t in module.parameters())
                       for name, module in (("unet", base.unet), ("vae", base.vae), ("text_encoder", base.text_encoder))},
    }


def describe_base_model(base: BaseModel) -> dict:
    """The base_model asset's record of a model: the identity hypernetwork files and images quote, and its architecture."""
    return {"source": base.source, "name": base.name, "sha256": base.sha256, "short_hash": base.short_hash,
            "path": str(base.path), "architecture": describe_architecture(base)}
