"""Noise schedules and parameterisations: alpha/sigma tables, student timesteps, x0 from a network output.

Forward process (docs/method.md): x_t = alpha_t * x_0 + sigma_t * eps over integer timesteps t = 0..T-1.
- DDPM-style (SD, SDXL): alpha_t = sqrt(alphabar_t), sigma_t = sqrt(1 - alphabar_t) from a diffusers scheduler's
  betas; the student's table may be rescaled to zero terminal SNR, so alpha at T-1 is exactly 0: the student
  starts from pure noise, and its output must be a v- or x0-prediction, which stays finite there.
- Flow matching (SD3, FLUX.1; a FlowMatchEulerDiscreteScheduler config): alpha_t = 1 - sigma_t with sigma_t the
  teacher's shifted sigma of (t + 1) / T, so sigma at T-1 is 1 (pure noise) by construction; the network predicts
  the velocity v = eps - x_0, and is called with the time sigma_t * T (`model_time`), not the index.
Everything downstream (losses, weightings, the sampler) is written in alpha_t and sigma_t, so it serves both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr


@dataclass(frozen=True)
class NoiseSchedule:
    """alpha_t and sigma_t for t = 0..T-1, plus what the network's output means."""

    alphas: torch.Tensor
    sigmas: torch.Tensor
    prediction_type: str
    model_times: Optional[torch.Tensor] = None
    """What the denoiser is called with at each index (sigma_t * T for flow matching); None: the index itself."""

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas.shape[0]

    def at(self, timesteps: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t gathered for a batch of integer timesteps and shaped to broadcast over ndim."""
        timesteps = timesteps.to(self.alphas.device).long()
        shape = (-1,) + (1,) * (ndim - 1)
        return self.alphas[timesteps].view(shape), self.sigmas[timesteps].view(shape)

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        times = None if self.model_times is None else self.model_times.to(device)
        return NoiseSchedule(self.alphas.to(device), self.sigmas.to(device), self.prediction_type, times)

    def model_time(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser's time input for integer timesteps: the timesteps themselves for a DDPM-style UNet, sigma_t * T
        (a float) for a flow-matching transformer."""
        if self.model_times is None:
            return timesteps
        return self.model_times[timesteps.to(self.model_times.device).long()]

    @property
    def flow(self) -> bool:
        return self.prediction_type == "flow"


def betas_from_config(config) -> torch.Tensor:
    """The beta table a diffusers scheduler config describes (the schedules SD/SDXL use)."""
    steps = int(config["num_train_timesteps"])
    kind = config.get("beta_schedule", "linear")
    start, end = float(config["beta_start"]), float(config["beta_end"])
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float64)
    if kind == "linear":
        return torch.linspace(start, end, steps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    raise ValueError(f"unsupported beta_schedule {kind!r} (linear and scaled_linear are supported)")


def is_flow_matching(config) -> bool:
    """Whether a diffusers scheduler config is a flow-matching one (SD3, FLUX.1)."""
    return "FlowMatch" in str(config.get("_class_name", ""))


def shift_sigmas(sigmas: torch.Tensor, config, image_tokens: Optional[int] = None) -> torch.Tensor:
    """The scheduler's timestep shift of unshifted sigmas in (0, 1]. SD3: the static shift s*sigma / (1 + (s-1)*sigma)
    (shift 3.0). FLUX.1 (use_dynamic_shifting): exp(mu) / (exp(mu) + (1/sigma - 1)) with mu linear in the image's
    token count between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as diffusers'
    calculate_shift has it: more tokens, more time at high noise."""
    if config.get("use_dynamic_shifting", False):
        if image_tokens is None:
            raise ValueError("this flow-matching scheduler shifts by resolution (use_dynamic_shifting): the image's "
                             "token count is needed")
        base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        mu = base + (top - base) * (image_tokens - base_len) / (max_len - base_len)
        return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    shift = float(config.get("shift", 1.0))
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_schedule(config, image_tokens: Optional[int] = None) -> NoiseSchedule:
    """sigma_t = shift((t + 1) / T), alpha_t = 1 - sigma_t, velocity prediction, time input sigma_t * T: index t is
    the FlowMatchEulerDiscreteScheduler's training timestep t + 1 (sigma_max = 1 at t = T-1, sigma_min = shift(1/T))."""
    steps = int(config.get("num_train_timesteps", 1000))
    unshifted = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    sigmas = shift_sigmas(unshifted, config, image_tokens)
    return NoiseSchedule((1.0 - sigmas).float(), sigmas.float(), "flow", (sigmas * steps).float())


def schedule_from_config(config, zero_terminal_snr: bool, prediction_type: str | None = None,
                         image_tokens: Optional[int] = None) -> NoiseSchedule:
    """Build a NoiseSchedule from a diffusers scheduler config (a dict or FrozenDict). A flow-matching config gives
    the flow schedule, whatever the other arguments say (its terminal sigma is 1; its parameterisation is fixed)."""
    if is_flow_matching(config):
        return flow_schedule(config, image_tokens)
    betas = betas_from_config(config)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prediction = prediction_type or config.get("prediction_type", "epsilon")
    if zero_terminal_snr and prediction == "epsilon":
        raise ValueError(
            "an epsilon-prediction cannot give x0 where alpha = 0 (zero terminal SNR): "
            "use prediction_type v_prediction or sample"
        )
    alphas = alphas_cumprod.sqrt()
    sigmas = (1.0 - alphas_cumprod).clamp(min=0.0).sqrt()
    return NoiseSchedule(alphas.float(), sigmas.float(), prediction)


def student_parameterisation(student_config, teacher_scheduler: dict) -> tuple[str, bool]:
    """(prediction type, zero terminal SNR) of the student: the teacher's own where the config says auto."""
    if is_flow_matching(teacher_scheduler):
        if student_config.prediction_type not in ("auto", "flow") or student_config.zero_terminal_snr not in ("auto", True):
            raise ValueError("a flow-matching teacher's student keeps its parameterisation (velocity, sigma = 1 at the "
                             "last timestep): leave student.prediction_type and student.zero_terminal_snr at auto")
        return "flow", True
    teacher_prediction = teacher_scheduler.get("prediction_type", "epsilon")
    teacher_zero_snr = bool(teacher_scheduler.get("rescale_betas_zero_snr", False))
    prediction = teacher_prediction if student_config.prediction_type == "auto" else student_config.prediction_type
    zero_snr = teacher_zero_snr if student_config.zero_terminal_snr == "auto" else bool(student_config.zero_terminal_snr)
    if zero_snr and prediction == "epsilon":
        where = " (the teacher's: student.prediction_type is auto)" if student_config.prediction_type == "auto" else ""
        raise ValueError(f"student.zero_terminal_snr true with an epsilon-prediction student{where}: epsilon has no x0 "
                         "where alpha = 0; set student.prediction_type to v_prediction or sample, or keep the teacher's "
                         "schedule (zero_terminal_snr: auto)")
    changed = [f"{key} {mine} (the teacher's: {theirs})" for key, mine, theirs in
               (("student.prediction_type", prediction, teacher_prediction),
                ("student.zero_terminal_snr", zero_snr, teacher_zero_snr)) if mine != theirs]
    if changed and not getattr(student_config, "change_parameterisation", False):
        raise ValueError(f"{'; '.join(changed)}: the student starts as a copy of the teacher's UNet, which was trained "
                         "for the teacher's parameterisation, so its first predictions would be wrong (an epsilon UNet "
                         "read as v gives pure noise as x0), and the pretrained initialisation the ADD paper calls "
                         "crucial is lost. Keep auto, or set student.change_parameterisation=true to do it anyway")
    return prediction, zero_snr


def pipeline_schedule(config, image_tokens: Optional[int] = None) -> NoiseSchedule:
    """The schedule a pipeline was trained with, as its own scheduler config says (rescale_betas_zero_snr included)."""
    return schedule_from_config(config, bool(config.get("rescale_betas_zero_snr", False)), image_tokens=image_tokens)


def student_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """tau_i = T-1 - floor(i*T/N), i = 0..N-1: {999, 749, 499, 249} for N = 4; tau_1 = T-1 is pure noise."""
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    return [num_train_timesteps - 1 - (i * num_train_timesteps) // num_steps for i in range(num_steps)]


def trained_subset(trained: list[int], steps: int) -> list[int]:
    """The timesteps a student runs `steps` steps on: every (N/steps)-th of the N it was trained on, so that only
    trained timesteps are used ({999, 499} of {999, 749, 499, 249} for 2 steps). A count that does not divide N
    has no such subset: ValueError naming the counts that do."""
    counts = [k for k in range(1, len(trained) + 1) if len(trained) % k == 0]
    if steps not in counts:
        raise ValueError(f"the student was trained on timesteps {list(trained)}: it samples with {counts} step(s) "
                         f"(evenly spaced subsets of them), not {steps}")
    return list(trained)[:: len(trained) // steps]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return alpha * x0 + sigma * noise


def predicted_x0(
    output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x0 implied by a network output. v: x0 = alpha*x_t - sigma*v (at alpha = 0 simply -v). epsilon: divides by
    alpha, which no epsilon schedule makes 0 (schedule_from_config refuses zero terminal SNR for one); not checked
    here, since reading alpha back would make the host wait for the device on every call. flow (v = eps - x0):
    x0 = x_t - sigma*v."""
    if prediction_type == "flow":
        return x_t - sigma * output
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * output
    if prediction_type == "sample":
        return output
    if prediction_type == "epsilon":
        return (x_t - sigma * output) / alpha
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def diffusion_target(
    x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What a network of `prediction_type` is trained to output for x_t = alpha*x0 + sigma*noise
    (v = alpha*noise - sigma*x0, Salimans & Ho 2022; flow matching's velocity: noise - x0)."""
    if prediction_type == "flow":
        return noise - x0
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha * noise - sigma * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def predicted_eps(
    output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """eps implied by a network output (teachers run at t < T-1, where sigma > 0). flow: eps = x_t + alpha*v
    (x_t = (1-sigma) x0 + sigma eps and v = eps - x0)."""
    if prediction_type == "flow":
        return x_t + alpha * output
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha * output + sigma * x_t
    if prediction_type == "sample":
        return (x_t - alpha * output) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up from 0 to 1 over warmup_steps, then 1. A function of the step, so resumes agree."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


@dataclass
class TrainingNoise:
    """All randomness of one training step: student timestep indices and noise, teacher t and noise, and for
    backward simulation a uniform draw per sample and the sampler's noise ((n, N-1, ...): start, re-noises)."""

    student_index: torch.Tensor
    noise: torch.Tensor
    teacher_t: torch.Tensor
    teacher_noise: torch.Tensor
    simulate: torch.Tensor
    simulation_noise: torch.Tensor


def stream_groups(streams: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, stream) of each run of rows from one data stream."""
    groups, start = [], 0
    while start < len(streams):
        end = start
        while end < len(streams) and streams[end] == streams[start]:
            end += 1
        groups.append((start, end, streams[start]))
        start = end
    return groups


def step_generator(seed: int, step: int, stream: int, purpose: int) -> torch.Generator:
    """A CPU generator for one (seed, step, stream, purpose): the same draw on any rank layout and after a resume."""
    mixed = (seed * 0x9E3779B1 + step * 0x85EBCA77 + stream * 0xC2B2AE3D + purpose * 0x27D4EB2F + 7) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def draw_training_noise(seed: int, step: int, streams: list[int], latent_shape: tuple[int, ...],
                        num_student_timesteps: int, t_min: int, t_max: int,
                        timestep_weights: Sequence[float] = ()) -> TrainingNoise:
    """Noise as a pure function of (seed, step, data stream): a resumed run draws exactly what the
    uninterrupted run drew, and the global batch's noise does not depend on how streams map to ranks.
    Student timestep indices are uniform, or drawn in proportion to `timestep_weights` where given."""
    weights = torch.tensor(timestep_weights, dtype=torch.float64) if timestep_weights else None
    parts: list[TrainingNoise] = []
    start = 0
    while start < len(streams):
        end = start
        while end < len(streams) and streams[end] == streams[start]:
            end += 1
        count = end - start
        mixed = (seed * 0x9E3779B1 + step * 0x85EBCA77 + streams[start] * 0xC2B2AE3D + 1) % (2**63 - 1)
        generator = torch.Generator().manual_seed(mixed)
        parts.append(TrainingNoise(
            torch.randint(0, num_student_timesteps, (count,), generator=generator) if weights is None
            else torch.multinomial(weights, count, replacement=True, generator=generator),
            torch.randn((count, *latent_shape), generator=generator),
            torch.randint(t_min, t_max + 1, (count,), generator=generator),
            torch.randn((count, *latent_shape), generator=generator),
            # Drawn after the rest, so runs without backward simulation draw what they always drew.
            torch.rand((count,), generator=generator),
            torch.randn((count, max(num_student_timesteps - 1, 0), *latent_shape), generator=generator),
        ))
        start = end
    return TrainingNoise(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(TrainingNoise)))
