"""Asset modules, one per group of pipeline stages (the module's name is the group the UI shows).

Each asset is declared once, with ``stage_asset`` (histo_assets/stage.py), as a short recipe over
histo_assets.core. Core modules that import diffusers (training, sampling, the base model) are
imported inside the recipes, when a run needs them: loading diffusers takes seconds that every CLI
start and UI reload would otherwise pay.
"""
