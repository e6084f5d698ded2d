"""Trainer overhead: the addpipe trainer on each backend against a bare loop doing the same ADD math on the same tiny
models, measured side by side in one run, with peak memory per rank on 1 and 2 ranks.

    .venv/bin/python benchmarks/trainer_overhead.py [--steps 30] [--warmup 5] [--batch 8] [--ranks 1 2]

The bare loop is tests/dist_worker.py's reference: the ADD method's phases called in a plain for-loop on plain
modules with torch AdamW, no backend, no checkpoints, no logging (the same code the distributed tests compare
losses against). Each configuration runs in its own process (torchrun for the trainer). Prints the median step
time of each, its ratio to the bare loop, and every rank's peak RSS; append the output to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"


def run(command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=WORKER.parent)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="Global batch (split over the ranks)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from addpipe.dataprep.digits import write_digit_shards
    from addpipe.train.tiny import build_tiny_dinov2, build_tiny_pipeline

    work = Path(tempfile.mkdtemp(prefix="addpipe_bench_"))
    shards = write_digit_shards(work / "shards", 200, args.resolution, 25)
    teacher = build_tiny_pipeline(work / "teacher", "sd", latent_size=args.resolution // 2)
    dino = build_tiny_dinov2(work / "dino", image_size=32)
    config = str(REPO / "configs/tiny.yaml")

    def overrides(name: str, ranks: int, backend: str) -> list[str]:
        return [f"run_dir={work / name}", f"steps={args.steps}", f"model.teacher={teacher}", f"discriminator.feature_network={dino}",
                f"data.shards={shards}", f"data.resolution={args.resolution}", f"data.batch_size={args.batch // ranks}",
                "data.num_workers=0", f"engine.backend={backend}", "engine.zero=2", "log.every=1", "log.sample_every=0",
                "log.progress=false", "log.tensorboard=false", f"checkpoint.every={10**6}", "optim.warmup_steps=0",
                "optim.ema_decay=0"]  # the bare loop keeps no EMA either

    results = {}
    run([sys.executable, str(WORKER), "reference", config, str(work / "bare.json"), *overrides("bare", 1, "deepspeed")])
    results["bare loop"] = json.loads((work / "bare.json").read_text())
    for ranks in args.ranks:
        for backend in ("deepspeed", "fsdp2"):
            name = f"{backend}-{ranks}"
            run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), str(WORKER),
                 "train", config, str(work / f"{name}.json"), *overrides(name, ranks, backend)])
            results[f"{backend}, {ranks} rank(s)"] = json.loads((work / f"{name}.json").read_text())

    bare = statistics.median(results["bare loop"]["step_seconds"][args.warmup:])
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    print(f"tiny SD-style models, {args.resolution}px, global batch {args.batch}, {args.steps - args.warmup} timed steps "
          "each (DeepSpeed at ZeRO-2; FSDP2 shards parameters)")
    print(f"{'configuration':24s} {'median step':>12s} {'vs bare':>8s}   peak RSS per rank (MiB)")
    summary = {}
    for name, result in results.items():
        median = statistics.median(result["step_seconds"][args.warmup:])
        rss = result.get("peak_rss_mib_per_rank") or [result["peak_rss_mib"]]
        summary[name] = {"median_step_s": median, "ratio_to_bare": median / bare, "peak_rss_mib_per_rank": rss}
        print(f"{name:24s} {median * 1000:9.1f} ms {median / bare:8.3f}   {', '.join(f'{r:.0f}' for r in rss)}")
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.node(), "args": vars(args) | {"json": str(args.json)},
                                         "results": summary}, indent=2))


if __name__ == "__main__":
    main()
