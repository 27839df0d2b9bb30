"""core/release.py: releases end to end with real git and real dvc against a local directory remote."""

import dataclasses
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histo_assets.core.dvc import (
    CommandError,
    DvcCli,
    TagConflictError,
    git_head,
    git_head_or_none,
    md5_from_dvc_text,
    git_is_repo,
    git_tag,
    git_tag_target,
    resolve_dvc_executable,
)
from histo_assets.core.io import sha256_file
from histo_assets.core.release import (
    CARD,
    MANIFEST,
    METRICS,
    ReleaseImage,
    ReleaseSelectionError,
    already_published,
    build_release,
    content_hash,
    local_remote_path,
    publish_release,
    read_manifest,
    release_repo_url,
    release_tag,
    selected_steps,
)
from histo_assets_tests.conftest import dvc_executable, isolated_git_dvc_env, tree_hashes

CLASSES = ("fibrocystic", "proliferative")
RELEASE_PATH = "releases/demo"


def isolate(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    for variable, value in isolated_git_dvc_env(root).items():
        monkeypatch.setenv(variable, value)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def new_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "--initial-branch", "main")
    git(path, "config", "user.name", "Test Releaser")
    git(path, "config", "user.email", "releaser@example.invalid")
    return path


def make_images(folder: Path, seed: int, per_class: int = 3) -> list[ReleaseImage]:
    """Small random PNGs with the provenance a generation step would record."""
    rng = np.random.default_rng(seed)
    images = []
    for tissue_class in CLASSES:
        for index in range(per_class):
            path = folder / tissue_class / f"step-1000_{index:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(path)
            provenance = {
                "checkpoint_sha256": f"{seed:064x}",
                "hypernetwork": f"{tissue_class}-1000",
                "seed": 1000 + index,
                "prompt": f"an H&E histology tile of {tissue_class}",
                "negative_prompt": "grainy | blurry",
                "sampler": "euler",
                "steps": 20,
                "cfg_scale": 7.0,
                "width": 16,
                "height": 16,
                "dagster_run_id": None,
            }
            images.append(ReleaseImage(path, tissue_class, 1000, provenance))
    return images


def make_extras(folder: Path) -> tuple[pd.DataFrame, list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    metrics = pd.DataFrame(
        {
            "tissue_class": list(CLASSES),
            "checkpoint_step": [1000, 1000],
            "fid": [123.456789, 98.7],
            "kid_mean": [0.0312, 0.0025],
        }
    )
    plot = folder / "fid_by_step.png"
    Image.new("RGB", (8, 8), (200, 110, 170)).save(plot)
    return metrics, [plot]


def commit_count(repo: Path) -> int:
    return int(git(repo, "rev-list", "--count", "--all").strip())


def working_copy_state(repo: Path) -> dict[str, str]:
    """What a user sees of their checkout: branch, HEAD, index and working tree (`git status`)."""
    return {
        "branch": git(repo, "symbolic-ref", "HEAD").strip(),
        "head": git(repo, "rev-parse", "HEAD").strip(),
        "index": git(repo, "ls-files", "--stage"),
        "status": git(repo, "status", "--porcelain", "--untracked-files=all"),
    }


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory):
    """One repo with one published release, shared by the read-only tests below (dvc calls are slow)."""
    root = tmp_path_factory.mktemp("published")
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate(monkeypatch, root)
        executable = dvc_executable()
        repo = new_repo(root / "repo")
        dvc = DvcCli(executable, repo)
        assert dvc.init() is True
        (repo / "README.md").write_text("project\n")
        git(repo, "add", "README.md")
        git(repo, "commit", "--quiet", "-m", "Initial commit")
        before = working_copy_state(repo)
        metrics, plots = make_extras(root / "plots")
        info = build_release(
            make_images(root / "generated", seed=1),
            repo / RELEASE_PATH,
            name="demo",
            metrics_table=metrics,
            plots=plots,
            repo_url=str(repo),
            repo_path=RELEASE_PATH,
        )
        release = publish_release(dvc, repo, info.path, info.tag, f"Release {info.tag}", ("store", str(root / "remote")))
        yield {"root": root, "repo": repo, "dvc": dvc, "info": info, "release": release, "before": before}


def test_release_tag_scheme() -> None:
    digest = "0123456789abcdef" * 4
    assert release_tag("demo", digest) == "release/demo/0123456789ab"
    for bad_name in ("", "with space", "a/b", "-lead", "x..y"):
        with pytest.raises(ValueError):
            release_tag(bad_name, digest)
    with pytest.raises(ValueError, match="hex"):
        release_tag("demo", "0123")


