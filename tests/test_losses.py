import pytest
import torch

from addpipe.train import losses
from addpipe.train.schedule import predicted_eps, predicted_x0


def test_hinge_losses_match_formula():
    real = [torch.tensor([[2.0, 0.5], [-1.0, 0.0]]), torch.tensor([[0.0], [3.0]])]
    fake = [torch.tensor([[-2.0, 0.5], [1.0, -0.5]]), torch.tensor([[0.2], [-3.0]])]
    terms = losses.discriminator_hinge_loss(real, fake)
    expected_real = (0 + 0.5 + 2.0 + 1.0) / 4 + (1.0 + 0.0) / 2
    expected_fake = (0 + 1.5 + 2.0 + 0.5) / 4 + (1.2 + 0.0) / 2
    assert terms["real"].item() == pytest.approx(expected_real)
    assert terms["fake"].item() == pytest.approx(expected_fake)


def test_generator_loss_sign_rewards_higher_fake_logits():
    low = losses.generator_adversarial_loss([torch.zeros(2, 3), torch.zeros(2, 1)])
    high = losses.generator_adversarial_loss([torch.ones(2, 3), 2 * torch.ones(2, 1)])
    assert high.item() == pytest.approx(-3.0) and low.item() == 0.0
    assert high < low


def test_r1_is_gradient_norm_wrt_head_input_features():
    """Hand-built head D(f)_t = (w . f_t)^2 / 2: dD/df = (w . f) w per token; R1 = (257 / N) / 2 * E||grad||^2."""
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    features = torch.randn(3, 5, 7, requires_grad=True)  # (B, C, N)

    def head(f):
        return 0.5 * torch.einsum("c,bcn->bn", w, f) ** 2

    r1 = losses.r1_penalty([head(features)], [features], normalise=False)
    projection = torch.einsum("c,bcn->bn", w, features).detach()
    gradient = projection[:, None, :] * w.detach()[None, :, None]
    expected = gradient.pow(2).flatten(1).sum(1).mean() * (257 / 7) / 2
    assert r1.item() == pytest.approx(expected.item(), rel=1e-5)
    # the penalty is differentiable w.r.t. the head parameters (its graph is kept)
    (grad_w,) = torch.autograd.grad(r1, w)
    assert torch.isfinite(grad_w).all() and grad_w.abs().sum() > 0


def test_r1_means_the_same_at_any_token_count_and_is_stylegan_r1_in_the_papers_setting():
    """A per-token linear head D_t = w . f_t has dD/df_t = w at every token: StyleGAN2-ADA's R1 (gamma/2 times the
    squared norm of the gradient of the summed logits) is N ||w||^2 / 2, growing with the N tokens. Ours is
    257 ||w||^2 / 2 at every N: equal to StyleGAN2-ADA's at the paper's 257 tokens (DINOv2 ViT-S/14, 224^2)."""
    w = torch.tensor([0.5, -1.0, 2.0])
    values = {}
    for tokens in (17, 65, 257, 1025):
        features = torch.randn(4, 3, tokens, requires_grad=True)
        values[tokens] = losses.r1_penalty([torch.einsum("c,bcn->bn", w, features)], [features],
                                            normalise=False).item()
        stylegan = tokens * w.pow(2).sum().item() / 2
        if tokens == 257:
            assert values[tokens] == pytest.approx(stylegan, rel=1e-6)
    for value in values.values():
        assert value == pytest.approx(257 * w.pow(2).sum().item() / 2, rel=1e-6)


def test_r1_sums_over_heads():
    f1, f2 = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True)
    both = losses.r1_penalty([f1.sum(1) * 2, f2.sum(1) * 3], [f1, f2], reference_tokens=4, normalise=False)
    # d/df of 2*sum_c f = 2 per element: 3*4 elements * 4 = 48; for 3: 12 * 9 = 108; halved (gamma/2)
    assert both.item() == pytest.approx((48 + 108) / 2)


def test_normalised_r1_is_r1_on_rms_normalised_features_and_ignores_the_feature_scale():
    """normalise: R1 w.r.t. each sample's features divided by their RMS. For a head that normalises its input (the
    ADD heads' local batch norm) the raw R1 falls as 1/c^2 when the features grow by c; the normalised one stays."""
    from addpipe.train.methods.add.discriminator import DiscriminatorHead

    torch.manual_seed(0)
    features = torch.randn(8, 6, 20)
    w = torch.randn(6)
    x = features.clone().requires_grad_(True)
    normalised = losses.r1_penalty([0.5 * torch.einsum("c,bcn->bn", w, x) ** 2], [x])
    rms = features.pow(2).flatten(1).mean(1).sqrt().view(-1, 1, 1)
    u = (features / rms).requires_grad_(True)  # the same head as a function of u = F / rms (rms held fixed)
    by_hand = losses.r1_penalty([0.5 * torch.einsum("c,bcn->bn", w, u * rms) ** 2], [u], normalise=False)
    assert normalised.item() == pytest.approx(by_hand.item(), rel=1e-5)

    head = DiscriminatorHead(6, 0, 8, 3, virtual_batch_size=8)
    values = {}
    for scale in (1.0, 30.0):
        x = (scale * features).requires_grad_(True)
        out = head(x, None)
        values[scale] = (losses.r1_penalty([out], [x]).item(), losses.r1_penalty([out], [x], normalise=False).item())
    assert values[30.0][0] == pytest.approx(values[1.0][0], rel=1e-3)
    assert values[30.0][1] == pytest.approx(values[1.0][1] / 900, rel=1e-3)


