"""The CUDA-only code paths, run for real on a GPU: fp16 weights, autocast and the fp16 GradScaler.

On CPU the project trains and generates in fp32 with the GradScaler disabled, so
the test suite never runs these branches. This script loads the tiny base model
on CUDA (``dtype="auto"`` gives fp16 there), trains a hypernetwork with
checkpoints, checks every file it wrote against the WebUI's loading rules,
generates PNGs from the last checkpoint and pastes their ``parameters`` text the
way the WebUI does. It compares the result with the same training on CPU in fp32:
the losses should track each other, not match (fp16 rounding).

Run on a CUDA machine (exits 2 without one):
    python benchmarks/cuda_paths.py [--steps 40]
"""

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histo_assets.core.base_model import TINY_HYPERNETWORK_SIZES, load_base_model
from histo_assets.core.hypernetwork import HypernetworkOptions, load_hypernetwork
from histo_assets.core.sampling import generate_images
from histo_assets.core.training import TrainingSettings, train_hypernetwork
from histo_assets.params import DEFAULT_PARAMS_FILE, load_params
from histo_assets.settings import generation_settings
from histo_assets_tests.webui_rules import check_loadable_by_webui, webui_paste

RESOLUTION = 64
SEED = 7
TEMPLATES = ("an H&E tile of [filewords], [name]",)


def write_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    columns = np.arange(RESOLUTION)
    for index in range(count):
        stripes = np.sin(columns / (3 + index))[None, :, None] * 60
        pixels = np.clip(rng.uniform(60, 200, size=3) + stripes, 0, 255)
        Image.fromarray(np.broadcast_to(pixels, (RESOLUTION, RESOLUTION, 3)).astype(np.uint8)).save(
            folder / f"{index:04d} pink tissue.png")
    return folder


def train(root: Path, images: Path, device: str, steps: int):
    base = load_base_model("tiny", tiny_cache_dir=root / "tiny", seed=0, device=device, dtype="auto")
    started = time.perf_counter()
    settings = TrainingSettings(templates=TEMPLATES, max_steps=steps, learning_rate="0.001", batch_size=2,
                                gradient_accumulation=2, checkpoint_steps=(steps // 2, steps), clip_mode="norm",
                                clip_value="1.0", latent_sampling="once", loss_log_every=1)
    result = train_hypernetwork(base, images, root / f"hn-{device}-{len(list(root.glob('hn-*')))}", settings,
                                name="tissue", options=HypernetworkOptions(sizes=TINY_HYPERNETWORK_SIZES),
                                resolution=RESOLUTION, seed=SEED)
    return base, result, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cuda", help="cpu only to try the script itself without a GPU")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = write_images(root / "images", 8)
        base, gpu, gpu_seconds = train(root, images, args.device, args.steps)
        _, cpu, cpu_seconds = train(root, images, "cpu", args.steps)
        print(f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}; torch {torch.__version__}; base model dtype on CUDA: {base.dtype}")
        gpu_losses = [record.loss for record in gpu.loss_history]
        cpu_losses = [record.loss for record in cpu.loss_history]
        print(f"training {args.steps} steps: CUDA {gpu_seconds:.1f} s (device {gpu.device}), CPU {cpu_seconds:.1f} s")
        print(f"final loss CUDA fp16 {gpu.final_loss:.5f}, CPU fp32 {cpu.final_loss:.5f}; "
              f"mean loss CUDA {statistics.mean(gpu_losses):.5f}, CPU {statistics.mean(cpu_losses):.5f}")
        if not all(np.isfinite(gpu_losses)):
            failures.append("a CUDA loss is not finite (GradScaler did not recover)")
        written = sorted(gpu.final_path.parent.rglob("*.pt")) + sorted(gpu.final_path.parent.rglob("*.pt.optim"))
        for path in written:
            try:
                check_loadable_by_webui(path)
            except Exception as error:  # noqa: BLE001 - every refusal is reported, whatever its type
                failures.append(f"{path.name}: refused by the WebUI's loading rules: {error}")
        final = load_hypernetwork(gpu.final_path)
        dtypes = {str(tensor.dtype) for tensor in final.state_dict().values()}
        print(f"files written on CUDA: {', '.join(path.name for path in written)}; weight dtypes {sorted(dtypes)}")
        difference = max((a - b).abs().max().item() for a, b in zip(final.state_dict().values(),
                         load_hypernetwork(cpu.final_path).state_dict().values(), strict=True))
        print(f"largest |CUDA fp16 - CPU fp32| final weight difference: {difference:.2e}")
        settings = replace(generation_settings(load_params(DEFAULT_PARAMS_FILE)), prompt="an H&E histology tile of [name]",
                           negative_prompt="", steps=8, width=RESOLUTION, height=RESOLUTION, batch_size=2)
        started = time.perf_counter()
        records = generate_images(base, gpu.final_path, root / "generated", tissue_class="tissue", step=gpu.final_step,
                                  count=4, settings=settings, master_seed=SEED)
        print(f"generated {len(records)} PNGs on CUDA in {time.perf_counter() - started:.1f} s")
        for record in records:
            with Image.open(root / "generated" / record.file) as image:
                pasted = webui_paste(image.text["parameters"])
                pixels = np.asarray(image)
            if pixels.std() == 0 or not np.isfinite(pixels).all():
                failures.append(f"{record.file}: blank or non-finite image")
            print(f"{record.file}: {image.size}, pixel std {pixels.std():.1f}, pasted Steps={pasted.get('Steps')} "
                  f"Seed={pasted.get('Seed')} RNG={pasted['RNG']} hypernet token in pasted prompt: {'<hypernet:' in pasted['Prompt']}")
    print("\n".join(failures) or f"CUDA paths: all checks pass ({len(written)} files, {len(records)} images)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
