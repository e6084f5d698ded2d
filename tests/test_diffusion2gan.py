"""Diffusion2GAN (method: diffusion2gan) on a tiny SD-style teacher's ODE pairs: the GAN terms and R1 against their
formulas, a discriminator that starts as the teacher's encoder and reads each of its conditions, exact resumes,
two ranks equal to one on both backends, the regression-only ablation, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from addpipe.config import load
from addpipe.train import losses
from addpipe.train.config import TrainConfig
from conftest import TINY_D2G_CONFIG, run_cli, torchrun_batch
from test_train import unet_weights


@pytest.fixture(scope="module")
def pairs(tiny_sd, tmp_path_factory) -> Path:
    from addpipe.train.methods.diffusion2gan.pairs import collect_pairs

    root = tmp_path_factory.mktemp("d2g")
    (root / "prompts.txt").write_text("".join(f"a handwritten {i % 10} in red on a blue background\n" for i in range(48)))
    config = load(TrainConfig, TINY_D2G_CONFIG, [f"model.teacher={tiny_sd}", "data.resolution=16", "pairs.steps=4",
                                             "pairs.samples_per_shard=6"])
    collect_pairs(config, str(root / "prompts.txt"), str(root / "pairs"), progress=False)
    return root / "pairs"


@pytest.fixture(scope="module")
def lpips_weights(tmp_path_factory) -> Path:
    from addpipe.train.methods.diffusion2gan.latent_lpips import LatentLPIPS

    torch.manual_seed(0)
    model = LatentLPIPS()
    with torch.no_grad():
        for head in model.lins:
            head.model[1].weight.uniform_(0.1, 1.0)
    return model.save(tmp_path_factory.mktemp("lpips") / "latent_lpips.pth")


def settings(tiny_sd, pairs, lpips_weights, run: Path, **extra) -> list[str]:
    values = {"method": "diffusion2gan", "run_dir": run, "model.teacher": tiny_sd, "data.shards": pairs,
              "data.resolution": 16, "data.batch_size": 4, "data.num_workers": 0, "d2g.lpips": lpips_weights,
              "log.tensorboard": "false", "log.progress": "false", "checkpoint.every": 1000, "log.every": 1,
              "steps": 3, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_gan_terms_and_r1_follow_their_formulas():
    real = [torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0]])]
    fake = [torch.tensor([[1.0, 0.0]]), torch.tensor([[-3.0]])]
    softplus = lambda x: torch.log1p(torch.exp(torch.as_tensor(x)))  # noqa: E731
    real_term, fake_term = losses.nonsaturating_discriminator_loss(real, fake)
    # each scale's mean, then the mean over scales
    assert real_term.item() == pytest.approx(((softplus(-0.5) + softplus(1.0)) / 2 + softplus(-2.0)).item() / 2)
    assert fake_term.item() == pytest.approx(((softplus(1.0) + softplus(0.0)) / 2 + softplus(-3.0)).item() / 2)
    assert losses.nonsaturating_generator_loss(fake).item() == pytest.approx(
        ((softplus(-1.0) + softplus(0.0)) / 2 + softplus(3.0)).item() / 2)
    # R1 of D(x) = mean over scales of the mean of w * x over positions: the gradient is known in closed form
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    w = torch.randn(1, 2, 4, 4)
    logits = [(x * w).sum(1, keepdim=True), (x * w).sum(1, keepdim=True)[:, :, ::2, ::2]]
    mask = torch.zeros(1, 1, 4, 4)
    mask[:, :, ::2, ::2] = 1
    expected_gradient = 0.5 * (w / 16) + 0.5 * (w * mask / 4)
    expected = expected_gradient.pow(2).sum() / 2  # the same for every sample; the batch mean keeps it
    assert losses.input_r1_penalty(logits, x).item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_discriminator_starts_as_the_teachers_encoder_and_reads_each_condition(tiny_sd):
    from diffusers import UNet2DConditionModel

    from addpipe.train.methods.diffusion2gan.unet_discriminator import UNetEncoderDiscriminator

    teacher = UNet2DConditionModel.from_pretrained(str(tiny_sd), subfolder="unet")
    disc = UNetEncoderDiscriminator(teacher)
    inner = disc.encoder
    assert torch.equal(inner.conv_in.weight[:, :4], teacher.conv_in.weight)
    assert torch.equal(inner.conv_in.weight[:, 4:], torch.zeros_like(inner.conv_in.weight[:, 4:]))
    assert torch.equal(inner.down_blocks[0].resnets[0].conv1.weight, teacher.down_blocks[0].resnets[0].conv1.weight)
    assert len(inner.up_blocks) == 0 and teacher.up_blocks  # the decoder half is gone; the teacher is untouched
    generator = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 4, 32, generator=generator)
    t = torch.tensor([10, 400])
    base = disc(x, t, z, text)
    assert [tuple(l.shape) for l in base] == [(2, 1, 4, 4), (2, 1, 4, 4), (2, 1, 4, 4)]  # two down blocks + mid

    def differs(other):
        return any(not torch.allclose(a, b) for a, b in zip(base, other))

    assert differs(disc(x + 0.5, t, z, text))                       # the latent
    assert differs(disc(x, torch.tensor([300, 20]), z, text))       # the timestep
    assert differs(disc(x, t, z, text.flip(0)))                     # the text
    assert not differs(disc(x, t, z + 1.0, text))                   # z: zero weights at the start ...
    with torch.no_grad():
        inner.conv_in.weight[:, 4:].normal_(0, 0.1)                 # ... read once training moves them
    moved = disc(x, t, z, text)
    assert any(not torch.allclose(a, b) for a, b in zip(moved, disc(x, t, z + 1.0, text)))
    with pytest.raises(ValueError, match="conditioned on the generator's noise"):
        disc(x, t, None, text)


def test_training_runs_both_phases_and_a_resume_equals_the_uninterrupted_run(tiny_sd, pairs, lpips_weights, tmp_path):
    from addpipe.train.loop import train

    def config(run, steps):
        return load(TrainConfig, TINY_D2G_CONFIG, settings(tiny_sd, pairs, lpips_weights, run, steps=steps,
                                                      **{"optim.ema_decay": 0.9}))

    train(config(tmp_path / "whole", 4))
    train(config(tmp_path / "split", 2))
    train(config(tmp_path / "split", 4), resume=True)
    whole, split = metrics(tmp_path / "whole"), metrics(tmp_path / "split")
    assert [m["step"] for m in split] == [1, 2, 3, 4]
    for a, b in zip(whole, split):
        for term in ("loss/lpips", "loss/generator_adversarial", "loss/discriminator_real", "loss/discriminator_mismatch",
                     "loss/r1"):
            assert a[term] == pytest.approx(b[term], rel=1e-5, abs=1e-7), term
    assert all(m["loss/r1"] > 0 and m["loss/lpips"] > 0 for m in whole)
    # each weighted term and the gradient it sends to the generator's output (log.every 1: every step is measured)
    for m in whole:
        assert m["grad_norm/lpips"] > 0 and m["grad_norm/generator_adversarial"] > 0
        assert m["loss_weighted/generator_adversarial"] == pytest.approx(0.05 * m["loss/generator_adversarial"], rel=1e-6)
        assert m["loss_weighted/r1"] == pytest.approx(m["loss/r1"], rel=1e-6)  # d2g.r1_gamma 1
    a, b = unet_weights(tmp_path / "whole" / "student"), unet_weights(tmp_path / "split" / "student")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    info = json.loads((tmp_path / "whole" / "student" / "addpipe_student.json").read_text())
    assert info["timesteps"] == [999]  # a one-step generator, reading z at the pairs' first ODE timestep
    from addpipe.train.models import load_teacher
    from addpipe.train.methods.diffusion2gan.pairs import ode_scheduler

    first = ode_scheduler(load_teacher(config(tmp_path / "x", 1).model).scheduler_config, 50).timesteps[0].item()
    assert info["timesteps"] == [first]


def test_the_regression_only_ablation_has_no_discriminator(tiny_sd, pairs, lpips_weights, tmp_path):
    from addpipe.train.loop import Trainer

    config = load(TrainConfig, TINY_D2G_CONFIG, settings(tiny_sd, pairs, lpips_weights, tmp_path / "run", steps=2,
                                                     **{"d2g.adversarial": "false"}))
    trainer = Trainer(config)
    try:
        assert list(trainer.models) == ["student"] and [p.name for p in trainer.phases] == ["generator"]
        trainer.run()
    finally:
        trainer.close()
    found = metrics(tmp_path / "run")
    assert "loss/generator_adversarial" not in found[0] and found[0]["loss/generator_total"] == pytest.approx(
        found[0]["loss/lpips"])


TWO_RANK_BACKENDS = {"deepspeed": {"engine.zero": 3}, "fsdp2": {}}


@pytest.fixture(scope="module")
def two_rank_runs(tiny_sd, pairs, lpips_weights, tmp_path_factory):
    """Each backend's two-rank run, both in one torchrun launch. -> {backend: run directory}."""
    root = tmp_path_factory.mktemp("d2g_two_ranks")
    runs = {backend: root / backend for backend in TWO_RANK_BACKENDS}
    torchrun_batch([{"config": TINY_D2G_CONFIG, "report": root / f"{backend}.json",
                     "overrides": settings(tiny_sd, pairs, lpips_weights, run, **two_rank_common(backend),
                                           **{"data.batch_size": 2, "data.num_workers": 1})}
                    for backend, run in runs.items()], root)
    return runs


