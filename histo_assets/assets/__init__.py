"""Asset modules: thin Dagster recipes over histo_assets.core, one module per group of pipeline stages.

Each module's ``build_assets`` makes its assets from a Params object, since their
partitions, run-config schema and (for the base model) deps come from params: so
definitions for different params files can live in one process. A run still reads
its params from the params resource, with the launch's overrides. Assets of other
modules are named by key, so no module needs another's assets built first. The
steps every stage shares are in histo_assets/stage.py, the asset checks in
histo_assets/checks.py.
"""