def test_selected_steps_follow_release_checkpoints() -> None:
    trained, classes = [100, "50", 200], ["a", "b"]
    metrics = {"best": {"a": "100", "b": 200}}
    utility = {"best_step_by_utility": 50}
    assert selected_steps("best", trained, classes, metrics, utility) == {"a": [100], "b": [200]}
    assert selected_steps("utility", trained, classes, metrics, utility) == {"a": [50], "b": [50]}
    assert selected_steps("all", trained, classes, metrics, None) == {"a": [50, 100, 200], "b": [50, 100, 200]}
    assert selected_steps([200, 50], trained, classes, metrics, None) == {"a": [50, 200], "b": [50, 200]}
    with pytest.raises(ReleaseSelectionError, match="materialise classifier_utility first"):
        selected_steps("utility", trained, classes, metrics, None)
    with pytest.raises(ReleaseSelectionError, match=r"not trained: \[300\]"):
        selected_steps([100, 300], trained, classes, metrics, utility)


def test_no_steps_are_selected_before_the_metrics_summary_exists() -> None:
    with pytest.raises(ReleaseSelectionError, match="metrics_summary has not been materialised"):
        selected_steps("all", [100], ["a"], None, None)


def test_release_repo_url_and_local_remote(tmp_path: Path) -> None:
    section = {"repo_url": "", "git_remote": ""}
    assert release_repo_url({**section, "repo_url": "https://example.invalid/lab.git"}, tmp_path) == (
        "https://example.invalid/lab.git")
    assert release_repo_url(section, None) is None
    assert release_repo_url(section, tmp_path) == str(tmp_path)
    repo = new_repo(tmp_path / "repo")
    git(repo, "remote", "add", "origin", "https://example.invalid/shared.git")
    assert release_repo_url({**section, "git_remote": "origin"}, repo) == "https://example.invalid/shared.git"

    assert local_remote_path("../dvc-store", tmp_path / "params") == (tmp_path / "dvc-store").resolve()
    assert local_remote_path("s3://bucket/store", tmp_path) is None


def test_build_twice_gives_byte_identical_folders(tmp_path: Path) -> None:
    images = make_images(tmp_path / "generated", seed=7)
    metrics, plots = make_extras(tmp_path / "plots")
    first = build_release(images, tmp_path / "a", name="demo", metrics_table=metrics, plots=plots)
    second = build_release(list(reversed(images)), tmp_path / "b", name="demo", metrics_table=metrics, plots=plots)

    assert tree_hashes(first.path) == tree_hashes(second.path)
    assert first.tag == second.tag == release_tag("demo", content_hash(first.path))
    assert first.counts == {"fibrocystic": 3, "proliferative": 3}
    assert sorted(tree_hashes(first.path)) == sorted(
        [CARD, MANIFEST, METRICS, "plots/fid_by_step.png"]
        + [f"images/{c}/step-1000_{i:03d}.png" for c in CLASSES for i in range(3)]
    )

    rebuilt = build_release(images, first.path, name="demo", metrics_table=metrics, plots=plots)
    assert tree_hashes(rebuilt.path) == tree_hashes(second.path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "generated", "plots"], "no staging folders left"


def test_manifest_and_card_describe_the_images(tmp_path: Path) -> None:
    images = make_images(tmp_path / "generated", seed=3)
    metrics, plots = make_extras(tmp_path / "plots")
    info = build_release(
        images, tmp_path / "release", name="demo", metrics_table=metrics, plots=plots, card_extra="Made by the tests.",
        metrics_notes="Flags in `flags`: none.",
    )
    manifest = read_manifest(info.path)

    assert list(manifest["path"]) == sorted(manifest["path"])
    assert len(manifest) == len(images)
    for row in manifest.itertuples():
        assert sha256_file(info.path / row.path) == row.sha256
        assert row.path.startswith(f"images/{row.tissue_class}/")
    sources = {f"images/{image.tissue_class}/{image.source.name}": sha256_file(image.source) for image in images}
    assert dict(zip(manifest["path"], manifest["sha256"])) == sources
    assert manifest["seed"].dtype == "Int64" and manifest["cfg_scale"].dtype == "Float64"
    assert manifest["dagster_run_id"].isna().all()
    assert {"checkpoint_sha256", "hypernetwork", "prompt", "negative_prompt", "sampler", "steps"} <= set(manifest)
    pd.testing.assert_frame_equal(pd.read_parquet(info.path / METRICS), metrics)

    card = info.card.read_text()
    assert f"Release tag: `{info.tag}`" in card
    assert "| fibrocystic | 3 | 1000 |" in card and "| **total** | 6 |  |" in card
    assert "| fibrocystic | 1000 | 123.457 | 0.0312 |" in card
    assert card.index("| fibrocystic | 1000 |") < card.index("Flags in `flags`: none.") < card.index("## Plots")
    assert "![fid_by_step](plots/fid_by_step.png)" in card
    assert f"dvc get <repo-url> <path-in-repo> --rev {info.tag}" in card
    assert "not diagnoses" in card and "Made by the tests." in card


