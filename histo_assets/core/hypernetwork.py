"""AUTOMATIC1111-compatible hypernetworks for diffusers U-Nets.

Implemented clean-room from ``shared/reference/a1111-hypernetwork.md``; the
section numbers in comments (§n) refer to that specification. The file format
must stay byte-for-byte loadable by A1111, ComfyUI and sdkit, so the module
layout (which fixes the state-dict indices) and the metadata keys follow the
specification exactly, including its quirks.
"""

from __future__ import annotations

import inspect
import io
import json
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from histo_assets.core.a1111_text import short_hash
from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.io import Log, atomic_write_bytes, sha256_file, stable_hash
from histo_assets.core.layout import INDEX
from histo_assets.core.schemas import IMPORTED_HYPERNETWORK_INDEX

OPTIMIZER_SUFFIX = ".optim"
WEIGHT_INIT_SCHEMES = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
# §4: "Normal" Linears and every LayerNorm start at N(0, 0.01), so the residual MLP starts near zero.
_NORMAL_INIT_STD = 0.01
# §8: the dropout probability A1111 assumes for files that predate `dropout_structure`.
_LEGACY_DROPOUT = 0.3
_LEGACY_RENAMES = (("linear1.", "linear.0."), ("linear2.", "linear.1."))
# Keys written by the Hypernetwork-MonkeyPatch extension that change the architecture (§8).
_EXTENSION_KEYS = ("skip_connection", "upsample_linear")


class HypernetworkFormatError(HistoAssetsError, ValueError):
    """A hypernetwork file that cannot be loaded as an A1111 hypernetwork."""


def _builds_without_arguments(cls: type) -> bool:
    params = inspect.signature(cls).parameters.values()
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def _activation_classes() -> dict[str, type[nn.Module]]:
    """§2: activations of ``torch.nn.modules.activation`` by lowercased class name.

    Classes that need constructor arguments (MultiheadAttention, Threshold)
    cannot be built from a name alone, so they are not offered.
    """
    module = torch.nn.modules.activation
    classes = {
        name.lower(): cls
        for name, cls in vars(module).items()
        if isinstance(cls, type)
        and issubclass(cls, nn.Module)
        and cls.__module__ == module.__name__
        and _builds_without_arguments(cls)
    }
    classes["swish"] = nn.Hardswish  # A1111's historical name, not SiLU
    return classes


ACTIVATIONS = _activation_classes()
_NO_ACTIVATION = (None, "linear")


def sanitize_name(name: str) -> str:
    """§2: A1111 keeps only alphanumerics and ``._- `` in names given at creation."""
    return "".join(ch for ch in name if ch.isalnum() or ch in "._- ")


def rebuilt_dropout_structure(n_layers: int, use_dropout: bool, last_layer_dropout: bool) -> tuple[float, ...]:
    """§8: the dropout structure A1111 assumes when a file (or caller) does not give one."""
    if not use_dropout or n_layers < 3:  # a single Linear has no hidden layer to drop out of
        return (0.0,) * n_layers
    last = _LEGACY_DROPOUT if last_layer_dropout else 0.0
    return (0.0,) + (_LEGACY_DROPOUT,) * (n_layers - 3) + (last, 0.0)


@dataclass(frozen=True)
class HypernetworkOptions:
    """Architecture of every module of a hypernetwork (§2, §3).

    Normalised on construction so that equal architectures compare equal:
    ``dropout_structure=None`` is rebuilt by the §8 rule, ``use_dropout`` is
    set when any dropout is non-zero, and ``last_layer_dropout`` is derived
    from the structure exactly as A1111 writes it (``structure[-2] != 0``).
    """

    sizes: tuple[int, ...] = (768, 320, 640, 1280)
    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation: str | None = "linear"
    weight_init: str | None = "Normal"
    layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: tuple[float, ...] | None = None
    activate_output: bool = False
    last_layer_dropout: bool = False

    def __post_init__(self) -> None:
        sizes = tuple(int(size) for size in self.sizes)
        structure = tuple(float(value) for value in self.layer_structure)
        if not sizes or len(set(sizes)) != len(sizes) or min(sizes) <= 0:
            raise ValueError(f"sizes must be distinct positive widths, got {self.sizes}")
        if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1:
            raise ValueError(f"layer_structure must have at least 2 entries and start and end with 1, got {structure}")
        if any(int(size * value) < 1 for size in sizes for value in structure):
            raise ValueError(f"layer_structure {structure} gives an empty layer for sizes {sizes}")
        if self.activation not in _NO_ACTIVATION and self.activation not in ACTIVATIONS:
            known = ", ".join(sorted(ACTIVATIONS))
            raise ValueError(f"unknown activation {self.activation!r}; use 'linear', None or one of: {known}")
        # §8: files created through the WebUI's API store None; the WebUI then initialises as Normal.
        if self.weight_init is not None and self.weight_init not in WEIGHT_INIT_SCHEMES:
            raise ValueError(f"unknown weight_init {self.weight_init!r}; use one of {WEIGHT_INIT_SCHEMES} or None")
        if self.dropout_structure is None:
            dropout = rebuilt_dropout_structure(len(structure), self.use_dropout, self.last_layer_dropout)
        else:
            dropout = tuple(float(value) for value in self.dropout_structure)
        if len(dropout) != len(structure):
            raise ValueError(f"dropout_structure {dropout} must have as many entries as layer_structure {structure}")
        if any(not (value == 0 or 0 < value < 1) for value in dropout):
            raise ValueError(f"dropout values must be 0 or in (0, 1), got {dropout}")
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "layer_structure", structure)
        object.__setattr__(self, "dropout_structure", dropout)
        object.__setattr__(self, "use_dropout", bool(self.use_dropout) or any(dropout))
        object.__setattr__(self, "last_layer_dropout", dropout[-2] != 0)


