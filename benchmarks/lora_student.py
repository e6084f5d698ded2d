"""Full student against LoRA student: step time, peak memory and trainable parameters on the same tiny models, run
side by side (alternating, each configuration twice) in one invocation, plus the memory plan of each.

    .venv/bin/python benchmarks/lora_student.py [--steps 30] [--warmup 5] [--batch 8] [--rank 8] [--backend deepspeed]

Each run is `addpipe train`'s Trainer in its own process (tests/dist_worker.py's `train` mode: the step times the
trainer logged, the process's peak RSS). A LoRA run holds one UNet where the full run holds two (the student copy
and the frozen teacher) and Adam state for the adapters only, which is what the peak memory should show; its step
still runs the whole UNet forward and backward (the gradients flow through the frozen base to the adapters), so its
step time stays close to the full student's. On a GPU the same script runs as it is (bf16, CUDA peak allocated
memory instead of RSS). Append the output to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from trainer_overhead import REPO, WORKER, run  # one way to run a trainer process and report its steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--backend", default="deepspeed", choices=["deepspeed", "fsdp2"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from addpipe.config import load
    from addpipe.dataprep.digits import write_digit_shards
    from addpipe.train.config import TrainConfig
    from addpipe.train.memory import plan_memory
    from addpipe.train.tiny import build_tiny_dinov2, build_tiny_pipeline

    work = Path(tempfile.mkdtemp(prefix="addpipe_lora_bench_"))
    shards = write_digit_shards(work / "shards", 200, args.resolution, 25)
    teacher = build_tiny_pipeline(work / "teacher", "sd", latent_size=args.resolution // 2)
    dino = build_tiny_dinov2(work / "dino", image_size=32)
    config = REPO / "configs/tiny.yaml"
    students = {"full student": [], f"LoRA student (rank {args.rank}, all modules)":
                [f"student.lora.rank={args.rank}", "student.lora.convolutions=true"]}

    def overrides(name: str, extra: list[str]) -> list[str]:
        return [f"run_dir={work / name}", f"steps={args.steps}", f"model.teacher={teacher}", f"discriminator.feature_network={dino}",
                f"data.shards={shards}", f"data.resolution={args.resolution}", f"data.batch_size={args.batch}",
                "data.num_workers=0", f"engine.backend={args.backend}", "engine.zero=2", "log.every=1", "log.sample_every=0",
                "log.progress=false", "log.tensorboard=false", f"checkpoint.every={10**6}", "optim.warmup_steps=0", *extra]

    reports: dict[str, list[dict]] = {name: [] for name in students}
    for repeat in range(args.repeats):  # alternating: both see the same machine load
        for index, (name, extra) in enumerate(students.items()):
            label = f"run{repeat}-{index}"
            run([sys.executable, str(WORKER), "train", str(config), str(work / f"{label}.json"), *overrides(label, extra)])
            reports[name].append(json.loads((work / f"{label}.json").read_text()))

    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    print(f"tiny SD-style models, {args.resolution}px, batch {args.batch}, {args.backend} (ZeRO-2), fp32 on CPU, "
          f"{args.steps - args.warmup} timed steps x {args.repeats} runs each, alternating")
    print(f"{'student':36s} {'trained params':>14s} {'median step':>12s} {'peak RSS':>10s}   plan (bf16, 1 rank): states")
    summary, full_step, full_rss = {}, None, None
    for name, extra in students.items():
        runs = reports[name]
        median = statistics.median(s for r in runs for s in r["step_seconds"][args.warmup:])
        rss = max(max(r["peak_rss_mib_per_rank"]) for r in runs)
        plan = plan_memory(load(TrainConfig, config, overrides("plan", extra)), 1)
        states = sum(line.total for line in plan.lines)
        full_step, full_rss = (median, rss) if full_step is None else (full_step, full_rss)
        summary[name] = {"trained_params": runs[0]["local_numel"], "median_step_s": median, "peak_rss_mib": rss,
                         "step_ratio_to_full": median / full_step, "rss_ratio_to_full": rss / full_rss,
                         "planned_states_mib": states / 2**20}
        print(f"{name:36s} {runs[0]['local_numel']:14,d} {median * 1000:9.1f} ms {rss:7.0f} MiB   {states / 2**20:.1f} MiB"
              f"   (step x{median / full_step:.2f}, RSS x{rss / full_rss:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.node(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": summary}, indent=2))


if __name__ == "__main__":
    main()
