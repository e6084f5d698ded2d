"""Benchmark: the rating server under N concurrent raters on loopback, whole vote rounds with the images.

`addpipe eval serve` runs as its own process (as in a study), over SQLite and, where Debian's package is
installed, PostgreSQL, measured side by side in one run. Each client is one rater with its own connection
pool, as a browser is: a round is GET /api/next, both images at once, then POST /api/vote with both
questions. The round's latency is from the first request to the vote's answer. Any answer other than 200, or
a failed connection, is an error. Afterwards the database must hold exactly two rows per acknowledged vote.

The raters are aiohttp clients in one process on the same machine (`pip install aiohttp`): httpx's async
client costs about three times the CPU per request, and on two cores the load generator's CPU is taken
from the server. The CPU each side spent per round is printed with the results.

    .venv/bin/python benchmarks/vote_server.py --clients 50 200 --rounds 10
    .venv/bin/python benchmarks/vote_server.py --clients 200 --think 1.0   # raters who look for a second
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def python_speed() -> float:
    """Seconds this machine takes for a fixed pure-Python loop, now: shared VMs drift by 2x over an hour, so each
    recorded result carries the speed it was measured at."""
    started = time.perf_counter()
    total = 0
    for i in range(5_000_000):
        total += i
    return time.perf_counter() - started


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_load() -> dict:
    """What else the machine was doing: the 1/5/15-minute load averages against the CPUs this process may use. A
    latency figure means little without it (the same command gave p99 1.2 s on a quiet VM and 1.8 s on a busy one)."""
    one, five, fifteen = os.getloadavg()
    return {"load_1m": round(one, 2), "load_5m": round(five, 2), "load_15m": round(fifteen, 2),
            "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpus": os.cpu_count(), "cpu_model": cpu_model()}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and every live process under it (Linux /proc): with --workers
    the server is a supervisor and its worker processes."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # parent, utime + stime
    tree, total = {pid}, 0
    for _ in range(4):  # a few levels are plenty (supervisor -> workers)
        tree |= {child for child, (parent, _) in stats.items() if parent in tree}
    total = sum(stats[p][1] for p in tree if p in stats)
    return total / os.sysconf("SC_CLK_TCK")


async def rater(session, base: str, token: str, think: float, rounds: list[float], errors: list[str],
                acknowledged: list[int]) -> None:
    headers = {"X-Token": token}

    async def image(path: str) -> bytes:
        async with session.get(base + path) as response:
            body = await response.read()
            if response.status != 200 or not body:
                raise RuntimeError(f"image {response.status}: {body[:200]!r}")
            return body

    async with session:
        while True:
            started = time.perf_counter()
            try:
                async with session.get(base + "/api/next", headers=headers) as response:
                    if response.status != 200:
                        errors.append(f"next {response.status}: {(await response.text())[:200]}")
                        return
                    task = await response.json()
                if task["finished"]:
                    return
                await asyncio.gather(image(task["left"]), image(task["right"]))  # as a browser loads them
                body = {"pair_id": task["pair_id"], "submission_id": uuid.uuid4().hex,
                        "answers": {"adherence": "left", "quality": "tie"}, "response_ms": int(1000 * think)}
                async with session.post(base + "/api/vote", json=body, headers=headers) as response:
                    if response.status != 200:
                        errors.append(f"vote {response.status}: {(await response.text())[:200]}")
                        return
                acknowledged.append(task["pair_id"])
            except Exception as error:  # connection refused, reset, timed out, a failed image: an error like any other
                errors.append(f"{type(error).__name__}: {error}")
                return
            rounds.append(time.perf_counter() - started)
            if think:
                await asyncio.sleep(think)


def run_backend(url: str, study: Path, clients: int, rounds_per_rater: int, think: float, threads: int, workers: int) -> dict:
    from sqlalchemy import func, select

    from addpipe.eval.db import Rater, Vote, connect, session_factory
    from addpipe.eval.study import invite
    from live_server import ServeProcess

    engine = connect(url)
    with session_factory(engine)() as session:
        invited = invite(session, study, raters=clients, pairs_per_rater=rounds_per_rater, golden_fraction=0.1)
    server = ServeProcess(study, url, threads, workers).__enter__()
    process, base = server.process, server.url
    rounds: list[float] = []
    errors: list[str] = []
    acknowledged: list[int] = []

    async def everyone() -> float:
        import aiohttp

        # One session (connection pool) per rater, as each browser has its own, all made before the clock starts.
        sessions = [aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) for _ in invited]
        started = time.perf_counter()
        await asyncio.gather(*(rater(session, base, r["token"], think, rounds, errors, acknowledged)
                               for session, r in zip(sessions, invited)))
        return time.perf_counter() - started

    load_before = machine_load()
    server_before, client_before = cpu_seconds(process.pid), sum(os.times()[:2])
    try:
        wall = asyncio.run(everyone())
        server_cpu, client_cpu = cpu_seconds(process.pid) - server_before, sum(os.times()[:2]) - client_before
        load_after = machine_load()
    finally:
        server.__exit__(None, None, None)
    with session_factory(engine)() as session:
        stored = session.scalar(select(func.count(Vote.id)))
        expected = session.scalar(select(func.sum(Rater.quota)))
    engine.dispose()
    rounds.sort()
    return {"clients": clients, "rounds": len(rounds), "expected_rounds": expected, "errors": len(errors),
            "first_errors": errors[:3], "stored_rows": stored, "acknowledged_votes": len(acknowledged),
            "rounds_per_s": len(rounds) / wall, "wall_s": wall,
            "server_cpu_ms_per_round": 1000 * server_cpu / max(1, len(rounds)),
            "client_cpu_ms_per_round": 1000 * client_cpu / max(1, len(rounds)),
            "p50_ms": 1000 * statistics.median(rounds) if rounds else None,
            "p99_ms": 1000 * rounds[int(0.99 * (len(rounds) - 1))] if rounds else None,
            "max_ms": 1000 * rounds[-1] if rounds else None,
            # beside every latency figure: the machine's load when it was measured (before the run counts the
            # machine's other work; after it includes this run's own)
            "load_before": load_before, "load_after": load_after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[50, 200], help="Concurrent raters (one run each)")
    parser.add_argument("--rounds", type=int, default=10, help="Regular pairs per rater (golden pairs come on top)")
    parser.add_argument("--think", type=float, default=0.0, help="Seconds each rater waits between rounds")
    parser.add_argument("--threads", type=int, default=8, help="The server's --threads")
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="The server's --workers (processes); one run each")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here")
    args = parser.parse_args()

    from live_server import PostgresServer
    from test_study_server import write_study

    speed_before = python_speed()
    postgres = PostgresServer()
    backends = ["sqlite"] + (["postgresql"] if postgres.available() else [])
    if "postgresql" in backends:
        postgres.__enter__()
    results = []
    try:
        for clients in args.clients:
            for workers in args.workers:
                for backend in backends:
                    work = Path(tempfile.mkdtemp(prefix="vote_bench_"))
                    study = write_study(work / "study")
                    url = (f"sqlite:///{study / 'votes.db'}" if backend == "sqlite"
                           else postgres.create_database(f"bench_{uuid.uuid4().hex[:8]}"))
                    result = {"backend": backend, "workers": workers,
                              **run_backend(url, study, clients, args.rounds, args.think, args.threads, workers)}
                    results.append(result)
                    intact = result["stored_rows"] == 2 * result["acknowledged_votes"]
                    print(f"{clients:4d} raters  {workers} proc  {backend:10s}  {result['rounds_per_s']:7.1f} rounds/s  "
                          f"p50 {result['p50_ms']:7.1f} ms  p99 {result['p99_ms']:7.1f} ms  max {result['max_ms']:7.1f} ms  "
                          f"errors {result['errors']}  rounds {result['rounds']}/{result['expected_rounds']}  "
                          f"votes stored once: {intact}  cpu ms/round: server {result['server_cpu_ms_per_round']:.1f} "
                          f"clients {result['client_cpu_ms_per_round']:.1f}  load 1m before {result['load_before']['load_1m']:.2f} "
                          f"after {result['load_after']['load_1m']:.2f} on {result['load_before']['nproc']} cpus", flush=True)
                    for error in result["first_errors"]:
                        print(f"      {error}")
        base = {(r["clients"], r["backend"]): r for r in results if r["workers"] == args.workers[0]}
        for r in results:
            if r["workers"] != args.workers[0]:
                ref = base[(r["clients"], r["backend"])]
                print(f"{r['clients']:4d} raters  {r['backend']:10s}  {r['workers']} processes vs {args.workers[0]}: "
                      f"throughput x{r['rounds_per_s'] / ref['rounds_per_s']:.2f}, p99 x{r['p99_ms'] / ref['p99_ms']:.2f}")
    finally:
        if "postgresql" in backends:
            postgres.__exit__(None, None, None)
    load = machine_load()
    machine = (f"{platform.node()} {platform.machine()} {load['cpu_model']}, {load['nproc']} cpus usable of {load['cpus']}, "
               f"load {load['load_1m']:.2f}/{load['load_5m']:.2f}/{load['load_15m']:.2f} (1/5/15 min) at the end, "
               f"python {platform.python_version()}; "
               f"server and clients share the machine; 5M-iteration Python loop {speed_before:.2f} s before, "
               f"{python_speed():.2f} s after")
    print(f"machine: {machine}; think time {args.think} s; server threads {args.threads}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "load_at_end": load, "think_s": args.think,
                                         "threads": args.threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()