def test_build_rejects_ambiguous_or_unsafe_input(tmp_path: Path) -> None:
    images = make_images(tmp_path / "generated", seed=5)
    clash = ReleaseImage(tmp_path / "generated" / "fibrocystic" / "step-1000_000.png", "fibrocystic", 2000)
    with pytest.raises(ValueError, match="distinct file names"):
        build_release([*images, clash], tmp_path / "out", name="demo")

    mixed = [ReleaseImage(i.source, i.tissue_class, 1000, {"seed": "one" if n else 1}) for n, i in enumerate(images)]
    with pytest.raises(TypeError, match="seed"):
        build_release(mixed, tmp_path / "out", name="demo")

    not_png = tmp_path / "fake.png"
    not_png.write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="not a PNG"):
        build_release([ReleaseImage(not_png, "fibrocystic", 0)], tmp_path / "out", name="demo")

    with pytest.raises(ValueError, match="inside the release folder"):
        build_release(images, tmp_path / "generated", name="demo")
    assert all(image.source.is_file() for image in images)
    assert not (tmp_path / "out").exists()


def test_publish_records_md5_commit_and_tag(published) -> None:
    repo, release, info = published["repo"], published["release"], published["info"]
    assert release.new_commit and release.new_tag
    assert release.tag == info.tag
    at_tag = git(repo, "show", f"{release.tag}:{RELEASE_PATH}.dvc")
    assert release.md5.endswith(".dir") and release.md5 == md5_from_dvc_text(at_tag, "the tag's .dvc file")
    assert release.commit == git_tag_target(repo, release.tag)
    assert git(repo, "rev-parse", f"{release.commit}^").strip() == published["before"]["head"]
    assert git_is_repo(repo) and not git_is_repo(repo / "releases")
    committed = set(git(repo, "show", "--name-only", "--format=", release.commit).split())
    assert committed == {f"{RELEASE_PATH}.dvc", "releases/.gitignore", ".dvc/config"}, "only what the branch lacks"
    assert "url = ../../remote" in git(repo, "show", f"{release.tag}:.dvc/config"), "the committed remote is portable"
    md5 = release.md5
    assert (published["root"] / "remote" / "files" / "md5" / md5[:2] / md5[2:]).is_file(), "pushed"


def test_publishing_leaves_branch_index_and_working_tree_alone(published) -> None:
    assert working_copy_state(published["repo"]) == published["before"]
    assert git_head(published["repo"]) == published["before"]["head"]


def test_clone_and_pull_gives_identical_files(published) -> None:
    root, repo, info, release = published["root"], published["repo"], published["info"], published["release"]
    clone = root / "clone"
    git(root, "clone", "--quiet", "--branch", release.tag, str(repo), str(clone))
    assert not (clone / RELEASE_PATH).exists()
    DvcCli(None, clone).pull([clone / f"{RELEASE_PATH}.dvc"])

    assert tree_hashes(clone / RELEASE_PATH) == tree_hashes(info.path)
    pd.testing.assert_frame_equal(read_manifest(clone / RELEASE_PATH), read_manifest(info.path))


def test_dvc_get_at_tag_gives_identical_files(published) -> None:
    root, repo, info, dvc = published["root"], published["repo"], published["info"], published["dvc"]
    out = dvc.get(str(repo), RELEASE_PATH, info.tag, root / "downstream" / "demo")
    assert tree_hashes(out) == tree_hashes(info.path)
    with pytest.raises(FileExistsError):
        dvc.get(str(repo), RELEASE_PATH, info.tag, out)


