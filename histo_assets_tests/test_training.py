"""Hypernetwork training on the tiny model: A1111 schedule and checkpoint semantics, resume, determinism."""

import copy
import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from histo_assets.core.base_model import TINY_HYPERNETWORK_SIZES, BaseModelError
from histo_assets.core.hypernetwork import (
    Hypernetwork,
    HypernetworkAttnProcessor,
    HypernetworkOptions,
    apply_hypernetwork,
    load_hypernetwork,
    load_optimizer_state,
)
from histo_assets.core.io import sha256_file
from histo_assets.core.training import (
    NonFiniteLossError,
    Schedule,
    TrainingError,
    build_dataset,
    caption_for,
    diffusion_loss,
    parse_schedule,
    render_prompt,
    TrainingSettings,
    resume_key,
    train_hypernetwork,
    write_hypernetwork_checkpoints,
)
from histo_assets.settings import from_section

OPTIONS = HypernetworkOptions(sizes=TINY_HYPERNETWORK_SIZES)
TEMPLATES = ["an H&E tile of [filewords], [name]", "a histology image of [filewords]"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Four 64x64 images with distinct stripes and tints; names carry the numeric prefixes A1111 strips."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    columns = np.arange(64)
    for index in range(4):
        tint = rng.uniform(60, 200, size=3)
        stripes = np.sin(columns / (3 + 2 * index))[None, :, None] * 60
        pixels = np.clip(np.broadcast_to(tint + stripes, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:04d}-12 pink tissue {index}.png")
    (folder / "0003-12 pink tissue 3.txt").write_text("dense stroma, purple nuclei\n")
    (folder / "notes.md").write_text("not an image")
    return folder


def _train(base, images, out, **overrides):
    settings = dict(name="tissue", options=OPTIONS, templates=TEMPLATES, resolution=64, seed=7, max_steps=8,
                    learning_rate="0.001", batch_size=1, gradient_accumulation=1, checkpoint_steps=[],
                    clip_mode="disabled", clip_value="0.1", latent_sampling="once", loss_log_every=4)
    settings.update(overrides)
    typed = {field: settings.pop(field) for field in TrainingSettings.__dataclass_fields__}
    return train_hypernetwork(base, images, out, TrainingSettings(**typed), **settings)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_hypernetwork(path).state_dict()


# --- schedule grammar (§7.6) --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "max_steps", "current", "expected"),
    [
        ("1e-5", 100, 0, [(1e-5, 100)]),
        ("0.00001", 40000, 0, [(1e-5, 40000)]),
        ("1e-5:100, 5e-6:-1", 1000, 0, [(1e-5, 100), (5e-6, 1000)]),
        ("1e-3:10, 1e-4:20, 1e-5:-1", 100, 0, [(1e-3, 10), (1e-4, 20), (1e-5, 100)]),
        # -1 and a bare value both end parsing.
        ("1e-3:-1, 1e-4:500", 100, 0, [(1e-3, 100)]),
        ("1e-3, 1e-4:20", 100, 0, [(1e-3, 100)]),
        # Ends are clamped to max_steps and the first entry beyond it ends parsing.
        ("1e-3:50, 1e-4:500, 1e-5:900", 200, 0, [(1e-3, 50), (1e-4, 200)]),
        ("1e-3:200, 1e-4:300", 200, 0, [(1e-3, 200), (1e-4, 200)]),
        # Resume: entries ending at or before the current step are skipped; -1 never is.
        ("1e-3:10, 1e-4:20, 1e-5:-1", 100, 10, [(1e-4, 20), (1e-5, 100)]),
        ("1e-3:10, 1e-4:20, 1e-5:-1", 100, 25, [(1e-5, 100)]),
        ("1e-3:10, 1e-4:20", 100, 20, []),
        (" 1e-3 : 10 ,, 1e-4:20, ", 100, 0, [(1e-3, 10), (1e-4, 20)]),
    ],
)
def test_parse_schedule(text, max_steps, current, expected):
    assert parse_schedule(text, max_steps, current) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1e-3:1e4", "is not an integer"),
        ("fast", "is not a number"),
        ("", "is empty"),
        (" , ", "is empty"),
        ("1e-3:10:20", "must be 'value' or 'value:step'"),
        ("-1e-3", "finite and non-negative"),
        ("nan", "finite and non-negative"),
    ],
)
def test_parse_schedule_rejects_malformed_text(text, message):
    with pytest.raises(TrainingError, match=message):
        parse_schedule(text, 100)


