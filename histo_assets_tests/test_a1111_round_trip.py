"""The AUTOMATIC1111 round trip, judged by the WebUI's own rules (``webui_rules``, restated from the spec).

Files: every ``.pt`` and ``.pt.optim`` a real pipeline run writes passes the
WebUI's restricted loader. PNG Info: a paste activates the hypernetwork once,
with ``RNG: CPU``. Same seed, same image: sigmas, initial noise and a whole
image against k-diffusion's Euler restated here. The library's loader ends
in eval mode and is as lenient as the WebUI's.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histo_assets.core.a1111_text import PARAMETERS_KEY, WEBUI_SAMPLERS
from histo_assets.core.base_model import load_base_model, tiny_model_dir, webui_model_name
from histo_assets.core.hypernetwork import (
    Hypernetwork,
    HypernetworkFormatError,
    HypernetworkOptions,
    load_hypernetwork,
    save_hypernetwork,
)
from histo_assets.core.sampling import generate_images, initial_noise, webui_sigmas
from histo_assets_tests.conftest import TINY_MODEL_SEED, thesis_generation
from histo_assets_tests.hypernetworks import strong_hypernetwork
from histo_assets_tests.webui_rules import (
    RefusedByWebui,
    check_loadable_by_webui,
    hypernet_tokens,
    k_diffusion_sigmas,
    webui_paste,
)

CLASS = "fibrocystic"
SETTINGS = thesis_generation(prompt="an H&E histology tile of [name]", negative_prompt="grainy, blurry",
                              steps=5, width=64, height=64, batch_size=1)


def png_text(path: Path) -> str:
    with Image.open(path) as image:
        return image.text[PARAMETERS_KEY]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


# --- 1. files pass the WebUI's loader ----------------------------------------------------------------


def test_every_hypernetwork_file_of_a_pipeline_run_passes_the_webui_loader(pipeline):
    checked = sorted(pipeline.data.rglob("*.pt")) + sorted(pipeline.data.rglob("*.pt.optim"))
    checkpoints = list((pipeline.data / "hypernetwork_checkpoints").rglob("*.pt"))
    assert checkpoints and len(checked) >= 2 * len(checkpoints), "every checkpoint and its sidecar are checked"
    for path in checked:
        check_loadable_by_webui(path)
    assert all(path.with_name(path.name + ".optim").is_file() for path in checkpoints), "resume needs the sidecars"
    released = [path for path in (pipeline.data / "releases").rglob("*") if path.is_file()]
    assert released and not [path for path in released if path.name.endswith(".optim")]
    for path in released:
        if path.suffix == ".pt":
            check_loadable_by_webui(path)


def test_the_restated_rules_refuse_what_the_webui_refuses(tmp_path):
    default = tmp_path / "default.pt"
    torch.save({768: (OrderedDict(w=torch.ones(2)), OrderedDict(w=torch.ones(2)))}, default)
    with pytest.raises(RefusedByWebui, match="bad file inside"):
        check_loadable_by_webui(default)

    class Payload:
        pass

    smuggled = tmp_path / "smuggled.pt"
    with zipfile.ZipFile(smuggled, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"name": Path("x")}))
    with pytest.raises(RefusedByWebui, match="forbidden"):
        check_loadable_by_webui(smuggled)


def test_same_weights_give_the_same_bytes_and_load_back(tmp_path):
    hn = Hypernetwork(CLASS, HypernetworkOptions(sizes=(48, 32), layer_norm=True, activation="relu"), seed=4)
    optimizer = torch.optim.AdamW(hn.parameters(), lr=1e-3)
    for parameter in hn.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    first = save_hypernetwork(hn, tmp_path / "a" / "x.pt", optimizer=optimizer)
    second = save_hypernetwork(hn, tmp_path / "b" / "x.pt", optimizer=optimizer)
    assert first.read_bytes() == second.read_bytes()
    assert Path(f"{first}.optim").read_bytes() == Path(f"{second}.optim").read_bytes()
    for path in (first, Path(f"{first}.optim")):
        check_loadable_by_webui(path)
    loaded = load_hypernetwork(first)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), hn.state_dict().values()))
    assert torch.load(first, mmap=True, weights_only=True)["name"] == CLASS, "records stay aligned for mmap loads"


# --- 2. PNG info as the current WebUI writes it ------------------------------------------------------


@pytest.fixture(scope="module")
def hn_image(tiny_base, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("png-info")
    hn_path = strong_hypernetwork(folder / f"{CLASS}-5000.pt", CLASS)
    (record,) = generate_images(tiny_base, hn_path, folder / "out", tissue_class=CLASS, step=5000, count=1,
                                settings=SETTINGS, master_seed=42)
    return folder / "out" / record.file, hn_path


def test_pasted_png_info_activates_the_hypernetwork_once_with_cpu_noise(tiny_base, hn_image):
    image, hn_path = hn_image
    pasted = webui_paste(png_text(image))
    assert hypernet_tokens(pasted["Prompt"]) == [(hn_path.stem, "1.0")]
    assert not {"Hypernet", "Hypernet hash", "Hypernet strength"} & set(pasted)
    assert pasted["RNG"] == "CPU"
    assert pasted["Schedule type"] == "Automatic", "Euler's uniform schedule is the WebUI's default for it"
    assert pasted["Model"] == tiny_base.name == f"tiny-sd-seed{TINY_MODEL_SEED}"
    assert pasted["Model hash"] == tiny_base.sha256[:10]
    assert (pasted["Sampler"], pasted["Steps"], pasted["Seed"], pasted["Negative prompt"]) == \
        ("Euler", "5", image.stem.rsplit("-", 1)[1], "grainy, blurry")


def test_schedule_type_is_written_where_ours_is_not_the_webui_default(tiny_base, tmp_path):
    for key, sampler in WEBUI_SAMPLERS.items():
        (record,) = generate_images(tiny_base, None, tmp_path / key, tissue_class=CLASS, step=0, count=1,
                                    settings=replace(SETTINGS, sampler=key, steps=2), master_seed=1)
        pasted = webui_paste(png_text(tmp_path / key / record.file))
        assert pasted["Sampler"] == sampler.name
        expected = "Uniform" if key == "dpm++_2m" else "Automatic"
        assert pasted["Schedule type"] == expected, key
        assert not hypernet_tokens(pasted["Prompt"])


def test_model_name_is_the_loaded_model_without_extension(tiny_model_cache):
    folder = tiny_model_dir(tiny_model_cache, TINY_MODEL_SEED)
    assert load_base_model("diffusers", folder, name="lab-model.safetensors", device="cpu").name == "lab-model"
    assert load_base_model("diffusers", folder, device="cpu").name == folder.name
    assert [webui_model_name(n) for n in ("v1-5-pruned-emaonly.safetensors", "sd.ckpt", "plain")] == \
        ["v1-5-pruned-emaonly", "sd", "plain"]


# --- 3. same seed, same image ------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 20, 37])
def test_sigmas_of_every_sigma_sampler_follow_k_diffusion(tiny_base, steps):
    from histo_assets.core.sampling import _scheduler_for

    config = tiny_base.scheduler.config
    reference = k_diffusion_sigmas(config.beta_start, config.beta_end, config.num_train_timesteps, steps)
    for key, sampler in WEBUI_SAMPLERS.items():
        if sampler.schedule != "uniform":
            continue
        scheduler = _scheduler_for(tiny_base, key, steps)
        ours = scheduler.sigmas.double()
        assert ours[-1] == reference[-1] == 0
        relative = ((ours[:-1] - reference[:-1].double()) / reference[:-1].double()).abs().max().item()
        assert relative < 1e-6, (key, relative)
        assert torch.allclose(scheduler.timesteps.double(), torch.linspace(999, 0, steps).double(), atol=1e-4)


def test_karras_sigmas_follow_k_diffusion(tiny_base):
    sigmas, _ = webui_sigmas(tiny_base.scheduler, 10, "karras")
    full = k_diffusion_sigmas(0.00085, 0.012, 1000, 1000)[:-1].double()
    sigma_min, sigma_max, rho = full.min().item(), full.max().item(), 7.0
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64)
    expected = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    assert np.allclose(sigmas[:-1].double().numpy(), expected.numpy(), rtol=1e-6) and sigmas[-1] == 0


def test_initial_noise_is_drawn_as_the_webui_draws_cpu_noise():
    shape = (4, 8, 8)
    noise, _ = initial_noise([7, 123456789], shape)
    for row, seed in zip(noise, (7, 123456789)):
        torch.manual_seed(seed)
        assert torch.equal(row, torch.randn(shape))
    assert noise.dtype == torch.float32


def test_an_image_equals_k_diffusion_euler_from_the_same_seed(tiny_base, tmp_path):
    """The WebUI's txt2img with Euler, RNG CPU, restated: CFG on the denoised image, Euler steps in fp32."""
    settings = replace(SETTINGS, steps=6)
    (record,) = generate_images(tiny_base, None, tmp_path, tissue_class=CLASS, step=0, count=1,
                                settings=settings, master_seed=3)
    config = tiny_base.scheduler.config
    sigmas = k_diffusion_sigmas(config.beta_start, config.beta_end, config.num_train_timesteps, settings.steps)
    cond, uncond = tiny_base.pipeline.encode_prompt(record.prompt, "cpu", 1, True, negative_prompt=record.negative_prompt)
    torch.manual_seed(record.seed)
    x = torch.randn(4, 8, 8)[None] * sigmas[0]
    with torch.no_grad():
        for i, t in enumerate(torch.linspace(999, 0, settings.steps)):
            sigma = sigmas[i]
            scaled = torch.cat([x, x]) / (sigma**2 + 1) ** 0.5
            eps = tiny_base.unet(scaled, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            denoised_uncond, denoised_cond = (x - sigma * eps).chunk(2)
            denoised = denoised_uncond + settings.cfg_scale * (denoised_cond - denoised_uncond)
            x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
        decoded = tiny_base.vae.decode(x / tiny_base.vae.config.scaling_factor).sample
    reference = ((decoded[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).round().numpy().astype(np.int16)
    assert np.abs(pixels(tmp_path / record.file) - reference).max() <= 1


def test_latents_stay_fp32_through_the_sampler_with_a_half_precision_model(tiny_model_cache, tmp_path, monkeypatch):
    from diffusers import EulerDiscreteScheduler

    half = load_base_model("tiny", tiny_cache_dir=tiny_model_cache, seed=TINY_MODEL_SEED, device="cpu",
                           dtype="bfloat16")
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    original = EulerDiscreteScheduler.step

    def recording_step(self, model_output, timestep, sample, *args, **kwargs):
        seen.append((model_output.dtype, sample.dtype))
        return original(self, model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(EulerDiscreteScheduler, "step", recording_step)
    (record,) = generate_images(half, None, tmp_path, tissue_class=CLASS, step=0, count=1,
                                settings=replace(SETTINGS, steps=3), master_seed=3)
    assert half.unet.dtype == torch.bfloat16
    assert seen == [(torch.float32, torch.float32)] * 3
    assert pixels(tmp_path / record.file).std() > 1


# --- 4. load_hypernetwork is ready for inference -----------------------------------------------------


def _linear_state(width: int, generator: torch.Generator) -> OrderedDict:
    return OrderedDict([
        ("linear.0.weight", torch.randn(2 * width, width, generator=generator) * 0.2),
        ("linear.0.bias", torch.randn(2 * width, generator=generator) * 0.2),
        ("linear.1.weight", torch.randn(width, 2 * width, generator=generator) * 0.2),
        ("linear.1.bias", torch.randn(width, generator=generator) * 0.2),
    ])


def _residual(state: OrderedDict, x: torch.Tensor, multiplier: float) -> torch.Tensor:
    """§5 with §3's default layout, by hand: x + Linear(Linear(x)) * m."""
    hidden = x @ state["linear.0.weight"].T + state["linear.0.bias"]
    return x + (hidden @ state["linear.1.weight"].T + state["linear.1.bias"]) * multiplier


def test_a_loaded_file_applies_its_multiplier_at_once(tmp_path):
    generator = torch.Generator().manual_seed(9)
    k_state, v_state = _linear_state(32, generator), _linear_state(32, generator)
    # §3: Dropout(0.5) sits after the first Linear, at index 1, so the second Linear is linear.2.
    def with_dropout_layout(state: OrderedDict) -> OrderedDict:
        return OrderedDict((key.replace("linear.1.", "linear.2."), value) for key, value in state.items())

    path = tmp_path / "dropout-file.pt"
    torch.save({32: (with_dropout_layout(k_state), with_dropout_layout(v_state)), "layer_structure": [1, 2, 1],
                "dropout_structure": [0, 0.5, 0], "activation_func": "linear", "name": "d"}, path)
    hn = load_hypernetwork(path)
    assert not any(module.training for module in hn.modules())
    x = torch.randn(3, 5, 32, generator=generator)
    k, v = hn.transform_context(x, 0.5)
    assert torch.allclose(k, _residual(k_state, x, 0.5), atol=1e-6)
    assert torch.allclose(v, _residual(v_state, x, 0.5), atol=1e-6)


# --- 5. as lenient as the WebUI ----------------------------------------------------------------------


def test_weight_initialization_none_loads_and_is_kept(tmp_path):
    generator = torch.Generator().manual_seed(2)
    path = tmp_path / "api-made.pt"
    torch.save({32: (_linear_state(32, generator), _linear_state(32, generator)),
                "weight_initialization": None, "layer_structure": [1, 2, 1], "activation_func": "linear"}, path)
    hn = load_hypernetwork(path)
    assert hn.options.weight_init is None and hn.name == "api-made"
    save_hypernetwork(hn, tmp_path / "again.pt")
    assert torch.load(tmp_path / "again.pt", weights_only=True)["weight_initialization"] is None


def test_dropout_structure_longer_than_layer_structure_is_read_by_its_first_entries(tmp_path):
    generator = torch.Generator().manual_seed(3)
    k_state, v_state = _linear_state(32, generator), _linear_state(32, generator)
    path = tmp_path / "long-dropout.pt"
    torch.save({32: (k_state, v_state), "layer_structure": [1, 2, 1], "dropout_structure": [0, 0, 0, 0.3, 0],
                "activation_func": "linear"}, path)
    hn = load_hypernetwork(path)
    assert hn.options.dropout_structure == (0.0, 0.0, 0.0)
    x = torch.randn(2, 32, generator=generator)
    assert torch.allclose(hn.transform_context(x, 1.0)[1], _residual(v_state, x, 1.0), atol=1e-6)


def test_monkeypatch_extension_files_are_still_refused(tmp_path):
    generator = torch.Generator().manual_seed(4)
    path = tmp_path / "extension.pt"
    torch.save({32: (_linear_state(32, generator), _linear_state(32, generator)), "skip_connection": True}, path)
    with pytest.raises(HypernetworkFormatError, match="MonkeyPatch"):
        load_hypernetwork(path)
