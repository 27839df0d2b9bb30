"""DVC and git, driven as command-line tools.

dvc pins antlr4 4.9 through hydra while dagster needs 4.13, so dvc lives in
its own venv (``.venv-dvc``) and this project never imports it: every call is
a subprocess. Errors carry the command and the tool's stderr, because a
failed push or tag in a pipeline run is otherwise undiagnosable.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.io import Log, atomic_write_bytes

DVC_ENV_VAR = "HISTO_ASSETS_DVC"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DVC = PROJECT_ROOT / ".venv-dvc" / "bin" / "dvc"
SETUP_HINT = (
    "run scripts/setup.sh, which creates .venv-dvc with dvc in it, "
    f"or point {DVC_ENV_VAR} at a dvc executable"
)


class CommandError(HistoAssetsError, RuntimeError):
    """A git or dvc command exited non-zero; the message names the command and its stderr."""

    def __init__(self, command: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.command = list(command)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = stderr.strip() or stdout.strip() or "(no output)"
        super().__init__(f"`{shlex.join(self.command)}` failed with exit code {returncode}:\n{detail}")


class DvcNotFoundError(HistoAssetsError, FileNotFoundError):
    """No usable dvc executable; raised before any work so a run fails with the fix in hand."""


class TagConflictError(HistoAssetsError, RuntimeError):
    """A release tag already names different content; tags are never moved."""


def _run(
    command: Sequence[str],
    cwd: Path,
    env: Mapping[str, str] | None = None,
    log: Log | None = None,
) -> subprocess.CompletedProcess[str]:
    started = time.perf_counter()
    result = subprocess.run(
        list(command), cwd=cwd, env=None if env is None else dict(env), capture_output=True, text=True, check=False
    )
    if log is not None:
        log(f"{shlex.join(command)} took {time.perf_counter() - started:.2f} s")
    if result.returncode != 0:
        raise CommandError(command, result.returncode, result.stdout, result.stderr)
    return result


def resolve_dvc_executable(executable: str | os.PathLike | None = None) -> Path:
    """The dvc to run: ``executable``, else $HISTO_ASSETS_DVC, else the project's .venv-dvc.

    A bare name such as ``"dvc"`` is looked up on PATH.
    """
    if executable is not None:
        candidate, origin = str(executable), "the executable argument"
    elif os.environ.get(DVC_ENV_VAR):
        candidate, origin = os.environ[DVC_ENV_VAR], f"${DVC_ENV_VAR}"
    else:
        candidate, origin = str(DEFAULT_DVC), "the project default"
    if os.sep not in candidate:
        found = shutil.which(candidate)
        if found is None:
            raise DvcNotFoundError(f"dvc executable {candidate!r} (from {origin}) is not on PATH; {SETUP_HINT}")
        candidate = found
    path = Path(candidate).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise DvcNotFoundError(f"dvc executable not found at {path} (from {origin}); {SETUP_HINT}")
    return path


def _inside(repo: Path, path: str | os.PathLike) -> Path:
    """``path`` relative to ``repo``; relative inputs are taken relative to the repo."""
    candidate = Path(path)
    absolute = (candidate if candidate.is_absolute() else repo / candidate).resolve()
    try:
        return absolute.relative_to(repo)
    except ValueError:
        raise ValueError(f"{path} is outside the repository {repo}") from None


def is_local_url(url: str) -> bool:
    return "://" not in url


class DvcCli:
    """The dvc commands a release needs, run in one repository.

    ``env`` adds variables on top of the current environment (e.g. to point
    DVC_SITE_CACHE_DIR into the project); ``log`` receives one line per
    command with its wall time.
    """

    def __init__(
        self,
        executable: str | os.PathLike | None,
        repo: str | os.PathLike,
        *,
        env: Mapping[str, str] | None = None,
        log: Log | None = None,
    ) -> None:
        self.executable = resolve_dvc_executable(executable)
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise NotADirectoryError(f"DVC repository folder {self.repo} does not exist")
        self.env = {**os.environ, **(env or {}), "DVC_NO_ANALYTICS": "1"}
        self.log = log

    def run(self, *args: str, cwd: Path | None = None) -> str:
        """Run ``dvc <args>`` and return its stdout."""
        command = [str(self.executable), *args]
        return _run(command, cwd or self.repo, self.env, self.log).stdout

    def init(self, no_scm: bool = False) -> bool:
        """Make the repo a DVC repo; False when it already was.

        With git, ``dvc init`` also stages ``.dvc/config``, ``.dvc/.gitignore``
        and ``.dvcignore`` in the git index.
        """
        if (self.repo / ".dvc").is_dir():
            return False
        self.run("init", *(["--no-scm"] if no_scm else []))
        return True

    def add(self, paths: Sequence[str | os.PathLike]) -> list[Path]:
        """Track files or folders; returns the ``.dvc`` file written for each."""
        if not paths:
            raise ValueError("dvc add needs at least one path")
        relative = [_inside(self.repo, path) for path in paths]
        for rel in relative:
            if not (self.repo / rel).exists():
                raise FileNotFoundError(f"cannot dvc add {self.repo / rel}: it does not exist")
        self.run("add", *map(str, relative))
        return [self.repo / rel.with_name(rel.name + ".dvc") for rel in relative]

    def _targets(self, targets: Sequence[str | os.PathLike] | None) -> list[str]:
        return [str(_inside(self.repo, target)) for target in targets or []]

    def push(self, targets: Sequence[str | os.PathLike] | None = None, remote: str | None = None) -> None:
        """Upload cached data; name ``targets`` (``.dvc`` files) to push just those.

        Naming targets matters: dvc's repo-wide scan prunes folders that a
        .gitignore excludes even where a later ``!`` pattern re-includes them,
        so ``dvc push`` without targets can silently skip a release.
        """
        self.run("push", *(["--remote", remote] if remote else []), *self._targets(targets))

    def pull(self, targets: Sequence[str | os.PathLike] | None = None, remote: str | None = None) -> None:
        """Download and check out data; see :meth:`push` for why targets are worth naming."""
        self.run("pull", *(["--remote", remote] if remote else []), *self._targets(targets))

    def status(self, targets: Sequence[str | os.PathLike] | None = None, cloud: bool = False) -> dict:
        """``dvc status --json``: empty when workspace (or, with ``cloud``, the remote) is up to date."""
        output = self.run("status", "--json", *(["--cloud"] if cloud else []), *self._targets(targets))
        return json.loads(output) if output.strip() else {}

    def remote_add_default(self, name: str, url: str | os.PathLike, level: str = "local") -> None:
        """Make ``name`` the default remote at ``url`` in one config level, changing only what differs.

        ``local`` (``.dvc/config.local``, never committed) serves this working
        copy and keeps a local path absolute; ``project`` (``.dvc/config``, what
        a clone reads) keeps it relative, so the committed config works on
        every machine. A relative local path is taken relative to the repo root.
        """
        if not name or any(c.isspace() for c in name) or "." in name:
            raise ValueError(f"invalid DVC remote name {name!r}")
        if level not in ("local", "project"):
            raise ValueError(f"DVC config level must be local or project, not {level!r}")
        url = str(url)
        if is_local_url(url):
            absolute = (self.repo / url).resolve()
            # dvc stores a relative path given on its command line relative to the config file.
            url = str(absolute) if level == "local" else os.path.relpath(absolute, self.repo)
        config = {}
        for line in self.run("config", f"--{level}", "--list").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                config[key.strip()] = value.strip()
        current = config.get(f"remote.{name}.url")
        if current is None:
            self.run("remote", "add", f"--{level}", "--default", name, url)
            return
        if current != url and os.path.normpath(self.repo / ".dvc" / current) != os.path.normpath(self.repo / url):
            self.run("remote", "modify", f"--{level}", name, "url", url)
        if config.get("core.remote") != name:
            self.run("remote", "default", f"--{level}", name)

    def committed_config(self, name: str, url: str | os.PathLike) -> bytes:
        """``.dvc/config`` as a clone needs it, with ``name`` as its portable default remote.

        Worked out with dvc itself, then the file is put back as it was: the
        text only goes into a release commit, never into the user's working tree.
        """
        path = self.repo / ".dvc" / "config"
        original = path.read_bytes() if path.exists() else None
        try:
            self.remote_add_default(name, url, level="project")
            return path.read_bytes()
        finally:
            if original is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_bytes(path, original)

    def get(self, repo_url: str, path: str, rev: str, out: str | os.PathLike) -> Path:
        """Download ``path`` of a DVC repo at ``rev`` into ``out`` as a plain copy.

        The copy is made in a temporary sibling and renamed into place, so
        ``out`` never holds a partial download; ``out`` must not exist yet,
        because replacing someone's data folder silently is worse than failing.
        """
        target = Path(out).resolve()
        if target.exists():
            raise FileExistsError(f"{target} already exists; dvc get writes a fresh folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.", suffix=".get", dir=target.parent) as tmp:
            fetched = Path(tmp) / target.name
            self.run("get", repo_url, path, "--rev", rev, "--out", str(fetched))
            os.replace(fetched, target)
        return target

    @staticmethod
    def md5_of(dvc_file: str | os.PathLike) -> str:
        """The ``outs[0].md5`` of a ``.dvc`` file; a folder's ends in ``.dir``.

        It changes exactly when the tracked content or names change, which
        makes it the data version of the tracked output.
        """
        path = Path(dvc_file)
        if not path.is_file():
            raise FileNotFoundError(f"no .dvc file at {path}")
        return md5_from_dvc_text(path.read_text(), str(path))


def md5_from_dvc_text(text: str, origin: str) -> str:
    """``outs[0].md5`` of a ``.dvc`` document given as text (e.g. read from git at a tag)."""
    try:
        md5 = yaml.safe_load(text)["outs"][0]["md5"]
    except (yaml.YAMLError, TypeError, KeyError, IndexError):
        raise ValueError(f"{origin} is not a .dvc file with an outs[0].md5 entry") from None
    if not isinstance(md5, str) or not md5:
        raise ValueError(f"{origin} has an empty or malformed outs[0].md5")
    return md5


def _git(repo: str | os.PathLike, *args: str) -> str:
    return _run(["git", "-C", str(repo), *args], Path(repo)).stdout


def git_toplevel(path: str | os.PathLike) -> Path | None:
    """The top level of the git work tree that contains ``path``; None outside one."""
    if not Path(path).is_dir():
        return None
    result = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=False
    )
    return Path(result.stdout.strip()).resolve() if result.returncode == 0 else None


def git_is_repo(repo: str | os.PathLike) -> bool:
    """True when ``repo`` is the top level of a git work tree (not merely inside one)."""
    return git_toplevel(repo) == Path(repo).resolve()


def git_last_commit(repo: str | os.PathLike, paths: Sequence[str]) -> str:
    """The last commit that changed ``paths``, with ``+dirty`` for uncommitted edits there; empty outside git."""
    try:
        last = _git(repo, "log", "-1", "--format=%H", "--", *paths).strip()
        dirty = _git(repo, "status", "--porcelain", "--", *paths).strip()
    except CommandError:
        return ""
    return last + ("+dirty" if last and dirty else "")


def ensure_git_identity(repo: str | os.PathLike, name: str, email: str) -> None:
    """Commits need an author: where git has none configured (a bare CI machine), use ``name``/``email``."""
    try:
        configured = _git(repo, "config", "user.email").strip()
    except CommandError:
        configured = ""
    if not configured:
        for role in ("AUTHOR", "COMMITTER"):
            os.environ.setdefault(f"GIT_{role}_NAME", name)
            os.environ.setdefault(f"GIT_{role}_EMAIL", email)


def git_path(repo: str | os.PathLike, name: str) -> Path:
    """A path inside the repository's git directory (e.g. ``info/exclude``), wherever that directory is."""
    return (Path(repo) / _git(repo, "rev-parse", "--git-path", name).strip()).resolve()


