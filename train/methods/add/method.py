"""Adversarial Diffusion Distillation as a method: a generator phase and a discriminator phase per step.

Generator phase: noise real latents (or, with backward simulation, the sampler's own earlier x0) to a student
timestep s, predict x0, decode it, and minimise L_adv + lambda * L_distill with the teacher's stop-gradient
denoised re-noised sample as the target. Discriminator phase: hinge loss on real against the same (detached)
fakes, plus gamma * R1 on the real features each head consumed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from addpipe.devices import autocast
from addpipe.train import distributed, losses
from addpipe.train.backends import Backend, OptimizerSettings, Trained
from addpipe.train.data import Batch
from addpipe.train.methods.add.config import ADDConfig
from addpipe.train.methods.add.augment import augment, draw, parse_policy
from addpipe.train.diagnostics import gradient_norms, log_window_ends
from addpipe.train.methods.add.discriminator import build_discriminator
from addpipe.train.export import export_lora_student, export_student
from addpipe.train.methods.add.memory import plan_add
from addpipe.train.lora import AdaptersOff, add_adapters, describe as describe_lora
from addpipe.train.methods.base import Method, Phase
from addpipe.train.models import (TextConditioning, TextEmbedder, encode_prompts, load_teacher, make_student, unconditional,
                                  vae_decode, vae_encode)
from addpipe.train.report import report
from addpipe.train.sampling import generate, sample_trajectory, save_grid, vae_downsample_factor
from addpipe.train.schedule import (add_noise, draw_training_noise, pipeline_schedule, predicted_eps, predicted_x0,
                                    schedule_from_config, student_parameterisation, student_timesteps, trained_subset,
                                    warmup_factor)


@dataclass
class StepInputs:
    """Everything the two phases share for one batch. The student's input is noised from `sources`: the real
    latents, or with backward simulation partly the student's own earlier outputs; `source_embedding` is the
    image condition c_img of those sources, which the discriminator pairs with the fakes."""

    latents: torch.Tensor
    pixels: torch.Tensor
    conditioning: TextConditioning
    time_ids: Optional[torch.Tensor]
    image_embedding: torch.Tensor
    streams: list[int]
    text_embedding: Optional[torch.Tensor] = None  # c_text from discriminator.text_encoder, when it names one
    sources: Optional[torch.Tensor] = None
    source_embedding: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        self.sources = self.latents if self.sources is None else self.sources
        self.source_embedding = self.image_embedding if self.source_embedding is None else self.source_embedding


@dataclass
class StepState:
    inputs: StepInputs
    noise: Any
    step: int = 0
    measure: bool = False  # the last step of a log window: measure each term's gradient norm (log.term_norms)
    fake_pixels: Optional[torch.Tensor] = None  # the generator phase's decoded fakes, detached, for the discriminator


REAL, FAKE = 11, 12
"""Purposes of the (seed, step, stream) draws of the discriminator's augmentations of real and generated images."""