def two_rank_common(backend: str) -> dict:
    return {"steps": 2, "engine.backend": backend, **TWO_RANK_BACKENDS[backend]}


@pytest.mark.slow
@pytest.mark.parametrize("backend", TWO_RANK_BACKENDS)
def test_two_rank_runs_match_one_rank(tiny_sd, pairs, lpips_weights, tmp_path, backend, two_rank_runs):
    from addpipe.train.loop import train

    one = tmp_path / "one"
    train(load(TrainConfig, TINY_D2G_CONFIG, settings(tiny_sd, pairs, lpips_weights, one, **two_rank_common(backend),
                                                  **{"data.batch_size": 4, "data.num_workers": 2})))
    two = two_rank_runs[backend]
    for a, b in zip(metrics(one), metrics(two)):
        for term in ("loss/lpips", "loss/generator_adversarial", "loss/discriminator_total"):
            assert a[term] == pytest.approx(b[term], rel=1e-4, abs=1e-6), term
    a, b = unet_weights(one / "student"), unet_weights(two / "student")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-3, msg=key)


def test_image_shards_missing_weights_and_pairs_of_another_teacher_are_refused(tiny_sd, tiny_sdxl, pairs, lpips_weights,
                                                                               digit_shards, tmp_path):
    result = run_cli("train", "-c", str(TINY_D2G_CONFIG), *settings(tiny_sd, pairs, lpips_weights, tmp_path / "a",
                                                           **{"d2g.lpips": ""}))
    assert result.returncode == 2 and "needs d2g.lpips" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "a" / "config.yaml").exists()
    result = run_cli("train", "-c", str(TINY_D2G_CONFIG), *settings(tiny_sd, digit_shards, lpips_weights, tmp_path / "b"))
    assert result.returncode == 2 and "is not an ODE pair" in result.stderr, result.stderr[-2000:]
    result = run_cli("train", "-c", str(TINY_D2G_CONFIG), *settings(tiny_sdxl, pairs, lpips_weights, tmp_path / "c"))
    assert result.returncode == 2 and "made with another teacher" in result.stderr, result.stderr[-2000:]
