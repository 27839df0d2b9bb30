"""Asset modules: thin Dagster recipes over histo_assets.core, one module per group of pipeline stages.

Each asset is declared once, with ``stage_asset`` (histo_assets/stage.py):
what it reads, what decides its output, its Dagster settings, and a recipe
that makes one core call and chooses what the UI shows. definitions.py builds
them from a Params object, since their partitions, run-config schema and (for
the base model) deps come from params: so definitions for different params
files can live in one process. A run still reads its params from the params
resource, with the launch's overrides. Assets of other modules are named by
key. The asset checks are in histo_assets/checks.py.

The core modules that import diffusers (training, sampling, the base model)
are imported inside the recipes, when a run needs them: loading diffusers
takes seconds that every CLI start and UI reload would otherwise pay.
"""
