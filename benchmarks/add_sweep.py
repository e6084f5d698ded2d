"""Which ADD settings give the demo's best student? Train variants side by side and score them as the table does.

    .venv/bin/python benchmarks/add_sweep.py --demo demo_out --out sweep --seeds 0 1 2 --steps 600 --parallel 2 \
        --variant base= \
        --variant "ema=optim.ema_decay=0.99" \
        --variant "exp-lam10=distill.weighting=exponential;distill.weight=10"

A variant is NAME=OVERRIDES, the overrides `;`-separated dotted config keys on top of configs/tiny.yaml (as
`addpipe train --set` takes them). `--demo` is a finished `addpipe demo` directory: its curated shards
(prep/shards), DINOv2 feature network and content classifier (models/) are reused, the teacher is the shipped
one unless `--teacher` names another. Each (variant, seed) trains with pipeline.demo.train_student and is scored
with pipeline.demo.evaluate on the same held-out prompts and noise as `addpipe demo --full`: Fréchet distance in
the classifier's features and prompt adherence at 1, 2 and 4 steps, against the teacher at 1, 2, 4 and 50 guided
steps on the same seed. Jobs run as separate processes, `--parallel` at a time, and each writes its result file
when done: a rerun skips finished jobs. The table (sweep.md, sweep.json) lists the target ratios per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

TEACHER = "teacher"


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name or name == TEACHER or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SystemExit(f"--variant {text!r}: want NAME=KEY=VALUE;KEY=VALUE with a plain NAME other than {TEACHER!r}")
    return name, [o.strip() for o in overrides.split(";") if o.strip()]


def run_job(args: argparse.Namespace, name: str, seed: int, overrides: list[str]) -> dict:
    """One (variant, seed) or the teacher's arms on one seed, in this process."""
    import torch

    from addpipe.shards import shard_pattern
    from addpipe.pipeline.demo import SHIPPED_TEACHER, DemoSettings, evaluate, real_reference, train_student
    from addpipe.pipeline.reproduce import GUIDANCE, TEACHER_STEPS

    torch.set_num_threads(args.threads)
    demo, out = Path(args.demo), Path(args.out)
    shards = shard_pattern(sorted((demo / "prep" / "shards").glob("*.tar")))
    teacher = Path(args.teacher) if args.teacher else SHIPPED_TEACHER
    settings = DemoSettings(out=str(out), steps=args.steps, prompts=args.prompts, seed=seed, device=args.device)
    started = time.perf_counter()
    if name == TEACHER:
        arms = [f"teacher-{n}={teacher}:steps={n}:cfg={GUIDANCE}:scheduler=ddim" for n in TEACHER_STEPS]
    else:
        student = train_student(out / "runs" / f"{name}-s{seed}", teacher, demo / "models" / "dinov2", shards, settings, seed,
                                ["log.progress=false", "log.tensorboard=false", *overrides])
        arms = [f"add-{n}={student}:steps={n}" for n in (1, 2, 4)]
    trained = time.perf_counter() - started
    result = evaluate(out / "studies" / f"{name}-s{seed}", arms, settings, shards, demo / "models" / "classifier", judges=0,
                      seed=seed)
    real = real_reference(settings, shards, demo / "models" / "classifier", seed) if name == TEACHER else None
    return {"variant": name, "seed": seed, "overrides": overrides, "steps": settings.steps, "train_s": round(trained, 1),
            **({"real": real} if real else {}),
            "total_s": round(time.perf_counter() - started, 1),
            "arms": {arm: {"fid": entry["frechet_distance"], "adherence": entry["adherence"]["all"],
                           "adherence_fields": {k: v for k, v in entry["adherence"].items() if k != "all"}}
                     for arm, entry in result["metrics"]["arms"].items()}}


