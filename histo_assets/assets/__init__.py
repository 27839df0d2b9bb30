"""Asset modules: thin Dagster wrappers over histo_assets.core, one module per pipeline stage."""

import dagster as dg

# Downstream assets follow their upstream through declarative automation, so a sensor or
# schedule only has to start the ingest job; unchanged inputs are reused by fingerprint.
FOLLOW_UPSTREAM = dg.AutomationCondition.eager()

# On Kubernetes (dagster-k8s) these tags request one GPU for the step's pod; elsewhere they are inert.
GPU_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}
