"""E-LatentLPIPS (Kang et al. 2024, Diffusion2GAN sec. 3.2): a perceptual distance computed on a latent diffusion
model's latents, without decoding them, and its ensembling over random differentiable augmentations.

LatentLPIPS is LPIPS with a VGG16-BN trunk whose first convolution reads the latent's channels and whose first
three max-pools are gone (the latent is already 8x smaller than the image): per-channel unit-normalised features
of five stages, squared differences, a learned non-negative 1x1 "linear" head per stage, spatial mean, summed,
plus the mean absolute difference of the latents themselves. E-LatentLPIPS applies one random geometric (and
optionally colour and cutout) augmentation to both latents before each evaluation, which removes the patchy
artefacts plain LatentLPIPS leaves when used as a regression loss.

The module's parameter names are those of the authors' `elatentlpips` package (`net.slice1.0.weight`, ...,
`lin0.model.1.weight`, and the same heads again under `lins.*`), so their published checkpoints
(`<encoder>_latest_vgg16_tuned.pth`) load unchanged with `LatentLPIPS.from_pretrained(path)`. That package itself
does not fit here: it downloads its weights into ./ckpt from the constructor and does not import without
setuptools' pkg_resources (gone from setuptools 81 on). The augmentations are written here, after the ADA
pipeline it uses ('b': flips, quarter turns, integer translation; 'g': scale, rotation, anisotropy, fractional
translation; 'c': brightness and contrast; 'o': cutout), drawn per sample with probability 1.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# vgg16_bn.features index ranges of the five stages, as the published network slices them
SLICES = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 44))
CHANNELS = (64, 128, 256, 512, 512)
AUGMENTS = ("b", "g", "c", "o")


# torchvision's VGG16 configuration (cfgs["D"]): channels of each 3x3 convolution, "M" a max-pool
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class LatentVGG(nn.Module):
    """The trunk: torchvision's VGG16-BN features reading `latent_channels`, without the first three max-pools.
    `width` scales every stage's channels (1: the published network; the offline demo trains a narrower one)."""

    def __init__(self, latent_channels: int = 4, width: float = 1.0):
        super().__init__()
        from torchvision.models.vgg import make_layers

        channels = [item if item == "M" else max(1, round(item * width)) for item in VGG16]
        features = make_layers(channels, batch_norm=True)  # the layer order and indices of vgg16_bn().features
        features[0] = nn.Conv2d(latent_channels, channels[0], kernel_size=3, padding=1)
        for index in [i for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)][:3]:
            features[index] = nn.Identity()
        for number, (start, stop) in enumerate(SLICES, 1):
            setattr(self, f"slice{number}", nn.Sequential(OrderedDict((str(i), features[i]) for i in range(start, stop))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for number in range(1, len(SLICES) + 1):
            x = getattr(self, f"slice{number}")(x)
            outputs.append(x)
        return outputs

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"slice{number}") for number in range(1, len(SLICES) + 1)]


