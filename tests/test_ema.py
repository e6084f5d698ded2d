"""The EMA's schedules against closed forms, and what a run exports with it."""

import json

import pytest
import torch

from addpipe.train.ema import EMA, ema_beta


def test_constant_decay_keeps_two_thirds_of_the_initial_copy_over_4000_steps():
    """The defect this replaces: 0.9999 over 4,000 steps exports 0.9999^4000 = 67% initial copy."""
    ema = EMA([torch.ones(3)], decay=0.9999)
    for step in range(4000):
        ema.update([torch.zeros(3)], step * 32, 32)
    assert ema.shadow[0][0].item() == pytest.approx(0.9999 ** 4000, rel=1e-4) == pytest.approx(0.6703, abs=1e-4)


def test_halflife_beta_is_edms_formula():
    # no ramp: halves every H images whatever the batch
    assert ema_beta(10_000, 32, halflife_images=3200) == pytest.approx(0.5 ** (32 / 3200))
    assert ema_beta(0, 32, halflife_images=3200) == pytest.approx(0.5 ** 0.01)
    # ramp: at most rampup * seen; the first update takes the weights whole
    assert ema_beta(0, 32, halflife_images=3200, rampup=0.05) == 0.0
    assert ema_beta(1000, 32, halflife_images=3200, rampup=0.05) == pytest.approx(0.5 ** (32 / 50))
    assert ema_beta(1_000_000, 32, halflife_images=3200, rampup=0.05) == pytest.approx(0.5 ** (32 / 3200))
    assert ema_beta(5, 32, decay=0.99) == 0.99  # constant decay when no half-life is set


def test_halflife_ema_after_k_steps_equals_the_closed_form_and_forgets_the_initial_copy():
    """After k updates with weights w_1..w_k, EMA = prod(beta) w_0 + sum_i (1 - beta_i) prod_{j>i} beta_j w_i, with
    beta_i = 0.5^(B / min(H, r (i-1) B)); written out here from the formula, not from the class."""
    batch, halflife, rampup, steps = 16, 2000.0, 0.05, 300
    weights = [torch.full((2,), float(i)) for i in range(steps + 1)]  # w_0 the initial copy, w_i after step i
    ema = EMA([weights[0]], halflife_images=halflife, rampup=rampup)
    for step in range(steps):
        ema.update([weights[step + 1]], step * batch, batch)
    betas = [0.5 ** (batch / max(min(halflife, rampup * i * batch), 1e-8)) for i in range(steps)]
    expected = weights[0][0].item() * torch.tensor(betas).prod().item()
    for i in range(steps):
        expected += (1 - betas[i]) * torch.tensor(betas[i + 1:]).prod().item() * weights[i + 1][0].item()
    assert ema.shadow[0][0].item() == pytest.approx(expected, rel=1e-5)
    # the initial copy's share is exactly 0 (the first update takes the weights whole); on weights growing by one
    # a step the average lags by about half-life / ln 2 steps: the ramp's 0.05 * 4800 = 240 images, 15 steps
    assert betas[0] == 0.0
    assert 300 - 15 / 0.6931 - 3 < ema.shadow[0][0].item() < 300 - 15 / 0.6931 + 3


def test_ema_settings_are_checked():
    from addpipe.train.config import OptimConfig

    assert OptimConfig(ema_halflife_kimg=10).ema_enabled and not OptimConfig().ema_enabled
    with pytest.raises(ValueError, match="not both"):
        OptimConfig(ema_decay=0.99, ema_halflife_kimg=10)


def test_a_run_with_an_ema_exports_both_weights(tiny_sd, tiny_dino, digit_shards, tmp_path):
    """student/ holds the EMA (here after 3 steps of a 4-image half-life), student_raw/ the trained weights; with
    checkpoint.export_ema=false the other way round (student/ raw, student_ema/ the EMA)."""
    from safetensors.torch import load_file

    from addpipe.config import load
    from addpipe.train.config import TrainConfig
    from addpipe.train.loop import Trainer
    from conftest import TINY_CONFIG, tiny_overrides

    def weights(directory):
        return load_file(str(next((directory / "unet").glob("*.safetensors"))))

    settings = {"optim.ema_decay": 0, "optim.ema_halflife_kimg": 0.004, "optim.ema_rampup": 0}
    trainer = Trainer(load(TrainConfig, TINY_CONFIG, tiny_overrides(tiny_sd, tiny_dino, digit_shards, tmp_path / "a",
                                                                    steps=3, **settings)))
    trainer.run()
    ema, raw = weights(tmp_path / "a" / "student"), weights(tmp_path / "a" / "student_raw")
    differ = [key for key in raw if not torch.equal(raw[key], ema[key])]
    assert differ and json.loads((tmp_path / "a" / "student_raw" / "addpipe_student.json").read_text())["timesteps"]
    trainer.config.checkpoint.export_ema = False
    trainer.run_dir = tmp_path / "b"
    trainer.export()
    for key in raw:  # the same weights under the other names
        assert torch.equal(weights(tmp_path / "b" / "student")[key], raw[key])
        assert torch.equal(weights(tmp_path / "b" / "student_ema")[key], ema[key])
