"""core/dvc.py: finding the dvc executable, and pushing a release tag without a branch or moving a tag."""

from pathlib import Path

import pytest

from histo_assets.core.dvc import (
    DVC_ENV_VAR,
    CommandError,
    DvcCli,
    DvcNotFoundError,
    git_push_tag,
    git_tag,
)
from histo_assets_tests.test_release import git, isolate, new_repo


def test_missing_dvc_executable_raises_with_setup_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no-venv" / "bin" / "dvc"
    with pytest.raises(DvcNotFoundError, match=r"scripts/setup\.sh.*\.venv-dvc") as error:
        DvcCli(missing, tmp_path)
    assert str(missing) in str(error.value)

    monkeypatch.setenv(DVC_ENV_VAR, str(missing))
    with pytest.raises(DvcNotFoundError, match=rf"\${DVC_ENV_VAR}.*scripts/setup\.sh"):
        DvcCli(None, tmp_path)
    with pytest.raises(DvcNotFoundError, match="not on PATH"):
        DvcCli("dvc-that-does-not-exist", tmp_path)


def test_push_tag_sends_only_the_tag_and_never_moves_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate(monkeypatch, tmp_path)
    shared = tmp_path / "shared.git"
    git(tmp_path, "init", "--quiet", "--bare", str(shared))
    repo = new_repo(tmp_path / "pod")
    git(repo, "remote", "add", "origin", str(shared))
    (repo / "release.dvc").write_text("outs:\n- md5: 1.dir\n")
    git(repo, "add", "release.dvc")
    git(repo, "commit", "--quiet", "-m", "release")
    tagged = git_tag(repo, "release/demo/aaaaaaaaaaaa", "Release demo")
    git_push_tag(repo, "origin", "release/demo/aaaaaaaaaaaa")
    git_push_tag(repo, "origin", "release/demo/aaaaaaaaaaaa")
    remote_refs = git(shared, "for-each-ref", "--format=%(refname)")
    assert remote_refs.split() == ["refs/tags/release/demo/aaaaaaaaaaaa"], "no branch is pushed"
    assert git(shared, "rev-parse", "release/demo/aaaaaaaaaaaa^{commit}").strip() == tagged

    other = new_repo(tmp_path / "other-pod")
    git(other, "remote", "add", "origin", str(shared))
    git(other, "commit", "--quiet", "--allow-empty", "-m", "something else")
    git_tag(other, "release/demo/aaaaaaaaaaaa", "Same name, other content")
    with pytest.raises(CommandError):
        git_push_tag(other, "origin", "release/demo/aaaaaaaaaaaa")
    assert git(shared, "rev-parse", "release/demo/aaaaaaaaaaaa^{commit}").strip() == tagged
    with pytest.raises(ValueError, match="invalid git remote"):
        git_push_tag(repo, "--upload-pack=evil", "release/demo/aaaaaaaaaaaa")