def test_schedule_advances_once_per_segment_and_finishes():
    schedule = Schedule("1e-3:2, 1e-4:4", max_steps=10)
    values = []
    for step in range(6):
        changed = schedule.advance(step)
        values.append((step, schedule.value, changed, schedule.finished))
    assert values == [
        (0, 1e-3, False, False), (1, 1e-3, False, False), (2, 1e-4, True, False),
        (3, 1e-4, False, False), (4, 1e-4, False, True), (5, 1e-4, False, True),
    ]
    # Resumed after its last segment, a schedule is finished but keeps its last value (used for the clip value).
    late = Schedule("0.5:3", max_steps=10, current_step=7)
    assert late.finished and late.value == 0.5
    with pytest.raises(TrainingError, match="no segment ending after step 0"):
        Schedule("1e-3:0", max_steps=10)


# --- dataset (§7.2) -----------------------------------------------------------------------------------------

def test_captions_and_prompts(images):
    assert caption_for(images / "0001-12 pink tissue 1.png") == "pink tissue 1"
    assert caption_for(images / "0003-12 pink tissue 3.png") == "dense stroma, purple nuclei"
    assert render_prompt("a [filewords] by [name], [name]", "stroma", "hn") == "a stroma by hn, hn"


def test_dataset_encodes_once_with_each_sampling_method(tiny_base, images):
    def build(method, seed=3):
        return build_dataset(tiny_base, images, name="hn", templates=TEMPLATES, resolution=64,
                             latent_sampling=method, seed=seed)

    deterministic, once, once_again, random = build("deterministic"), build("once"), build("once"), build("random")
    assert [path.name for path in deterministic.files] == sorted(p.name for p in images.glob("*.png"))
    assert deterministic.latent_mean.shape == (4, 4, 8, 8)
    assert deterministic.conditioning.shape == (4, 77, 48)
    assert deterministic.prompts == once.prompts
    assert all(prompt in {render_prompt(t, caption, "hn") for t in TEMPLATES}
               for prompt, caption in zip(deterministic.prompts, deterministic.captions))

    pixels = np.asarray(Image.open(images / "0000-12 pink tissue 0.png").convert("RGB"), dtype=np.float32)
    x = torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        mean = tiny_base.vae.encode(x).latent_dist.mean * tiny_base.vae.config.scaling_factor
    assert torch.allclose(deterministic.latent_mean[:1], mean, atol=1e-6)

    generator = torch.Generator()
    assert torch.equal(once.latents([0, 2], generator), once_again.latents([0, 2], generator))
    assert not torch.equal(once.latent_mean, deterministic.latent_mean)
    first = random.latents([1], torch.Generator().manual_seed(1))
    assert torch.equal(first, random.latents([1], torch.Generator().manual_seed(1)))
    assert not torch.equal(first, random.latents([1], torch.Generator().manual_seed(2)))


# --- training ---------------------------------------------------------------------------------------------

def test_gradients_reach_only_the_hypernetwork(tiny_base, images):
    dataset = build_dataset(tiny_base, images, name="hn", templates=TEMPLATES, resolution=64,
                            latent_sampling="once", seed=0)
    hn = Hypernetwork("hn", OPTIONS, seed=0).train()
    noise_scheduler = DDPMScheduler.from_config(tiny_base.scheduler.config)
    with apply_hypernetwork(tiny_base.unet, hn):
        loss = diffusion_loss(tiny_base, noise_scheduler, dataset.latents([0, 1], torch.Generator()),
                              dataset.conditioning[[0, 1]], torch.Generator().manual_seed(0))
        loss.backward()
    base_parameters = [p for m in (tiny_base.unet, tiny_base.vae, tiny_base.text_encoder) for p in m.parameters()]
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(p.grad is None for p in base_parameters)
    hn_parameters = list(hn.parameters())
    assert len(hn_parameters) == 3 * 2 * 4  # 3 widths x (K, V) x (2 Linear layers x weight, bias)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hn_parameters)
    assert not any(isinstance(p, HypernetworkAttnProcessor) for p in tiny_base.unet.attn_processors.values())