def git_head(repo: str | os.PathLike) -> str:
    """The commit HEAD points to; fails clearly in a repo without commits."""
    return _git(repo, "rev-parse", "--verify", "HEAD^{commit}").strip()


def _commit_or_none(repo: str | os.PathLike, rev: str) -> str | None:
    result = subprocess.run(["git", "-C", str(repo), "rev-parse", "--quiet", "--verify", f"{rev}^{{commit}}"],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def git_head_or_none(repo: str | os.PathLike) -> str | None:
    """The commit HEAD points to, or None in a repository without commits yet."""
    return _commit_or_none(repo, "HEAD")


def git_tag_target(repo: str | os.PathLike, tag: str) -> str | None:
    """The commit a tag points to, or None when there is no such tag."""
    return _commit_or_none(repo, f"refs/tags/{tag}")


def git_file_at(repo: str | os.PathLike, rev: str, path: str | os.PathLike) -> bytes | None:
    """A file's content at a revision (path relative to the repo root), or None if absent there."""
    result = subprocess.run(
        ["git", "-C", str(repo), "show", f"{rev}:{Path(path).as_posix()}"], capture_output=True, check=False
    )
    return result.stdout if result.returncode == 0 else None


def git_commit_beside_head(repo: str | os.PathLike, files: Mapping[str, bytes], message: str) -> str:
    """A commit whose parent is HEAD and whose tree is HEAD's with ``files`` (repo-relative path -> content).

    Made in a private index with git's plumbing, so HEAD, the checked-out
    branch, the user's index and the working tree are all left as they were:
    only a ref made afterwards (a release tag) points to the commit.
    """
    if not files:
        raise ValueError("git_commit_beside_head needs at least one file")
    if not message.strip():
        raise ValueError("a commit message is required")
    root = Path(repo).resolve()
    parent = git_head_or_none(root)
    with tempfile.TemporaryDirectory(prefix="histo-assets-index-") as private:
        env = os.environ | {"GIT_INDEX_FILE": str(Path(private) / "index")}
        if parent is not None:
            _run(["git", "read-tree", parent], root, env)
        for path, content in files.items():
            relative = _inside(root, root / path).as_posix()
            blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=root, input=content,
                                  capture_output=True, check=True).stdout.decode().strip()
            _run(["git", "update-index", "--add", "--cacheinfo", f"100644,{blob},{relative}"], root, env)
        tree = _run(["git", "write-tree"], root, env).stdout.strip()
    return _git(root, "commit-tree", tree, *(["-p", parent] if parent else []), "-m", message).strip()


