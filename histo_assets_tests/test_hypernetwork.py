"""Behavioural tests of the A1111 hypernetwork format and the diffusers hook.

The hand-built files and reference forwards are written here directly from
``shared/reference/a1111-hypernetwork.md`` (§2, §3, §5, §8), independently of
the module under test, so a shared misreading cannot make both agree.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors import safe_open

from histo_assets.core.a1111_text import short_hash
from histo_assets.core.io import sha256_file, stable_hash
from histo_assets.core.hypernetwork import (
    Hypernetwork,
    HypernetworkAttnProcessor,
    HypernetworkFormatError,
    HypernetworkOptions,
    apply_hypernetwork,
    checkpoint_problems,
    export_safetensors,
    load_hypernetwork,
    load_optimizer_state,
    sanitize_name,
    save_hypernetwork,
    write_imported_index,
)
from histo_assets.settings import from_section

CROSS_DIM = 48  # deliberately unlike the block widths, so attn1 and attn2 keys differ
TINY_SIZES = (CROSS_DIM, 32, 64)
METADATA_KEYS = {
    "step",
    "name",
    "layer_structure",
    "activation_func",
    "is_layer_norm",
    "weight_initialization",
    "sd_checkpoint",
    "sd_checkpoint_name",
    "activate_output",
    "use_dropout",
    "dropout_structure",
    "last_layer_dropout",
    "optional_info",
}


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return model.eval().requires_grad_(False)


@pytest.fixture
def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 5, CROSS_DIM, generator=g)
    return sample, torch.tensor([10, 500]), context


def _tiny_hn(seed: int = 3, **options) -> Hypernetwork:
    return Hypernetwork("tiny", HypernetworkOptions(sizes=TINY_SIZES, **options), seed=seed)


# --- hand-built A1111 files -------------------------------------------------------------

# Each layer spec is the A1111 Sequential of §3 for ls=[1, 2, 1]: ("linear", idx, in_mult, out_mult),
# ("relu",), ("ln", idx, mult) or ("dropout",). Indices are the positions in the Sequential.
DEFAULT_LINEAR = [("linear", 0, 1, 2), ("linear", 1, 2, 1)]
RELU_LN = [("linear", 0, 1, 2), ("relu",), ("ln", 2, 2), ("linear", 3, 2, 1), ("ln", 4, 1)]
RELU_DROPOUT = [("linear", 0, 1, 2), ("relu",), ("dropout",), ("linear", 3, 2, 1)]
RELU_ACTIVATE_OUTPUT = [("linear", 0, 1, 2), ("relu",), ("linear", 2, 2, 1), ("relu",)]

FULL_DEFAULT_METADATA = {
    "layer_structure": [1.0, 2.0, 1.0],
    "activation_func": "linear",
    "is_layer_norm": False,
    "weight_initialization": "Normal",
    "activate_output": False,
    "use_dropout": False,
    "dropout_structure": [0.0, 0.0, 0.0],
    "last_layer_dropout": False,
    "step": 123,
    "name": "from-file",
    "sd_checkpoint": "0123456789",
    "sd_checkpoint_name": "v1-5-pruned-emaonly",
    "optional_info": None,
}

# (case id, metadata written, layer spec, legacy key names, expected options and attributes after load)
HAND_BUILT_CASES = [
    (
        "default-linear",
        FULL_DEFAULT_METADATA,
        DEFAULT_LINEAR,
        False,
        {"activation": "linear", "activate_output": False, "use_dropout": False, "step": 123, "name": "from-file"},
    ),
    (
        "relu-layernorm",
        {**FULL_DEFAULT_METADATA, "activation_func": "relu", "is_layer_norm": True},
        RELU_LN,
        False,
        {"activation": "relu", "layer_norm": True, "activate_output": False},
    ),
    (
        "relu-dropout",
        {
            **FULL_DEFAULT_METADATA,
            "activation_func": "relu",
            "use_dropout": True,
            "dropout_structure": [0.0, 0.3, 0.0],
            "last_layer_dropout": True,
        },
        RELU_DROPOUT,
        False,
        {"use_dropout": True, "dropout_structure": (0.0, 0.3, 0.0), "last_layer_dropout": True},
    ),
    (
        "relu-activate-output",
        {**FULL_DEFAULT_METADATA, "activation_func": "relu", "activate_output": True},
        RELU_ACTIVATE_OUTPUT,
        False,
        {"activation": "relu", "activate_output": True},
    ),
    (
        "legacy-linear1-linear2",
        {},
        DEFAULT_LINEAR,
        True,
        {
            "layer_structure": (1.0, 2.0, 1.0),
            "activation": None,
            "weight_init": "Normal",
            "layer_norm": False,
            "activate_output": True,
            "use_dropout": False,
            "dropout_structure": (0.0, 0.0, 0.0),
            "last_layer_dropout": False,
            "step": 0,
            "name": "legacy-linear1-linear2",
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
            "optional_info": None,
        },
    ),
    (
        # §8: an old file with an activation but no `activate_output` key activates the output too.
        "old-relu-no-activate-output-key",
        {"layer_structure": [1, 2, 1], "activation_func": "relu"},
        RELU_ACTIVATE_OUTPUT,
        False,
        {"activate_output": True, "use_dropout": False},
    ),
    (
        # §8: dropout flags without a structure rebuild it: [0] + [0.3]*(n-3) + [0.3 if last] + [0].
        "old-dropout-no-structure",
        {"activation_func": "relu", "activate_output": False, "use_dropout": True, "last_layer_dropout": True},
        RELU_DROPOUT,
        False,
        {"use_dropout": True, "dropout_structure": (0.0, 0.3, 0.0), "last_layer_dropout": True},
    ),
]


def _hand_state(spec, width: int, g: torch.Generator, legacy: bool) -> OrderedDict:
    state = OrderedDict()
    for layer in spec:
        if layer[0] == "linear":
            _, idx, in_mult, out_mult = layer
            prefix = f"linear{idx + 1}." if legacy else f"linear.{idx}."
            state[prefix + "weight"] = torch.randn(width * out_mult, width * in_mult, generator=g) * 0.1
            state[prefix + "bias"] = torch.randn(width * out_mult, generator=g) * 0.1
        elif layer[0] == "ln":
            _, idx, mult = layer
            state[f"linear.{idx}.weight"] = 1 + torch.randn(width * mult, generator=g) * 0.1
            state[f"linear.{idx}.bias"] = torch.randn(width * mult, generator=g) * 0.1
    return state


def _reference_mlp(spec, state: OrderedDict, x: torch.Tensor, legacy: bool) -> torch.Tensor:
    """The §3 MLP with explicit matmuls; dropout is the identity in eval mode."""
    h = x
    for layer in spec:
        if layer[0] == "linear":
            prefix = f"linear{layer[1] + 1}." if legacy else f"linear.{layer[1]}."
            h = h @ state[prefix + "weight"].T + state[prefix + "bias"]
        elif layer[0] == "relu":
            h = torch.clamp_min(h, 0.0)
        elif layer[0] == "ln":
            mean = h.mean(dim=-1, keepdim=True)
            var = ((h - mean) ** 2).mean(dim=-1, keepdim=True)
            gamma, beta = state[f"linear.{layer[1]}.weight"], state[f"linear.{layer[1]}.bias"]
            h = (h - mean) / torch.sqrt(var + 1e-5) * gamma + beta
    return h


@pytest.mark.parametrize("case", HAND_BUILT_CASES, ids=[case[0] for case in HAND_BUILT_CASES])
def test_hand_built_a1111_file_loads_with_spec_defaults_and_forward(tmp_path, case):
    case_id, metadata, spec, legacy, expected = case
    g = torch.Generator().manual_seed(7)
    widths = (CROSS_DIM, 32)
    states = {d: (_hand_state(spec, d, g, legacy), _hand_state(spec, d, g, legacy)) for d in widths}
    path = tmp_path / f"{case_id}.pt"
    torch.save({**states, **metadata}, path)

    hn = load_hypernetwork(path)

    assert hn.options.sizes == widths
    for key, value in expected.items():
        holder = hn.options if hasattr(hn.options, key) else hn
        assert getattr(holder, key) == value, key
    hn.eval()
    multiplier = 0.7
    for d in widths:
        x = torch.randn(2, 5, d, generator=g)
        got_k, got_v = hn.transform_context(x, multiplier)
        k_state, v_state = states[d]
        torch.testing.assert_close(got_k, x + _reference_mlp(spec, k_state, x, legacy) * multiplier)
        torch.testing.assert_close(got_v, x + _reference_mlp(spec, v_state, x, legacy) * multiplier)
    unknown = torch.randn(2, 5, 64, generator=g)
    passed_k, passed_v = hn.transform_context(unknown, multiplier)
    assert passed_k is unknown and passed_v is unknown


def test_training_mode_ignores_multiplier():
    hn = _tiny_hn()
    x = torch.randn(1, 4, 32)
    hn.train()
    trained_k, _ = hn.transform_context(x, multiplier=0.0)
    hn.eval()
    full_k, _ = hn.transform_context(x, multiplier=1.0)
    off_k, _ = hn.transform_context(x, multiplier=0.0)
    assert torch.equal(trained_k, full_k)
    assert torch.equal(off_k, x)
    assert not torch.equal(full_k, x)


def test_context_runs_in_fp32_and_returns_input_dtype():
    hn = _tiny_hn().eval()
    x = torch.randn(1, 4, 32).to(torch.bfloat16)
    k_module, _ = hn.modules_for(32)
    got_k, _ = hn.transform_context(x, 0.5)
    assert got_k.dtype == torch.bfloat16
    assert torch.equal(got_k, k_module(x.float(), 0.5).to(torch.bfloat16))
    assert hn.modules_for(1024) is None


# --- save / load round trip ----------------------------------------------------------------


def test_save_load_round_trip_keeps_a1111_layout_and_metadata(tmp_path):
    hn = _tiny_hn(activation="relu", layer_norm=True, dropout_structure=(0.0, 0.3, 0.0), weight_init="KaimingNormal")
    hn.step = 4999
    hn.sd_checkpoint = "abcdef0123"
    hn.sd_checkpoint_name = "v1-5-pruned-emaonly"
    hn.optional_info = "H&E adipose"
    path = save_hypernetwork(hn, tmp_path / "tiny-5000.pt")

    raw = torch.load(path, weights_only=True)
    assert set(raw) == set(TINY_SIZES) | METADATA_KEYS
    assert all(type(key) is int for key in raw if not isinstance(key, str))
    for d in TINY_SIZES:
        assert isinstance(raw[d], tuple) and len(raw[d]) == 2
        assert all(type(state) is OrderedDict for state in raw[d])
        assert list(raw[d][0]) == [f"linear.{i}.{p}" for i in (0, 2, 4, 5) for p in ("weight", "bias")]
        assert all(t.dtype == torch.float32 for t in raw[d][0].values())
    assert raw["step"] == 4999 and raw["name"] == "tiny"
    assert raw["layer_structure"] == [1.0, 2.0, 1.0] and raw["dropout_structure"] == [0.0, 0.3, 0.0]
    assert raw["activation_func"] == "relu" and raw["weight_initialization"] == "KaimingNormal"
    assert raw["is_layer_norm"] is True and raw["use_dropout"] is True and raw["last_layer_dropout"] is True
    assert raw["activate_output"] is False
    assert (raw["sd_checkpoint"], raw["sd_checkpoint_name"]) == ("abcdef0123", "v1-5-pruned-emaonly")
    assert raw["optional_info"] == "H&E adipose"

    loaded = load_hypernetwork(path)
    assert loaded.options == hn.options
    assert (loaded.name, loaded.step, loaded.sd_checkpoint, loaded.sd_checkpoint_name, loaded.optional_info) == (
        "tiny",
        4999,
        "abcdef0123",
        "v1-5-pruned-emaonly",
        "H&E adipose",
    )
    for (key, expected), (loaded_key, got) in zip(hn.state_dict().items(), loaded.state_dict().items()):
        assert key == loaded_key and torch.equal(expected, got)

    again = save_hypernetwork(loaded, tmp_path / "again.pt")
    assert again.read_bytes() == path.read_bytes()


def test_sanitize_name_keeps_alphanumerics_and_dot_underscore_dash_space():
    assert sanitize_name("adipose/tissue: v1.2_a-b c!") == "adiposetissue v1.2_a-b c"


def test_name_defaults_to_file_stem(tmp_path):
    hn = _tiny_hn()
    path = save_hypernetwork(hn, tmp_path / "stemmed.pt")
    raw = torch.load(path, weights_only=True)
    del raw["name"]
    torch.save(raw, path)
    assert load_hypernetwork(path).name == "stemmed"


def test_options_from_a_params_section():
    section = {"sizes": ["48", 32], "layer_structure": [1, 2, 1], "activation": "relu", "weight_init": "XavierNormal",
               "layer_norm": 1, "use_dropout": 0, "dropout_structure": [0, 0.25, 0], "activate_output": 0}
    options = from_section(HypernetworkOptions, section)
    assert options == HypernetworkOptions(sizes=(48, 32), layer_structure=(1.0, 2.0, 1.0), activation="relu",
                                          weight_init="XavierNormal", layer_norm=True, dropout_structure=(0.0, 0.25, 0.0))
    assert options.use_dropout and options.last_layer_dropout


def _checkpoint_entries(folder, steps) -> list[dict]:
    entries = []
    for step in steps:
        path = save_hypernetwork(_tiny_hn(seed=step), folder / f"tiny-{step}.pt")
        entries.append({"step": step, "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return entries


def test_checkpoint_problems_name_each_unusable_checkpoint(tmp_path):
    entries = _checkpoint_entries(tmp_path, [2, 1, 3, 4])
    assert checkpoint_problems(tmp_path, entries, [1, 2, 3, 4]) == []
    assert checkpoint_problems(tmp_path, entries, [4, 5, 0]) == ["missing steps [0, 5]"]

    (tmp_path / "tiny-1.pt").write_bytes(b"changed")
    broken = _tiny_hn()
    with torch.no_grad():
        next(broken.parameters())[0] = float("nan")
    nan_path = save_hypernetwork(broken, tmp_path / "tiny-3.pt")
    corrupt = tmp_path / "tiny-4.pt"
    corrupt.write_bytes(b"not a torch archive")
    for entry in entries:
        if entry["step"] in (3, 4):
            entry["sha256"] = hashlib.sha256((tmp_path / entry["file"]).read_bytes()).hexdigest()
    problems = checkpoint_problems(tmp_path, entries, [1, 2, 3, 4])
    assert problems[:2] == ["tiny-1.pt: missing or changed on disk", f"{nan_path.name}: non-finite weights"]
    assert len(problems) == 3 and problems[2].startswith("tiny-4.pt: does not load (")


def test_imported_index_keeps_usable_files_and_says_why_others_were_skipped(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    save_hypernetwork(_tiny_hn(), inbox / "good.pt")
    save_hypernetwork(Hypernetwork("wide", HypernetworkOptions(sizes=(48, 768)), seed=0), inbox / "wide.pt")
    save_hypernetwork(Hypernetwork("other", HypernetworkOptions(sizes=(1024,)), seed=0), inbox / "other.pt")
    (inbox / "broken.pt").write_bytes(b"not a torch archive")
    (inbox / "notes.txt").write_text("not a hypernetwork")
    asked, warnings = [], []

    def widths():
        asked.append(True)
        return TINY_SIZES

    summary = write_imported_index(out, inbox, widths, warnings.append)
    frame, problems = pd.read_parquet(out / "index.parquet"), summary["problems"]

    assert list(frame["file"]) == ["good.pt", "wide.pt"] and len(asked) == 1
    assert list(frame["unused_sizes"]) == ["", "768"] and frame["sizes"].iloc[0] == "48,32,64"
    assert frame["sha256"].iloc[0] == hashlib.sha256((inbox / "good.pt").read_bytes()).hexdigest()
    assert [p["file"] for p in problems] == ["broken.pt", "other.pt"] and "none of its sizes" in problems[1]["reason"]
    assert len(warnings) == 2 and all(w.startswith("skipped imported hypernetwork") for w in warnings)
    assert summary == {"count": 2, "problems": problems, "data_version": stable_hash(sorted(frame["sha256"]))}


def test_imported_index_of_an_empty_inbox_needs_no_base_model(tmp_path):
    def no_model():
        raise AssertionError("the base model was loaded")

    summary = write_imported_index(tmp_path / "out", tmp_path / "missing", no_model, print)
    frame = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert frame.empty and list(frame.columns)[:3] == ["file", "path", "sha256"] and summary["problems"] == []


def test_seeded_init_is_deterministic_and_leaves_global_rng_alone():
    rng_before = torch.get_rng_state()
    first, second, other = _tiny_hn(seed=11), _tiny_hn(seed=11), _tiny_hn(seed=12)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for a, b, c in zip(first.parameters(), second.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, c) for a, c in zip(first.parameters(), other.parameters()))


def test_initialisation_follows_spec():
    hn = Hypernetwork("init", HypernetworkOptions(sizes=(320,), activation="relu", layer_norm=True), seed=0)
    k_module, _ = hn.modules_for(320)
    linear, layer_norm = k_module.linear[0], k_module.linear[2]
    assert isinstance(layer_norm, torch.nn.LayerNorm)
    for layer in (linear, layer_norm):
        assert abs(layer.weight.std().item() - 0.01) < 0.001  # N(0, 0.01), LayerNorm gamma near 0
        assert torch.count_nonzero(layer.bias) == 0
    xavier = Hypernetwork("x", HypernetworkOptions(sizes=(320,), weight_init="XavierUniform"), seed=0)
    bound = (6 / (320 + 640)) ** 0.5
    weight = xavier.modules_for(320)[0].linear[0].weight
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound


@pytest.mark.parametrize(("d", "expected"), [(320, 410_560), (768, 2_361_600)])
def test_default_module_parameter_count_matches_spec_table(d, expected):
    hn = Hypernetwork("count", HypernetworkOptions(sizes=(d,)), seed=0)
    for module in hn.modules_for(d):
        count = sum(p.numel() for p in module.parameters())
        assert count == expected == 4 * d * d + 3 * d


def test_layer_structure_uses_int_truncation():
    hn = Hypernetwork("trunc", HypernetworkOptions(sizes=(768,), layer_structure=(1.0, 1.3, 1.0)), seed=0)
    assert hn.modules_for(768)[0].linear[0].out_features == 998


# --- rejected files and options --------------------------------------------------------------


@pytest.mark.parametrize("key", ["skip_connection", "upsample_linear"])
def test_extension_keys_are_rejected(tmp_path, key):
    path = save_hypernetwork(_tiny_hn(), tmp_path / "ext.pt")
    raw = torch.load(path, weights_only=True)
    raw[key] = True
    torch.save(raw, path)
    with pytest.raises(HypernetworkFormatError, match=key):
        load_hypernetwork(path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layer_structure": (2.0, 1.0)}, "start and end with 1"),
        ({"layer_structure": (1.0, 2.0)}, "start and end with 1"),
        ({"layer_structure": (1.0,)}, "at least 2"),
        ({"dropout_structure": (0.0, 1.0, 0.0)}, "dropout values"),
        ({"dropout_structure": (0.0, -0.1, 0.0)}, "dropout values"),
        ({"dropout_structure": (0.0, 0.3)}, "as many entries"),
        ({"activation": "nope"}, "unknown activation 'nope'"),
        ({"weight_init": "Uniform"}, "unknown weight_init"),
    ],
)
def test_invalid_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        HypernetworkOptions(sizes=TINY_SIZES, **options)


def test_invalid_files_are_rejected_with_format_error(tmp_path):
    good = torch.load(save_hypernetwork(_tiny_hn(), tmp_path / "good.pt"), weights_only=True)
    cases = {
        "bad-structure": {**good, "layer_structure": [1.0, 2.0, 2.0]},
        "bad-activation": {**good, "activation_func": "nope"},
        "mismatched-weights": {**good, "is_layer_norm": True},
        "no-widths": {key: value for key, value in good.items() if isinstance(key, str)},
        "not-a-dict": [1, 2, 3],
    }
    for name, contents in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(contents, path)
        with pytest.raises(HypernetworkFormatError, match=name):
            load_hypernetwork(path)


def test_activation_names_follow_spec():
    swish = Hypernetwork("s", HypernetworkOptions(sizes=(32,), activation="swish"), seed=0)
    assert isinstance(swish.modules_for(32)[0].linear[1], torch.nn.Hardswish)
    mish = Hypernetwork("m", HypernetworkOptions(sizes=(32,), activation="mish"), seed=0)
    assert isinstance(mish.modules_for(32)[0].linear[1], torch.nn.Mish)
    plain = Hypernetwork("p", HypernetworkOptions(sizes=(32,), activation=None), seed=0)
    assert [type(layer) for layer in plain.modules_for(32)[0].linear] == [torch.nn.Linear, torch.nn.Linear]


# --- optimizer sidecar, hashes, safetensors --------------------------------------------------


def test_short_hash_is_first_ten_hex_digits_of_sha256(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"histo")
    assert short_hash(sha256_file(path)) == hashlib.sha256(b"histo").hexdigest()[:10]


def test_optimizer_sidecar_round_trip_and_hash_rule(tmp_path):
    hn = _tiny_hn()
    optimizer = torch.optim.AdamW(hn.parameters(), lr=1e-5)
    for param in hn.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    path = save_hypernetwork(hn, tmp_path / "opt.pt", optimizer=optimizer)
    sidecar_path = tmp_path / "opt.pt.optim"

    sidecar = torch.load(sidecar_path, weights_only=True)
    assert sidecar["optimizer_name"] == "AdamW" and sidecar["hash"] == short_hash(sha256_file(path))
    state = load_optimizer_state(path)
    resumed = torch.optim.AdamW(load_hypernetwork(path).parameters(), lr=1e-5)
    resumed.load_state_dict(state)
    for original, restored in zip(optimizer.state.values(), resumed.state.values()):
        assert torch.equal(original["exp_avg"], restored["exp_avg"])
        assert torch.equal(original["exp_avg_sq"], restored["exp_avg_sq"])

    hn.step += 1
    save_hypernetwork(hn, path)  # the .pt changes, the stale sidecar stays
    assert sidecar_path.exists()
    assert load_optimizer_state(path) is None
    assert load_optimizer_state(save_hypernetwork(hn, tmp_path / "no-optim.pt")) is None


def test_safetensors_export_has_every_weight_and_the_metadata(tmp_path):
    hn = _tiny_hn(activation="relu", layer_norm=True)
    hn.step, hn.sd_checkpoint = 42, "abcdef0123"
    path = export_safetensors(hn, tmp_path / "tiny.safetensors")
    expected = {
        f"{d}.{role}.{key}": tensor
        for d in TINY_SIZES
        for role, module in zip(("k", "v"), hn.modules_for(d))
        for key, tensor in module.state_dict().items()
    }
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(expected)
        for key, tensor in expected.items():
            assert torch.equal(handle.get_tensor(key), tensor)
        metadata = {key: json.loads(value) for key, value in handle.metadata().items()}
    assert set(metadata) == METADATA_KEYS
    assert metadata["step"] == 42 and metadata["sd_checkpoint"] == "abcdef0123"
    assert metadata["layer_structure"] == [1.0, 2.0, 1.0] and metadata["is_layer_norm"] is True


# --- diffusers hook ----------------------------------------------------------------------------


def test_multiplier_zero_is_bit_identical_to_stock(unet, unet_inputs):
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    hn = _tiny_hn().eval()
    with torch.no_grad():
        stock = unet(*unet_inputs).sample
        with apply_hypernetwork(unet, hn, multiplier=0.0):
            hooked = unet(*unet_inputs).sample
        with apply_hypernetwork(unet, hn, multiplier=1.0):
            active = unet(*unet_inputs).sample
            per_call_off = unet(*unet_inputs, cross_attention_kwargs={"hn_scale": 0.0}).sample
    assert torch.equal(hooked, stock)
    assert torch.equal(per_call_off, stock)
    assert not torch.equal(active, stock)
    assert (active - stock).abs().max() > 0


def test_processors_restored_after_exit_and_exception(unet):
    original = unet.attn_processors
    hn = _tiny_hn()
    with apply_hypernetwork(unet, hn):
        assert all(isinstance(p, HypernetworkAttnProcessor) for p in unet.attn_processors.values())
    assert unet.attn_processors == original
    with pytest.raises(RuntimeError, match="boom"), apply_hypernetwork(unet, hn):
        raise RuntimeError("boom")
    assert all(unet.attn_processors[key] is processor for key, processor in original.items())


def test_gradients_reach_only_the_hypernetwork(unet, unet_inputs):
    hn = _tiny_hn().train()
    unet_state_keys = set(unet.state_dict())
    with apply_hypernetwork(unet, hn, multiplier=0.0):  # training forces strength 1
        unet_params = {id(p) for p in unet.parameters()}
        assert unet_params.isdisjoint(id(p) for p in hn.parameters())
        assert set(unet.state_dict()) == unet_state_keys
        unet(*unet_inputs).sample.square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    grads = [p.grad for p in hn.parameters()]
    assert all(grad is not None for grad in grads)
    # every width (48 cross, 32 and 64 self-attention) is hit, so each module's last bias learns
    for d in TINY_SIZES:
        for module in hn.modules_for(d):
            assert module.linear[-1].bias.grad.abs().sum() > 0, d


@pytest.mark.parametrize(
    "config",
    [
        {"residual_connection": True, "rescale_output_factor": 3.0, "norm_num_groups": 8, "four_d": True},
        {"cross_attention_norm": "layer_norm", "mask": True},
        {"spatial_norm_dim": 4, "four_d": True},
    ],
    ids=["residual-groupnorm-4d", "cross-norm-mask", "spatial-norm"],
)
def test_processor_matches_stock_attention_variants(config):
    config = dict(config)
    four_d, use_mask = config.pop("four_d", False), config.pop("mask", False)
    torch.manual_seed(0)
    cross = None if four_d else CROSS_DIM
    attn = Attention(query_dim=32, cross_attention_dim=cross, heads=4, dim_head=8, **config).eval()
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 32, 4, 4, generator=g) if four_d else torch.randn(2, 6, 32, generator=g)
    context = None if four_d else torch.randn(2, 5, CROSS_DIM, generator=g)
    temb = torch.randn(2, 4, 2, 2, generator=g) if "spatial_norm_dim" in config else None
    mask = None
    if use_mask:
        mask = torch.zeros(2, 1, 5)
        mask[:, :, -2:] = -10_000.0
    hn = _tiny_hn().eval()
    with torch.no_grad():
        stock = AttnProcessor2_0()(attn, hidden, context, mask, temb)
        off = HypernetworkAttnProcessor(hn, 0.0)(attn, hidden, context, mask, temb)
        on = HypernetworkAttnProcessor(hn, 1.0)(attn, hidden, context, mask, temb)
    assert torch.equal(off, stock)
    assert not torch.equal(on, stock)


def test_processor_feeds_transformed_contexts_to_k_and_v():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=CROSS_DIM, heads=4, dim_head=8).eval()
    hn = _tiny_hn(activation="relu", activate_output=True).eval()
    g = torch.Generator().manual_seed(5)
    hidden, context = torch.randn(1, 6, 32, generator=g), torch.randn(1, 5, CROSS_DIM, generator=g)
    with torch.no_grad():
        got = HypernetworkAttnProcessor(hn, 0.8)(attn, hidden, context)
        ck, cv = hn.transform_context(context, 0.8)
        q = attn.to_q(hidden).view(1, -1, 4, 8).transpose(1, 2)
        k = attn.to_k(ck).view(1, -1, 4, 8).transpose(1, 2)
        v = attn.to_v(cv).view(1, -1, 4, 8).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, -1, 32)
        expected = attn.to_out[0](out)
    torch.testing.assert_close(got, expected)