def test_checkpoints_follow_a1111_numbering(tiny_base, images, tmp_path):
    unet_before = copy.deepcopy(tiny_base.unet.state_dict())
    lines = []
    result = _train(tiny_base, images, tmp_path, checkpoint_steps=[4, 8], log=lines.append)

    assert sorted(result.checkpoints) == [4, 8]
    for steps in (4, 8):
        path = tmp_path / f"tissue-{steps}.pt"
        assert result.checkpoints[steps] == path
        hn = load_hypernetwork(path)
        assert hn.step == steps - 1  # name-N.pt is written after N-1 updates
        assert hn.sd_checkpoint == tiny_base.short_hash and hn.sd_checkpoint_name == tiny_base.name
        assert hn.options == OPTIONS and hn.name == "tissue"
        assert load_optimizer_state(path) is not None
    final = load_hypernetwork(tmp_path / "tissue.pt")
    assert result.final_path == tmp_path / "tissue.pt" and final.step == result.final_step == 8
    assert load_optimizer_state(result.final_path) is not None

    with result.loss_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == list(range(1, 9))
    assert [float(row["loss"]) for row in rows] == [record.loss for record in result.loss_history]
    assert all(float(row["lr"]) == 0.001 for row in rows)
    assert result.final_loss == result.loss_history[-1].loss and result.steps_per_second > 0
    assert result.device == "cpu" and result.base_model_sha256 == tiny_base.sha256
    assert any("saved tissue-4.pt" in line for line in lines)

    unet_after = tiny_base.unet.state_dict()
    assert all(torch.equal(unet_before[key], unet_after[key]) for key in unet_before)
    assert not any(isinstance(p, HypernetworkAttnProcessor) for p in tiny_base.unet.attn_processors.values())


def test_loss_falls_on_a_few_images(tiny_base, images, tmp_path):
    result = _train(tiny_base, images, tmp_path, max_steps=200, loss_log_every=100)
    losses = np.array([record.loss for record in result.loss_history])
    assert len(losses) == 200
    assert losses[-50:].mean() < 0.9 * losses[:50].mean()


@pytest.fixture(scope="module")
def resume_settings():
    return dict(max_steps=12, checkpoint_steps=[4, 8, 12], gradient_accumulation=2, latent_sampling="random",
                clip_mode="norm", clip_value="1.0", learning_rate="0.002:6, 0.001")


@pytest.fixture(scope="module")
def reference_run(tiny_base, images, tmp_path_factory, resume_settings):
    out = tmp_path_factory.mktemp("reference")
    return out, _train(tiny_base, images, out, **resume_settings)


def test_resumed_run_ends_with_identical_weights(tiny_base, images, tmp_path, reference_run, resume_settings):
    reference_dir, reference = reference_run
    interrupted = _train(tiny_base, images, tmp_path, stop_after=10, **resume_settings)
    assert interrupted.interrupted and interrupted.final_step == 10 and interrupted.final_path is None
    assert not (tmp_path / "tissue.pt").exists()

    lines = []
    resumed = _train(tiny_base, images, tmp_path, log=lines.append, **resume_settings)
    assert resumed.resumed_from == tmp_path / "tissue-8.pt"
    assert any("resuming tissue from tissue-8.pt at step 7" in line for line in lines)
    final, expected = _weights(resumed.final_path), _weights(reference.final_path)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[key], expected[key]) for key in expected)
    assert sha256_file(resumed.final_path) == sha256_file(reference.final_path)
    assert sha256_file(tmp_path / "tissue-12.pt") == sha256_file(reference_dir / "tissue-12.pt")
    assert resumed.loss_history == reference.loss_history
    assert [record.lr for record in resumed.loss_history] == [0.002] * 6 + [0.001] * 6

    # A finished run is not trained again.
    before = resumed.final_path.stat().st_mtime_ns
    again = _train(tiny_base, images, tmp_path, **resume_settings)
    assert again.final_step == 12 and again.steps_per_second is None
    assert again.final_path.stat().st_mtime_ns == before


