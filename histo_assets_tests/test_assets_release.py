"""The dataset_release asset publishing for real, a fresh clone pulling it, and lineage from the pulled copy.

Why this module exists: the other tests stop short of what the demo promises.
test_cli materialises the graph outside any git repository, so
dataset_release there only builds its folder; test_release publishes
hand-made images with the core functions; test_lineage traces a release made
by ``build_release``. Here the real asset publishes the release of a real
(tiny) pipeline run, and a downstream user's clone gets it back:

1. The materialised tiny project (conftest's ``pipeline``) is copied, made a git
   repository and DVC project (with the project's own .gitignore) whose
   ``origin`` is a bare "shared" repository, committed and pushed, and
   `histo-assets materialize --job release_pipeline --set release.git_remote=origin`
   runs in it. The DVC remote is whatever params say (``release.remote``: the
   default local directory beside the params file).
2. The asset's Dagster metadata must record the DVC md5 and the tag, the tag
   must follow ``release/<name>/<12 hex of the content hash>``, the DVC remote
   must hold the data and the shared repository the tag (and no moved branch).
3. A fresh ``git clone`` of the shared repository checks out the tag and runs
   ``dvc pull`` as the README says; every file must be byte-identical to the
   published folder.
4. `histo-assets lineage` traces every image of the pulled copy, with no data
   folder, back to the raw slide files and their sha256 (compared with the
   pipeline's raw slide inventory and the files themselves), the checkpoint
   sha256, the generation parameters and the Dagster run ids; by sha256 the
   original data folder gives the same chain with every link verified; an
   unknown sha256 fails with a message.

Every git and dvc call, the asset's included, runs with git's and DVC's global
and user config redirected into the temp folder and no git identity
configured, as on a bare CI machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from histo_assets.core.release import PIPELINE_AUTHOR
from histo_assets.core.evaluation import SMALL_REFERENCE, TABLE_COLUMNS
from histo_assets.core.io import sha256_file
from histo_assets.core.release import CARD, DATASET_HEADING, content_hash
from histo_assets.core.sampling import image_seed
from histo_assets.core.layout import INDEX, INVENTORY, SUMMARY, Layout
from histo_assets.params import PROJECT_ROOT, load_params
from histo_assets_tests.conftest import dvc_executable, isolated_git_dvc_env, tree_hashes
from histo_assets_tests.tiny_pipeline import BASE_MODEL_NAME, CLASSES, SEED, STEPS, Pipeline, data_version, latest, metadata, run_ok

TAG_SCHEME = r"release/{name}/[0-9a-f]{{12}}"


# --- git, dvc and the CLI in subprocesses, isolated from the user's configuration -------------------


def environ() -> dict[str, str]:
    """This process's environment without a git identity (which the user's shell or CI may set)."""
    identity = {"GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"}
    return {key: value for key, value in os.environ.items() if key not in identity}


def run(command: list[str], cwd: Path, env: Mapping[str, str], *, check: bool = True) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, cwd=cwd, env=environ() | dict(env), capture_output=True, text=True, timeout=600)
    if check:
        assert completed.returncode == 0, (
            f"`{shlex.join(command)}` exited {completed.returncode}\nstdout:\n{completed.stdout[-3000:]}\n"
            f"stderr:\n{completed.stderr[-3000:]}"
        )
    return completed


def materialize_release(work: Pipeline, env: Mapping[str, str], *args: str) -> str:
    """`histo-assets materialize --job release_pipeline` with git's ceiling above the pipeline root.

    By default ``Pipeline.materialize`` puts the ceiling at the root, so that
    dataset_release, which looks for a repository from data_dir upwards, finds
    none. Here the root is the repository: the ceiling is its parent, so the
    asset finds the root and still nothing above it.
    """
    return run_ok(work.materialize("--job", "release_pipeline", *args, env=environ() | dict(env), git_ceiling=work.root.parent))


# --- the published project and its clone ------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """The tiny project as a git + DVC repository after the release job, and what the run left behind."""

    work: Pipeline
    shared: Path  # the bare repository that is the project's git remote "origin"
    initial_commit: str
    env: dict[str, str]
    name: str
    remote: Path
    tag: str
    record: dg.EventLogRecord
    output: str
    checkout_before: dict[str, str]  # the lab's branch, HEAD, index and `git status` before the release job

    @property
    def release(self) -> Path:
        return Layout(self.work.data).release(self.name)

    @property
    def release_path(self) -> str:
        """The release folder relative to the repository root, as the .dvc file and the card name it."""
        return self.release.relative_to(self.work.root).as_posix()

    def git(self, *args: str, repo: Path | None = None) -> str:
        return run(["git", *args], repo or self.work.root, self.env).stdout

    def dvc(self, *args: str, repo: Path) -> str:
        return run([str(dvc_executable()), *args], repo, self.env).stdout


@pytest.fixture(scope="module")
def published(pipeline, tmp_path_factory) -> Published:
    """A copy of the materialised tiny project, committed to git with `dvc init` done and pushed to a shared
    repository, then the release job run in it, pushing its tag there too."""
    sandbox = tmp_path_factory.mktemp("release-asset")
    env = isolated_git_dvc_env(sandbox)
    dvc = str(dvc_executable())
    work = pipeline.copy(sandbox / "lab" / "project")
    section = load_params(work.params)["release"]
    # A lab's checkout before its first release: the session pipeline's unversioned release folder goes.
    shutil.rmtree(Layout(work.data).release(section["name"]))
    ignored = (PROJECT_ROOT / ".gitignore").read_text() + "/dagster_home/\n/first_run.log\n"
    (work.root / ".gitignore").write_text(ignored)
    run(["git", "init", "--quiet", "--initial-branch", "main"], work.root, env)
    run([dvc, "init", "--quiet"], work.root, env)
    run(["git", "add", "params.yaml", ".gitignore", ".dvc", ".dvcignore"], work.root, env)
    run(["git", "-c", "user.name=Lab", "-c", "user.email=lab@example.invalid", "commit", "--quiet", "-m", "Project"],
        work.root, env)
    shared = sandbox / "shared.git"
    run(["git", "init", "--quiet", "--bare", "--initial-branch", "main", str(shared)], sandbox, env)
    run(["git", "remote", "add", "origin", str(shared)], work.root, env)
    run(["git", "push", "--quiet", "origin", "main"], work.root, env)
    initial_commit = run(["git", "rev-parse", "HEAD"], work.root, env).stdout.strip()
    checkout_before = checkout_state(work.root, env)

    output = materialize_release(work, env, "--set", "release.git_remote=origin")

    with work.instance() as instance:
        record = latest(instance, "dataset_release")
    tags = run(["git", "tag", "--list"], work.root, env).stdout.split()
    assert len(tags) == 1, tags
    # release.remote.url is relative to the params file the run used.
    remote = (work.params.parent / section["remote"]["url"]).resolve()
    return Published(work, shared, initial_commit, env, section["name"], remote, tags[0], record, output,
                     checkout_before)


def checkout_state(repo: Path, env: dict[str, str]) -> dict[str, str]:
    """What the user sees of their checkout: branch, HEAD, index and working tree."""
    def git(*args: str) -> str:
        return run(["git", *args], repo, env).stdout

    return {"branch": git("symbolic-ref", "HEAD"), "head": git("rev-parse", "HEAD"), "index": git("ls-files", "--stage"),
            "status": git("status", "--porcelain", "--untracked-files=all")}


@pytest.fixture(scope="module")
def clone(published) -> Path:
    """A downstream user's copy: `git clone` of the shared repository, then the dataset card's commands
    (`git checkout <tag>`, pointing DVC at the local remote, `dvc pull <release>.dvc`)."""
    root = published.work.root.parent.parent / "downstream" / "project"
    root.parent.mkdir()
    published.git("clone", "--quiet", str(published.shared), str(root), repo=root.parent)
    assert not (root / published.release_path).exists(), "release data committed to git instead of DVC"
    card = (published.release / CARD).read_text()
    commands = re.search(r"In a clone of the repository.*?```sh\n(.*?)```", card, re.DOTALL).group(1).splitlines()
    assert commands[0] == f"git checkout {published.tag}" and commands[-1] == f"dvc pull {published.release_path}.dvc"
    for command in commands:
        tool, *args = shlex.split(command)
        (published.git if tool == "git" else published.dvc)(*args, repo=root)
    return root


# --- what the pipeline folder says an image came from -------------------------------------------------


def best_steps(work: Pipeline) -> dict[str, int]:
    summary = json.loads((Layout(work.data).metrics_summary / "metrics.json").read_text())
    return {tissue_class: int(entry["best_step"]) for tissue_class, entry in summary["classes"].items()}


@dataclass(frozen=True)
class Expected:
    """One released image's chain, read from the pipeline's own files, independently of the lineage code."""

    tissue_class: str
    step: int
    generation: dict
    checkpoint_sha256: str
    run_id: str
    raw_slides: dict[str, str]  # path relative to data_dir -> sha256, from the slide_inventory asset


def expected(work: Pipeline, tissue_class: str, file: str) -> Expected:
    layout = Layout(work.data)
    step = best_steps(work)[tissue_class]
    folder = layout.synthetic_images(tissue_class, step)
    index = pd.read_parquet(folder / INDEX)
    (row,) = index[index["file"] == file].to_dict("records")
    checkpoint = layout.hypernetwork_checkpoints(tissue_class) / f"{tissue_class}-{step}.pt"
    inventory = pd.read_parquet(layout.slide_inventory(tissue_class) / INVENTORY)
    return Expected(
        tissue_class=tissue_class,
        step=step,
        generation=row,
        checkpoint_sha256=sha256_file(checkpoint),
        run_id=json.loads((folder / SUMMARY).read_text())["run_id"],
        raw_slides=dict(zip(inventory["path"], inventory["sha256"])),
    )


def lineage(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess:
    """The real `histo-assets lineage`, in a subprocess like a user's shell."""
    return run([sys.executable, "-m", "histo_assets.cli", "lineage", *args], PROJECT_ROOT, env, check=False)


