"""The methods' losses as pure functions of tensors (docs/method.md): ADD's, then Diffusion2GAN's GAN terms. Nothing here
calls backward or touches an optimizer.

Conventions (ADD): a discriminator returns one logit tensor per head, shaped (batch, tokens); a head's score
is the mean over its tokens, and the heads' terms are summed (StyleGAN-T's multi-scale sum). Diffusion2GAN's
discriminator returns a logit map per scale, and its terms are averaged over scales.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def generator_adversarial_loss(fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_adv^G = -E[sum_k D_k(F_k(x_hat))]."""
    return -sum(logits.mean() for logits in fake_logits)


def discriminator_hinge_loss(
    real_logits: Sequence[torch.Tensor], fake_logits: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Hinge terms: real = E[sum_k max(0, 1 - D_k(real))], fake = E[sum_k max(0, 1 + D_k(fake))]."""
    real = sum(F.relu(1.0 - logits).mean() for logits in real_logits)
    fake = sum(F.relu(1.0 + logits).mean() for logits in fake_logits)
    return {"real": real, "fake": fake}


PAPER_TOKENS = 257
"""Tokens a head sees in the paper's setting: DINOv2 ViT-S/14 at 224^2, 16x16 patches plus the CLS token."""


def r1_penalty(head_outputs: Sequence[torch.Tensor], head_inputs: Sequence[torch.Tensor],
               reference_tokens: int = PAPER_TOKENS, normalise: bool = True, create_graph: bool = True) -> torch.Tensor:
    """R1 = sum_k (reference_tokens / L_k) * E_batch[ s_k^2 ||d(sum_t D_k,t) / dF_k||^2 ] / 2: the gradient of each
    head's summed token logits w.r.t. its own input features F_k (not the pixels, not the parameters).

    Two choices decide what gamma means, and both are stated here (docs/method.md has the measurements):
    - Tokens: StyleGAN2-ADA's convention (gamma/2 on the squared gradient norm of the summed logits) grows with the
      L tokens a head reads; reference_tokens / L_k makes it a per-token average scaled to the paper's 257
      (DINOv2 ViT-S/14 at 224^2), the same strength at any input size.
    - Feature scale (`normalise`, s_k = the root mean square of the sample's features F_k, detached): the heads
      normalise their input (local batch norm), so their output barely changes when the features are scaled by c
      and the raw gradient shrinks by 1/c. DINOv2's hidden states at pretrained magnitude are far larger than a
      random-init ViT's, which made the raw penalty 1e-4 or less of the hinge loss at the paper's gamma: inert.
      Taken w.r.t. F_k / s_k, the penalty does not depend on the feature network's scale, so one gamma means the
      same on the demo's small ViT and on DINOv2 at 512^2. normalise=False is the raw convention.
    `head_outputs[k]` is (B, L_k); `head_inputs[k]` must require grad and be the tensor head k consumed; with
    `create_graph` the graph is kept so the penalty can be differentiated (training), without it only measured."""
    total = head_outputs[0].new_zeros(())
    for output, features in zip(head_outputs, head_inputs):
        (gradient,) = torch.autograd.grad(output.sum(), features, create_graph=create_graph, retain_graph=True)
        tokens = output.shape[1] if output.ndim > 1 else 1
        squared = gradient.pow(2).flatten(1).sum(1)
        if normalise:
            squared = squared * features.detach().float().pow(2).flatten(1).mean(1)
        total = total + squared.mean() * (reference_tokens / tokens) / 2
    return total


def distillation_weight(kind: str, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """c(t). exponential: alpha_t. sds (and nfsd): alpha_t / (2 sigma_t) * w(t) with DreamFusion's
    w(t) = sigma_t^2, chosen so d/dx of c(t)||x - x_psi||^2 equals w(t)(eps_psi - eps)."""
    if kind == "exponential":
        return alpha
    if kind in ("sds", "nfsd"):
        return alpha / (2.0 * sigma) * sigma.pow(2)
    raise ValueError(f"unknown distillation weighting {kind!r}")


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """u + s (c - u), for eps, v or x0 predictions alike: each is affine in the others at fixed x_t and t."""
    return uncond + scale * (cond - uncond)


def nfsd_target(
    student_x0: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    timesteps: torch.Tensor,
    eps_cond: torch.Tensor,
    eps_uncond: torch.Tensor,
    eps_negative: torch.Tensor,
    guidance_scale: float,
    t_threshold: int = 200,
) -> torch.Tensor:
    """Noise-free score distillation (Katzir et al. 2023) as an x0 target.

    NFSD's update direction is g = delta_D + s * delta_C with delta_C = eps_c - eps_u and
    delta_D = eps_u for t < threshold, eps_u - eps_neg otherwise: the injected noise eps never enters.
    With the SDS weight c(t), the target x0 - (sigma/alpha) g makes the gradient of
    c(t)||x0 - sg(target)||^2 equal to w(t) g exactly.
    """
    small_t = (timesteps < t_threshold).view((-1,) + (1,) * (student_x0.ndim - 1))
    delta_domain = torch.where(small_t, eps_uncond, eps_uncond - eps_negative)
    direction = delta_domain + guidance_scale * (eps_cond - eps_uncond)
    return student_x0 - (sigma / alpha) * direction


def distillation_loss(student_x0: torch.Tensor, target_x0: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """E[c(t) * ||x_theta - sg(x_psi)||^2], the squared error averaged over elements of each sample
    (resolution-independent) and weighted per sample. The target is detached here, whatever the caller did."""
    squared = (student_x0 - target_x0.detach()).pow(2).flatten(1).mean(1)
    return (weight.flatten() * squared).mean()


def generator_total(adversarial: torch.Tensor, distillation: torch.Tensor, weight: float) -> torch.Tensor:
    """L = L_adv + lambda * L_distill."""
    return adversarial + weight * distillation


# ---- Diffusion2GAN (train/methods/diffusion2gan/method.py): a non-saturating conditional GAN on multi-scale logit maps ----

def scale_mean(logits: Sequence[torch.Tensor], fn) -> torch.Tensor:
    """mean over scales k of E[fn(D_k)] over samples and positions: each scale weighs the same at any resolution."""
    return torch.stack([fn(l.float()).mean() for l in logits]).mean()


def nonsaturating_generator_loss(fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_G = E[softplus(-D(G(z, c), z, c))]  (= -log sigmoid D)."""
    return scale_mean(fake_logits, lambda l: F.softplus(-l))


def nonsaturating_fake_loss(fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """E[softplus(D(fake))] = -log(1 - sigmoid D): the discriminator's term for what it must call fake."""
    return scale_mean(fake_logits, F.softplus)


def nonsaturating_discriminator_loss(real_logits: Sequence[torch.Tensor], fake_logits: Sequence[torch.Tensor]
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[softplus(-D(real))], E[softplus(D(fake))]): -log sigmoid on real, -log(1 - sigmoid) on fake."""
    return scale_mean(real_logits, lambda l: F.softplus(-l)), nonsaturating_fake_loss(fake_logits)


def input_r1_penalty(real_logits: Sequence[torch.Tensor], real_inputs: torch.Tensor) -> torch.Tensor:
    """E_batch[ ||d D(x) / dx||^2 ] / 2 for D(x) = the per-sample mean of every scale's logits (StyleGAN2's R1 with
    gamma applied by the caller); `real_inputs` must require grad; the graph is kept for the backward pass."""
    score = torch.stack([l.float().flatten(1).mean(1) for l in real_logits]).mean(0)
    (gradient,) = torch.autograd.grad(score.sum(), real_inputs, create_graph=True)
    return gradient.pow(2).flatten(1).sum(1).mean() / 2
