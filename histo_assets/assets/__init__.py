"""Asset modules: thin Dagster wrappers over histo_assets.core, one module per pipeline stage.

Each module's ``build_assets`` makes its assets from a Params object, since their
partitions, run-config schema and (for the base model) deps come from params: so
definitions for different params files can live in one process. A run still reads
its params from the params resource, with the launch's overrides. Assets of other
modules are named by key, so no module needs another's assets built first.
"""

import dagster as dg

# Downstream assets follow their upstream through declarative automation, so a sensor or
# schedule only has to start the ingest job; unchanged inputs are reused by fingerprint.
FOLLOW_UPSTREAM = dg.AutomationCondition.eager()

# On Kubernetes (dagster-k8s) these tags request one GPU for the step's pod; elsewhere they are inert.
GPU_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}
