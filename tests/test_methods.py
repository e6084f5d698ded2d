"""The method seam: a second training method, defined here and nowhere else, runs through the unchanged loop on
both backends (checkpoints, resume and export included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from addpipe.config import load
from addpipe.train import distributed
from addpipe.train.backends import OptimizerSettings
from addpipe.train.config import TrainConfig
from addpipe.train.methods import Method, Phase, method_class, register
from addpipe.train.models import encode_prompts, load_teacher, make_student, vae_encode
from addpipe.train.schedule import add_noise, pipeline_schedule, predicted_x0
from conftest import TINY_CONFIG, tiny_overrides


@register
class DenoisingDistillation(Method):
    """From x_500 the student learns the x0 the teacher predicts from the same sample re-noised only to t = 250:
    a one-step distillation toward a less noisy teacher view, with no discriminator."""

    name = "toy-denoising-distillation"
    timestep, teacher_timestep = 500, 250

    def build(self, backend):
        self.teacher = load_teacher(self.config.model, dtype=self.dtype)
        for module in self.teacher.frozen_modules():
            module.to(self.device)
        student = make_student(self.teacher, self.config.model)
        self.schedule = pipeline_schedule(self.teacher.scheduler_config).to(self.device)
        self.student = backend.wrap("student", student, list(student.parameters()), self.optimizer_settings()["student"],
                                    shard=True)
        return {"student": self.student}

    def optimizer_settings(self):
        optim = self.config.optim
        return {"student": OptimizerSettings(optim.student_lr, optim.student_betas, optim.weight_decay, lambda step: 1.0,
                                             optim.gradient_clipping)}

    def phases(self):
        return [Phase("denoise", "student", self.terms, "loss/denoise")]

    @torch.no_grad()
    def begin_step(self, batch, step):
        latents = vae_encode(self.teacher, batch.pixels.to(self.device))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(step)).to(self.device)
        t = torch.full((latents.shape[0],), self.timestep, device=self.device)
        alpha, sigma = self.schedule.at(t, latents.ndim)
        x_t = add_noise(latents, noise, alpha, sigma)
        kwargs = encode_prompts(self.teacher, batch.captions, self.device).unet_kwargs(None)
        t_teacher = torch.full_like(t, self.teacher_timestep)
        alpha_teacher, sigma_teacher = self.schedule.at(t_teacher, latents.ndim)
        x_teacher = add_noise(latents, noise, alpha_teacher, sigma_teacher)
        target = predicted_x0(self.teacher.unet(x_teacher, t_teacher, **kwargs, return_dict=False)[0], x_teacher,
                              alpha_teacher, sigma_teacher, self.schedule.prediction_type)
        return {"x_t": x_t, "t": t, "kwargs": kwargs, "alpha": alpha, "sigma": sigma, "target": target}

    def terms(self, state):
        output = self.student.forward(state["x_t"], state["t"], **state["kwargs"], return_dict=False)[0]
        x0 = predicted_x0(output, state["x_t"], state["alpha"], state["sigma"], self.schedule.prediction_type)
        return {"loss/denoise": torch.nn.functional.mse_loss(x0, state["target"])}

    def export(self, out_dir: Path) -> Path:
        state = self.student.full_state_dict()
        if distributed.is_main():
            out_dir.mkdir(parents=True, exist_ok=True)
            torch.save(state, out_dir / "student.pt")
        distributed.barrier()
        return out_dir


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp2"])
def test_a_method_defined_outside_the_trainer_runs_through_the_unchanged_loop(backend, tiny_sd, tiny_dino, digit_shards,
                                                                               tmp_path):
    from addpipe.train.loop import Trainer, train

    assert method_class("toy-denoising-distillation") is DenoisingDistillation

    def config(steps):
        return load(TrainConfig, TINY_CONFIG, tiny_overrides(
            tiny_sd, tiny_dino, digit_shards, tmp_path, steps=steps,
            **{"method": "toy-denoising-distillation", "engine.backend": backend, "optim.student_lr": 1e-3,
               "checkpoint.every": 2, "optim.ema_decay": 0.5}))

    trainer = Trainer(config(2))
    before = {k: v.clone() for k, v in trainer.models["student"].full_state_dict().items()}
    assert list(trainer.models) == ["student"] and [p.name for p in trainer.phases] == ["denoise"]
    trainer.run()
    out = train(config(4), resume=True)  # the generic checkpoint and resume carry a method they never heard of
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert all(set(line) >= {"loss/denoise", "lr/student"} for line in lines)
    assert lines[-1]["loss/denoise"] < lines[0]["loss/denoise"]  # it learns
    after = torch.load(out / "student.pt")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "checkpoints" / "step_00000004" / "COMPLETE").is_file()


def test_an_unknown_method_names_the_known_ones(tiny_sd, tiny_dino, digit_shards, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'nope': one of .*add"):
        method_class("nope")
