"""Training a LatentLPIPS where the published one cannot be had (the offline demo, or a VAE it was not made for).

The published network (Kang et al. 2024) is a VGG16-BN trained on ImageNet *in the latent space* of one VAE,
whose linear heads are then calibrated on BAPPS, a set of human two-alternative judgments. Offline neither exists,
so this trains the same layout (train/methods/diffusion2gan/latent_lpips.py; `width` narrows it to CPU size) in two steps:

1. Trunk: the VGG on the teacher VAE's latents of labelled shards, supervised by the label fields (for the
   digits: digit, ink and background colour), as the demo's DINOv2 is. What it learns to tell apart is what the
   labels name, not ImageNet's thousand classes.
2. Heads: calibrated on synthetic two-alternative judgments instead of human ones. A reference image gets the
   same kind of distortion (noise, blur, shift, contrast, a patch) at two strengths; the weaker one must come out
   closer. The heads (non-negative, as LPIPS's) and a logistic scale are fitted to that ranking with the trunk
   frozen. This teaches the layers' relative weights to order distortion strength, which is weaker than human
   perception: the README says so where the demo uses it.

The result is saved like the published checkpoints (`LatentLPIPS.save`), so `d2g.lpips` loads either.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from addpipe.devices import IMAGENET_MEAN, IMAGENET_STD
from addpipe.backbone import fit_classifier, labelled_images
from addpipe.train.methods.diffusion2gan.latent_lpips import CHANNELS, LatentLPIPS

DISTORTIONS = ("noise", "blur", "shift", "contrast", "patch")


def distort(pixels: torch.Tensor, kind: str, strength: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`pixels` in [0, 1] (B, 3, H, W), each distorted by `kind` at its own `strength` in [0, 1]."""
    s = strength.view(-1, 1, 1, 1)
    if kind == "noise":
        return (pixels + 0.3 * s * torch.randn(pixels.shape, generator=generator)).clamp(0, 1)
    if kind == "blur":  # a 5x5 Gaussian per sample, sigma up to 1.5 px
        radius = torch.arange(-2, 3, dtype=pixels.dtype)
        out = []
        for image, sigma in zip(pixels, strength.tolist()):
            weights = torch.exp(-radius**2 / (2 * max(1.5 * sigma, 1e-3) ** 2))
            kernel = (weights[:, None] * weights[None, :]) / weights.sum() ** 2
            out.append(F.conv2d(F.pad(image[None], (2, 2, 2, 2), mode="replicate"),
                                kernel.expand(3, 1, 5, 5), groups=3)[0])
        return torch.stack(out)
    if kind == "shift":
        return torch.stack([torch.roll(image, shifts=(round(3 * v), round(3 * v)), dims=(1, 2))
                            for image, v in zip(pixels, strength.tolist())])
    if kind == "contrast":
        return ((pixels - 0.5) * (1 - 0.7 * s) + 0.5).clamp(0, 1)
    if kind == "patch":  # a square of the image's mean colour, its side growing with the strength
        size = pixels.shape[-1]
        out = pixels.clone()
        for image, v in zip(out, strength.tolist()):
            side = max(1, round(v * size * 0.6))
            top, left = (torch.randint(0, size - side + 1, (2,), generator=generator)).tolist()
            image[:, top:top + side, left:left + side] = image.mean(dim=(1, 2), keepdim=True)
        return out
    raise ValueError(f"unknown distortion {kind!r}: one of {', '.join(DISTORTIONS)}")


def judgments(count: int, generator: torch.Generator) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """`count` synthetic two-alternative trials: (kind, weaker strength, stronger strength) each."""
    kinds = [DISTORTIONS[i] for i in torch.randint(0, len(DISTORTIONS), (count,), generator=generator).tolist()]
    weak = 0.05 + 0.45 * torch.rand(count, generator=generator)
    strong = weak + 0.2 + 0.3 * torch.rand(count, generator=generator)
    return kinds, weak, strong.clamp(max=1.0)


