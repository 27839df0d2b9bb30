"""Asset modules: thin Dagster wrappers over histo_assets.core, one module per pipeline stage."""
