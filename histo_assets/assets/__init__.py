"""Asset modules: thin Dagster wrappers over histo_assets.core, one module per pipeline stage."""

import dagster as dg

# Downstream assets follow their upstream through declarative automation, so a sensor or
# schedule only has to start the ingest job; unchanged inputs are reused by fingerprint.
FOLLOW_UPSTREAM = dg.AutomationCondition.eager()