class HypernetworkModule(nn.Module):
    """One residual MLP, ``x + MLP(x) * m`` (§5); ``linear`` fixes the state-dict keys (§3)."""

    def __init__(self, width: int, options: HypernetworkOptions, generator: torch.Generator | None) -> None:
        super().__init__()
        structure, dropout = options.layer_structure, options.dropout_structure
        activation = None if options.activation in _NO_ACTIVATION else ACTIVATIONS[options.activation]
        layers: list[nn.Module] = []
        n_linear = len(structure) - 1
        for i in range(n_linear):
            out_features = int(width * structure[i + 1])
            # skip_init: torch's default init would draw from the global RNG; §4 init follows.
            layers.append(nn.utils.skip_init(nn.Linear, int(width * structure[i]), out_features, dtype=torch.float32))
            if activation is not None and (i < n_linear - 1 or options.activate_output):
                layers.append(activation())
            if options.layer_norm:
                layers.append(nn.utils.skip_init(nn.LayerNorm, out_features, dtype=torch.float32))
            if dropout[i + 1] > 0:
                layers.append(nn.Dropout(p=dropout[i + 1]))
        self.linear = nn.Sequential(*layers)
        self._initialise(options, generator)

    @torch.no_grad()
    def _initialise(self, options: HypernetworkOptions, generator: torch.Generator | None) -> None:
        nonlinearity = "leaky_relu" if options.activation == "leakyrelu" else "relu"
        for layer in self.linear:
            if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
                continue
            scheme = "Normal" if isinstance(layer, nn.LayerNorm) else options.weight_init or "Normal"
            if scheme == "Normal":
                nn.init.normal_(layer.weight, mean=0.0, std=_NORMAL_INIT_STD, generator=generator)
            elif scheme == "XavierUniform":
                nn.init.xavier_uniform_(layer.weight, generator=generator)
            elif scheme == "XavierNormal":
                nn.init.xavier_normal_(layer.weight, generator=generator)
            elif scheme == "KaimingUniform":
                nn.init.kaiming_uniform_(layer.weight, nonlinearity=nonlinearity, generator=generator)
            else:
                nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity, generator=generator)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, multiplier: float = 1.0) -> Tensor:
        # §5: the strength only applies at inference; training always uses the full residual.
        strength = 1.0 if self.training else multiplier
        return x + self.linear(x) * strength


class Hypernetwork(nn.Module):
    """A (K, V) pair of residual MLPs per context width (§1), plus the file metadata."""

    def __init__(self, name: str, options: HypernetworkOptions = HypernetworkOptions(), *, seed: int | None = None):
        super().__init__()
        self.name = name
        self.options = options
        self.step = 0
        self.sd_checkpoint: str | None = None
        self.sd_checkpoint_name: str | None = None
        self.optional_info: str | None = None
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.pairs = nn.ModuleDict(
            {
                str(width): nn.ModuleList([HypernetworkModule(width, options, generator) for _ in range(2)])
                for width in options.sizes
            }
        )

    def modules_for(self, width: int) -> tuple[nn.Module, nn.Module] | None:
        pair = self.pairs[str(width)] if str(width) in self.pairs else None
        return None if pair is None else (pair[0], pair[1])

    def transform_context(self, context: Tensor, multiplier: float = 1.0) -> tuple[Tensor, Tensor]:
        """Return the contexts for ``to_k`` and ``to_v``; widths without a module pass through (§6)."""
        pair = self.modules_for(context.shape[-1])
        if pair is None:
            return context, context
        x = context.float()  # §5: modules run in fp32, the result goes back to the U-Net dtype
        k_module, v_module = pair
        return k_module(x, multiplier).to(context.dtype), v_module(x, multiplier).to(context.dtype)


