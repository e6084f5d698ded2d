"""Benchmark: votes/s and latency percentiles of the rating server under N concurrent clients on loopback.

One uvicorn process (what `addpipe eval serve` runs) over SQLite, and over PostgreSQL when Debian's
package is installed, measured side by side in one run. Each client is one rater voting through its queue
(GET /api/next, then POST /api/vote with both questions), as the rater page does.

    .venv/bin/python benchmarks/vote_server.py --clients 1 8 32 --raters 32
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def run_backend(url: str, study: Path, clients: int, raters: int) -> dict:
    import httpx
    from sqlalchemy import func, select

    from addpipe.eval.db import Vote, connect, session_factory
    from addpipe.eval.server import create_app
    from addpipe.eval.study import invite
    from live_server import ServerThread

    engine = connect(url)
    with session_factory(engine)() as session:
        invited = invite(session, study, raters=raters, golden_fraction=0.1)
    latencies: list[float] = []
    lock = threading.Lock()

    def rater(token: str) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while True:
                task = client.get("/api/next", headers={"X-Token": token}).json()
                if task["finished"]:
                    return
                body = {"pair_id": task["pair_id"], "submission_id": uuid.uuid4().hex,
                        "answers": {"adherence": "left", "quality": "tie"}, "response_ms": 1000}
                started = time.perf_counter()
                response = client.post("/api/vote", json=body, headers={"X-Token": token})
                elapsed = time.perf_counter() - started
                assert response.status_code == 200, response.text
                with lock:
                    latencies.append(elapsed)

    with ServerThread(create_app(study, url), workers_limit=max(64, 2 * clients)) as server:
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            list(pool.map(rater, [r["token"] for r in invited]))
        wall = time.perf_counter() - started
    with session_factory(engine)() as session:
        stored = session.scalar(select(func.count(Vote.id)))
    engine.dispose()
    latencies.sort()
    return {"votes": len(latencies), "stored_rows": stored, "votes_per_s": len(latencies) / wall,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--raters", type=int, default=32)
    args = parser.parse_args()

    from live_server import PostgresServer
    from test_study_server import write_study

    postgres = PostgresServer()
    backends = ["sqlite"] + (["postgresql"] if postgres.available() else [])
    if "postgresql" in backends:
        postgres.__enter__()
    rows = []
    try:
        for clients in args.clients:
            for backend in backends:
                work = Path(tempfile.mkdtemp(prefix="vote_bench_"))
                study = write_study(work / "study")
                url = f"sqlite:///{study / 'votes.db'}" if backend == "sqlite" else postgres.create_database(f"bench_{uuid.uuid4().hex[:8]}")
                result = run_backend(url, study, clients, max(args.raters, clients))
                assert result["stored_rows"] == 2 * result["votes"], result  # nothing lost, nothing doubled
                rows.append((clients, backend, result))
                print(f"{clients:3d} clients  {backend:10s}  {result['votes_per_s']:7.1f} votes/s  p50 {result['p50_ms']:6.1f} ms  "
                      f"p99 {result['p99_ms']:6.1f} ms  ({result['votes']} votes)", flush=True)
    finally:
        if "postgresql" in backends:
            postgres.__exit__(None, None, None)
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}; "
          "server and clients share the machine")


if __name__ == "__main__":
    main()