def lineage_json(*args: str, env: Mapping[str, str]) -> dict:
    completed = lineage(*args, "--json", env=env)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def failed_checks(report: dict) -> list[dict]:
    return [check for check in report["checks"] if check["passed"] is False]


# --- 1. the asset publishes ------------------------------------------------------------------------


def test_release_asset_pushes_and_tags_and_records_the_dvc_md5_and_tag_in_dagster(published):
    shown = metadata(published.record)
    tag = published.tag
    assert re.fullmatch(TAG_SCHEME.format(name=re.escape(published.name)), tag), tag
    assert tag == f"release/{published.name}/{content_hash(published.release)[:12]}"
    assert shown["published"] is True and shown["tag"] == tag
    assert f"published {tag}: dvc md5 {shown['dvc_md5']}" in published.output
    assert shown["git_remote"] == "origin" and f"pushed tag {tag} to git remote origin" in published.output

    # The .dvc file committed under the tag is what Dagster recorded.
    dvc_file = yaml.safe_load(published.git("show", f"{tag}:{published.release_path}.dvc"))
    md5 = dvc_file["outs"][0]["md5"]
    assert md5.endswith(".dir") and shown["dvc_md5"] == md5 == data_version(published.record)
    assert shown["git_commit"] == published.git("rev-parse", f"{tag}^{{commit}}").strip()
    assert published.git("rev-parse", f"{tag}^{{commit}}^").strip() == published.initial_commit
    assert shown["new_commit"] is True
    # The tag and its commit reached the shared repository; no branch was moved there.
    assert published.git("rev-parse", f"{tag}^{{commit}}", repo=published.shared).strip() == shown["git_commit"]
    assert published.git("rev-parse", "main", repo=published.shared).strip() == published.initial_commit
    assert published.git("cat-file", "-t", tag).strip() == "tag", "release tags are annotated"
    # No git identity is configured here: the asset signs as the pipeline, as on a bare CI machine.
    signed = published.git("for-each-ref", "--format=%(taggername) %(taggeremail)", f"refs/tags/{tag}").strip()
    authored = published.git("log", "-1", "--format=%an <%ae>", shown["git_commit"]).strip()
    assert signed == authored == "{} <{}>".format(*PIPELINE_AUTHOR)
    committed = set(published.git("show", "--name-only", "--format=", shown["git_commit"]).split())
    assert committed == {f"{published.release_path}.dvc", f"{Path(published.release_path).parent.as_posix()}/.gitignore",
                         ".dvc/config"}

    # The remote is the local directory params name, set as the tag's default remote, and it holds the data.
    config = published.git("show", f"{tag}:.dvc/config")
    assert "url = ../.dvc-remote" in config and str(published.work.root) not in config, "the committed remote is portable"
    assert published.remote == published.work.root / ".dvc-remote"
    stored = [path for path in published.remote.rglob("*") if path.is_file()]
    assert stored, f"nothing was pushed to {published.remote}"
    assert (published.remote / "files" / "md5" / md5[:2] / md5[2:]).is_file(), "the folder's .dir object was not pushed"
    assert len(stored) >= len(set(tree_hashes(published.release).values())) + 1


