"""What R1 weighs against the hinge loss, and how the gradients it sends to the heads compare, at the demo's and at
the paper's setting; the evidence behind discriminator.r1_gamma and r1_normalise (docs/method.md).

    .venv/bin/python benchmarks/r1_calibration.py --demo demo_out            # writes benchmarks/results/r1_calibration.json

For each setting: fresh heads on the feature network's tokens of a batch of images (real digits from the demo's
shards, or images upscaled to 224^2 for a DINOv2-S-shaped ViT), then the hinge loss (real + fake), R1 raw and
normalised, and the norm of the gradient each of hinge and gamma * R1 sends to the heads' parameters, at the
feature network's own scale and with its features multiplied by 20 (where a pretrained DINOv2's hidden states sit
relative to a random-init one's). Side by side in one run; the machine and its load are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def images_from_shards(demo: Path, count: int) -> torch.Tensor:
    from addpipe.shards import shard_pattern
    from addpipe.train.data import decode_sample
    import webdataset as wds

    found = []
    for sample in wds.WebDataset(shard_pattern(sorted((demo / "prep" / "shards").glob("*.tar"))), shardshuffle=False):
        found.append(decode_sample(sample, 32, "txt", None, None)["pixels"])
        if len(found) == count:
            break
    return torch.stack(found)


def measure(feature_network, images, fakes, gammas, scale: float, heads: int = 5, input_size: int = 224) -> dict:
    from addpipe.train import losses
    from addpipe.train.methods.add.discriminator import Discriminator, evenly_spaced_layers

    torch.manual_seed(0)
    layers = evenly_spaced_layers(feature_network.config.num_hidden_layers,
                                  min(heads, feature_network.config.num_hidden_layers))
    disc = Discriminator(feature_network, layers, text_dim=0, image_dim=0, text_conditioning=False,
                         image_conditioning=False, input_size=input_size, spectral_norm=True)
    with torch.no_grad():
        real_features = [scale * f for f in disc.features(images)]
        fake_features = [scale * f for f in disc.features(fakes)]
    params = list(disc.heads.parameters())
    real_inputs = [f.clone().requires_grad_(True) for f in real_features]
    real_logits = disc(real_inputs, None, None)
    fake_logits = disc(fake_features, None, None)
    hinge = losses.discriminator_hinge_loss(real_logits, fake_logits)
    hinge_total = hinge["real"] + hinge["fake"]
    hinge_grad = torch.cat([g.flatten() for g in torch.autograd.grad(hinge_total, params, retain_graph=True)]).norm()
    found = {"scale": scale, "tokens": real_features[0].shape[-1], "feature_rms": float(torch.stack(
        [f.detach().pow(2).mean() for f in real_features]).mean().sqrt()), "hinge": float(hinge_total),
             "hinge_grad_norm_at_heads": float(hinge_grad), "by_gamma": {}}
    for normalise in (False, True):
        r1 = losses.r1_penalty(real_logits, real_inputs, normalise=normalise)
        r1_grad = torch.cat([g.flatten() for g in torch.autograd.grad(r1, params, retain_graph=True, allow_unused=True)
                             if g is not None]).norm()
        name = "normalised" if normalise else "raw"
        found[f"r1_{name}"] = float(r1)
        for gamma in gammas:
            found["by_gamma"].setdefault(str(gamma), {})[name] = {
                "share_of_hinge": float(gamma * r1 / hinge_total),
                "grad_ratio_at_heads": float(gamma * r1_grad / hinge_grad)}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True, help="a finished `addpipe demo` directory (shards, models/dinov2)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--gammas", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 2e-3, 1e-2])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "r1_calibration.json"))
    args = parser.parse_args()
    from transformers import Dinov2Config, Dinov2Model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    demo = Path(args.demo)
    real = images_from_shards(demo, 2 * args.batch)
    images, others = real[: args.batch], real[args.batch:]
    fakes = (0.7 * others + 0.3 * torch.randn_like(others)).clamp(-1, 1)  # a poor generator: real plus noise
    demo_dino = Dinov2Model.from_pretrained(demo / "models" / "dinov2").eval()
    small = Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                                     image_size=224)).eval()  # DINOv2 ViT-S/14's shape, random init
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg(),
                           "python": sys.version.split()[0], "torch": torch.__version__},
               "settings": {}}
    for name, network, size in (("demo ViT, its input size", demo_dino, demo_dino.config.image_size),
                                ("DINOv2-S shape at 224^2", small, 224)):
        for scale in (1.0, 20.0):
            key = f"{name}, features x{scale:g}"
            results["settings"][key] = measure(network, images, fakes, args.gammas, scale, input_size=size)
            row = results["settings"][key]
            print(f"{key}: tokens {row['tokens']}, feature RMS {row['feature_rms']:.3g}, hinge {row['hinge']:.3g}, "
                  f"R1 raw {row['r1_raw']:.3g}, normalised {row['r1_normalised']:.3g}")
            for gamma, by in row["by_gamma"].items():
                print(f"    gamma {gamma}: share of hinge raw {by['raw']['share_of_hinge']:.2e} normalised "
                      f"{by['normalised']['share_of_hinge']:.2e}; gradient at the heads vs the hinge's raw "
                      f"{by['raw']['grad_ratio_at_heads']:.2e} normalised {by['normalised']['grad_ratio_at_heads']:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