class NetLin(nn.Module):
    """A stage's calibrated head: a 1x1 convolution from the squared feature differences to one channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def unit_normalise(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each spatial position's feature vector scaled to unit length (LPIPS's normalize_tensor)."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LatentAugment(nn.Module):
    """One random augmentation per sample, applied identically to every tensor given (the generated and the target
    latent), differentiable in the tensors. `kinds`: letters of AUGMENTS, e.g. 'bg' (the published default)."""

    def __init__(self, kinds: str = "bg", translate: float = 0.125, scale_std: float = 0.2, aniso_std: float = 0.2,
                 frac_std: float = 0.125, brightness_std: float = 0.2, contrast_std: float = 0.5, cutout: float = 0.5):
        super().__init__()
        unknown = set(kinds) - set(AUGMENTS)
        if unknown:
            raise ValueError(f"unknown augmentation(s) {''.join(sorted(unknown))!r}: letters of {''.join(AUGMENTS)} "
                             "(b flips/quarter turns/integer shifts, g scale/rotation/anisotropy/fractional shifts, "
                             "c brightness/contrast, o cutout)")
        self.kinds = kinds
        self.translate, self.scale_std, self.aniso_std, self.frac_std = translate, scale_std, aniso_std, frac_std
        self.brightness_std, self.contrast_std, self.cutout = brightness_std, contrast_std, cutout

    def draw(self, batch: int, height: int, width: int, generator: Optional[torch.Generator] = None) -> dict:
        """The random parameters of one augmentation per sample (on the CPU; `generator` makes them repeatable)."""
        def uniform(*shape):
            return torch.rand(shape, generator=generator, dtype=torch.float64)

        def normal(*shape):
            return torch.randn(shape, generator=generator, dtype=torch.float64)

        # the affine map from output to input coordinates (normalised to [-1, 1]), composed right to left
        matrix = torch.eye(3, dtype=torch.float64).repeat(batch, 1, 1)

        def then(m):
            nonlocal matrix
            matrix = matrix @ m

        def scale2(sx, sy):
            m = torch.eye(3, dtype=torch.float64).repeat(batch, 1, 1)
            m[:, 0, 0], m[:, 1, 1] = sx, sy
            return m

        def rotation(angle):
            m = torch.eye(3, dtype=torch.float64).repeat(batch, 1, 1)
            m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
            return m

        def shift(tx, ty):
            m = torch.eye(3, dtype=torch.float64).repeat(batch, 1, 1)
            m[:, 0, 2], m[:, 1, 2] = tx, ty
            return m

        if "b" in self.kinds:
            then(scale2(1 - 2 * (uniform(batch) < 0.5).double(), torch.ones(batch, dtype=torch.float64)))  # x flip
            then(rotation(torch.floor(uniform(batch) * 4) * (math.pi / 2)))  # quarter turns
            pixels = torch.tensor([width, height], dtype=torch.float64)
            t = torch.round((uniform(batch, 2) * 2 - 1) * self.translate * pixels) / pixels * 2  # whole pixels
            then(shift(t[:, 0], t[:, 1]))
        if "g" in self.kinds:
            s = torch.exp2(normal(batch) * self.scale_std)
            then(scale2(s, s))
            then(rotation((uniform(batch) * 2 - 1) * math.pi))
            a = torch.exp2(normal(batch) * self.aniso_std)
            then(scale2(a, 1 / a))
            t = normal(batch, 2) * self.frac_std * 2
            then(shift(t[:, 0], t[:, 1]))
        params = {"matrix": matrix[:, :2, :]}
        if "c" in self.kinds:
            params["brightness"] = normal(batch) * self.brightness_std
            params["contrast"] = torch.exp2(normal(batch) * self.contrast_std)
        if "o" in self.kinds:
            centre = uniform(batch, 2)
            ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height
            xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width
            inside_y = (ys[None, :] - centre[:, 1:2]).abs() < self.cutout / 2
            inside_x = (xs[None, :] - centre[:, 0:1]).abs() < self.cutout / 2
            params["keep"] = ~(inside_y[:, :, None] & inside_x[:, None, :])
        return params

    def apply(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        if "matrix" in params and ("b" in self.kinds or "g" in self.kinds):
            grid = F.affine_grid(params["matrix"].to(x.device, x.dtype), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if "brightness" in params:
            x = x + params["brightness"].to(x.device, x.dtype)[:, None, None, None]
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * params["contrast"].to(x.device, x.dtype)[:, None, None, None] + mean
        if "keep" in params:
            x = x * params["keep"].to(x.device, x.dtype)[:, None]
        return x

    def forward(self, *tensors: torch.Tensor, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, ...]:
        first = tensors[0]
        params = self.draw(first.shape[0], first.shape[-2], first.shape[-1], generator)
        return tuple(self.apply(t, params) for t in tensors)


class LatentLPIPS(nn.Module):
    """d(a, b) per sample for scaled latents (the space the UNet works in). `augment`: None for plain LatentLPIPS,
    else the letters of the ensemble's augmentations ('bg' as published); `l1`: add mean |a - b| as published."""

    def __init__(self, latent_channels: int = 4, augment: Optional[str] = "bg", l1: bool = True, width: float = 1.0):
        super().__init__()
        self.net = LatentVGG(latent_channels, width)
        self.width = width
        for number, channels in enumerate(CHANNELS):
            setattr(self, f"lin{number}", NetLin(max(1, round(channels * width))))
        self.lins = nn.ModuleList([getattr(self, f"lin{number}") for number in range(len(CHANNELS))])  # published alias
        self.augment = LatentAugment(augment) if augment else None
        self.l1 = l1
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LatentLPIPS":
        """A loss network: batch norm keeps its running statistics and dropout stays off whatever the caller does."""
        return super().train(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor, ensemble: bool = True,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if a.shape != b.shape:
            raise ValueError(f"LatentLPIPS compares latents of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        distance = (a - b).abs().mean(dim=(1, 2, 3)) if self.l1 else a.new_zeros(a.shape[0])
        if ensemble and self.augment is not None:
            a, b = self.augment(a, b, generator=generator)
        for head, fa, fb in zip(self.lins, self.net(a), self.net(b)):
            distance = distance + head((unit_normalise(fa) - unit_normalise(fb)) ** 2).mean(dim=(1, 2, 3))
        return distance

    @classmethod
    def from_pretrained(cls, path: str | Path, latent_channels: int = 4, augment: Optional[str] = "bg",
                        l1: bool = True) -> "LatentLPIPS":
        """Weights from a file: a published `<encoder>_latest_vgg16_tuned.pth`, or one `save` wrote. The width is
        read off the weights (the first convolution's output channels against the published 64)."""
        from addpipe.train.models import ModelLoadError

        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"LatentLPIPS weights {path} not found (a .pth/.pt state dict or .safetensors)")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        first = state.get("net.slice1.0.weight")
        width = 1.0 if first is None else first.shape[0] / CHANNELS[0]
        model = cls(latent_channels, augment, l1, width)
        if not any(k.startswith("lins.") for k in state):  # written without the alias
            state.update({f"lins.{k[3]}.{k[5:]}": v for k, v in state.items() if k.startswith("lin")})
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # a shape mismatch: another latent width, or another network
            raise ModelLoadError(f"{path} does not fit LatentLPIPS for {latent_channels} latent channels: "
                                 f"{str(error).strip().splitlines()[-1].strip()}") from error
        if missing or unexpected:
            raise ModelLoadError(f"{path} is not a LatentLPIPS state dict for {latent_channels} latent channels: "
                                 f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        return model

    def save(self, path: str | Path) -> Path:
        """The state dict in the published layout (both head names), loadable by `from_pretrained` and by the
        authors' package."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path)
        return path
