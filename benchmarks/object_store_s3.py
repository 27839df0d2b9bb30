"""Requests and time per file when the object store is S3: push and pull of a folder of small PNGs.

The store (`histo_assets.core.object_store`) talks to a real S3-compatible server: moto in
server mode on 127.0.0.1 (`histo_assets_tests/s3_server.py`, the tests' server), through s3fs,
as a pod talks to S3. Every HTTP request the server answers is counted, by kind (HEAD, GET,
LIST = a GET of the bucket, PUT, which includes server-side copies, POST = multi-object delete).
Scenarios, each on a fresh bucket per round:

- first push: the folder into an empty store;
- push, unchanged: the same folder again (what every step's push costs when nothing changed);
- pull into empty: the folder into an empty local folder (a fresh pod);
- pull, up to date: into a folder that already holds it;
- push, 10 % new: a tenth of the files replaced by new ones (a folder that grows, as training's does).

Request counts are exact and machine-independent. On bare loopback a request costs no network
time, only moto's own work (a few ms of Python in this process). `--rtt-ms` puts a relay on
127.0.0.1 between the client and moto that holds every byte the client sends for that long, so
each request costs one round trip as it would against S3 from a cluster (10-50 ms); the relay
stops with the benchmark. `--concurrency` sets how many requests the store keeps in flight
(its CONCURRENT_REQUESTS; 1: one after another). Times are medians of `--rounds`.
Run (1-3 minutes on 2 busy cores):
    flock /tmp/histo-heavy.lock .venv/bin/python benchmarks/object_store_s3.py [--files 200 --rounds 3]
    flock /tmp/histo-heavy.lock .venv/bin/python benchmarks/object_store_s3.py --rtt-ms 20 --concurrency 1
Prints a Markdown table; results are recorded in benchmarks/README.md.
"""

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from histo_assets.core import object_store
from histo_assets.core.object_store import folder_files
from histo_assets_tests.s3_server import running_s3_server

KINDS = ("HEAD", "GET", "LIST", "PUT", "POST", "DELETE")


def write_pngs(folder: Path, count: int, side: int, seed: int, prefix: str = "img") -> None:
    """Noise PNGs: they do not compress, so side x side x 3 bytes is about the file size."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)).save(folder / f"{prefix}-{index:04d}.png")


@contextmanager
def delaying_relay(endpoint_url: str, delay_seconds: float) -> Iterator[str]:
    """A TCP relay on 127.0.0.1 to ``endpoint_url`` (also on this machine) that forwards each chunk the
    client sends ``delay_seconds`` after it arrived (chunks stay in order and overlap), and the
    server's answers at once: one round trip per request. Yields the relay's URL; closed on exit."""
    target = urlparse(endpoint_url)
    assert target.hostname == "127.0.0.1", "the relay only forwards to this machine"
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state = {}

    async def pipe(reader, writer, delay):
        queue: asyncio.Queue = asyncio.Queue()

        async def forward():
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(data)
                await writer.drain()
            writer.close()

        forwarding = asyncio.ensure_future(forward())
        try:
            while data := await reader.read(65536):
                await queue.put((loop.time() + delay, data))
        except ConnectionError:
            pass
        await queue.put(None)
        await forwarding

    async def handle(client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection(target.hostname, target.port)
        try:
            await asyncio.gather(pipe(client_reader, server_writer, delay_seconds), pipe(server_reader, client_writer, 0.0))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            client_writer.close()
            server_writer.close()

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        state["server"] = server
        state["port"] = server.sockets[0].getsockname()[1]
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop).result()
    started.wait()
    try:
        yield f"http://127.0.0.1:{state['port']}"
    finally:
        async def stop():
            state["server"].close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--side", type=int, default=58, help="PNG width and height (58: about 10 KB of noise)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=object_store.CONCURRENT_REQUESTS,
                        help="requests in flight at once (the store's CONCURRENT_REQUESTS); 1: one after another")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round trip added to every request (0: bare loopback)")
    args = parser.parse_args()
    object_store.CONCURRENT_REQUESTS = args.concurrency

    with tempfile.TemporaryDirectory() as tmp, running_s3_server(Path(tmp) / "aws") as s3:
        tmp = Path(tmp)
        source = tmp / "source"
        write_pngs(source, args.files, args.side, seed=0)
        files = folder_files(source)
        kib = sum(p.stat().st_size for p in files.values()) / len(files) / 1024
        new = max(1, args.files // 10)
        grown = tmp / "grown"
        shutil.copytree(source, grown)
        for path in sorted(grown.iterdir())[:new]:
            path.unlink()
        write_pngs(grown, new, args.side, seed=1, prefix="new")

        with delaying_relay(s3.endpoint_url, args.rtt_ms / 1000) if args.rtt_ms else _bare(s3.endpoint_url) as endpoint:
            print(f"load average {os.getloadavg()[0]:.2f} at start; {len(files)} PNGs of {kib:.1f} KiB on average; moto on "
                  f"loopback, {args.rtt_ms:g} ms added per round trip; {args.concurrency} request(s) in flight at once; "
                  f"medians of {args.rounds} rounds")
            print()
            scenarios = {}
            for round_index in range(args.rounds):
                store = object_store.ObjectStore(f"s3://{s3.new_bucket()}/store",
                                                 {"endpoint_url": endpoint, "skip_instance_cache": True})
                pod = tmp / f"pod-{round_index}" / "stage"
                steps = [
                    ("first push", args.files, lambda: store.push(source, "stage")),
                    ("push, unchanged", 0, lambda: store.push(source, "stage")),
                    ("pull into empty", args.files, lambda: store.pull("stage", pod)),
                    ("pull, up to date", 0, lambda: store.pull("stage", pod)),
                    (f"push, {new} of {args.files} new", new, lambda: store.push(grown, "stage")),
                ]
                for name, moved, action in steps:
                    before = len(s3.requests())
                    start = time.perf_counter()
                    action()
                    seconds = time.perf_counter() - start
                    entry = scenarios.setdefault(name, {"moved": moved, "seconds": [], "counts": []})
                    entry["seconds"].append(seconds)
                    entry["counts"].append(s3.count(before))

        print("| scenario | files moved | requests | per file of the folder | " + " | ".join(KINDS) + " | seconds | ms per file |")
        print("|---|---|---|---|" + "---|" * len(KINDS) + "---|---|")
        for name, entry in scenarios.items():
            counts = entry["counts"][-1]
            assert all(c == counts for c in entry["counts"]), f"{name}: request counts differ between rounds"
            seconds = statistics.median(entry["seconds"])
            kinds = " | ".join(str(counts.get(kind, 0)) for kind in KINDS)
            print(f"| {name} | {entry['moved']} | {counts['total']} | {counts['total'] / args.files:.2f} | {kinds} | "
                  f"{seconds:.3f} | {1000 * seconds / args.files:.2f} |")
        print()
        print(f"load average {os.getloadavg()[0]:.2f} at the end")


@contextmanager
def _bare(endpoint_url: str) -> Iterator[str]:
    yield endpoint_url


if __name__ == "__main__":
    main()