def test_same_seed_gives_identical_checkpoint_bytes(tiny_base, images, tmp_path, reference_run, resume_settings):
    reference_dir, _ = reference_run
    _train(tiny_base, images, tmp_path / "same", **resume_settings)
    _train(tiny_base, images, tmp_path / "other", **{**resume_settings, "seed": 8})
    names = ["tissue-4.pt", "tissue-8.pt", "tissue-12.pt", "tissue.pt", "tissue.pt.optim"]
    assert [sha256_file(tmp_path / "same" / n) for n in names] == [sha256_file(reference_dir / n) for n in names]
    assert sha256_file(tmp_path / "other" / "tissue.pt") != sha256_file(reference_dir / "tissue.pt")


def test_non_finite_loss_stops_with_the_step_and_keeps_checkpoints(tiny_base, images, tmp_path):
    # Update 5 runs at lr 1e38, so the forward pass of update 6 overflows.
    with pytest.raises(NonFiniteLossError, match="at step 6") as error:
        _train(tiny_base, images, tmp_path, learning_rate="0.001:4, 1e38", max_steps=10, checkpoint_steps=[3, 5])
    assert error.value.step == 6
    for steps in (3, 5):
        hn = load_hypernetwork(tmp_path / f"tissue-{steps}.pt")
        assert hn.step == steps - 1
        assert all(torch.isfinite(p).all() for p in hn.parameters())
    assert not (tmp_path / "tissue.pt").exists()
    assert not list(tmp_path.glob(".*.tmp"))
    with (tmp_path / "tissue-loss.csv").open() as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [1, 2, 3, 4, 5]


def test_training_stops_when_the_schedule_finishes(tiny_base, images, tmp_path):
    result = _train(tiny_base, images, tmp_path, learning_rate="0.001:3, 0.0005:5", max_steps=10)
    assert result.final_step == 5 and load_hypernetwork(result.final_path).step == 5
    assert [record.lr for record in result.loss_history] == [0.001] * 3 + [0.0005] * 2


def test_batch_clamping_and_clip_modes(tiny_base, images, tmp_path):
    lines = []
    clamped = _train(tiny_base, images, tmp_path / "clamped", batch_size=3, gradient_accumulation=5, max_steps=2,
                     log=lines.append)
    assert clamped.final_step == 2
    assert any("batch size 3 -> 3, gradient accumulation 5 -> 1" in line for line in lines)

    def final(mode, compat="correct"):
        result = _train(tiny_base, images, tmp_path / f"{mode}-{compat}", max_steps=4, clip_mode=mode,
                        clip_value="0.00001", clip_compat=compat)
        return _weights(result.final_path)

    correct, a1111, unclipped = final("value"), final("value", "a1111"), final("disabled")
    # Without a loss scaler (CPU, fp32) A1111's clipping of scaled gradients is the correct clipping.
    assert all(torch.equal(correct[key], a1111[key]) for key in correct)
    assert not all(torch.equal(correct[key], unclipped[key]) for key in correct)


