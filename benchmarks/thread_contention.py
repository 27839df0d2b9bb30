"""Training steps/s next to busy processes: torch's default threads against the thread policy.

A Dagster host runs several steps at once, each a process with torch's intra-op pool sized to
every core it sees; this measures what that costs the tiny model's training loop, and what the
policy of `histo_assets.core.threads` (the cores available, divided among the steps allowed to
run at once; here the default, one step per core) gives instead.

`train_hypernetwork` (its own steps/s: the loop with its checkpoint write, not the encoding) runs
under both policies, idle and next to `--busy` CPU-bound processes that stand for the host's other
steps. Each busy process ends by itself after `--busy-seconds` and is killed when its measurement
ends, whatever happens. One warm-up run per policy, then `--repeats` interleaved rounds of the four
cells, so load from elsewhere falls on all alike; the median round is reported. The machine should be
otherwise quiet: `uptime` is printed before every measurement. Run:
    flock /tmp/histo-heavy.lock .venv/bin/python benchmarks/thread_contention.py [--busy 2 --steps 100 --repeats 3]
Prints Markdown tables.
"""

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from histo_assets.core.base_model import TINY_HYPERNETWORK_SIZES, load_base_model
from histo_assets.core.hypernetwork import HypernetworkOptions
from histo_assets.core.threads import THREAD_ENV_VARS, apply_threads, available_cores, thread_count
from histo_assets.core.training import TrainingSettings, train_hypernetwork
from training_overhead import load, write_images

# What torch chose at import, before anything here changed it: the pipeline's behaviour until now.
TORCH_DEFAULT_THREADS = torch.get_num_threads()
BUSY_LOOP = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


@contextmanager
def busy_processes(count: int, seconds: float):
    processes = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(seconds)]) for _ in range(count)]
    try:
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--busy", type=int, default=2, help="competing CPU-bound processes in the loaded cells")
    parser.add_argument("--busy-seconds", type=float, default=120, help="upper bound on each busy process's life")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    preset = [name for name in THREAD_ENV_VARS if name in os.environ]
    if preset:
        sys.exit(f"unset {', '.join(preset)}: the old policy is torch's default thread count")

    policies = {
        f"old: torch default ({TORCH_DEFAULT_THREADS} threads)": lambda: torch.set_num_threads(TORCH_DEFAULT_THREADS),
        f"new: thread policy ({thread_count()} thread(s))": lambda: apply_threads(thread_count()),
    }
    conditions = {"idle": 0, f"{args.busy} busy processes": args.busy}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = load_base_model("tiny", tiny_cache_dir=root / "cache", seed=0, device="cpu")
        write_images(root / "images", args.images)
        run_dirs = (root / f"run-{n}" for n in itertools.count())

        def steps_per_second(policy, busy: int) -> float:
            policy()
            print(f"$ uptime\n{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)
            with busy_processes(busy, args.busy_seconds):
                settings = TrainingSettings(
                    templates=("an H&E histology tile of [filewords], [name]",), max_steps=args.steps,
                    learning_rate="1e-5", batch_size=1, gradient_accumulation=1, checkpoint_steps=(args.steps,),
                    clip_mode="disabled", clip_value="0.1", latent_sampling="once", loss_log_every=args.steps,
                )
                result = train_hypernetwork(base, root / "images", next(run_dirs), settings, name="hn",
                                            options=HypernetworkOptions(sizes=TINY_HYPERNETWORK_SIZES),
                                            resolution=args.resolution, seed=0)
            print(f"  {torch.get_num_threads()} thread(s), {busy} busy: {result.steps_per_second:.1f} steps/s", flush=True)
            return result.steps_per_second

        print(f"{available_cores()} cores available; tiny model, {args.resolution} px, batch 1, {args.steps} steps per run\n")
        for policy in policies.values():
            steps_per_second(policy, 0)  # warm-up
        rates = {(p, c): [] for p in policies for c in conditions}
        loads = {(p, c): [] for p in policies for c in conditions}
        for _ in range(args.repeats):
            for condition, busy in conditions.items():
                for label, policy in policies.items():
                    rates[label, condition].append(steps_per_second(policy, busy))
                    loads[label, condition].append(load())

        print(f"\nmedian of {args.repeats} interleaved rounds; load avg after each run (1, 5, 15 min)\n")
        print("| policy | condition | median steps/s | fastest steps/s | of this policy's idle | load avg after each run |")
        print("|---|---|---|---|---|---|")
        for label in policies:
            idle = statistics.median(rates[label, "idle"])
            for condition in conditions:
                median = statistics.median(rates[label, condition])
                print(f"| {label} | {condition} | {median:.1f} | {max(rates[label, condition]):.1f} | "
                      f"{median / idle:.0%} | {'; '.join(loads[label, condition])} |")


if __name__ == "__main__":
    main()
