"""Trainer overhead: the addpipe step (DeepSpeed engines, data streams, reporting) against a bare PyTorch
loop doing the same math on the same tiny models, measured side by side in one run.

    .venv/bin/python benchmarks/trainer_overhead.py [--steps 30] [--batch 8] [--zero 2]

Prints per-step times, their ratio (the framework's overhead) and peak memory; append the output to
benchmarks/RESULTS.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from addpipe.dataprep.digits import write_digit_shards  # noqa: E402
from addpipe.config import load  # noqa: E402
from addpipe.train import losses  # noqa: E402
from addpipe.train.config import TrainConfig  # noqa: E402
from addpipe.train.discriminator import build_discriminator  # noqa: E402
from addpipe.train.loop import Trainer  # noqa: E402
from addpipe.train.models import encode_prompts, load_teacher, make_student, vae_decode, vae_encode  # noqa: E402
from addpipe.train.schedule import (add_noise, draw_training_noise, pipeline_schedule, predicted_eps,  # noqa: E402
                                    predicted_x0, schedule_from_config, student_timesteps)
from addpipe.train.tiny import build_tiny_dinov2, build_tiny_pipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bare_loop(config: TrainConfig, batch: tuple[torch.Tensor, list[str]], steps: int) -> list[float]:
    """The same generator + discriminator math with plain modules and torch AdamW, batch held in memory."""
    teacher = load_teacher(config.model)
    student = make_student(teacher, config.model)
    disc = build_discriminator(config.discriminator, teacher.pooled_dim)
    heads = list(disc.heads.parameters())
    opt_g = torch.optim.AdamW(student.parameters(), lr=config.optim.student_lr, betas=config.optim.student_betas)
    opt_d = torch.optim.AdamW(heads, lr=config.optim.discriminator_lr, betas=config.optim.discriminator_betas)
    s_sched = schedule_from_config(teacher.scheduler_config, True, "v_prediction")
    t_sched = pipeline_schedule(teacher.scheduler_config)
    taus = torch.tensor(student_timesteps(4))
    pixels, captions = batch
    empty, negative = encode_prompts(teacher, [""], "cpu"), encode_prompts(teacher, [config.distill.nfsd_negative_prompt], "cpu")
    times = []
    for step in range(steps):
        start = time.perf_counter()
        with torch.no_grad():
            latents = vae_encode(teacher, pixels)
            cond = encode_prompts(teacher, captions, "cpu")
            c_img = disc.image_embedding(pixels)
        n = draw_training_noise(0, step, [0] * len(captions), tuple(latents.shape[1:]), 4, 20, 980)
        s = taus[n.student_index]
        a, sg = s_sched.at(s, 4)
        x_s = add_noise(latents, n.noise, a, sg)
        for p in heads:
            p.requires_grad_(False)
        x0 = predicted_x0(student(x_s, s, **cond.unet_kwargs(None), return_dict=False)[0], x_s, a, sg, "v_prediction")
        fake = vae_decode(teacher, x0)
        adv = losses.generator_adversarial_loss(disc(disc.features(fake), cond.pooled, c_img))
        at, st = t_sched.at(n.teacher_t, 4)
        x_t = add_noise(x0.detach(), n.teacher_noise, at, st)
        k, b = 3, len(captions)
        with torch.no_grad():
            h = torch.cat([cond.hidden_states, empty.hidden_states.expand(b, -1, -1), negative.hidden_states.expand(b, -1, -1)])
            out = teacher.unet(x_t.repeat(k, 1, 1, 1), n.teacher_t.repeat(k), encoder_hidden_states=h, return_dict=False)[0]
            eps = [predicted_eps(branch, x_t, at, st, t_sched.prediction_type) for branch in out.chunk(k)]
            target = vae_decode(teacher, losses.nfsd_target(x0.detach(), at, st, n.teacher_t, *eps, config.distill.teacher_guidance))
        distill = losses.distillation_loss(fake, target, losses.distillation_weight("nfsd", at, st))
        opt_g.zero_grad(set_to_none=True)
        (adv + config.distill.weight * distill).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), config.optim.gradient_clipping)
        opt_g.step()
        for p in heads:
            p.requires_grad_(True)
        with torch.no_grad():
            real_f, fake_f = disc.features(pixels), disc.features(fake.detach())
        real_in = [f.requires_grad_(True) for f in real_f]
        real_l, fake_l = disc(real_in, cond.pooled, c_img), disc(fake_f, cond.pooled, c_img)
        hinge = losses.discriminator_hinge_loss(real_l, fake_l)
        loss_d = hinge["real"] + hinge["fake"] + config.discriminator.r1_gamma * losses.r1_penalty(real_l, real_in)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        torch.nn.utils.clip_grad_norm_(heads, config.optim.gradient_clipping)
        opt_d.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--zero", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="addpipe_bench_"))
    shards = work / "shards"
    write_digit_shards(shards, 200, args.resolution, 25)
    teacher = build_tiny_pipeline(work / "teacher", "sd", latent_size=args.resolution // 2)
    dino = build_tiny_dinov2(work / "dino", image_size=32)
    config = load(TrainConfig, REPO / "configs/tiny.yaml", [
        f"run_dir={work / 'run'}", f"steps={args.steps}", f"model.teacher={teacher}", f"discriminator.feature_network={dino}",
        f"data.shards={shards}", f"data.resolution={args.resolution}", f"data.batch_size={args.batch}",
        f"engine.zero={args.zero}", "log.every=1", "log.sample_every=0", "log.progress=false",
        "log.tensorboard=false", f"checkpoint.every={10**6}", "optim.warmup_steps=0",
    ])

    trainer = Trainer(config)
    first = next(trainer.data)
    batch = (first.pixels.clone(), list(first.captions))
    trainer.run()
    records = [json.loads(l) for l in (work / "run/metrics.jsonl").read_text().splitlines()]
    addpipe_times = [args.batch / r["perf/images_per_second"] for r in records][args.warmup:]
    rss_after_trainer = peak_rss_mib()
    bare_times = bare_loop(config, batch, args.steps)[args.warmup:]

    addpipe_median, bare_median = statistics.median(addpipe_times), statistics.median(bare_times)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, CUDA {torch.cuda.is_available()}")
    print(f"tiny SD-style models, {args.resolution}px, batch {args.batch}, ZeRO-{args.zero}, "
          f"{args.steps - args.warmup} timed steps each")
    print(f"addpipe trainer step  median {addpipe_median * 1000:8.1f} ms")
    print(f"bare PyTorch loop     median {bare_median * 1000:8.1f} ms")
    print(f"overhead ratio (addpipe / bare): {addpipe_median / bare_median:.3f}")
    print(f"peak RSS after trainer: {rss_after_trainer:.0f} MiB; after both: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
