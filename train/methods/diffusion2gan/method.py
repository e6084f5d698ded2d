"""Diffusion2GAN (Kang et al. 2024) as a method: a one-step generator trained on the teacher's ODE pairs.

Data: shards from `addpipe pairs` (noise z, the teacher's DDIM latent x, the prompt's text embeddings). The
generator is a copy of the teacher's UNet (or LoRA adapters on it) run once at the last timestep T on z; its x0 is
read as the student parameterisation says (as ADD's one-step student). Generator phase: lambda_lpips *
E-LatentLPIPS(G(z, c), x) + lambda_gan * L_G, with L_G the non-saturating loss of the conditional discriminator on
G(z, c) noised to a random t. Discriminator phase: the teacher UNet's encoder (train/methods/diffusion2gan/unet_discriminator.py) scores
(x_t, z, c) for the real x against (G(z, c)_t, z, c), plus the text-alignment term (the real x with another
sample's prompt counts as fake) and gamma/2 R1 on the noised real latents. With d2g.adversarial off it is the
regression-only ablation: one phase, no discriminator.

All randomness (discriminator timesteps and noise, the ensemble's augmentations) is a function of (seed, step,
data stream), as ADD's, so resumes are exact and the global batch does not depend on how streams map to ranks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from addpipe.devices import autocast
from addpipe.train import distributed, losses
from addpipe.train.backends import Backend, OptimizerSettings, Trained
from addpipe.train.data import Batch
from addpipe.train.diagnostics import gradient_norms, log_window_ends
from addpipe.train.export import export_student
from addpipe.train.methods.diffusion2gan.config import Diffusion2GANConfig
from addpipe.train.methods.diffusion2gan.data import OdePairs
from addpipe.train.methods.diffusion2gan.latent_lpips import LatentLPIPS
from addpipe.train.methods.diffusion2gan.memory import plan_diffusion2gan
from addpipe.train.methods.base import Method, Phase
from addpipe.train.models import ModelLoadError, TextConditioning, load_teacher, make_student
from addpipe.train.sampling import generate, save_grid
from addpipe.train.schedule import (add_noise, draw_training_noise, pipeline_schedule, predicted_x0, schedule_from_config,
                                    step_generator, stream_groups, student_parameterisation, warmup_factor)
from addpipe.train.methods.diffusion2gan.unet_discriminator import UNetEncoderDiscriminator


@dataclass
class PairStep:
    noise: torch.Tensor            # z, the generator's input
    target: torch.Tensor           # x, the teacher's ODE output for z
    conditioning: TextConditioning
    time_ids: Optional[torch.Tensor]
    streams: list[int]
    t: torch.Tensor                # the discriminator's timestep per sample
    diffusion_noise: torch.Tensor  # what both real and generated latents are noised with
    step: int                      # the training step (the ensemble's augmentations are drawn from it)
    measure: bool = False          # the last step of a log window: measure each term's gradient norm (log.term_norms)
    fake: Optional[torch.Tensor] = None  # the generator phase's output, detached, for the discriminator phase


class Diffusion2GAN(Method):
    name = "diffusion2gan"
    config_class = Diffusion2GANConfig
    memory_plan = staticmethod(plan_diffusion2gan)

    # ---- models -----------------------------------------------------------------------------------------
    def build(self, backend: Backend) -> dict[str, Trained]:
        config, device, dtype = self.config, self.device, self.dtype
        d2g = config.d2g
        if not d2g.lpips:
            raise ModelLoadError("method diffusion2gan needs d2g.lpips: LatentLPIPS weights (a published "
                                 "<encoder>_latest_vgg16_tuned.pth, or the one `addpipe demo` trains)")
        self.teacher = load_teacher(config.model, dtype=dtype)
        if self.teacher.family.denoiser_folder != "unet":
            raise ModelLoadError(f"method diffusion2gan needs a UNet teacher (its discriminator is the teacher's UNet "
                                 f"encoder, its pairs come from a DDIM sampler); {config.model.teacher} is "
                                 f"{self.teacher.family.summary}: use method add")
        channels = int(self.teacher.unet.config.in_channels)
        self.lpips = LatentLPIPS.from_pretrained(d2g.lpips, latent_channels=channels, augment=d2g.augment or None).to(device)
        discriminator = (UNetEncoderDiscriminator(self.teacher.unet).float().to(device) if d2g.adversarial else None)
        if config.student.lora.enabled:
            raise ValueError("method diffusion2gan trains a full one-step generator here; unset student.lora")
        student = make_student(self.teacher, config.model)
        self.teacher.unet = None  # the pairs hold everything the teacher UNet would give: free it
        for module in (self.teacher.vae, *self.teacher.text_encoders):
            module.to(device)

        scheduler_config = self.teacher.scheduler_config
        self.discriminator_schedule = pipeline_schedule(scheduler_config).to(device)
        if d2g.discriminator_t[1] >= self.discriminator_schedule.num_train_timesteps:
            raise ValueError(f"d2g.discriminator_t={list(d2g.discriminator_t)} reaches past the teacher's last timestep "
                             f"{self.discriminator_schedule.num_train_timesteps - 1}")
        self.student_prediction, self.student_zero_snr = student_parameterisation(config.student, scheduler_config)
        self.student_schedule = schedule_from_config(scheduler_config, self.student_zero_snr,
                                                     self.student_prediction).to(device)
        self.timesteps = [self.student_schedule.num_train_timesteps - 1]

        settings = self.optimizer_settings()
        self.student = backend.wrap("student", student, [p for p in student.parameters() if p.requires_grad],
                                    settings["student"], shard=True)
        models = {"student": self.student}
        self.discriminator = None
        if discriminator is not None:
            self.discriminator = backend.wrap("discriminator", discriminator, list(discriminator.parameters()),
                                              settings["discriminator"], shard=False)
            models["discriminator"] = self.discriminator
        return models

    def optimizer_settings(self) -> dict[str, OptimizerSettings]:
        optim = self.config.optim
        schedule = lambda step: warmup_factor(step, optim.warmup_steps)  # noqa: E731 - a function of the step
        found = {"student": OptimizerSettings(optim.student_lr, optim.student_betas, optim.weight_decay, schedule,
                                              optim.gradient_clipping)}
        if self.config.d2g.adversarial:
            found["discriminator"] = OptimizerSettings(optim.discriminator_lr, optim.discriminator_betas,
                                                       optim.weight_decay, schedule, optim.gradient_clipping)
        return found

    def sample_format(self) -> OdePairs:
        """ODE pairs made with this run's teacher, VAE, resolution and the pairs' timestep spacing."""
        from addpipe.train.methods.diffusion2gan.pairs import ODE_SPACING

        model = self.config.model
        return OdePairs({"teacher": model.teacher, "revision": model.revision, "vae": model.vae,
                         "resolution": self.config.data.resolution, "timestep_spacing": ODE_SPACING})

    def phases(self) -> list[Phase]:
        found = [Phase("generator", "student", self.generator_terms, "loss/generator_total")]
        if self.config.d2g.adversarial:
            found.append(Phase("discriminator", "discriminator", self.discriminator_terms, "loss/discriminator_total",
                               self.config.optim.discriminator_interval))
        return found

    # ---- one step ---------------------------------------------------------------------------------------
    def begin_step(self, batch: Batch, step: int) -> PairStep:
        if "noise" not in batch.extra:
            raise ValueError("method diffusion2gan trains on ODE pairs: point data.shards at `addpipe pairs` output")
        n, resolution = len(batch.captions), self.config.data.resolution
        low, high = self.config.d2g.discriminator_t
        drawn = draw_training_noise(self.config.seed, step, batch.streams, tuple(batch.latents.shape[1:]), 1, low, high)
        time_ids = self.teacher.family.micro_conditioning(n, resolution)  # pairs are whole images at the training resolution
        time_ids = None if time_ids is None else time_ids.to(self.device)
        return PairStep(batch.extra["noise"].to(self.device), batch.latents.to(self.device),
                        TextConditioning(batch.prompt_embeds.to(self.device), batch.pooled_embeds.to(self.device)),
                        time_ids, batch.streams, drawn.teacher_t.to(self.device), drawn.teacher_noise.to(self.device), step,
                        self.config.log.term_norms and log_window_ends(step, self.config.log.every, self.config.steps))

    def diffuse(self, latents: torch.Tensor, state: PairStep) -> torch.Tensor:
        alpha, sigma = self.discriminator_schedule.at(state.t, latents.ndim)
        return add_noise(latents, state.diffusion_noise, alpha, sigma)

    def discriminate(self, latents: torch.Tensor, state: PairStep, conditioning: TextConditioning,
                     twice_differentiable: bool = False) -> list[torch.Tensor]:
        """The bare discriminator (not the engine: R1's autograd.grad must not start the engine's reduction).
        `twice_differentiable`: attention through PyTorch's math kernel, the only one with a double backward (R1
        differentiates a gradient; the flash and memory-efficient kernels, CPU and CUDA, have none)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kwargs = conditioning.unet_kwargs(state.time_ids)
        with sdpa_kernel(SDPBackend.MATH) if twice_differentiable else contextlib.nullcontext():
            return self.discriminator.module(latents, state.t, state.noise, kwargs["encoder_hidden_states"],
                                             kwargs.get("added_cond_kwargs"))

    def ensemble_lpips(self, fake: torch.Tensor, target: torch.Tensor, state: PairStep) -> torch.Tensor:
        """E-LatentLPIPS per sample; each stream's rows get augmentations drawn from (seed, step, stream)."""
        parts = []
        for start, end, stream in stream_groups(state.streams):
            generator = step_generator(self.config.seed, state.step, stream, purpose=1)
            parts.append(self.lpips(fake[start:end], target[start:end], generator=generator))
        return torch.cat(parts)

    def generator_terms(self, state: PairStep) -> dict[str, torch.Tensor]:
        d2g = self.config.d2g
        t = torch.full((state.noise.shape[0],), self.timesteps[0], device=self.device, dtype=torch.long)
        alpha, sigma = self.student_schedule.at(t, state.noise.ndim)
        terms: dict[str, torch.Tensor] = {}
        with autocast(self.device, self.dtype):
            output = self.teacher.family.denoise(self.student.forward, state.noise.to(self.dtype),
                                                 self.student_schedule.model_time(t), state.conditioning,
                                                 state.time_ids, self.dtype)
            fake = predicted_x0(output.float(), state.noise, alpha, sigma, self.student_schedule.prediction_type)
            terms["loss/lpips"] = self.ensemble_lpips(fake.float(), state.target, state).mean()
            total = d2g.lpips_weight * terms["loss/lpips"]
            if d2g.adversarial:
                terms["loss/generator_adversarial"] = losses.nonsaturating_generator_loss(
                    self.discriminate(self.diffuse(fake.float(), state), state, state.conditioning))
                total = total + d2g.gan_weight * terms["loss/generator_adversarial"]
        weighted = {"lpips": d2g.lpips_weight * terms["loss/lpips"]}
        if d2g.adversarial:
            weighted["generator_adversarial"] = d2g.gan_weight * terms["loss/generator_adversarial"]
        terms.update({f"loss_weighted/{name}": value.detach() for name, value in weighted.items()})
        if state.measure:  # what each term pushes on the generator's output, in the same units
            terms.update({f"grad_norm/{name}": norm for name, norm in gradient_norms(weighted, fake).items()})
        terms["loss/generator_total"] = total
        state.fake = fake.detach().float()
        return terms

    def discriminator_terms(self, state: PairStep) -> dict[str, torch.Tensor]:
        d2g = self.config.d2g
        real_input = self.diffuse(state.target, state).detach().requires_grad_(d2g.r1_gamma > 0)
        fake_input = self.diffuse(state.fake, state).detach()
        with autocast(self.device, self.dtype):
            real = self.discriminate(real_input, state, state.conditioning, twice_differentiable=d2g.r1_gamma > 0)
            fake = self.discriminate(fake_input, state, state.conditioning)
            real_term, fake_term = losses.nonsaturating_discriminator_loss(real, fake)
            total = real_term + fake_term
            terms = {"loss/discriminator_real": real_term, "loss/discriminator_fake": fake_term}
            partner, usable = self.mismatched(state.streams)
            if d2g.text_mismatch_weight > 0 and usable.any():
                other = TextConditioning(state.conditioning.hidden_states[partner], state.conditioning.pooled[partner])
                logits = self.discriminate(real_input.detach(), state, other)
                keep = usable.to(self.device)
                terms["loss/discriminator_mismatch"] = losses.nonsaturating_fake_loss([l[keep] for l in logits])
                total = total + d2g.text_mismatch_weight * terms["loss/discriminator_mismatch"]
        r1 = losses.input_r1_penalty(real, real_input) if d2g.r1_gamma > 0 else total.new_zeros(())
        if "loss/discriminator_mismatch" in terms:
            terms["loss_weighted/discriminator_mismatch"] = (d2g.text_mismatch_weight
                                                             * terms["loss/discriminator_mismatch"]).detach()
        terms.update({"loss/r1": r1, "loss_weighted/r1": (d2g.r1_gamma * r1).detach(),
                      "loss_weighted/r1_share": (d2g.r1_gamma * r1 / (real_term + fake_term).clamp(min=1e-12)).detach(),
                      "loss/discriminator_total": total + d2g.r1_gamma * r1,
                      "logits/real": torch.stack([l.mean() for l in real]).mean().detach(),
                      "logits/fake": torch.stack([l.mean() for l in fake]).mean().detach()})
        return terms

    @staticmethod
    def mismatched(streams: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """For the text-alignment term: each row's partner is the next row of its own stream (wrapping), so the
        pairing is the same on any rank layout; a stream with one row here has no partner (usable False)."""
        partner, usable = torch.arange(len(streams)), torch.zeros(len(streams), dtype=torch.bool)
        for start, end, _ in stream_groups(streams):
            if end - start > 1:
                partner[start:end] = torch.arange(start, end).roll(-1)
                usable[start:end] = True
        return partner, usable

    # ---- outputs ----------------------------------------------------------------------------------------
    def sample_grid(self, path: Path, step: int) -> Optional[Path]:
        """One row: the one-step generator on the configured prompts."""
        module = self.student.module
        was_training = module.training
        module.eval()
        with autocast(self.device, self.dtype):
            images = generate(module, self.teacher, self.student_schedule, list(self.config.log.sample_prompts),
                              self.timesteps, seed=self.config.seed, resolution=self.config.data.resolution,
                              device=self.device)
        module.train(was_training)
        if not distributed.is_main():
            return None
        return save_grid(images.float().cpu(), path, 1)

    def export(self, out_dir: Path) -> Path:
        """A one-step diffusers pipeline (timesteps [T]), loadable and sampled like an ADD student."""
        return export_student(self.student.full_state_dict(), self.student.module.config, self.teacher, out_dir,
                              self.student_prediction, self.student_zero_snr, self.timesteps)

    @staticmethod
    def describe_placement(config, placement: dict[str, str]) -> dict[str, str]:
        found = {"student": placement["student"]}
        if config.d2g.adversarial:  # a whole UNet encoder, placed as the backend places ADD's heads
            found["discriminator (UNet encoder)"] = placement["discriminator heads"]
        found["teacher UNet"] = "none in training: the generator and the discriminator start as copies; the pairs replace it"
        found["VAE, text encoders, LatentLPIPS"] = "replicated on every rank (frozen)"
        return found

    @staticmethod
    def describe_plan(config) -> dict[str, str]:
        d2g = config.d2g
        phases = "generator (student) every step"
        if d2g.adversarial:
            phases += f", discriminator (teacher UNet encoder) every {config.optim.discriminator_interval} step(s)"
        return {"method": "diffusion2gan: one-step conditional GAN on ODE pairs (E-LatentLPIPS + GAN)", "phases": phases,
                "student": f"trainable: a copy of {config.model.student_init or 'the teacher UNet'}, run once at t = T",
                "discriminator": ("trainable: the teacher UNet's down and mid blocks, conditioned on z and the text, "
                                  f"noised to t in {list(d2g.discriminator_t)}" if d2g.adversarial
                                  else "none (regression only)"),
                "loss": (f"{d2g.lpips_weight} x E-LatentLPIPS[{d2g.augment or 'no augmentation'}] ({d2g.lpips})"
                         + (f" + {d2g.gan_weight} x GAN, text mismatch {d2g.text_mismatch_weight}, "
                            f"R1 gamma {d2g.r1_gamma}" if d2g.adversarial else "")),
                "teacher": f"{config.model.teacher}: its ODE pairs are the data; VAE and text encoders for samples"}
