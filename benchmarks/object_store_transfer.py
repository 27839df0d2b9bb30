"""What the object store costs a step: push and pull of the demo's stage folders against a plain copy.

Run after the demo (`scripts/demo.sh`), so data/ holds every stage:
    .venv/bin/python benchmarks/object_store_transfer.py [--rounds 3]
The store is a local directory (file://), so the numbers are the store's own
work (hashing, content addressing, manifests, verification), not network time.
Prints a Markdown table; results are recorded in benchmarks/README.md.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from histo_assets.core.object_store import ObjectStore, folder_files
from histo_assets.params import PROJECT_ROOT, load_params

STAGES = ["raw", "square_crops", "augmented_crops", "hypernetwork_checkpoints", "synthetic_images", "metrics_summary"]


def stage_folders(data: Path, stage: str) -> list[Path]:
    root = data / stage
    if stage == "metrics_summary":
        return [root]
    if stage == "synthetic_images":
        return sorted(step for tissue_class in sorted(root.iterdir()) for step in sorted(tissue_class.iterdir()))
    return sorted(p for p in root.iterdir() if p.is_dir())


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(PROJECT_ROOT / "params.demo.yaml"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data = load_params(args.params).data_dir
    print(f"load average {os.getloadavg()[0]:.2f} at start; medians of {args.rounds} rounds, seconds per stage (all classes)")
    print()
    print("| stage | folders | files | MiB | copytree | first push | push, unchanged | pull into empty | pull, up to date |")
    print("|---|---|---|---|---|---|---|---|---|")
    for stage in STAGES:
        folders = stage_folders(data, stage)
        files = sum(len(folder_files(f)) for f in folders)
        size = sum(p.stat().st_size for f in folders for p in folder_files(f).values()) / 2**20
        times = {k: [] for k in ("copy", "push", "push_again", "pull", "pull_again")}
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                store = ObjectStore(f"file://{tmp / 'bucket'}")
                keys = [f.relative_to(data).as_posix() for f in folders]
                times["copy"].append(timed(lambda: [shutil.copytree(f, tmp / "copy" / k) for f, k in zip(folders, keys)]))
                times["push"].append(timed(lambda: [store.push(f, k) for f, k in zip(folders, keys)]))
                times["push_again"].append(timed(lambda: [store.push(f, k) for f, k in zip(folders, keys)]))
                times["pull"].append(timed(lambda: [store.pull(k, tmp / "pod" / k) for k in keys]))
                times["pull_again"].append(timed(lambda: [store.pull(k, tmp / "pod" / k) for k in keys]))
        cells = " | ".join(f"{statistics.median(times[k]):.3f}" for k in ("copy", "push", "push_again", "pull", "pull_again"))
        print(f"| {stage} | {len(folders)} | {files} | {size:.1f} | {cells} |")
    print()
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
