"""`addpipe demo`: the whole training job offline on CPU, on data that ships with scikit-learn.

1. shards: coloured, captioned handwritten digits written as WebDataset shards in the contract;
2. teacher: a small SD-architecture pipeline trained here with plain diffusion training;
3. ADD: the student distilled from it with the real trainer (DeepSpeed engine, DINOv2-architecture
   discriminator) from configs/tiny.yaml;
4. a PNG grid: the teacher at 50 guided steps above the student at 1, 2 and 4 steps, same prompts.
Every stage skips work whose output already exists, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from addpipe.pipeline.config import load
from addpipe.train.config import TrainConfig

logger = logging.getLogger(__name__)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
PROMPTS = ["a handwritten seven in red on a blue background", "a handwritten two in white on a black background",
           "a handwritten four in yellow on a purple background", "a handwritten zero in green on a white background"]


def build_shards(out: Path, images: int, resolution: int) -> Path:
    from addpipe.dataprep.digits import digit_images
    from addpipe.dataprep.shards import ShardSample, write_shards

    shards = out / "shards"
    if not (shards / "DONE").is_file():
        samples = (ShardSample(f"{i:06d}", image, caption, meta)
                   for i, (caption, image, meta) in enumerate(digit_images(images, size=resolution)))
        write_shards(samples, shards, samples_per_shard=50)
        (shards / "DONE").write_text(json.dumps({"images": images}))
    return shards


def build_teacher(out: Path, shards: Path, resolution: int, steps: int) -> tuple[Path, Path]:
    from addpipe.train.teacher import pretrain_teacher
    from addpipe.train.tiny import build_tiny_dinov2, build_tiny_pipeline

    teacher, dino = out / "models" / "teacher", out / "models" / "dinov2"
    if not (teacher / "DONE").is_file():
        build_tiny_pipeline(teacher, "sd", latent_size=resolution // 2)
        pretrain_teacher(teacher, str(shards), resolution, vae_steps=max(1, steps // 2), unet_steps=steps)
        (teacher / "DONE").write_text("ok")
    if not (dino / "config.json").is_file():
        build_tiny_dinov2(dino, image_size=32)
    return teacher, dino


@torch.no_grad()
def teacher_images(teacher: Path, resolution: int, seed: int) -> torch.Tensor:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(teacher)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPTS, num_inference_steps=50, guidance_scale=3.0, height=resolution, width=resolution,
                  generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return images.float()


def run_demo(out: Path, steps: int = 300, images: int = 400, teacher_steps: int = 600, resolution: int = 32) -> Path:
    from addpipe.train.loop import train
    from addpipe.train.sampling import generate, load_student, save_grid, student_timesteps

    out = Path(out)
    started = time.perf_counter()
    shards = build_shards(out, images, resolution)
    teacher, dino = build_teacher(out, shards, resolution, teacher_steps)
    config = load(TrainConfig, CONFIG, [
        f"run_dir={out / 'run'}", f"steps={steps}", f"model.teacher={teacher}", f"discriminator.feature_network={dino}",
        f"data.shards={shards}", f"data.resolution={resolution}", f"checkpoint.every={max(1, steps // 3)}",
        f"log.sample_every={max(1, steps // 3)}", f"log.sample_prompts={json.dumps(PROMPTS)}",
    ])
    student_dir = out / "run" / "student"
    if not (student_dir / "addpipe_student.json").is_file():
        train(config, resume=True)
    components, schedule, _ = load_student(str(student_dir), torch.device("cpu"))
    rows = [teacher_images(teacher, resolution, seed=0)]
    for count in (1, 2, 4):
        rows.append(generate(components.unet, components, schedule, PROMPTS, student_timesteps(count), seed=0,
                             resolution=resolution, device=torch.device("cpu")))
    grid = save_grid(torch.cat(rows), out / "demo_grid.png", rows=len(rows))
    (out / "demo_summary.json").write_text(json.dumps({
        "grid": str(grid), "rows": ["teacher 50 steps, guidance 3", "student 1 step", "student 2 steps", "student 4 steps"],
        "prompts": PROMPTS, "seconds": round(time.perf_counter() - started, 1),
    }, indent=2))
    return grid
