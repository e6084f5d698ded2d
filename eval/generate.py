"""`addpipe eval generate`: paired images for a study, every arm on the same prompts and the same initial noise.

An arm is `name=SOURCE[:steps=N][:cfg=G][:scheduler=S][:resolution=R]`, SOURCE a diffusers pipeline
(hub id or directory: a teacher, or a student exported by `addpipe train`). Students use the timesteps
they were trained on (their `addpipe_student.json`); other pipelines their scheduler with N steps.
For prompt i the initial latent and the sampler's own noise come from seed `seed + i`, identical for every
arm (the paired design).
Latency is wall-clock per image (batch 1, after a warm-up call, synchronised on GPU).

Generation is resumable: an (arm, prompt) already in generations.jsonl is skipped.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)
BUNDLED_PROMPTS = Path(__file__).parent / "prompts.tsv"
PARTI_URL = "https://raw.githubusercontent.com/google-research/parti/main/PartiPrompts.tsv"
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
              "dpm": "DPMSolverMultistepScheduler", "lcm": "LCMScheduler", "pndm": "PNDMScheduler"}


@dataclass
class Arm:
    name: str
    source: str
    steps: int = 1
    guidance: float = 0.0
    scheduler: Optional[str] = None
    resolution: Optional[int] = None
    lora: Optional[str] = None
    """A LoRA (diffusers format, e.g. an addpipe student_lora directory) loaded into the source pipeline and fused."""
    prompts: Optional[int] = None
    """Only the study's first N prompts (an expensive arm, such as a 50-step teacher, on a subset); None: all."""

    @classmethod
    def parse(cls, spec: str) -> "Arm":
        if "=" not in spec.split(":", 1)[0]:
            raise ValueError(f"arm {spec!r} must look like name=SOURCE[+LORA][:steps=N][:cfg=G][:scheduler=S][:resolution=R][:prompts=N]")
        name, rest = spec.split("=", 1)
        source, *options = rest.split(":")
        lora = None
        if "+" in source and not Path(source).exists():  # base+lora (a path with a '+' of its own stays whole)
            source, lora = source.rsplit("+", 1)
        arm = cls(name.strip(), source, lora=lora or None)
        numbers = {"steps": ("steps", int), "cfg": ("guidance", float), "guidance": ("guidance", float),
                   "resolution": ("resolution", int), "prompts": ("prompts", int)}
        for option in options:
            key, _, value = option.partition("=")
            if key in numbers:
                field, kind = numbers[key]
                try:
                    setattr(arm, field, kind(value))
                except ValueError:
                    raise ValueError(f"arm {spec!r}: {key} must be {'an integer' if kind is int else 'a number'}, "
                                     f"got {value!r}") from None
            elif key == "scheduler":
                if value not in SCHEDULERS:
                    raise ValueError(f"unknown scheduler {value!r} in arm {name}; choose from {', '.join(SCHEDULERS)}")
                arm.scheduler = value
            else:
                raise ValueError(f"unknown arm option {key!r} in {spec!r}; valid: steps, cfg, scheduler, resolution, prompts")
        if not arm.name or not arm.source or arm.steps < 1 or (arm.prompts is not None and arm.prompts < 1):
            raise ValueError(f"arm {spec!r} needs a name, a source, steps >= 1 and prompts >= 1 when given")
        return arm


@dataclass
class Prompt:
    id: int
    text: str
    category: str = ""


def load_prompts(spec: str, limit: Optional[int] = None) -> list[Prompt]:
    """`bundled` (ours, PartiPrompts format), `parti` (PartiPrompts.tsv from GitHub), a .tsv with a Prompt
    column (and optional Category), or a text file with one prompt per line."""
    if spec == "bundled":
        text = BUNDLED_PROMPTS.read_text()
    elif spec == "parti":
        try:
            with urllib.request.urlopen(PARTI_URL, timeout=30) as response:
                text = response.read().decode()
        except OSError as error:
            raise FileNotFoundError(f"could not fetch PartiPrompts from {PARTI_URL} ({error}); download it and pass the .tsv path") from error
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist (or use --prompts bundled / parti)")
        text = path.read_text()
        if path.suffix.lower() != ".tsv":
            prompts = [Prompt(i, line.strip()) for i, line in enumerate(l for l in text.splitlines() if l.strip())]
            return prompts[:limit] if limit else prompts
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    if not rows or "Prompt" not in rows[0]:
        raise ValueError(f"prompt table {spec} needs a 'Prompt' column (PartiPrompts format); found {list(rows[0]) if rows else 'no rows'}")
    prompts = [Prompt(i, row["Prompt"].strip(), (row.get("Category") or "").strip()) for i, row in enumerate(rows) if row["Prompt"].strip()]
    return prompts[:limit] if limit else prompts


