"""A real S3-compatible server on 127.0.0.1 for tests and benchmarks: moto in server mode.

moto's ``ThreadedMotoServer`` speaks the S3 REST protocol over HTTP from a thread
of this process, so s3fs, botocore and DVC (in its own venv, as a subprocess)
talk to it exactly as to S3: signed requests, real listings, 404s, copies.
It binds to port 0, so the kernel picks a free port and parallel runs never
clash. Nothing leaves the machine: the credentials are dummies, the endpoint
is loopback, instance-metadata lookups are off, and the user's ~/.aws files
are never read.

Every request the server answers is recorded (method and path, from the
server's own request log), which is how tests check that data really went
over HTTP and how ``benchmarks/object_store_s3.py`` counts requests per file.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# What every process that talks to the server needs; the endpoint is added by S3Server.env().
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "histo-assets-test",
    "AWS_SECRET_ACCESS_KEY": "histo-assets-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Removed from the environment while the server runs, so a developer's own AWS setup cannot leak in.
CLEARED = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
           "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")
REQUEST_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')
ANSI_STYLE = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours the lines of 3xx, 4xx and 5xx answers


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int

    @property
    def kind(self) -> str:
        """LIST for a GET of the bucket itself (a listing), else the HTTP method (a copy is a PUT)."""
        key = self.path.split("?", 1)[0].strip("/").partition("/")[2]
        return "LIST" if self.method == "GET" and not key else self.method


class RequestLog(logging.Handler):
    """Records each request line of the server's (werkzeug's) access log instead of printing it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.requests: list[Request] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        match = REQUEST_LINE.search(ANSI_STYLE.sub("", record.getMessage()))
        if match:
            with self._lock:
                self.requests.append(Request(match["method"], match["path"], int(match["status"])))


@dataclass
class S3Server:
    endpoint_url: str
    log: RequestLog
    _buckets: Iterator[int] = field(default_factory=itertools.count)

    @property
    def storage_options(self) -> dict[str, str]:
        """What ObjectStore / ObjectStoreResource take to reach this server."""
        return {"endpoint_url": self.endpoint_url}

    def env(self) -> dict[str, str]:
        """Variables for a subprocess: the dummy credentials and the endpoint, which botocore reads from
        AWS_ENDPOINT_URL (so `histo-assets` with only HISTO_ASSETS_STORE_URL=s3://... reaches this server)."""
        return DUMMY_CREDENTIALS | {"AWS_ENDPOINT_URL": self.endpoint_url}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint_url, skip_instance_cache=True)

    def new_bucket(self, prefix: str = "histo") -> str:
        """A fresh, empty bucket (names are never reused within a server's life)."""
        name = f"{prefix}-{next(self._buckets)}"
        self.filesystem().mkdir(name)
        return name

    def requests(self) -> list[Request]:
        with self.log._lock:
            return list(self.log.requests)

    def count(self, since: int = 0) -> Counter:
        """Requests answered since the ``since``-th one, by kind (HEAD, GET, LIST, PUT, ...) and in 'total'."""
        counts = Counter(request.kind for request in self.requests()[since:])
        counts["total"] = sum(counts.values())
        return counts


@contextmanager
def environment(values: Mapping[str, str], cleared: tuple[str, ...] = ()) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in (*values, *cleared)}
    try:
        for name in cleared:
            os.environ.pop(name, None)
        os.environ.update(values)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def running_s3_server(scratch: Path) -> Iterator[S3Server]:
    """Start moto's S3 server on 127.0.0.1 (a free port), with dummy credentials in os.environ;
    stop it and restore the environment on the way out, whatever happened inside."""
    from moto.server import ThreadedMotoServer

    scratch.mkdir(parents=True, exist_ok=True)
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"]))
    values = DUMMY_CREDENTIALS | {
        # Files that do not exist: botocore must not read the user's profiles or credentials.
        "AWS_CONFIG_FILE": str(scratch / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "aws-credentials"),
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }
    access_log = logging.getLogger("werkzeug")
    log = RequestLog()
    previous = (access_log.level, access_log.propagate)
    access_log.addHandler(log)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
    with environment(values, CLEARED):
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield S3Server(f"http://{host}:{port}", log)
        finally:
            server.stop()
            access_log.removeHandler(log)
            access_log.setLevel(previous[0])
            access_log.propagate = previous[1]