def _portable_state_dict(module: nn.Module) -> OrderedDict[str, Tensor]:
    state = module.state_dict()
    return OrderedDict((key, value.detach().to("cpu", torch.float32).clone()) for key, value in state.items())


def _file_dict(hn: Hypernetwork) -> dict[Any, Any]:
    """§2 layout: int width keys with tuples of OrderedDicts, then the metadata."""
    options = hn.options
    contents: dict[Any, Any] = {}
    for width in options.sizes:
        k_module, v_module = hn.modules_for(width)
        contents[width] = (_portable_state_dict(k_module), _portable_state_dict(v_module))
    contents.update(
        step=int(hn.step),
        name=hn.name,
        layer_structure=list(options.layer_structure),
        activation_func=options.activation,
        is_layer_norm=options.layer_norm,
        weight_initialization=options.weight_init,
        sd_checkpoint=hn.sd_checkpoint,
        sd_checkpoint_name=hn.sd_checkpoint_name,
        activate_output=options.activate_output,
        use_dropout=options.use_dropout,
        dropout_structure=list(options.dropout_structure),
        last_layer_dropout=options.last_layer_dropout,
        optional_info=hn.optional_info,
    )
    return contents


# §2: the only zip entries the WebUI's restricted loader accepts, after the archive's folder name.
WEBUI_ZIP_ENTRY = re.compile(r"[^/]+/(data\.pkl|data/\d+|version|byteorder|\.data/serialization_id)")
# torch aligns every record's data to this many bytes, so memory-mapped loads stay possible.
_RECORD_ALIGNMENT = 64
_PADDING_FIELD_ID = b"FB"  # the extra-field id torch's own writer pads with
_LOCAL_HEADER_SIZE = 30