def git_check_tag_name(tag: str) -> None:
    """Raise ValueError unless git accepts ``tag`` as a tag name (checked before any commit)."""
    if subprocess.run(["git", "check-ref-format", f"refs/tags/{tag}"], capture_output=True, check=False).returncode:
        raise ValueError(f"{tag!r} is not a valid git tag name")


def git_tag(repo: str | os.PathLike, tag: str, message: str, commit: str = "HEAD") -> str:
    """Create an annotated tag on ``commit``; returns the tagged commit.

    Re-tagging the same commit is a no-op. A tag that already points
    elsewhere raises :class:`TagConflictError`: downstream users pull data by
    tag, so moving one would silently change what they get.
    """
    if not message.strip():
        raise ValueError("a tag message is required")
    git_check_tag_name(tag)
    target = _git(repo, "rev-parse", "--verify", f"{commit}^{{commit}}").strip()
    existing = git_tag_target(repo, tag)
    if existing == target:
        return target
    if existing is not None:
        raise TagConflictError(
            f"git tag {tag!r} already points to commit {existing}, not {target}; "
            "tags are never moved, so publish under another tag"
        )
    _git(repo, "tag", "--annotate", "--message", message, tag, target)
    return target


def git_push_tag(repo: str | os.PathLike, remote: str, tag: str) -> None:
    """Push one release tag (and the commit it marks) to a git remote.

    Where the repository lives only as long as the job (a Kubernetes pod),
    the tag must reach the shared repository, or downstream users could not
    check it out. Only the tag is pushed: no branch is moved. A remote that
    already has the same tag accepts the push as a no-op; one whose tag
    differs refuses it, since tags are never moved.
    """
    git_check_tag_name(tag)
    if not remote or remote.startswith("-"):
        raise ValueError(f"invalid git remote {remote!r}")
    _git(repo, "push", "--quiet", remote, f"refs/tags/{tag}:refs/tags/{tag}")


def git_remote_url(repo: str | os.PathLike, remote: str) -> str:
    return _git(repo, "remote", "get-url", remote).strip()