def table(results: list[dict], variants: dict[str, list[str]], seeds: list[int]) -> str:
    teacher = {r["seed"]: r["arms"] for r in results if r["variant"] == TEACHER}
    lines = ["| variant | FID 1 | FID 2 | FID 4 | adherence (worst of 1/2/4) | FID1 / teacher FID1 (<= 0.5) | "
             "FID2 / teacher FID4 (<= 1.25) | FID1 / teacher FID4 (<= 1) | train s |",
             "|---|---:|---:|---:|---:|---|---|---|---:|"]
    if teacher:
        t = {n: mean(teacher[s][f"teacher-{n}"]["fid"] for s in teacher) for n in (1, 2, 4, 50)}
        lines.append(f"| teacher (1/2/4/50 steps, cfg 3) | {t[1]:.1f} | {t[2]:.1f} | {t[4]:.1f} (50: {t[50]:.1f}) | "
                     f"{min(teacher[s]['teacher-50']['adherence'] for s in teacher):.3f} (50 steps) | | | | |")
        real = [r["real"] for r in results if r["variant"] == TEACHER and "real" in r]
        if real:
            lines.append(f"| real images of the prompts | {mean(r['frechet_distance'] for r in real):.1f} | | | "
                         f"{min(r['adherence'] for r in real):.3f} | | | | |")
    for name in variants:
        rows = {r["seed"]: r for r in results if r["variant"] == name}
        if not rows:
            continue
        fid = {n: mean(rows[s]["arms"][f"add-{n}"]["fid"] for s in rows) for n in (1, 2, 4)}
        worst = min(rows[s]["arms"][f"add-{n}"]["adherence"] for s in rows for n in (1, 2, 4))

        def ratios(arm: str, reference: str) -> str:
            return ", ".join(f"{rows[s]['arms'][arm]['fid'] / teacher[s][reference]['fid']:.2f}" for s in seeds
                             if s in rows and s in teacher)

        lines.append(f"| {name} | {fid[1]:.1f} | {fid[2]:.1f} | {fid[4]:.1f} | {worst:.3f} | {ratios('add-1', 'teacher-1')} | "
                     f"{ratios('add-2', 'teacher-4')} | {ratios('add-1', 'teacher-4')} | "
                     f"{mean(r['train_s'] for r in rows.values()):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True, help="a finished `addpipe demo` directory (prep/shards, models/)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", action="append", required=True, help="NAME=KEY=VALUE;KEY=VALUE (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE override for every variant (repeatable)")
    parser.add_argument("--teacher", default=None, help="teacher pipeline directory [default: the shipped one]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=600, help="ADD steps per student")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts per arm")
    parser.add_argument("--parallel", type=int, default=1, help="jobs at a time (separate processes)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per job [default: cores / parallel]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    variants = dict(parse_variant(v) for v in args.variant)
    out = Path(args.out)
    results_dir = out / "results"
    if args.job:  # a child: run one job and write its result
        name, seed = args.job.rsplit(":", 1)
        result = run_job(args, name, int(seed), [*args.set, *variants.get(name, [])])
        (results_dir / f"{name}-s{seed}.json").write_text(json.dumps(result, indent=2))
        return

    results_dir.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    jobs = [(TEACHER, s) for s in args.seeds] + [(name, s) for name in variants for s in args.seeds]
    todo = [(n, s) for n, s in jobs if not (results_dir / f"{n}-s{s}.json").is_file()]
    started = time.perf_counter()
    running: list[tuple[subprocess.Popen, str]] = []
    failed = []
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    while todo or running:
        while todo and len(running) < args.parallel:
            name, seed = todo.pop(0)
            log = (out / "logs" / f"{name}-s{seed}.log").open("w")
            command = [sys.executable, __file__, "--job", f"{name}:{seed}", *sys.argv[1:]]
            running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment), f"{name}-s{seed}"))
        time.sleep(2)
        for process, label in list(running):
            if process.poll() is not None:
                running.remove((process, label))
                status = "done" if process.returncode == 0 else f"FAILED ({process.returncode}), see {out}/logs/{label}.log"
                if process.returncode:
                    failed.append(label)
                print(f"[{time.perf_counter() - started:7.1f} s] {label}: {status}", flush=True)
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    markdown = table(results, variants, args.seeds)
    import torch

    machine = (torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    header = (f"ADD sweep, {args.steps} steps, seeds {args.seeds}, {args.prompts} prompts per arm, on {machine}; "
              f"{time.perf_counter() - started:.0f} s for {len(jobs)} jobs, {args.parallel} at a time.\n\n")
    (out / "sweep.md").write_text(header + markdown + "\n")
    (out / "sweep.json").write_text(json.dumps({"variants": variants, "seeds": args.seeds, "steps": args.steps,
                                                "machine": machine, "results": results}, indent=2))
    print(header + markdown)
    if failed:
        raise SystemExit(f"{len(failed)} job(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
