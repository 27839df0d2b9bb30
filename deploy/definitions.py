"""The pipeline as deployed on Kubernetes with dagster-k8s: every step in its own pod.

Steps of the `gpu` pool (training, generation) carry the `dagster-k8s/config` tag that
requests `nvidia.com/gpu: 1`, so the k8s_job_executor schedules them on GPU nodes.
Load with `dagster dev -f deploy/definitions.py` or from the user-code deployment of
the Helm chart (deploy/values.yaml).
"""

import dagster as dg
from dagster_k8s import k8s_job_executor

from histo_assets import definitions

defs = dg.Definitions.merge(definitions.defs, dg.Definitions(executor=k8s_job_executor))