def test_the_release_leaves_the_users_branch_index_and_working_tree_as_they_were(published):
    assert checkout_state(published.work.root, published.env) == published.checkout_before
    assert published.git("rev-parse", "main").strip() == published.initial_commit
    assert published.git("log", "-1", "--format=%H %s").startswith(published.initial_commit)


def test_release_holds_the_best_checkpoint_images_of_every_class_with_their_provenance(published):
    manifest = pd.read_parquet(published.release / "manifest.parquet")
    card = (published.release / CARD).read_text()
    assert f"Release tag: `{published.tag}`" in card
    assert f"dvc get {published.shared} " in card, "the card points downstream users at the shared repository"
    metrics = pd.read_parquet(published.release / "metrics.parquet")
    assert list(metrics.columns) == TABLE_COLUMNS and (metrics["comparable_with"] == "none").all()
    assert "Comparable with: **none**" in card and "bootstrap intervals" in card and f"`{SMALL_REFERENCE}`:" in card
    for tissue_class, step in best_steps(published.work).items():
        folder = Layout(published.work.data).synthetic_images(tissue_class, step)
        index = pd.read_parquet(folder / INDEX)
        rows = manifest[manifest["tissue_class"] == tissue_class]
        assert set(rows["checkpoint_step"]) == {step}
        assert sorted(rows["path"]) == sorted(f"images/{tissue_class}/{file}" for file in index["file"])
        assert dict(zip(rows["path"].map(lambda p: p.rsplit("/", 1)[-1]), rows["sha256"])) == dict(zip(index["file"], index["sha256"]))
        assert set(rows["dagster_run_id"]) == {json.loads((folder / SUMMARY).read_text())["run_id"]}
    assert set(manifest["tissue_class"]) == set(CLASSES)


