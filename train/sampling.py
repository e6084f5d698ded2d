"""Few-step sampling of an ADD student (docs/method.md, sampling): predict x0, re-noise to the next smaller timestep
with fresh noise, repeat; never classifier-free guidance. Used by the trainer's sample grids,
`addpipe sample` and the evaluation stage alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from addpipe.train.families import Denoiser
from addpipe.train.models import TeacherComponents, encode_prompts, vae_decode
from addpipe.train.schedule import NoiseSchedule, predicted_x0, schedule_from_config, student_timesteps, trained_subset

STUDENT_INFO = "addpipe_student.json"


def vae_downsample_factor(components: TeacherComponents) -> int:
    return 2 ** (len(components.vae.config.block_out_channels) - 1)


@torch.no_grad()
def sample_trajectory(denoiser: Denoiser, schedule: NoiseSchedule, noise: torch.Tensor, timesteps: Sequence[int],
                      fresh: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
    """The few-step sampler: x at timesteps[0] is pure noise (alpha = 0 under zero terminal SNR); returns the
    x0 predicted at each timestep. `denoiser`: a model bound to the batch's conditioning by its family
    (ModelFamily.denoiser); `fresh(i)` is the noise that re-noises step i's x0 to timesteps[i + 1]."""
    x, predictions = noise, []
    for index, timestep in enumerate(timesteps):
        t = torch.full((x.shape[0],), int(timestep), dtype=torch.long, device=x.device)
        output = denoiser(x, schedule.model_time(t)).float()
        alpha, sigma = schedule.at(t, x.ndim)
        predictions.append(predicted_x0(output, x, alpha, sigma, schedule.prediction_type))
        if index < len(timesteps) - 1:
            alpha, sigma = schedule.at(torch.full_like(t, int(timesteps[index + 1])), x.ndim)
            x = alpha * predictions[-1] + sigma * fresh(index).to(device=x.device, dtype=x.dtype)
    return predictions


def sample_latents(denoiser: Denoiser, schedule: NoiseSchedule, noise: torch.Tensor, timesteps: Sequence[int],
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The final x0 of the sampler, fresh noise drawn from `generator` (a CPU generator: same seed, same images)."""
    return sample_trajectory(denoiser, schedule, noise, timesteps,
                             lambda _: torch.randn(noise.shape, generator=generator, dtype=noise.dtype))[-1]


@torch.no_grad()
def generate(unet: nn.Module, components: TeacherComponents, schedule: NoiseSchedule, prompts: list[str],
             timesteps: Sequence[int], seed: int, resolution: int, device: torch.device) -> torch.Tensor:
    """Images in [0, 1], (n, 3, H, W). Same seed, same images: noise comes from a seeded CPU generator."""
    generator = torch.Generator().manual_seed(seed)
    size = resolution // vae_downsample_factor(components)
    channels = components.vae.config.latent_channels
    noise = torch.randn((len(prompts), channels, size, size), generator=generator).to(device)
    family = components.family
    micro = family.micro_conditioning(len(prompts), resolution)
    denoiser = family.denoiser(unet, encode_prompts(components, prompts, device), None if micro is None else micro.to(device))
    latents = sample_latents(denoiser, schedule, noise, timesteps, generator)
    return ((vae_decode(components, latents) + 1.0) / 2.0).clamp(0.0, 1.0)


def save_grid(images: torch.Tensor, path: Path, rows: int) -> Path:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, str(path), nrow=max(1, images.shape[0] // max(rows, 1)), padding=2)
    return path


def load_student(directory: str, device: torch.device) -> tuple[TeacherComponents, NoiseSchedule, dict]:
    """An exported student directory (diffusers pipeline format + addpipe_student.json)."""
    from addpipe.train.config import ModelConfig
    from addpipe.train.models import ModelLoadError, load_teacher

    info_path = Path(directory) / STUDENT_INFO
    if not info_path.is_file():
        raise ModelLoadError(f"{info_path} not found: {directory} is not a student exported by `addpipe train`")
    info = json.loads(info_path.read_text())
    components = load_teacher(ModelConfig(teacher=str(directory), architecture=info["architecture"]))
    for module in components.frozen_modules():
        module.to(device)
    schedule = schedule_from_config(components.scheduler_config, info["zero_terminal_snr"], info["prediction_type"])
    return components, schedule.to(device), info


def sample_timesteps(info: dict, steps: int, untrained: bool = False) -> list[int]:
    """The timesteps an exported student samples `steps` steps on, from its metadata (addpipe_student.json): a
    subset of those it was trained on. `untrained`: a count with no such subset gets the evenly spaced trailing
    timesteps instead (which the student never saw), by the user's explicit choice."""
    try:
        return trained_subset(info["timesteps"], steps)
    except ValueError as error:
        if not untrained:
            raise ValueError(f"{error}; pass --untrained-steps to sample on timesteps it was not trained on") from None
    return student_timesteps(steps, info["num_train_timesteps"])
