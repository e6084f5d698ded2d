"""The ADD training loop: a generator phase and a discriminator phase per step (StyleGAN-T style).

Generator phase: noise real latents to a student timestep s, predict x0, decode it, and minimise
L_adv + lambda * L_distill with the teacher's (stop-gradient) denoised re-noised sample as the target.
Discriminator phase: hinge loss on real vs the same (detached) fakes, plus gamma * R1 on the real
features each head consumed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from tqdm.auto import tqdm

from addpipe.config import differences, to_dict, to_yaml
from addpipe.devices import autocast, resolve_precision
from addpipe.train import checkpoint, distributed, engines, losses, rundir
from addpipe.train.config import TrainConfig
from addpipe.train.data import Batch, TrainingData
from addpipe.train.discriminator import build_discriminator
from addpipe.train.ema import EMA
from addpipe.train.export import export_student
from addpipe.train.models import (TextConditioning, encode_prompts, load_teacher, make_student,
                                  sdxl_time_ids, vae_decode, vae_encode)
from addpipe.train.report import Reporter, check_finite, report, use
from addpipe.train.sampling import generate, sample_trajectory, save_grid, vae_downsample_factor
from addpipe.train.schedule import (add_noise, draw_training_noise, pipeline_schedule, predicted_eps, predicted_x0,
                                    schedule_from_config, student_timesteps, warmup_factor)

logger = logging.getLogger(__name__)


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
    sources: Optional[torch.Tensor] = None
    source_embedding: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        self.sources = self.latents if self.sources is None else self.sources
        self.source_embedding = self.image_embedding if self.source_embedding is None else self.source_embedding


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False):
        self.config = config
        self.device = distributed.initialize(config.engine.backend)
        self.dtype = resolve_precision(config.engine.precision, self.device)
        self.run_dir = Path(config.run_dir)
        # One trainer per run directory, checked before anything is loaded or written; held until the process ends.
        self.lock = rundir.RunDirLock(self.run_dir).acquire() if distributed.is_main() else None
        distributed.barrier()
        torch.manual_seed(config.seed)  # identical head initialisation on every rank

        self.teacher = load_teacher(config.model, dtype=self.dtype)
        student = make_student(self.teacher, config.model)
        for module in self.teacher.frozen_modules():
            module.to(self.device)
        if config.model.gradient_checkpointing:
            # The student's x0 is decoded with gradients (pixel-space losses): at 512^2 and up the VAE decoder's
            # activations outweigh the student's own, so it recomputes them too.
            self.teacher.vae.enable_gradient_checkpointing()
        self.teacher_unet = self.teacher.unet
        if config.model.frozen_placement == "partition":
            self.teacher_unet = engines.partitioned_frozen(self.teacher.unet, config.data.batch_size, self.dtype)

        scheduler_config = self.teacher.scheduler_config
        self.teacher_schedule = pipeline_schedule(scheduler_config).to(self.device)
        if config.distill.t_max >= self.teacher_schedule.num_train_timesteps:
            raise ValueError(f"distill.t_max={config.distill.t_max} is past the teacher's last timestep "
                             f"{self.teacher_schedule.num_train_timesteps - 1}")
        if config.distill.weighting == "nfsd" and self.teacher_schedule.alphas[config.distill.t_max].item() == 0.0:
            raise ValueError(f"distill.t_max={config.distill.t_max} is pure noise for this zero-terminal-SNR teacher, where "
                             "NFSD's target x0 - (sigma/alpha) g is infinite: lower distill.t_max or use another weighting")
        self.student_schedule = schedule_from_config(
            scheduler_config, config.student.zero_terminal_snr, config.student.prediction_type).to(self.device)
        num_train = self.student_schedule.num_train_timesteps
        self.timesteps = list(config.student.timesteps) or student_timesteps(config.student.num_timesteps, num_train)
        if self.timesteps[0] != num_train - 1:
            raise ValueError(f"the first student timestep must be {num_train - 1} (pure noise), got {self.timesteps}")

        discriminator = build_discriminator(
            config.discriminator, self.teacher.text_embedding_dim(config.discriminator.text_embedding), dtype=torch.float32)
        discriminator.to(self.device)
        self.heads = [p for p in discriminator.heads.parameters()]

        optim = config.optim
        schedule = lambda step: warmup_factor(step, optim.warmup_steps)  # noqa: E731 - a function of the step
        engine = config.engine
        self.student = engines.build_engine(
            student, [p for p in student.parameters() if p.requires_grad], optim.student_lr, optim.student_betas,
            optim.weight_decay, schedule,
            engines.deepspeed_config(engine.zero, config.data.batch_size, optim.gradient_clipping, self.dtype,
                                     engine.offload_optimizer, engine.offload_param, engine.nvme_path))
        disc_zero = engine.discriminator_zero if engine.discriminator_zero is not None else min(engine.zero, 2)
        self.discriminator = engines.build_engine(
            discriminator, self.heads, optim.discriminator_lr, optim.discriminator_betas, optim.weight_decay, schedule,
            engines.deepspeed_config(disc_zero, config.data.batch_size, optim.gradient_clipping, torch.float32))
        self.ema = EMA(engines.local_tensors(self.student.module), optim.ema_decay) if optim.ema_decay > 0 else None

        self.step = 0
        self.last_checkpoint: Optional[Path] = None
        data_state, state = None, {}
        if resume:
            found = checkpoint.load_latest(self.run_dir, self.engines(), self.layout(), self.device)
            if found is None:
                logger.warning("--resume: no complete checkpoint in %s; starting from step 0", self.run_dir)
            else:
                self.last_checkpoint, state = found
                self.step, data_state = state["step"], state["data"]
                if self.ema is not None and state.get("ema") is not None:
                    self.ema.load_state_dict(state["ema"])
                self.apply_configured_optimizers(self.last_checkpoint)
                if distributed.is_main():
                    logger.info("resumed from %s at step %d", self.last_checkpoint, self.step)
        elif checkpoint.latest(self.run_dir) is not None:
            raise checkpoint.CheckpointError(
                f"{self.run_dir} already holds checkpoints (newest: {checkpoint.latest(self.run_dir).name}): pass --resume "
                "to continue that run, or give a new run_dir")
        from addpipe.train.encode import encoding_signature  # the one definition both sides compare

        signature = encoding_signature(config) if config.data.use_precomputed and not config.data.random_crop else None
        self.data = TrainingData(config.data, distributed.rank(), distributed.world_size(), data_state, signature)
        self.precomputed_batches = 0

        with torch.no_grad():
            self.empty = encode_prompts(self.teacher, [""], self.device)
            self.negative = encode_prompts(self.teacher, [config.distill.nfsd_negative_prompt], self.device)
        if distributed.is_main():  # only now: a refused start or resume leaves the recorded config as it was
            rundir.write_config(self.run_dir, to_yaml(config))
        self.reporter = Reporter(self.run_dir, config.log.tensorboard, start_step=self.step)
        if state.get("reporter") is not None:
            self.reporter.load_state_dict(state["reporter"])
        latent_size = config.data.resolution // vae_downsample_factor(self.teacher)
        self.latent_shape = (self.teacher.vae.config.latent_channels, latent_size, latent_size)

    def engines(self) -> dict[str, Any]:
        return {"student": self.student, "discriminator": self.discriminator}

    def layout(self) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it (besides the process count)."""
        engine = self.config.engine
        return {"engine.zero": engine.zero,
                "engine.discriminator_zero": engine.discriminator_zero if engine.discriminator_zero is not None else min(engine.zero, 2)}

    def apply_configured_optimizers(self, path: Path) -> None:
        """A resumed run trains with the optimizer settings of its config, not the checkpoint's: learning rates,
        betas and weight decay changed for the continuation take effect from the first resumed step."""
        optim = self.config.optim
        engines.set_hyperparameters(self.student, optim.student_lr, optim.student_betas, optim.weight_decay)
        engines.set_hyperparameters(self.discriminator, optim.discriminator_lr, optim.discriminator_betas, optim.weight_decay)
        saved = path / "config.yaml"
        if distributed.is_main() and saved.is_file():
            changed = differences(yaml.safe_load(saved.read_text()) or {}, to_dict(self.config))
            for key, before, after in changed:
                logger.warning("resume: %s changed since %s: %s -> %s; the new value is used", key, path.name, before, after)

    # ----------------------------------------------------------------------------------------------
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
        time_ids = None
        if self.teacher.architecture == "sdxl":
            time_ids = sdxl_time_ids(batch.original_sizes, batch.crops, self.config.data.resolution).to(self.device)
        image_embedding = self.discriminator.module.image_embedding(pixels)
        return StepInputs(latents, pixels, conditioning, time_ids, image_embedding, batch.streams)

    def text_condition(self, inputs: StepInputs) -> torch.Tensor:
        return inputs.conditioning.discriminator_embedding(self.config.discriminator.text_embedding)

    @torch.no_grad()
    def simulate(self, inputs: StepInputs, noise) -> StepInputs:
        """Backward simulation: for the chosen samples at a later student timestep tau_k, the source is the x0
        the sampler itself reaches after k student steps from pure noise, so training sees what inference
        feeds the student (its own re-noised output), not only noised real images."""
        share = self.config.student.backward_simulation
        if share <= 0 or len(self.timesteps) == 1:
            return inputs
        index = noise.student_index.to(self.device)
        chosen = (index > 0) & (noise.simulate.to(self.device) < share)
        # ZeRO-3 gathers parameters in every forward, collectively, so every rank must run the same number of
        # them: there each rank runs all N-1 steps on its whole batch; elsewhere only what the chosen rows need.
        fixed = self.config.engine.zero == 3
        if not fixed and not bool(chosen.any()):
            return inputs
        run = torch.arange(index.shape[0], device=self.device) if fixed else chosen.nonzero().squeeze(1)
        depth = len(self.timesteps) - 1 if fixed else int(index[run].max())
        start_noise = noise.simulation_noise.to(self.device)[run]
        time_ids = None if inputs.time_ids is None else inputs.time_ids[run]
        with autocast(self.device, self.dtype):
            trajectory = sample_trajectory(self.student.module, self.student_schedule,
                                           inputs.conditioning.select(run).unet_kwargs(time_ids), start_noise[:, 0],
                                           self.timesteps[:depth], lambda step: start_noise[:, step + 1])
        reached = torch.stack(trajectory)[(index[run] - 1).clamp(min=0), torch.arange(run.shape[0], device=self.device)]
        keep = chosen[run]
        rows, reached = run[keep], reached[keep]
        sources, embedding = inputs.sources.clone(), inputs.source_embedding.clone()
        sources[rows] = reached.to(sources.dtype)
        if rows.numel() and self.config.discriminator.image_conditioning:
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
        """The stop-gradient target x_psi and the weight c(t) (DESIGN §1.3)."""
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
            output = self.teacher_unet(x_t.repeat(k, 1, 1, 1), teacher_t.repeat(k), **conditioning.unet_kwargs(time_ids),
                                       return_dict=False)[0].float()
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

    def generator_phase(self, inputs: StepInputs, noise) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
        cfg = self.config.distill
        timesteps = torch.tensor(self.timesteps, device=self.device)[noise.student_index.to(self.device)]
        alpha, sigma = self.student_schedule.at(timesteps, inputs.latents.ndim)
        x_s = add_noise(inputs.sources, noise.noise.to(self.device), alpha, sigma)
        engines.set_requires_grad(self.heads, False)
        terms: dict[str, torch.Tensor] = {}
        with autocast(self.device, self.dtype):
            # In bf16 DeepSpeed holds the student in bf16 and, on CUDA, turns torch.autocast off inside the engine's
            # forward (it follows only its own `torch_autocast` setting): the inputs must arrive in the weights' dtype.
            output = self.student(x_s.to(self.dtype), timesteps,
                                  **inputs.conditioning.unet_kwargs(inputs.time_ids, self.dtype), return_dict=False)[0]
            x0 = predicted_x0(output.float(), x_s, alpha, sigma, self.student_schedule.prediction_type)
            need_pixels = cfg.adversarial or cfg.space == "pixel"
            fake_pixels = vae_decode(self.teacher, x0) if need_pixels else None
            total = x0.new_zeros(())
            if cfg.adversarial:
                # The heads are called through .module: under ZeRO-1/2 the engine's forward must not see this pass.
                logits = self.discriminator.module(self.discriminator.module.features(fake_pixels),
                                                   self.text_condition(inputs), inputs.source_embedding)
                terms["loss/generator_adversarial"] = losses.generator_adversarial_loss(logits)
                total = total + terms["loss/generator_adversarial"]
            if cfg.distillation:
                target, weight = self.teacher_target(x0, inputs, noise.teacher_t.to(self.device),
                                                     noise.teacher_noise.to(self.device))
                if cfg.space == "pixel":
                    with torch.no_grad():
                        target = vae_decode(self.teacher, target)
                    terms["loss/distillation"] = losses.distillation_loss(fake_pixels, target, weight)
                else:
                    terms["loss/distillation"] = losses.distillation_loss(x0, target, weight)
                total = total + cfg.weight * terms["loss/distillation"]
        terms["loss/generator_total"] = total
        self.student.backward(total)
        self.student.step()
        engines.set_requires_grad(self.heads, True)
        return terms, None if fake_pixels is None else fake_pixels.detach()

    def discriminator_phase(self, inputs: StepInputs, fake_pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        module = self.discriminator.module
        with torch.no_grad():
            real_features = module.features(inputs.pixels)
            fake_features = module.features(fake_pixels)
        real_inputs = [f.detach().requires_grad_(True) for f in real_features]
        text = self.text_condition(inputs)
        # Through .module, not the engine: the engine hooks its outputs to start gradient reduction on
        # any backward, and R1's autograd.grad is a backward that must not trigger it.
        real_logits = module(real_inputs, text, inputs.image_embedding)
        fake_logits = module(fake_features, text, inputs.source_embedding)
        hinge = losses.discriminator_hinge_loss(real_logits, fake_logits)
        gamma = self.config.discriminator.r1_gamma
        r1 = losses.r1_penalty(real_logits, real_inputs) if gamma > 0 else real_logits[0].new_zeros(())
        total = hinge["real"] + hinge["fake"] + gamma * r1
        self.discriminator.backward(total)
        self.discriminator.step()
        return {"loss/discriminator_real": hinge["real"], "loss/discriminator_fake": hinge["fake"], "loss/r1": r1,
                "logits/real": torch.stack([l.mean() for l in real_logits]).sum().detach(),
                "logits/fake": torch.stack([l.mean() for l in fake_logits]).sum().detach()}

    # ----------------------------------------------------------------------------------------------
    def save(self) -> Path:
        state = {"step": self.step, "data": self.data.state_dict(), "reporter": self.reporter.state_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else None}
        self.last_checkpoint = checkpoint.save(self.run_dir, self.step, self.engines(), state,
                                               self.config.checkpoint.keep_last, self.layout(), to_yaml(self.config))
        return self.last_checkpoint

    def sample_grid(self) -> Optional[Path]:
        """Rows: 1, 2 and 4 steps (those the student supports); columns: the configured prompts."""
        prompts = list(self.config.log.sample_prompts)
        step_counts = [k for k in (1, 2, 4) if k <= len(self.timesteps)]
        module = self.student.module
        was_training = module.training
        module.eval()
        rows = []
        for count in step_counts:
            with autocast(self.device, self.dtype):
                rows.append(generate(module, self.teacher, self.student_schedule, prompts,
                                     student_timesteps(count, self.student_schedule.num_train_timesteps),
                                     seed=self.config.seed, resolution=self.config.data.resolution, device=self.device))
        module.train(was_training)
        if not distributed.is_main():
            return None
        return save_grid(torch.cat(rows).float().cpu(), self.run_dir / "samples" / f"step_{self.step:08d}.png", len(rows))

    def export(self) -> Path:
        out = self.run_dir / "student"
        tensors = engines.local_tensors(self.student.module)
        use_ema = self.ema is not None and self.config.checkpoint.export_ema
        context = self.ema.applied(tensors) if use_ema else torch.no_grad()
        with context:
            export_student(self.student.module, self.teacher, out, self.config.student.prediction_type,
                           self.config.student.zero_terminal_snr, self.timesteps)
        return out

    def train_step(self) -> tuple[dict[str, torch.Tensor], int]:
        """One generator update and, on its interval, one discriminator update on the next batch.
        Returns the loss terms and how many images all ranks together trained on."""
        config = self.config
        inputs = self.prepare(next(self.data))
        noise = draw_training_noise(config.seed, self.step, inputs.streams, self.latent_shape, len(self.timesteps),
                                    config.distill.t_min, config.distill.t_max, config.student.timestep_weights)
        inputs = self.blind_image_condition(self.simulate(inputs, noise), noise)
        terms, fake_pixels = self.generator_phase(inputs, noise)
        if config.distill.adversarial and self.step % config.optim.discriminator_interval == 0:
            terms.update(self.discriminator_phase(inputs, fake_pixels))
        if self.ema is not None:
            self.ema.update(engines.local_tensors(self.student.module))
        self.step += 1
        check_finite(self.step, terms, self.device, self.last_checkpoint)
        return terms, inputs.latents.shape[0] * distributed.world_size()

    def run(self) -> Path:
        config = self.config
        use(self.reporter)
        progress = tqdm(total=config.steps, initial=self.step, desc="ADD", dynamic_ncols=True,
                        disable=not (distributed.is_main() and config.log.progress))
        try:
            while self.step < config.steps:
                started = time.perf_counter()
                terms, images = self.train_step()
                elapsed = time.perf_counter() - started
                for name, value in terms.items():
                    report(name, value)
                report("lr/student", engines.learning_rate(self.student))
                report("lr/discriminator", engines.learning_rate(self.discriminator))
                report("perf/images_per_second", images / elapsed)
                report("data/skipped_samples", self.data.skipped)
                report("data/precomputed_batches", self.precomputed_batches)
                if self.step % config.log.every == 0 or self.step == config.steps:
                    means = self.reporter.flush(self.step, self.device)
                    progress.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in means.items() if k.startswith("loss/")})
                progress.update(1)
                if config.log.sample_every and self.step % config.log.sample_every == 0:
                    self.sample_grid()
                if self.step % config.checkpoint.every == 0 and self.step < config.steps:
                    self.save()
            if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:08d}"):
                self.save()
            self.sample_grid()
            return self.export()
        finally:
            progress.close()
            self.close()

    def close(self) -> None:
        """Flush the logs and give the run directory back (a process that dies gives it back anyway)."""
        self.reporter.close()
        use(None)
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Run (or continue) an ADD training run; returns the exported student directory."""
    try:
        return Trainer(config, resume=resume).run()
    except OSError as error:
        if rundir.is_write_error(error):  # a full or read-only disk under a sample grid or the export
            raise rundir.RunDirError(rundir.describe_write_error(Path(error.filename or config.run_dir), error)) from None
        raise