def _aligned_info(name: str, offset: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    unpadded = offset + _LOCAL_HEADER_SIZE + len(name.encode()) + 4
    padding = -unpadded % _RECORD_ALIGNMENT
    info.extra = _PADDING_FIELD_ID + padding.to_bytes(2, "little") + b"Z" * padding
    return info


def webui_loadable_bytes(obj: Any) -> bytes:
    """``torch.save`` output cut down to the zip entries the WebUI's loader allows (§2).

    torch writes ``.format_version`` and ``.storage_alignment`` besides the
    records the WebUI knows, and the WebUI refuses any file holding them with
    "bad file inside". Both are optional for ``torch.load``, so they are left
    out. Saving to a buffer keeps the archive name fixed ("archive") and the
    entries are rewritten with a fixed date, so equal contents give equal bytes.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    out = io.BytesIO()
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(out, "w") as target:
        for entry in source.infolist():
            if WEBUI_ZIP_ENTRY.fullmatch(entry.filename):
                target.writestr(_aligned_info(entry.filename, out.tell()), source.read(entry))
    return out.getvalue()


def optimizer_sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + OPTIMIZER_SUFFIX)


def save_hypernetwork(hn: Hypernetwork, path: str | Path, *, optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write ``hn`` in the A1111 ``.pt`` layout and, with ``optimizer``, the ``.pt.optim`` sidecar.

    The sidecar records the short hash of the ``.pt`` it belongs to, so a stale
    sidecar next to a rewritten file is ignored on resume (§2).
    """
    path = atomic_write_bytes(path, webui_loadable_bytes(_file_dict(hn)))
    if optimizer is not None:
        sidecar = {
            "optimizer_name": type(optimizer).__name__,
            "hash": short_hash(sha256_file(path)),
            "optimizer_state_dict": optimizer.state_dict(),
        }
        atomic_write_bytes(optimizer_sidecar_path(path), webui_loadable_bytes(sidecar))
    return path


def load_optimizer_state(path: str | Path) -> dict | None:
    """The sidecar's optimizer state, or None if there is none or it belongs to another ``.pt``."""
    sidecar_path = optimizer_sidecar_path(path)
    if not sidecar_path.is_file():
        return None
    sidecar = torch.load(sidecar_path, map_location="cpu", weights_only=True)
    if not isinstance(sidecar, Mapping) or sidecar.get("hash") != short_hash(sha256_file(path)):
        return None
    return sidecar.get("optimizer_state_dict")


def _options_from_file(contents: Mapping[Any, Any], sizes: tuple[int, ...]) -> HypernetworkOptions:
    """§8 defaults for every metadata key a (possibly old) file may lack.

    A ``dropout_structure`` longer than ``layer_structure`` is cut to its length:
    the WebUI only ever indexes its first entries, so the rest never take effect.
    """
    structure = tuple(contents.get("layer_structure") or (1.0, 2.0, 1.0))
    dropout = contents.get("dropout_structure")
    if dropout is not None:
        dropout = tuple(dropout)[: len(structure)]
    use_dropout = bool(contents.get("use_dropout", False)) or bool(dropout and any(dropout))
    return HypernetworkOptions(
        sizes=sizes,
        layer_structure=structure,
        activation=contents.get("activation_func"),
        weight_init=contents.get("weight_initialization", "Normal"),
        layer_norm=bool(contents.get("is_layer_norm", False)),
        use_dropout=use_dropout,
        dropout_structure=dropout,
        activate_output=bool(contents.get("activate_output", True)),
        last_layer_dropout=bool(contents.get("last_layer_dropout", False)),
    )


def _renamed_legacy_keys(state: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    renamed: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state.items():
        for old, new in _LEGACY_RENAMES:
            if key.startswith(old):
                key = new + key[len(old) :]
        renamed[key] = value
    return renamed


def load_hypernetwork(path: str | Path, *, map_location: str | torch.device = "cpu") -> Hypernetwork:
    """Load an A1111 ``.pt`` hypernetwork, applying the §8 defaults and legacy renames.

    The result is in eval mode, ready for inference as after the WebUI's load:
    in training mode the multiplier would be ignored and dropout active (§5).
    Call ``.train()`` to resume training.
    """
    path = Path(path)
    try:
        contents = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # the unpickler raises many types; callers need one
        raise HypernetworkFormatError(f"{path}: not a loadable hypernetwork file ({err})") from err
    if not isinstance(contents, Mapping):
        raise HypernetworkFormatError(f"{path}: expected a dict, found {type(contents).__name__}")
    extensions = [key for key in _EXTENSION_KEYS if contents.get(key) is not None and contents[key] is not False]
    if extensions:
        raise HypernetworkFormatError(
            f"{path}: uses {extensions} from the Hypernetwork-MonkeyPatch extension, "
            "which changes the architecture; only plain A1111 hypernetworks are supported"
        )
    widths = tuple(key for key in contents if isinstance(key, int) and not isinstance(key, bool))
    if not widths:
        raise HypernetworkFormatError(f"{path}: no integer width keys, so no hypernetwork modules")
    try:
        options = _options_from_file(contents, widths)
    except ValueError as err:
        raise HypernetworkFormatError(f"{path}: {err}") from err
    # The seed only keeps the global RNG untouched; every weight is overwritten below.
    hn = Hypernetwork(contents.get("name") or path.stem, options, seed=0)
    for width in widths:
        states = contents[width]
        if not isinstance(states, (tuple, list)) or len(states) != 2:
            raise HypernetworkFormatError(f"{path}: width {width} must hold a (k, v) pair of state dicts")
        for module, state in zip(hn.modules_for(width), states):
            try:
                module.load_state_dict(_renamed_legacy_keys(state))
            except (RuntimeError, AttributeError) as err:
                raise HypernetworkFormatError(f"{path}: width {width} does not match its metadata: {err}") from err
    hn.step = int(contents.get("step") or 0)
    hn.sd_checkpoint = contents.get("sd_checkpoint")
    hn.sd_checkpoint_name = contents.get("sd_checkpoint_name")
    hn.optional_info = contents.get("optional_info")
    return hn.to(map_location).eval()


def checkpoint_problems(folder: str | Path, checkpoints: Sequence[Mapping[str, Any]],
                        wanted_steps: Iterable[int]) -> list[str]:
    """What keeps a run's checkpoints from being used; empty when all is well.

    ``checkpoints`` are the summary's entries (step, file, sha256). A file is
    only trusted when it is the one recorded, loads in safe mode as any WebUI
    would, and has finite weights, since generation reads every one of them.
    """
    problems = []
    missing = sorted({int(step) for step in wanted_steps} - {int(entry["step"]) for entry in checkpoints})
    if missing:
        problems.append(f"missing steps {missing}")
    for entry in sorted(checkpoints, key=lambda entry: entry["step"]):
        path = Path(folder) / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['file']}: missing or changed on disk")
            continue
        try:
            hn = load_hypernetwork(path)
        except (HypernetworkFormatError, RuntimeError, OSError, pickle.UnpicklingError) as error:
            problems.append(f"{entry['file']}: does not load ({error})")
            continue
        if not all(torch.isfinite(t).all() for t in hn.state_dict().values()):
            problems.append(f"{entry['file']}: non-finite weights")
    return problems


def _imported_row(path: Path, hn: Hypernetwork, widths: set[int]) -> dict[str, Any]:
    sizes = hn.options.sizes
    return {
        "file": path.name, "path": str(path), "sha256": sha256_file(path), "name": hn.name, "step": hn.step,
        "sizes": ",".join(map(str, sizes)), "unused_sizes": ",".join(map(str, sorted(set(sizes) - widths))),
        "activation": str(hn.options.activation), "layer_structure": ",".join(map(str, hn.options.layer_structure)),
        "sd_checkpoint": hn.sd_checkpoint, "sd_checkpoint_name": hn.sd_checkpoint_name,
    }


def write_imported_index(out: Path, inbox: Path, context_widths: Callable[[], Iterable[int]],
                         warn: Log) -> dict[str, Any]:
    """Index the ``.pt`` files a lab dropped into ``inbox`` in ``out``; the summary's fields.

    An inbox holds whatever a lab had, so a file that fails to load or fits
    no attention width of the model is skipped, with the reason kept for
    people to read. ``context_widths`` (the base model's, slow to load) is
    asked for only once a file has loaded, so an inbox of unusable files never
    needs the model. The data version is the hash of the indexed files' hashes.
    """
    rows, problems = [], []
    widths = None
    for path in sorted(inbox.glob("*.pt")) if inbox.is_dir() else []:
        try:
            hn = load_hypernetwork(path)
            if widths is None:
                widths = set(context_widths())
            if not set(hn.options.sizes) & widths:
                raise ValueError(f"none of its sizes {list(hn.options.sizes)} match the base model's attention "
                                 f"widths {sorted(widths)}")
        except Exception as error:
            problems.append({"file": path.name, "reason": str(error)})
            warn(f"skipped imported hypernetwork {path.name}: {error}")
            continue
        rows.append(_imported_row(path, hn, widths))
    frame = pd.DataFrame(rows, columns=list(IMPORTED_HYPERNETWORK_INDEX.columns))
    IMPORTED_HYPERNETWORK_INDEX.write(out / INDEX, frame)
    return {"count": len(rows), "problems": problems, "data_version": stable_hash(sorted(frame["sha256"]))}


def export_safetensors(hn: Hypernetwork, path: str | Path) -> Path:
    """Write the weights as ``<width>.<k|v>.<key>`` tensors; metadata values are JSON strings."""
    contents = _file_dict(hn)
    tensors: dict[str, Tensor] = {}
    metadata: dict[str, str] = {}
    for key, value in contents.items():
        if isinstance(key, int):
            for role, state in zip(("k", "v"), value):
                tensors.update({f"{key}.{role}.{name}": tensor.contiguous() for name, tensor in state.items()})
        else:
            metadata[key] = json.dumps(value)
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


class HypernetworkAttnProcessor:
    """SDPA attention with the hypernetwork applied to the K and V contexts (§10).

    Mirrors diffusers' ``AttnProcessor2_0`` operation for operation, so that a
    context passed through unchanged gives bit-identical results. A plain
    object, not an ``nn.Module``, so the hypernetwork's weights never become
    part of the U-Net's parameters or state dict. ``hn_scale`` overrides the
    multiplier per call, e.g. ``pipe(..., cross_attention_kwargs={"hn_scale": 0.8})``.
    """

    def __init__(self, hypernetwork: Hypernetwork, multiplier: float = 1.0) -> None:
        self.hypernetwork = hypernetwork
        self.multiplier = multiplier

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: Any,
        hn_scale: float | None = None,
        **kwargs: Any,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context_shape = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        batch_size, context_length, _ = context_shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        multiplier = self.multiplier if hn_scale is None else hn_scale
        context_k, context_v = self.hypernetwork.transform_context(encoder_hidden_states, multiplier)
        key = attn.to_k(context_k)
        value = attn.to_v(context_v)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def apply_hypernetwork(
    unet: nn.Module, hn: Hypernetwork, multiplier: float = 1.0
) -> Iterator[HypernetworkAttnProcessor]:
    """Route every attention layer of ``unet`` through ``hn`` (self- and cross-attention, §10).

    The original processors are restored on exit, also after an exception.
    The yielded processor's ``multiplier`` may be changed inside the block.
    """
    original = unet.attn_processors
    processor = HypernetworkAttnProcessor(hn, multiplier)
    unet.set_attn_processor(processor)
    try:
        yield processor
    finally:
        unet.set_attn_processor(dict(original))
