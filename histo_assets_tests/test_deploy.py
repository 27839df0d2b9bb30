"""The Kubernetes deployment configuration loads and requests GPUs where it should; no cluster needed."""

import importlib.util
import os
import subprocess
from pathlib import Path

import dagster as dg
import yaml

from histo_assets.core.object_store import STORE_URL_ENV, ObjectStore
from histo_assets.params import PROJECT_ROOT, load_params

DEPLOY = PROJECT_ROOT / "deploy"
GPU_LIMIT = {"nvidia.com/gpu": "1"}


def load_deploy_definitions():
    spec = importlib.util.spec_from_file_location("deploy_definitions", DEPLOY / "definitions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.defs


def test_definitions_use_the_k8s_executor_and_gpu_tags():
    defs = load_deploy_definitions()
    for name in ("ingest_pipeline", "training_pipeline", "checkpoint_pipeline", "summary_pipeline", "release_pipeline"):
        assert defs.resolve_job_def(name).executor_def.name == "k8s"
    graph = defs.resolve_asset_graph()
    tagged = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        config = (node.assets_def.op.tags or {}).get("dagster-k8s/config")
        tagged[key.path[-1]] = config
    for gpu_asset in ("hypernetwork_checkpoints", "synthetic_images"):
        config = tagged[gpu_asset]
        config = yaml.safe_load(config) if isinstance(config, str) else config
        assert config["container_config"]["resources"]["limits"] == GPU_LIMIT
    assert tagged["square_crops"] is None


def test_definitions_validate_with_the_cluster_params(tmp_path):
    env = dict(os.environ, HISTO_ASSETS_PARAMS=str(DEPLOY / "params.k8s.yaml"), DAGSTER_HOME=str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    dagster = Path(PROJECT_ROOT / ".venv" / "bin" / "dagster")
    out = subprocess.run([str(dagster), "definitions", "validate", "-f", str(DEPLOY / "definitions.py")],
                         env=env, capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


def test_cluster_params_and_instance_config_are_coherent():
    p = load_params(DEPLOY / "params.k8s.yaml")
    assert p.data_dir == Path("/app/data") and p["base_model"]["source"] == "single_file"
    assert p["base_model"]["sha256"].startswith("6ce0161689")
    assert p["release"]["remote"]["url"].startswith("s3://") and p["release"]["git_remote"] == "origin"
    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    assert instance["run_launcher"]["class"] == "K8sRunLauncher"
    assert "postgres" in instance["storage"]
    values = yaml.safe_load((DEPLOY / "values.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["-f", "deploy/definitions.py"]
    assert {"name": "HISTO_ASSETS_PARAMS", "value": "/app/deploy/params.k8s.yaml"} in deployment["env"]


def test_pods_hand_stage_folders_on_through_the_store_named_in_the_values(tmp_path, monkeypatch):
    values = yaml.safe_load((DEPLOY / "values.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    url = {e["name"]: e["value"] for e in deployment["env"]}[STORE_URL_ENV]
    assert {"name": "data", "emptyDir": {}} in deployment["volumes"]
    assert {"name": "data", "mountPath": "/app/data"} in deployment["volumeMounts"]
    store = ObjectStore(url)
    assert type(store.fs).__name__ == "S3FileSystem" and store.root == url.removeprefix("s3://")

    # The deployed resource reads its URL from the environment: point it at a local store and push a folder.
    local_store = f"file://{tmp_path / 'bucket'}"
    monkeypatch.setenv(STORE_URL_ENV, local_store)
    definition = load_deploy_definitions().resolve_job_def("ingest_pipeline").resource_defs["object_store"]
    folder = tmp_path / "data" / "square_crops" / "x"
    folder.mkdir(parents=True)
    (folder / "index.parquet").write_bytes(b"index")
    with dg.build_resources({"object_store": definition}) as resources:
        assert resources.object_store.url == local_store
        resources.object_store.push(tmp_path / "data", folder, log=lambda message: None)
    assert ObjectStore(local_store).manifest("square_crops/x")["index.parquet"]["size"] == 5
