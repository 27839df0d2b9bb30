"""The pipeline as deployed on Kubernetes with dagster-k8s: every step in its own pod.

Steps of the `gpu` pool (training, generation) carry the `dagster-k8s/config` tag that
requests `nvidia.com/gpu: 1`, so the k8s_job_executor schedules them on GPU nodes.
Pods share no disk: each step pulls the stage folders it reads from the object store
named by $HISTO_ASSETS_STORE_URL and pushes its own (histo_assets.core.object_store).
Load with `dagster dev -f deploy/definitions.py` or from the user-code deployment of
the Helm chart (deploy/values.yaml).
"""

import dagster as dg
from dagster_k8s import k8s_job_executor

from histo_assets.definitions import build_definitions
from histo_assets.core.object_store import STORE_URL_ENV
from histo_assets.params import load_params
from histo_assets.resources import BaseModelResource, ObjectStoreResource

# One step per pod: each step's torch threads get the pod's whole CPU quota (histo_assets.core.threads).
defs = build_definitions(
    load_params(),
    object_store=ObjectStoreResource(url=dg.EnvVar(STORE_URL_ENV)),
    executor=k8s_job_executor,
    base_model=BaseModelResource(concurrent_steps=1),
)