def two_alternative_distances(model: LatentLPIPS, encode, pixels: torch.Tensor, kinds: list[str], weak: torch.Tensor,
                              strong: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(d(reference, weaker), d(reference, stronger)) per trial; distortions grouped by kind."""
    near, far = torch.zeros(len(kinds)), torch.zeros(len(kinds))
    reference = encode(pixels)
    for kind in sorted(set(kinds)):
        rows = torch.tensor([i for i, k in enumerate(kinds) if k == kind])
        near[rows] = model(reference[rows], encode(distort(pixels[rows], kind, weak[rows], generator)), ensemble=False)
        far[rows] = model(reference[rows], encode(distort(pixels[rows], kind, strong[rows], generator)), ensemble=False)
    return near, far


def train_latent_lpips(shards: str, teacher: str | Path, out_dir: Path, fields: list[str], resolution: int,
                       width: float = 0.125, trunk_steps: int = 400, head_steps: int = 200, batch_size: int = 64,
                       seed: int = 0, progress: bool = True) -> Path:
    """Train and save `out_dir/latent_lpips.pth` (+ latent_lpips.json: what was measured); -> the weights' path."""
    from addpipe.train.config import ModelConfig
    from addpipe.train.models import load_teacher, vae_encode

    data = labelled_images(shards, fields, resolution)
    components = load_teacher(ModelConfig(teacher=str(teacher)), with_unet=False)
    channels = int(components.vae.config.latent_channels)
    torch.manual_seed(seed)
    model = LatentLPIPS(latent_channels=channels, augment=None, width=width)
    trunk = model.net

    @torch.no_grad()
    def encode(pixels01: torch.Tensor) -> torch.Tensor:
        return torch.cat([vae_encode(components, pixels01[i:i + 256] * 2 - 1) for i in range(0, len(pixels01), 256)])

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def features(normalised: torch.Tensor) -> torch.Tensor:  # fit_classifier hands over ImageNet-normalised pixels
        return trunk(encode(normalised * std + mean))[-1].mean(dim=(2, 3))

    # 1. the trunk, as a classifier of the label fields (batch-norm statistics are learned here, in train mode)
    trunk.train()  # the trunk alone: LatentLPIPS itself stays in eval mode
    trunk.requires_grad_(True)
    _, accuracy = fit_classifier(features, list(trunk.parameters()), max(1, round(CHANNELS[-1] * width)), data,
                                 trunk_steps, batch_size=batch_size, lr=2e-3, seed=seed, desc="LatentLPIPS trunk",
                                 progress=progress)
    trunk.eval()
    trunk.requires_grad_(False)

    # 2. the heads, on synthetic two-alternative judgments
    generator = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(len(data), generator=generator)
    held, train_rows = order[: max(1, len(data) // 10)], order[max(1, len(data) // 10):]
    heads = [head.model[1].weight for head in model.lins]
    with torch.no_grad():
        for weight in heads:
            weight.fill_(1.0 / weight.shape[1])  # LPIPS's "baseline": every channel alike, before calibration
    test = torch.Generator().manual_seed(seed + 2)
    test_trials = judgments(len(held), test)

    def agreement() -> float:
        with torch.no_grad():
            near, far = two_alternative_distances(model, encode, data.pixels[held], *test_trials,
                                                  torch.Generator().manual_seed(seed + 3))
        return float((far > near).float().mean())

    before = agreement()
    log_scale = torch.zeros((), requires_grad=True)
    for weight in heads:
        weight.requires_grad_(True)
    optimizer = torch.optim.Adam(heads + [log_scale], lr=1e-2)
    for _ in tqdm(range(head_steps), desc="LatentLPIPS heads", disable=not progress):
        rows = train_rows[torch.randint(0, len(train_rows), (batch_size,), generator=generator)]
        near, far = two_alternative_distances(model, encode, data.pixels[rows], *judgments(batch_size, generator),
                                              generator)
        loss = F.softplus(-log_scale.exp() * (far - near) / (far + near).detach().mean().clamp(min=1e-8)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for weight in heads:
                weight.clamp_(min=0.0)  # distances stay distances: LPIPS's heads are non-negative
    for weight in heads:
        weight.requires_grad_(False)
    after = agreement()

    out_dir = Path(out_dir)
    path = model.save(out_dir / "latent_lpips.pth")
    report = {"width": width, "latent_channels": channels, "trunk_steps": trunk_steps, "head_steps": head_steps,
              "trunk_heldout_accuracy": accuracy, "two_alternative_agreement": {"uncalibrated": before, "calibrated": after},
              "teacher": str(teacher), "shards": shards, "seed": seed,
              "differs_from_published": "trunk trained on the label fields of these shards, not ImageNet; heads calibrated "
                                        "on synthetic same-kind distortion pairs, not BAPPS's human judgments; "
                                        f"{width:g}x the published channel width"}
    (out_dir / "latent_lpips.json").write_text(json.dumps(report, indent=2))
    if not math.isfinite(after):
        raise RuntimeError(f"LatentLPIPS calibration diverged: see {out_dir / 'latent_lpips.json'}")
    return path