class ADD(Method):
    name = "add"
    config_class = ADDConfig
    memory_plan = staticmethod(plan_add)

    # ---- models -----------------------------------------------------------------------------------------
    def build(self, backend: Backend) -> dict[str, Trained]:
        config, device, dtype = self.config, self.device, self.dtype
        self.teacher = load_teacher(config.model, dtype=dtype)
        lora = config.student.lora
        if lora.enabled and not self.teacher.family.lora:
            raise ValueError(f"student.lora: LoRA students are not supported for {self.teacher.family.name} teachers "
                             "yet; train the full student (unset student.lora.enabled)")
        if lora.enabled:  # one UNet: the teacher's, adapted; the backend below places it as the student
            student = self.teacher.unet
            trainable = add_adapters(student, lora)
            for parameter in trainable:  # fp32 adapters over a bf16 base: the optimizer steps fp32 weights
                parameter.data = parameter.data.float()
            student.train()
            if config.model.gradient_checkpointing is True:
                student.enable_gradient_checkpointing()
        else:
            student = make_student(self.teacher, config.model)
            trainable = [p for p in student.parameters() if p.requires_grad]
        for module in self.teacher.frozen_modules():
            if module is not student:
                module.to(device)
        if device.type == "cuda":  # the frozen VAE's convolutions run faster in channels-last on tensor cores
            self.teacher.vae.to(memory_format=torch.channels_last)
        if config.model.gradient_checkpointing is True:
            # The student's x0 is decoded with gradients (pixel-space losses): at 512^2 and up the VAE decoder's
            # activations outweigh the student's own, so it recomputes them too.
            self.teacher.vae.enable_gradient_checkpointing()
        if not lora.enabled:
            self.teacher_unet = backend.place_frozen(self.teacher.unet, shard=config.model.frozen_placement == "partition")

        scheduler_config = self.teacher.scheduler_config
        self.teacher_schedule = pipeline_schedule(scheduler_config).to(device)
        if config.distill.t_max >= self.teacher_schedule.num_train_timesteps:
            raise ValueError(f"distill.t_max={config.distill.t_max} is past the teacher's last timestep "
                             f"{self.teacher_schedule.num_train_timesteps - 1}")
        if config.distill.weighting == "nfsd" and self.teacher_schedule.alphas[config.distill.t_max].item() == 0.0:
            raise ValueError(f"distill.t_max={config.distill.t_max} is pure noise for this zero-terminal-SNR teacher, where "
                             "NFSD's target x0 - (sigma/alpha) g is infinite: lower distill.t_max or use another weighting")
        self.student_prediction, self.student_zero_snr = student_parameterisation(config.student, scheduler_config)
        self.student_schedule = schedule_from_config(
            scheduler_config, self.student_zero_snr, self.student_prediction).to(device)
        num_train = self.student_schedule.num_train_timesteps
        self.timesteps = list(config.student.timesteps) or student_timesteps(config.student.num_timesteps, num_train)
        if self.timesteps[0] != num_train - 1:
            raise ValueError(f"the first student timestep must be {num_train - 1} (pure noise), got {self.timesteps}")

        self.text_embedder = (TextEmbedder(config.discriminator.text_encoder, device)
                              if config.discriminator.text_encoder and config.discriminator.text_conditioning else None)
        text_dim = (self.text_embedder.dim if self.text_embedder is not None
                    else self.teacher.text_embedding_dim(config.discriminator.text_embedding))
        discriminator = build_discriminator(config.discriminator, text_dim, dtype=torch.float32)
        discriminator.to(device)
        heads = list(discriminator.heads.parameters())

        optim = config.optim
        schedule = lambda step: warmup_factor(step, optim.warmup_steps)  # noqa: E731 - a function of the step
        self.student = backend.wrap("student", student, trainable,
                                    OptimizerSettings(optim.student_lr, optim.student_betas, optim.weight_decay, schedule,
                                                      optim.gradient_clipping), shard=True)
        self.discriminator = backend.wrap("discriminator", discriminator, heads,
                                          OptimizerSettings(optim.discriminator_lr, optim.discriminator_betas,
                                                            optim.weight_decay, schedule, optim.gradient_clipping), shard=False)
        self.heads = self.discriminator.trainable
        if lora.enabled:  # the teacher is the wrapped student's module with the adapters off
            self.teacher_unet = AdaptersOff(self.student.module)

        with torch.no_grad():
            self.empty = unconditional(self.teacher, device)
            self.negative = encode_prompts(self.teacher, [config.distill.nfsd_negative_prompt], device)
        latent_size = config.data.resolution // vae_downsample_factor(self.teacher)
        self.latent_shape = (self.teacher.vae.config.latent_channels, latent_size, latent_size)
        self.precomputed_batches = 0
        return {"student": self.student, "discriminator": self.discriminator}

    def optimizer_settings(self) -> dict[str, OptimizerSettings]:
        """What each trained model's optimizer is configured with now (a resume puts these in)."""
        optim = self.config.optim
        schedule = lambda step: warmup_factor(step, optim.warmup_steps)  # noqa: E731
        return {"student": OptimizerSettings(optim.student_lr, optim.student_betas, optim.weight_decay, schedule,
                                             optim.gradient_clipping),
                "discriminator": OptimizerSettings(optim.discriminator_lr, optim.discriminator_betas, optim.weight_decay,
                                                   schedule, optim.gradient_clipping)}

    def data_signature(self) -> Optional[dict[str, Any]]:
        from addpipe.train.encode import encoding_signature  # the one definition both sides compare

        data = self.config.data
        return encoding_signature(self.config) if data.use_precomputed and not data.random_crop else None

    def phases(self) -> list[Phase]:
        found = [Phase("generator", "student", self.generator_terms, "loss/generator_total")]
        if self.config.distill.adversarial:
            found.append(Phase("discriminator", "discriminator", self.discriminator_terms, "loss/discriminator_total",
                               self.config.optim.discriminator_interval))
        return found

    # ---- one step ---------------------------------------------------------------------------------------
    def begin_step(self, batch: Batch, step: int) -> StepState:
        inputs = self.prepare(batch)
        noise = draw_training_noise(self.config.seed, step, inputs.streams, self.latent_shape, len(self.timesteps),
                                    self.config.distill.t_min, self.config.distill.t_max, self.config.student.timestep_weights)
        report("data/precomputed_batches", self.precomputed_batches)
        measure = self.config.log.term_norms and log_window_ends(step, self.config.log.every, self.config.steps)
        return StepState(self.blind_image_condition(self.simulate(inputs, noise), noise), noise, step, measure)

    def augmented(self, images: torch.Tensor, state: StepState, purpose: int) -> torch.Tensor:
        """The discriminator's view of `images`: DiffAugment as discriminator.augment says, drawn per sample from
        (seed, step, stream)."""
        policies = parse_policy(self.config.discriminator.augment)
        if not policies:
            return images
        return augment(images, policies, draw(self.config.seed, state.step, state.inputs.streams, purpose))

    @torch.no_grad()
    def prepare(self, batch: Batch) -> StepInputs:
        pixels = batch.pixels.to(self.device)
        if batch.latents is not None:  # precomputed by `addpipe prep encode`
            latents = batch.latents.to(self.device)
            conditioning = TextConditioning(batch.prompt_embeds.to(self.device), batch.pooled_embeds.to(self.device))
            self.precomputed_batches += 1
        else:
            with autocast(self.device, self.dtype):
                latents = vae_encode(self.teacher, pixels)
                conditioning = encode_prompts(self.teacher, batch.captions, self.device)
        time_ids = self.teacher.family.micro_conditioning(len(batch.captions), self.config.data.resolution,
                                                          batch.original_sizes, batch.crops)
        time_ids = None if time_ids is None else time_ids.to(self.device)
        image_embedding = self.discriminator.module.image_embedding(pixels)
        text_embedding = self.text_embedder(batch.captions) if self.text_embedder is not None else None
        return StepInputs(latents, pixels, conditioning, time_ids, image_embedding, batch.streams, text_embedding)

    def text_condition(self, inputs: StepInputs) -> torch.Tensor:
        if inputs.text_embedding is not None:
            return inputs.text_embedding
        return inputs.conditioning.discriminator_embedding(self.config.discriminator.text_embedding)

    @torch.no_grad()
    def simulate(self, inputs: StepInputs, noise) -> StepInputs:
        """Backward simulation: for the chosen samples at a later student timestep tau_k, the source is the x0
        the sampler itself reaches after k student steps from pure noise, so training sees what inference
        feeds the student (its own re-noised output), not only noised real images."""
        share = self.config.student.backward_simulation
        if share <= 0 or len(self.timesteps) == 1:
            return inputs
        # The choice is made on the CPU, where the step's noise is drawn: deciding on the device would make the
        # host wait for it every step.
        index = noise.student_index
        chosen = (index > 0) & (noise.simulate < share)
        # A sharded student gathers parameters in every forward, collectively, so every rank must run the same
        # number of them: there each rank runs all N-1 steps on its whole batch; elsewhere (and alone) only what
        # the chosen rows need.
        fixed = self.student.shards_parameters and distributed.world_size() > 1
        if not fixed and not bool(chosen.any()):
            return inputs
        run_cpu = torch.arange(index.shape[0]) if fixed else chosen.nonzero().squeeze(1)
        depth = len(self.timesteps) - 1 if fixed else int(index[run_cpu].max())
        run = run_cpu.to(self.device)
        index = index.to(self.device)
        start_noise = noise.simulation_noise.to(self.device)[run]
        time_ids = None if inputs.time_ids is None else inputs.time_ids[run]
        with autocast(self.device, self.dtype):
            denoiser = self.teacher.family.denoiser(self.student.module, inputs.conditioning.select(run), time_ids)
            trajectory = sample_trajectory(denoiser, self.student_schedule, start_noise[:, 0], self.timesteps[:depth],
                                           lambda step: start_noise[:, step + 1])
        reached = torch.stack(trajectory)[(index[run] - 1).clamp(min=0), torch.arange(run.shape[0], device=self.device)]
        keep = chosen[run_cpu].nonzero().squeeze(1)  # positions in `run` of the chosen rows (all of them unless fixed)
        rows, reached = run_cpu[keep].to(self.device), reached[keep.to(self.device)]
        sources, embedding = inputs.sources.clone(), inputs.source_embedding.clone()
        sources[rows] = reached.to(sources.dtype)
        if keep.numel() and self.config.discriminator.image_conditioning:
            with autocast(self.device, self.dtype):
                pixels = vae_decode(self.teacher, reached).clamp(-1.0, 1.0)
            embedding[rows] = self.discriminator.module.image_embedding(pixels).to(embedding.dtype)
        return replace(inputs, sources=sources, source_embedding=embedding)

    def blind_image_condition(self, inputs: StepInputs, noise) -> StepInputs:
        """With discriminator.image_condition_pure_noise off: a zero c_img, for the real and the fake image alike,
        on the samples whose student input carried no signal of x_0 (alpha_s = 0)."""
        if self.config.discriminator.image_condition_pure_noise or not self.config.discriminator.image_conditioning:
            return inputs
        timesteps = torch.tensor(self.timesteps, device=self.device)[noise.student_index.to(self.device)]
        alpha, _ = self.student_schedule.at(timesteps, 2)
        keep = (alpha > 0).to(inputs.image_embedding.dtype)
        return replace(inputs, image_embedding=inputs.image_embedding * keep, source_embedding=inputs.source_embedding * keep)

    def teacher_target(self, x0_student: torch.Tensor, inputs: StepInputs, teacher_t: torch.Tensor,
                       teacher_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stop-gradient target x_psi and the weight c(t) (docs/method.md, the distillation loss)."""
        cfg = self.config.distill
        alpha, sigma = self.teacher_schedule.at(teacher_t, x0_student.ndim)
        x_t = add_noise(x0_student.detach(), teacher_noise, alpha, sigma)
        n = x_t.shape[0]
        branches = [inputs.conditioning]
        if cfg.weighting == "nfsd" or cfg.teacher_guidance != 1.0:
            branches.append(self.empty.select([0] * n))
        if cfg.weighting == "nfsd":
            branches.append(self.negative.select([0] * n))
        conditioning = TextConditioning.cat(branches)
        time_ids = None if inputs.time_ids is None else inputs.time_ids.repeat(len(branches), 1)
        k = len(branches)
        with torch.no_grad(), autocast(self.device, self.dtype):
            output = self.teacher.family.denoise(self.teacher_unet, x_t.repeat(k, 1, 1, 1),
                                                 self.teacher_schedule.model_time(teacher_t).repeat(k),
                                                 conditioning, time_ids).float()
            prediction = self.teacher_schedule.prediction_type
            if cfg.weighting == "nfsd":
                eps = [predicted_eps(branch, x_t, alpha, sigma, prediction) for branch in output.chunk(k)]
                target = losses.nfsd_target(x0_student.detach(), alpha, sigma, teacher_t, eps[0], eps[1], eps[2],
                                            cfg.teacher_guidance, cfg.nfsd_t_threshold)
            else:
                # Guidance on x0 rather than eps: the same target wherever alpha > 0 (x0 is affine in eps),
                # and still finite near alpha = 0 for a zero-terminal-SNR v-prediction teacher.
                x0 = [predicted_x0(branch, x_t, alpha, sigma, prediction) for branch in output.chunk(k)]
                target = losses.classifier_free_guidance(x0[1], x0[0], cfg.teacher_guidance) if k > 1 else x0[0]
        return target, losses.distillation_weight(cfg.weighting, alpha, sigma)

    def generator_terms(self, state: StepState) -> dict[str, torch.Tensor]:
        cfg, inputs, noise = self.config.distill, state.inputs, state.noise
        timesteps = torch.tensor(self.timesteps, device=self.device)[noise.student_index.to(self.device)]
        alpha, sigma = self.student_schedule.at(timesteps, inputs.latents.ndim)
        x_s = add_noise(inputs.sources, noise.noise.to(self.device), alpha, sigma)
        terms: dict[str, torch.Tensor] = {}
        with autocast(self.device, self.dtype):
            # In bf16 DeepSpeed holds the student in bf16 and, on CUDA, turns torch.autocast off inside the engine's
            # forward (it follows only its own `torch_autocast` setting): the inputs must arrive in the weights' dtype.
            output = self.teacher.family.denoise(self.student.forward, x_s.to(self.dtype),
                                                 self.student_schedule.model_time(timesteps), inputs.conditioning,
                                                 inputs.time_ids, self.dtype)
            x0 = predicted_x0(output.float(), x_s, alpha, sigma, self.student_schedule.prediction_type)
            need_pixels = cfg.adversarial or cfg.resolved_space == "pixel"
            fake_pixels = vae_decode(self.teacher, x0) if need_pixels else None
            total = x0.new_zeros(())
            if cfg.adversarial:
                # The bare heads, not the engine: under ZeRO-1/2 the engine's forward must not see this pass.
                discriminator = self.discriminator.module
                logits = discriminator(discriminator.features(self.augmented(fake_pixels, state, FAKE)),
                                       self.text_condition(inputs), inputs.source_embedding)
                terms["loss/generator_adversarial"] = losses.generator_adversarial_loss(logits)
                total = total + terms["loss/generator_adversarial"]
            if cfg.distillation:
                target, weight = self.teacher_target(x0, inputs, noise.teacher_t.to(self.device),
                                                     noise.teacher_noise.to(self.device))
                if cfg.resolved_space == "pixel":
                    with torch.no_grad():
                        target = vae_decode(self.teacher, target)
                    terms["loss/distillation"] = losses.distillation_loss(fake_pixels, target, weight)
                else:
                    terms["loss/distillation"] = losses.distillation_loss(x0, target, weight)
                total = total + cfg.weight * terms["loss/distillation"]
        weighted = {"generator_adversarial": terms.get("loss/generator_adversarial"),
                    "distillation": cfg.weight * terms["loss/distillation"] if cfg.distillation else None}
        weighted = {name: value for name, value in weighted.items() if value is not None}
        terms.update({f"loss_weighted/{name}": value.detach() for name, value in weighted.items()})
        if state.measure:  # what each term pushes on the student's x0, in the same units
            terms.update({f"grad_norm/{name}": norm for name, norm in gradient_norms(weighted, x0).items()})
        terms["loss/generator_total"] = total
        state.fake_pixels = None if fake_pixels is None else fake_pixels.detach()
        return terms

    def discriminator_terms(self, state: StepState) -> dict[str, torch.Tensor]:
        inputs, module = state.inputs, self.discriminator.module
        with torch.no_grad():
            real_features = module.features(self.augmented(inputs.pixels, state, REAL))
            fake_features = module.features(self.augmented(state.fake_pixels, state, FAKE))
        real_inputs = [f.detach().requires_grad_(True) for f in real_features]
        text = self.text_condition(inputs)
        # The bare heads, not the engine: the engine hooks its outputs to start gradient reduction on any
        # backward, and R1's autograd.grad is a backward that must not trigger it.
        real_logits = module(real_inputs, text, inputs.image_embedding)
        fake_logits = module(fake_features, text, inputs.source_embedding)
        hinge = losses.discriminator_hinge_loss(real_logits, fake_logits)
        gamma, normalise = self.config.discriminator.r1_gamma, self.config.discriminator.r1_normalise
        measure_r1 = gamma > 0 or state.measure
        r1 = (losses.r1_penalty(real_logits, real_inputs, normalise=normalise, create_graph=gamma > 0) if measure_r1
              else real_logits[0].new_zeros(()))
        terms = {"loss/discriminator_total": hinge["real"] + hinge["fake"] + gamma * r1,
                 "loss/discriminator_real": hinge["real"], "loss/discriminator_fake": hinge["fake"], "loss/r1": r1.detach(),
                 "loss_weighted/r1": (gamma * r1).detach(),
                 "loss_weighted/r1_share": (gamma * r1 / (hinge["real"] + hinge["fake"]).clamp(min=1e-12)).detach(),
                 "logits/real": torch.stack([l.mean() for l in real_logits]).sum().detach(),
                 "logits/fake": torch.stack([l.mean() for l in fake_logits]).sum().detach()}
        if state.measure:
            # The heads' gradient at their input features, in R1's units (R1 = norm^2 / 2), on real and on generated
            # features: how sharply the heads react where R1 acts, and where it does not.
            fake_inputs = [f.detach().requires_grad_(True) for f in fake_features]
            fake_r1 = losses.r1_penalty(module(fake_inputs, text, inputs.source_embedding), fake_inputs,
                                        normalise=normalise, create_graph=False)
            terms["grad_norm/heads_at_real_features"] = (2 * r1.detach()).sqrt()
            terms["grad_norm/heads_at_fake_features"] = (2 * fake_r1).sqrt()
        return terms

    # ---- outputs ----------------------------------------------------------------------------------------
    def sample_grid(self, path: Path, step: int) -> Optional[Path]:
        """Rows: 1, 2 and 4 steps, those with a subset of the trained timesteps; columns: the configured prompts."""
        prompts = list(self.config.log.sample_prompts)
        step_counts = [k for k in (1, 2, 4) if k <= len(self.timesteps) and len(self.timesteps) % k == 0]
        module = self.student.module
        was_training = module.training
        module.eval()
        rows = []
        for count in step_counts:
            with autocast(self.device, self.dtype):
                rows.append(generate(module, self.teacher, self.student_schedule, prompts,
                                     trained_subset(self.timesteps, count),
                                     seed=self.config.seed, resolution=self.config.data.resolution, device=self.device))
        module.train(was_training)
        if not distributed.is_main():
            return None
        return save_grid(torch.cat(rows).float().cpu(), path, len(rows))

    def export(self, out_dir: Path) -> Path:
        """The student as a diffusers pipeline in `out_dir`; a LoRA student also (or, with export_fused off, only)
        as a diffusers LoRA in `<out_dir>_lora` (student -> student_lora, student_raw -> student_lora_raw)."""
        state = self.student.full_state_dict()
        parameterisation = (self.student_prediction, self.student_zero_snr, self.timesteps)
        lora = self.config.student.lora
        if not lora.enabled:
            return export_student(state, self.student.module.config, self.teacher, out_dir, *parameterisation)
        lora_dir = Path(out_dir).with_name(Path(out_dir).name.replace("student", "student_lora", 1))
        return export_lora_student(state, self.student.module.config, lora, self.teacher, lora_dir,
                                   out_dir if lora.export_fused else None, *parameterisation)

    @staticmethod
    def describe_placement(config, placement: dict[str, str]) -> dict[str, str]:
        if config.student.lora.enabled and "frozen teacher UNet" in placement:  # no second UNet to place
            placement["frozen teacher UNet"] = "none: the student's UNet with its adapters off"
        return placement

    @staticmethod
    def describe_plan(config) -> dict[str, str]:
        phases = "generator (student) every step"
        if config.distill.adversarial:
            phases += f", discriminator (heads) every {config.optim.discriminator_interval} step(s)"
        return {"method": "add: Adversarial Diffusion Distillation", "phases": phases,
                "student": (f"trainable: {describe_lora(config.student.lora)}" if config.student.lora.enabled else
                            f"trainable: a copy of {config.model.student_init or 'the teacher UNet'}"),
                "discriminator": (f"trainable heads ({config.discriminator.num_heads}) on frozen "
                                  f"{config.discriminator.feature_network}; c_img from "
                                  f"{config.discriminator.image_encoder or config.discriminator.feature_network}; c_text from "
                                  f"{config.discriminator.text_encoder or 'the teacher (' + config.discriminator.text_embedding + ')'}"),
                "teacher": f"frozen: {config.model.teacher} (UNet, VAE, text encoders)" + (
                    "; its UNet is the student's base" if config.student.lora.enabled else "")}