def test_invalid_settings_fail_before_training(tiny_base, images, tmp_path):
    with pytest.raises(TrainingError, match="name"):
        _train(tiny_base, images, tmp_path, name="../escape")
    with pytest.raises(TrainingError, match=r"checkpoint_steps \[1, 9, 4.5\]"):
        _train(tiny_base, images, tmp_path, checkpoint_steps=[1, 4, 9, 4.5])
    with pytest.raises(TrainingError, match="batch_size must be a positive integer, got '2'"):
        _train(tiny_base, images, tmp_path, batch_size="2")
    with pytest.raises(BaseModelError, match="match no attention context width"):
        _train(tiny_base, images, tmp_path, options=HypernetworkOptions())
    with pytest.raises(TrainingError, match="does not exist"):
        _train(tiny_base, tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no images"):
        _train(tiny_base, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(TrainingError, match="latent_sampling"):
        _train(tiny_base, images, tmp_path / "out", latent_sampling="sometimes")
    with pytest.raises(TrainingError, match="templates"):
        _train(tiny_base, images, tmp_path / "out", templates=["", "  "])
    assert not (tmp_path / "out").exists()


def test_resuming_with_other_settings_is_refused(tiny_base, images, tmp_path):
    _train(tiny_base, images, tmp_path, max_steps=3, checkpoint_steps=[2])
    with pytest.raises(TrainingError, match=r"other settings \(seed differ\)"):
        _train(tiny_base, images, tmp_path, max_steps=6, seed=99)
    extended = _train(tiny_base, images, tmp_path, max_steps=6)
    assert extended.resumed_from == tmp_path / "tissue.pt" and extended.final_step == 6


STAGE_TRAINING = dict(templates=TEMPLATES, max_steps=4, learning_rate="0.001", batch_size=1, gradient_accumulation=1,
                      checkpoint_steps=[2, 4], clip_mode="disabled", clip_value="0.1", latent_sampling="once",
                      loss_log_every=2)


def test_resume_key_ignores_only_the_settings_training_can_be_extended_by():
    key = resume_key(training=STAGE_TRAINING, training_set="crops", seed=1)
    extended = STAGE_TRAINING | {"max_steps": 8, "checkpoint_steps": [2, 4, 8], "loss_log_every": 1}
    assert resume_key(training=extended, training_set="crops", seed=1) == key
    assert resume_key(training=STAGE_TRAINING | {"batch_size": 2}, training_set="crops", seed=1) != key
    assert resume_key(training=STAGE_TRAINING, training_set="other crops", seed=1) != key


def test_stage_training_writes_checkpoints_loss_plot_and_a_summary_of_them(tiny_base, images, tmp_path):
    lines, pushed = [], []
    training = from_section(TrainingSettings, STAGE_TRAINING)
    settings = dict(tissue_class="pink tissue/1", options=OPTIONS, training=training, resolution=64,
                    master_seed=7, training_set="crops", resume="key", log=lines.append)
    summary = write_hypernetwork_checkpoints(tmp_path, tiny_base, images, on_checkpoint=pushed.append, **settings)

    assert summary["name"] == "pink tissue1" and summary["training_set"] == "crops"
    assert [(c["step"], c["file"]) for c in summary["checkpoints"]] == [(2, "pink tissue1-2.pt"), (4, "pink tissue1-4.pt")]
    assert all(c["sha256"] == sha256_file(tmp_path / c["file"]) for c in summary["checkpoints"])
    assert summary["base_model_sha256"] == tiny_base.sha256 and summary["resumed_from"] is None
    assert [path.name for path in pushed] == ["pink tissue1-2.pt", "pink tissue1-4.pt"]
    assert (tmp_path / "loss.png").is_file() and json.loads((tmp_path / "run.json").read_text()) == {"fingerprint": "key"}
    assert not any("continuing" in line for line in lines)

    longer = write_hypernetwork_checkpoints(tmp_path, tiny_base, images,
                                            **settings | {"training": replace(training, max_steps=6)})
    assert longer["resumed_from"] == "pink tissue1.pt" and any("continuing the training run" in line for line in lines)
    with pytest.raises(BaseModelError):
        write_hypernetwork_checkpoints(tmp_path, tiny_base, images, **settings | {"options": HypernetworkOptions(),
                                                                                  "resume": "other"})
    assert json.loads((tmp_path / "run.json").read_text()) == {"fingerprint": "key"}