# --- 2. a fresh clone pulls it ---------------------------------------------------------------------


def test_fresh_clone_at_the_tag_pulls_the_release_byte_identically(published, clone):
    assert published.git("rev-parse", "HEAD", repo=clone) == published.git("rev-parse", f"{published.tag}^{{commit}}")
    assert published.dvc("remote", "default", repo=clone).strip() == "local"
    original, pulled = tree_hashes(published.release), tree_hashes(clone / published.release_path)
    assert len(pulled) > len(CLASSES) and "manifest.parquet" in pulled and "lineage.parquet" in pulled
    assert pulled == original
    manifest = pd.read_parquet(clone / published.release_path / "manifest.parquet")
    assert {path: pulled[path] for path in manifest["path"]} == dict(zip(manifest["path"], manifest["sha256"]))


def test_the_cards_dataset_snippet_loads_the_pulled_release_with_its_labels(published, clone):
    """The card's own code, copied out of the pulled card, run where `dvc get` would have put the folder."""
    release = clone / published.release_path
    card = (release / "README.md").read_text()
    code = card.split(DATASET_HEADING, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    check = code + textwrap.dedent("""
        import json
        batch, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
        print(json.dumps({"n": len(dataset), "classes": dataset.classes, "shape": list(batch.shape),
                          "labels": sorted(set(labels.tolist())), "min": float(batch.min()), "max": float(batch.max()),
                          "first": [dataset.manifest["tissue_class"].iloc[0], dataset.labels[0]]}))
    """)
    completed = subprocess.run([sys.executable, "-c", check], cwd=release.parent, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    manifest = pd.read_parquet(release / "manifest.parquet")
    assert result["n"] == len(manifest) and result["classes"] == sorted(CLASSES)
    assert result["shape"] == [len(manifest), 3, 64, 64] and 0 <= result["min"] <= result["max"] <= 1
    assert result["labels"] == list(range(len(CLASSES)))
    assert result["first"][1] == sorted(CLASSES).index(result["first"][0])


# --- 3. lineage from the pulled copy and from the data folder -----------------------------------------


def assert_full_chain(report: dict, want: Expected, work: Pipeline) -> None:
    """The report names the raw slides with their sha256, the checkpoint sha256, the generation params and run ids."""
    assert (report["tissue_class"], report["checkpoint_step"]) == (want.tissue_class, want.step)
    generation = report["generation"]
    assert generation["seed"] == want.generation["seed"] == image_seed(SEED, want.tissue_class, want.step, want.generation["index"])
    for key in ("sampler", "steps", "cfg_scale", "prompt", "negative_prompt", "width", "height"):
        assert generation[key] == want.generation[key], key
    assert report["png_parameters"]["Seed"] == str(want.generation["seed"])
    assert f"<hypernet:{want.tissue_class}-{want.step}:1.0>" in report["png_parameters"]["Prompt"]
    assert report["checkpoint"]["sha256"] == want.checkpoint_sha256
    assert report["checkpoint"]["file"] == f"{want.tissue_class}-{want.step}.pt"
    assert report["code"]["dagster_run_ids"] == [want.run_id]
    slides = {slide["path"]: slide["sha256"] for slide in report["raw_slides"]}
    assert slides == want.raw_slides and len(slides) == 2
    for path, sha in slides.items():
        assert path.startswith(f"raw/{want.tissue_class}/") and sha256_file(work.data / path) == sha
    assert report["square_crops"] and all(crop["raw_slide"] in slides for crop in report["square_crops"])
    assert not failed_checks(report), failed_checks(report)


def test_lineage_traces_every_image_of_the_cloned_release_to_the_raw_slides(published, clone, tmp_path):
    release = clone / published.release_path
    manifest = pd.read_parquet(release / "manifest.parquet")
    no_data = tmp_path / "no-data-here"
    with published.work.instance() as instance:
        for row in manifest.itertuples():
            image = release / row.path
            report = lineage_json(str(image), "--release", str(release), "--data-dir", str(no_data), env=published.env)
            want = expected(published.work, row.tissue_class, image.name)
            assert report["sha256"] == sha256_file(image) == row.sha256
            assert report["locations"] == [str(image.resolve())]
            assert report["releases"] == [{"name": published.name, "folder": str(release), "tag": published.tag, "image": row.path}]
            assert_full_chain(report, want, published.work)
            # From the release alone: nothing in a data folder is claimed, the lineage table stands in for it.
            assert report["checkpoint"]["path"] is None and report["training"]["settings"] is None
            assert report["training_images"]["source"] == str(release / "lineage.parquet")
            assert all(slide["on_disk"] is None for slide in report["raw_slides"])
            passed = {check["name"] for check in report["checks"] if check["passed"]}
            assert passed >= {"PNG parameters chunk", "training images"}
            # The run ids are real runs of this project's Dagster instance that generated this partition.
            partition = dg.MultiPartitionKey({"tissue_class": row.tissue_class, "step": str(want.step)})
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("synthetic_images"), asset_partitions=[partition]), limit=100
            ).records
            assert want.run_id in {record.run_id for record in records}

    # The report for people says the same.
    image = release / manifest["path"].iloc[0]
    want = expected(published.work, manifest["tissue_class"].iloc[0], image.name)
    completed = lineage(str(image), "--release", str(release), "--data-dir", str(no_data), env=published.env)
    assert completed.returncode == 0, completed.stderr
    text = completed.stdout
    for path, sha in want.raw_slides.items():
        assert f"  {path}\n    sha256 {sha}" in text
    assert want.checkpoint_sha256 in text and f"Seed: {want.generation['seed']}" in text
    assert want.run_id in text and published.tag in text and "FAIL" not in text
    base_section = text.split("Base model (asset base_model)\n", 1)[1].split("\n\n", 1)[0]
    assert BASE_MODEL_NAME in base_section and "sha256" in base_section


