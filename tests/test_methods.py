"""The method seam: a method defined here and nowhere else, with its own config section, memory plan, dry-run
description and export, is loaded by `method:` and runs through the unchanged loop on both backends (checkpoints,
resume and export included), without an edit to any file under train/."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import yaml

from addpipe.config import ConfigError, load
from addpipe.train import distributed
from addpipe.train.backends import OptimizerSettings
from addpipe.train.config import TrainConfig
from addpipe.train.methods import Method, Phase, method_class, register
from addpipe.train.models import encode_prompts, load_teacher, make_student, vae_encode
from addpipe.train.schedule import add_noise, pipeline_schedule, predicted_x0
from conftest import TINY_CONFIG


@dataclass
class ToySection:
    timestep: int = 500
    """Where the student starts."""
    teacher_timestep: int = 250
    """The less noisy view the teacher predicts x0 from."""

    def __post_init__(self) -> None:
        if not 0 <= self.teacher_timestep < self.timestep:
            raise ValueError(f"toy.teacher_timestep must lie in [0, toy.timestep), got {self.teacher_timestep}")


@dataclass
class ToyConfig(TrainConfig):
    toy: ToySection = field(default_factory=ToySection)
    """The toy method's own section."""


def plan_toy(config, world_size, dtype):
    """The student UNet alone: the toy trains nothing else."""
    from diffusers import UNet2DConditionModel

    from addpipe.train.memory import MemoryPlan, count, meta, model_config, trained_state

    unet = meta(lambda: UNet2DConditionModel.from_config(model_config(UNet2DConditionModel, config.model.teacher, "unet")))
    plan = MemoryPlan(world_size, str(dtype).replace("torch.", ""))
    plan.lines.append(trained_state("toy student UNet (trained)", count(unet), config.engine, dtype, world_size, True,
                                    config.optim.ema_enabled))
    return plan


@register
class DenoisingDistillation(Method):
    """From x_t the student learns the x0 the teacher predicts from the same sample re-noised only to a smaller t:
    a one-step distillation toward a less noisy teacher view, with no discriminator."""

    name = "toy-denoising-distillation"
    config_class = ToyConfig
    memory_plan = staticmethod(plan_toy)

    @staticmethod
    def describe_plan(config):
        return {"method": f"toy: x_{config.toy.timestep} -> the teacher's x0 from x_{config.toy.teacher_timestep}"}

    @property
    def timestep(self):
        return self.config.toy.timestep

    @property
    def teacher_timestep(self):
        return self.config.toy.teacher_timestep

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


def toy_config(tiny_sd, digit_shards, run_dir: Path) -> Path:
    """configs/tiny.yaml's common sections with the toy's instead of ADD's."""
    data = yaml.safe_load(TINY_CONFIG.read_text())
    for section in ("discriminator", "distill"):
        data.pop(section)
    data.update({"method": "toy-denoising-distillation", "run_dir": str(run_dir), "toy": {"timestep": 500}})
    data["model"]["teacher"], data["data"]["shards"] = str(tiny_sd), str(digit_shards)
    data["log"].update({"tensorboard": False, "progress": False, "every": 1})
    path = run_dir.parent / "toy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_method_brings_its_config_section_memory_plan_and_dry_run(tiny_sd, digit_shards, tmp_path):
    from typer.testing import CliRunner

    from addpipe.pipeline.cli import app
    from addpipe.train.memory import plan_memory

    path = toy_config(tiny_sd, digit_shards, tmp_path / "run")
    config = load(TrainConfig, path, ["toy.teacher_timestep=100"])
    assert type(config) is ToyConfig and config.toy.teacher_timestep == 100 and not hasattr(config, "discriminator")
    with pytest.raises(ConfigError, match="toy.teacher_timestep must lie in"):  # its own bounds, named
        load(TrainConfig, path, ["toy.teacher_timestep=600"])
    with pytest.raises(ConfigError, match=r"unknown config key toy.nope.*\n.*timestep: Where the student starts"):
        load(TrainConfig, path, ["toy.nope=1"])
    with pytest.raises(ConfigError, match="section 'distill' belongs to method add; .* method: toy-denoising-distillation "
                                          r"\(its own sections: toy\)"):
        load(TrainConfig, path, ["distill.weight=1"])
    with pytest.raises(ConfigError, match="section 'toy' belongs to method toy-denoising-distillation"):
        load(TrainConfig, TINY_CONFIG, ["toy.timestep=400"])  # an ADD config

    plan = plan_memory(config, 1, torch.float32)
    assert [line.name for line in plan.lines] == ["toy student UNet (trained)"]
    result = CliRunner().invoke(app, ["train", "-c", str(path), "--dry-run", "--gpu-memory", "1"])
    assert result.exit_code == 0, result.output[-2000:]
    assert "# The toy method's own section." in result.stdout and "  timestep: 500" in result.stdout
    assert "# method: toy-denoising-distillation" in result.stdout and "toy: x_500 -> the teacher's x0 from x_250" in result.stdout
    assert "toy student UNet (trained)" in result.stdout and "fits 1 GiB" in result.stdout


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp2"])
def test_a_method_defined_outside_the_trainer_runs_through_the_unchanged_loop(backend, tiny_sd, digit_shards, tmp_path):
    from addpipe.train.loop import Trainer, train

    assert method_class("toy-denoising-distillation") is DenoisingDistillation
    path = toy_config(tiny_sd, digit_shards, tmp_path / "run")

    def config(steps):
        return load(TrainConfig, path, [f"steps={steps}", f"engine.backend={backend}", "optim.student_lr=1e-3",
                                        "checkpoint.every=2", "optim.ema_decay=0.5", "data.num_workers=0"])

    trainer = Trainer(config(2))
    before = {k: v.clone() for k, v in trainer.models["student"].full_state_dict().items()}
    assert list(trainer.models) == ["student"] and [p.name for p in trainer.phases] == ["denoise"]
    if backend == "deepspeed":  # on the CPU its shared-memory op (inference collectives only) is neither built nor used
        from deepspeed.comm import comm

        assert comm.cdb is not None and comm.cdb.shm_comm_op is None
    trainer.run()
    out = train(config(4), resume=True)  # the generic checkpoint and resume carry a method they never heard of
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert all(set(line) >= {"loss/denoise", "lr/student"} for line in lines)
    assert lines[-1]["loss/denoise"] < lines[0]["loss/denoise"]  # it learns
    after = torch.load(out / "student.pt")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (run / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["toy"] == {"timestep": 500, "teacher_timestep": 250}


def test_an_unknown_method_names_the_known_ones(tiny_sd, tiny_dino, digit_shards, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'nope': one of .*add"):
        method_class("nope")