def load_arm_pipeline(arm: Arm, device: torch.device, dtype: torch.dtype):
    import diffusers
    from diffusers import DiffusionPipeline

    from addpipe.train import ModelLoadError

    try:
        pipe = DiffusionPipeline.from_pretrained(arm.source, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"arm {arm.name}: cannot load a diffusers pipeline from {arm.source}: {error}") from error
    if arm.lora:
        try:
            pipe.load_lora_weights(arm.lora)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"arm {arm.name}: cannot load the LoRA {arm.lora} into {arm.source}: {error}") from error
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # merged: the adapters' own layers are no longer needed
        if (Path(arm.lora) / "scheduler").is_dir() and not arm.scheduler:  # an addpipe LoRA student's sampler
            config = json.loads((Path(arm.lora) / "scheduler" / "scheduler_config.json").read_text())
            pipe.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    if arm.scheduler:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[arm.scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def arm_call_kwargs(arm: Arm) -> dict[str, Any]:
    """Students run on a subset of the timesteps they were trained on (their addpipe_student.json); other
    pipelines on `steps` of their scheduler. A student arm with a step count it was not trained for: ValueError."""
    info_path = Path(arm.lora or arm.source) / "addpipe_student.json"
    if info_path.is_file():
        from addpipe.train import sample_timesteps

        try:
            timesteps = sample_timesteps(json.loads(info_path.read_text()), arm.steps)
        except ValueError as error:
            raise ValueError(f"arm {arm.name}: {error}") from None
        return {"timesteps": timesteps, "guidance_scale": arm.guidance}
    return {"num_inference_steps": arm.steps, "guidance_scale": arm.guidance}


def initial_latents(pipe, seed: int, resolution: int) -> torch.Tensor:
    channels = pipe.unet.config.in_channels
    factor = pipe.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, channels, resolution // factor, resolution // factor), generator=generator)


def generate_study(study_dir: Path, arms: list[Arm], prompts: list[Prompt], seed: int = 0, device: str = "auto",
                   dtype: str = "auto") -> Path:
    study_dir = Path(study_dir)
    (study_dir / "images").mkdir(parents=True, exist_ok=True)
    from addpipe.devices import resolve_device

    target = resolve_device(device)
    torch_dtype = {"auto": torch.float16 if target.type == "cuda" else torch.float32, "fp32": torch.float32,
                   "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    names = [arm.name for arm in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique: {names}")
    study_file = study_dir / "study.json"
    study = json.loads(study_file.read_text()) if study_file.exists() else {"arms": {}, "seed": seed}
    call_kwargs = {arm.name: arm_call_kwargs(arm) for arm in arms}  # a bad step count fails before any image
    for arm in arms:
        previous = study["arms"].get(arm.name)
        # studies from before arms had a LoRA or a prompt count; a new count only adds or leaves prompts
        if previous and {"lora": None, **previous, "prompts": arm.prompts} != asdict(arm):
            raise ValueError(f"arm {arm.name} already exists in {study_file} with other settings {previous}; use a new name")
        study["arms"][arm.name] = asdict(arm)
    study_file.write_text(json.dumps(study, indent=2))
    generations = study_dir / "generations.jsonl"
    done = set()
    if generations.exists():
        done = {(g["arm"], g["prompt_id"]) for g in map(json.loads, generations.read_text().splitlines()) if g}
    for arm in arms:
        todo = [p for p in prompts[:arm.prompts] if (arm.name, p.id) not in done]
        if not todo:
            continue
        pipe = load_arm_pipeline(arm, target, torch_dtype)
        resolution = arm.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        kwargs = call_kwargs[arm.name]
        (study_dir / "images" / arm.name).mkdir(exist_ok=True)
        pipe(todo[0].text, latents=initial_latents(pipe, seed, resolution).to(target, torch_dtype), height=resolution,
             width=resolution, output_type="pil", **kwargs)  # warm-up: the first call pays for lazy initialisation
        if not sys.stderr.isatty():  # no bar off a terminal: one line per arm says what runs
            logger.info("generate: arm %s, %d prompt(s)", arm.name, len(todo))
        with generations.open("a") as log:
            for prompt in tqdm(todo, desc=f"generate {arm.name}", disable=None):
                latents = initial_latents(pipe, seed + prompt.id, resolution).to(target, torch_dtype)
                if target.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                # the generator pairs stochastic samplers too (their per-step noise), not only the initial latent
                generator = torch.Generator(target).manual_seed(seed + prompt.id)
                image = pipe(prompt.text, latents=latents, height=resolution, width=resolution, output_type="pil",
                             generator=generator, **kwargs).images[0]
                if target.type == "cuda":
                    torch.cuda.synchronize()
                latency = time.perf_counter() - started
                path = study_dir / "images" / arm.name / f"{prompt.id:05d}.png"
                image.save(path)
                log.write(json.dumps({"arm": arm.name, "prompt_id": prompt.id, "prompt": prompt.text, "category": prompt.category,
                                      "seed": seed + prompt.id, "steps": arm.steps, "guidance": arm.guidance,
                                      "scheduler": arm.scheduler or type(pipe.scheduler).__name__, "resolution": resolution,
                                      "latency_s": latency, "image": str(path.relative_to(study_dir))}, ensure_ascii=False) + "\n")
                log.flush()
        del pipe
    return generations