def test_card_python_snippet_fetches_the_release(published) -> None:
    """The dvc.api snippet of the dataset card runs as written, in dvc's own venv."""
    root, info = published["root"], published["info"]
    python = resolve_dvc_executable().parent / "python"
    if not python.is_file():
        pytest.skip(f"no python next to the dvc executable ({python})")
    snippet = re.search(r"```python\n(import dvc\.api\n.*?)```", info.card.read_text(), re.DOTALL).group(1)
    workdir = root / "snippet"
    workdir.mkdir()
    subprocess.run([str(python), "-c", snippet], cwd=workdir, check=True, capture_output=True)
    assert tree_hashes(workdir / "demo") == tree_hashes(info.path)


def test_republishing_identical_content_makes_no_commit(published) -> None:
    repo, dvc, info, first = published["repo"], published["dvc"], published["info"], published["release"]
    before = commit_count(repo)
    again = publish_release(dvc, repo, info.path, info.tag, f"Release {info.tag}", ("store", str(published["root"] / "remote")))
    assert not again.new_commit and not again.new_tag
    assert (again.commit, again.md5) == (first.commit, first.md5)
    assert commit_count(repo) == before and working_copy_state(repo) == published["before"]


def test_content_tagged_for_this_remote_is_known_published_without_dvc(published) -> None:
    """What lets a refresh with nothing changed skip dvc add and push: the tag names the content, and was made after
    the push to the remote its commit records."""
    repo, info, first, remote = published["repo"], published["info"], published["release"], published["root"] / "remote"
    known = already_published(repo, info, "store", remote)
    assert (known.tag, known.commit, known.md5, known.dvc_file) == (first.tag, first.commit, first.md5, first.dvc_file)
    assert not known.new_commit and not known.new_tag
    assert already_published(repo, info, "store", published["root"] / "another-remote") is None, "pushed elsewhere"
    assert already_published(repo, info, "other", remote) is None, "another remote name"
    assert already_published(repo, info, "store", "s3://bucket/store") is None
    assert already_published(repo, dataclasses.replace(info, tag="release/demo/000000000000"), "store", remote) is None


def test_new_content_needs_a_new_tag_and_old_tag_still_serves_old_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate(monkeypatch, tmp_path)
    executable = dvc_executable()
    repo = new_repo(tmp_path / "repo")
    dvc = DvcCli(executable, repo)
    assert dvc.init() is True and dvc.init() is False
    (repo / ".gitignore").write_text("/data/*\n")
    ignored = build_release(make_images(tmp_path / "gen0", seed=0), repo / "data" / "release", name="demo")
    with pytest.raises(CommandError, match=r"(?s)`\S*dvc add data/release` failed.*git-ignored") as failure:
        dvc.add([ignored.path])
    assert failure.value.returncode != 0 and "git-ignored" in failure.value.stderr
    dvc.remote_add_default("store", tmp_path / "remote")
    config = (repo / ".dvc" / "config.local").read_bytes()
    dvc.remote_add_default("store", tmp_path / "remote")
    assert (repo / ".dvc" / "config.local").read_bytes() == config
    remote = ("store", str(tmp_path / "remote"))

    v1 = build_release(make_images(tmp_path / "gen1", seed=1), repo / RELEASE_PATH, name="demo")
    snapshot = tree_hashes(v1.path)
    head = git_head_or_none(repo)
    first = publish_release(dvc, repo, v1.path, v1.tag, "v1", remote)
    v2 = build_release(make_images(tmp_path / "gen2", seed=2), repo / RELEASE_PATH, name="demo")
    assert v2.tag != v1.tag

    tags_before = git(repo, "tag", "--list")
    with pytest.raises(TagConflictError, match=re.escape(v1.tag)):
        publish_release(dvc, repo, v2.path, v1.tag, "v2 under the old tag", remote)
    assert git(repo, "tag", "--list") == tags_before and git_head_or_none(repo) == head, "a tag clash commits nothing"

    second = publish_release(dvc, repo, v2.path, v2.tag, "v2", remote)
    assert second.new_commit and second.new_tag and second.md5 != first.md5
    with pytest.raises(TagConflictError, match="never moved"):
        git_tag(repo, v1.tag, "move it", commit=second.commit)
    old = dvc.get(str(repo), RELEASE_PATH, v1.tag, tmp_path / "old")
    assert tree_hashes(old) == snapshot
    assert git_tag_target(repo, v1.tag) == first.commit