def test_lineage_by_sha256_in_the_original_data_folder_verifies_every_link(published, clone):
    data = published.work.data
    manifest = pd.read_parquet(published.release / "manifest.parquet")
    in_clone = published.env | {"HISTO_ASSETS_PARAMS": str(clone / "params.yaml")}
    for tissue_class in CLASSES:
        row = manifest[manifest["tissue_class"] == tissue_class].iloc[-1]
        want = expected(published.work, tissue_class, Path(row["path"]).name)
        # No --release: the data folder's own releases/ are searched.
        report = lineage_json(row["sha256"], "--data-dir", str(data), env=published.env)
        assert report["sha256"] == row["sha256"]
        assert report["releases"] == [{"name": published.name, "folder": str(published.release), "tag": published.tag,
                                       "image": row["path"]}]
        assert_full_chain(report, want, published.work)
        assert report["checkpoint"]["on_disk_sha256_matches"] is True
        assert report["training"]["settings"]["checkpoint_steps"] == STEPS
        for slide in report["raw_slides"]:
            assert slide["on_disk"] is True and slide["bytes"] == (data / slide["path"]).stat().st_size
        assert {check["name"] for check in report["checks"] if check["passed"]} >= {
            "PNG parameters chunk", "checkpoint file on disk", "training settings", "training images",
            "release manifest = data folder index", "base model",
        }
        base = json.loads((data / "base_model" / "summary.json").read_text())
        assert report["base_model"] | {"training_set": None} == {
            "asset": "base_model", "name": BASE_MODEL_NAME, "sha256": base["sha256"], "source": "tiny",
            "path": base["path"], "training_set": None}
        # In the clone, with its committed params and no options, the pulled release gives the same chain.
        from_clone = lineage_json(row["sha256"], env=in_clone)
        assert [hit["folder"] for hit in from_clone["releases"]] == [str((clone / published.release_path).resolve())]
        for key in ("sha256", "tissue_class", "checkpoint_step", "square_crops", "code"):
            assert from_clone[key] == report[key], key
        assert from_clone["generation"] == {key: report["generation"][key] for key in from_clone["generation"]}
        assert from_clone["checkpoint"]["sha256"] == report["checkpoint"]["sha256"]
        assert [(s["path"], s["sha256"]) for s in from_clone["raw_slides"]] == [(s["path"], s["sha256"]) for s in report["raw_slides"]]
        assert not failed_checks(from_clone), failed_checks(from_clone)


def test_lineage_of_an_unknown_sha256_exits_non_zero_with_a_message(published, clone, tmp_path):
    release = clone / published.release_path
    known = set(pd.read_parquet(release / "manifest.parquet")["sha256"])
    unknown = "0123456789abcdef" * 4
    assert not any(sha.startswith(unknown[:16]) for sha in known)
    for query in (unknown, unknown[:16]):
        completed = lineage(query, "--release", str(release), "--data-dir", str(tmp_path / "none"), env=published.env)
        assert completed.returncode != 0
        assert completed.stdout == ""
        assert "no synthetic image with" in completed.stderr and query in completed.stderr
        assert str(release) in completed.stderr, "the message names where it searched"