def test_distillation_loss_weighs_a_per_element_error_the_same_in_pixel_and_latent_space():
    """lambda must mean the same in both spaces: an error of 0.1 in every element costs 0.01 whether it is spread
    over 3x512x512 decoded pixels or 4x64x64 latents (a sum would differ by 786,432 / 16,384 = 48x)."""
    weight = torch.tensor([1.0, 2.0])
    for shape in ((2, 3, 512, 512), (2, 4, 64, 64)):
        student = torch.zeros(shape)
        loss = losses.distillation_loss(student, student + 0.1, weight)
        assert loss.item() == pytest.approx(0.01 * 1.5, rel=1e-4)


def test_nfsd_distils_in_latent_space_over_the_whole_range():
    """NFSD's target is a displaced latent: auto takes it in latent space (no cap on t), pixel space is refused;
    the other weightings' targets are teacher x0 predictions and stay in pixel space by default."""
    from addpipe.train.methods.add.config import DistillConfig

    assert DistillConfig(weighting="nfsd").resolved_space == "latent"
    assert DistillConfig(weighting="nfsd", space="latent").resolved_space == "latent"
    assert DistillConfig(weighting="exponential").resolved_space == "pixel"
    assert DistillConfig(weighting="sds", space="latent").resolved_space == "latent"
    with pytest.raises(ValueError, match="distill.space=pixel with distill.weighting=nfsd"):
        DistillConfig(weighting="nfsd", space="pixel")


def test_distillation_weights_match_formulas():
    alpha, sigma = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.4359, 0.8660, 0.9950])
    torch.testing.assert_close(losses.distillation_weight("exponential", alpha, sigma), alpha)
    sds = alpha / (2 * sigma) * sigma**2
    torch.testing.assert_close(losses.distillation_weight("sds", alpha, sigma), sds)
    torch.testing.assert_close(losses.distillation_weight("nfsd", alpha, sigma), sds)
    with pytest.raises(ValueError):
        losses.distillation_weight("unknown", alpha, sigma)


def test_sds_weight_gives_the_sds_gradient():
    """d/dx c(t)||x - x_psi||^2 (per element, mean-free form) equals w(t)(eps_psi - eps) with w = sigma^2."""
    torch.manual_seed(0)
    alpha, sigma = torch.tensor(0.6), torch.tensor(0.8)
    x0 = torch.randn(6, requires_grad=True)
    eps, eps_psi = torch.randn(6), torch.randn(6)
    x_t = alpha * x0.detach() + sigma * eps
    target = predicted_x0(eps_psi, x_t, alpha, sigma, "epsilon")
    weight = losses.distillation_weight("sds", alpha, sigma)
    (weight * (x0 - target.detach()).pow(2).sum()).backward()
    torch.testing.assert_close(x0.grad, sigma**2 * (eps_psi - eps), atol=1e-5, rtol=1e-5)


def test_nfsd_gradient_is_noise_free_direction():
    torch.manual_seed(0)
    alpha, sigma = torch.full((2, 1), 0.6), torch.full((2, 1), 0.8)
    t = torch.tensor([100, 500])
    x0 = torch.randn(2, 5, requires_grad=True)
    eps_c, eps_u, eps_n = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    scale = 7.5
    target = losses.nfsd_target(x0.detach(), alpha, sigma, t, eps_c, eps_u, eps_n, scale, t_threshold=200)
    weight = losses.distillation_weight("nfsd", alpha, sigma)
    (weight * (x0 - target).pow(2)).sum().backward()
    delta_c = eps_c - eps_u
    expected = torch.stack([eps_u[0] + scale * delta_c[0], (eps_u[1] - eps_n[1]) + scale * delta_c[1]])
    torch.testing.assert_close(x0.grad, sigma**2 * expected, atol=1e-5, rtol=1e-5)


def test_distillation_loss_is_weighted_mse_with_stop_gradient():
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randn(2, 3, 4, 4, requires_grad=True)
    weight = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    loss = losses.distillation_loss(student, target, weight)
    expected = (torch.tensor([0.5, 2.0]) * (student - target).pow(2).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert target.grad is None and student.grad is not None


def test_guidance_and_total():
    u, c = torch.zeros(3), torch.ones(3)
    torch.testing.assert_close(losses.classifier_free_guidance(u, c, 7.5), torch.full((3,), 7.5))
    assert losses.generator_total(torch.tensor(1.0), torch.tensor(2.0), 2.5).item() == pytest.approx(6.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_guidance_on_x0_equals_x0_of_guided_eps(prediction_type):
    """The trainer guides the teacher's x0 (finite at zero terminal SNR); where alpha > 0 that is the
    x0 of the eps-space guided prediction, the textbook definition."""
    torch.manual_seed(0)
    alpha = torch.tensor(0.3)
    sigma = (1 - alpha**2).sqrt()
    x_t, out_u, out_c = torch.randn(3, 8).unbind()
    eps = [predicted_eps(o, x_t, alpha, sigma, prediction_type) for o in (out_u, out_c)]
    x0 = [predicted_x0(o, x_t, alpha, sigma, prediction_type) for o in (out_u, out_c)]
    via_eps = predicted_x0(losses.classifier_free_guidance(eps[0], eps[1], 5.0), x_t, alpha, sigma, "epsilon")
    torch.testing.assert_close(losses.classifier_free_guidance(x0[0], x0[1], 5.0), via_eps, atol=1e-5, rtol=1e-5)
