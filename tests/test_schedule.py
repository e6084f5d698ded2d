import pytest
import torch

from addpipe.train.schedule import (diffusion_target, draw_training_noise, predicted_eps, predicted_x0,
                                    schedule_from_config, student_timesteps, warmup_factor)

SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "prediction_type": "epsilon"}


def lin_et_al_zero_snr(betas: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of Lin et al. (2023), written out by hand."""
    alphas_bar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def test_sampling_uses_evenly_spaced_subsets_of_the_trained_timesteps():
    from addpipe.train.schedule import trained_subset

    trained = [999, 749, 499, 249]
    assert trained_subset(trained, 4) == trained and trained_subset(trained, 2) == [999, 499]
    assert trained_subset(trained, 1) == [999] and trained_subset([999, 500], 2) == [999, 500]
    for steps in (3, 0, 5, 8):  # {999, 666, 333} was never trained: no subset
        with pytest.raises(ValueError, match=r"samples with \[1, 2, 4\] step"):
            trained_subset(trained, steps)


def test_student_timesteps_match_the_paper():
    assert student_timesteps(4) == [999, 749, 499, 249]
    assert student_timesteps(1) == [999]
    assert student_timesteps(2) == [999, 499]
    with pytest.raises(ValueError):
        student_timesteps(0)


def test_sd_schedule_matches_hand_formula():
    schedule = schedule_from_config(SD_CONFIG, zero_terminal_snr=False)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_bar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(schedule.alphas, alphas_bar.sqrt().float())
    torch.testing.assert_close(schedule.sigmas, (1 - alphas_bar).sqrt().float())
    assert schedule.prediction_type == "epsilon"


def test_zero_terminal_snr_alpha_is_exactly_zero_and_matches_lin_et_al():
    schedule = schedule_from_config(SD_CONFIG, zero_terminal_snr=True, prediction_type="v_prediction")
    assert schedule.alphas[999].item() == 0.0
    assert schedule.sigmas[999].item() == pytest.approx(1.0)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - lin_et_al_zero_snr(betas), 0)
    torch.testing.assert_close(schedule.alphas, expected.clamp(min=0).sqrt().float(), atol=1e-6, rtol=1e-5)
    # alpha^2 + sigma^2 = 1 everywhere (variance preserving)
    torch.testing.assert_close(schedule.alphas**2 + schedule.sigmas**2, torch.ones(1000), atol=1e-5, rtol=0)


def test_epsilon_student_at_zero_snr_is_refused():
    with pytest.raises(ValueError, match="epsilon"):
        schedule_from_config(SD_CONFIG, zero_terminal_snr=True, prediction_type="epsilon")


def test_x0_at_pure_noise_is_finite_and_equals_minus_v():
    schedule = schedule_from_config(SD_CONFIG, zero_terminal_snr=True, prediction_type="v_prediction")
    t = torch.tensor([999, 999])
    alpha, sigma = schedule.at(t, 4)
    x_t, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x0 = predicted_x0(v, x_t, alpha, sigma, "v_prediction")
    assert torch.isfinite(x0).all()
    torch.testing.assert_close(x0, -v)
    # epsilon has no x0 there (it divides by alpha = 0), which is why no epsilon schedule may have zero terminal SNR:
    # schedule_from_config refuses it (the test above), so predicted_x0 need not read alpha back on every call
    assert not torch.isfinite(predicted_x0(v, x_t, alpha, sigma, "epsilon")).all()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_parameterisations_are_consistent(kind):
    schedule = schedule_from_config(SD_CONFIG, zero_terminal_snr=False)
    t = torch.tensor([10, 500, 990])
    alpha, sigma = schedule.at(t, 4)
    x0, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    x_t = alpha * x0 + sigma * eps
    output = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[kind]
    torch.testing.assert_close(predicted_x0(output, x_t, alpha, sigma, kind), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(predicted_eps(output, x_t, alpha, sigma, kind), eps, atol=2e-4, rtol=1e-4)
    # what a teacher of this kind is pretrained to output is exactly that output
    torch.testing.assert_close(diffusion_target(x0, eps, alpha, sigma, kind), output)


def test_v_target_at_pure_noise_is_minus_x0():
    """Under zero terminal SNR the v-target at T-1 is -x0: the network must draw the image from the prompt alone."""
    schedule = schedule_from_config(SD_CONFIG, zero_terminal_snr=True, prediction_type="v_prediction")
    alpha, sigma = schedule.at(torch.tensor([999]), 4)
    x0, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(diffusion_target(x0, eps, alpha, sigma, "v_prediction"), -x0)
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_target(x0, eps, alpha, sigma, "x_prediction")


def test_warmup_is_linear_then_constant():
    assert warmup_factor(0, 10) == pytest.approx(0.1)
    assert warmup_factor(4, 10) == pytest.approx(0.5)
    assert warmup_factor(50, 10) == 1.0
    assert warmup_factor(0, 0) == 1.0


def test_training_noise_depends_only_on_seed_step_and_stream():
    a = draw_training_noise(0, 7, [0, 0, 1, 1], (4, 2, 2), 4, 20, 980)
    b = draw_training_noise(0, 7, [0, 0], (4, 2, 2), 4, 20, 980)
    c = draw_training_noise(0, 7, [1, 1], (4, 2, 2), 4, 20, 980)
    torch.testing.assert_close(a.noise, torch.cat([b.noise, c.noise]))
    torch.testing.assert_close(a.teacher_t, torch.cat([b.teacher_t, c.teacher_t]))
    other_step = draw_training_noise(0, 8, [0, 0], (4, 2, 2), 4, 20, 980)
    assert not torch.equal(other_step.noise, b.noise)
    assert a.student_index.min() >= 0 and a.student_index.max() < 4
    assert a.teacher_t.min() >= 20 and a.teacher_t.max() <= 980


def test_student_timestep_weights_set_how_often_each_timestep_is_trained():
    streams = list(range(4000))  # one sample per stream: 4000 independent draws
    weighted = draw_training_noise(0, 3, streams, (1, 1, 1), 4, 20, 980, (2.0, 0.0, 1.0, 1.0)).student_index
    counts = torch.bincount(weighted, minlength=4).double() / len(streams)
    assert counts[1] == 0
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.0, 0.25, 0.25], dtype=torch.float64), atol=0.03, rtol=0)
    uniform = draw_training_noise(0, 3, streams, (1, 1, 1), 4, 20, 980).student_index
    torch.testing.assert_close(torch.bincount(uniform, minlength=4).double() / len(streams),
                               torch.full((4,), 0.25, dtype=torch.float64), atol=0.03, rtol=0)
    # Still a pure function of (seed, step, stream), weights or not.
    assert torch.equal(weighted[:2], draw_training_noise(0, 3, [0, 1], (1, 1, 1), 4, 20, 980, (2, 0, 1, 1)).student_index)
