"""E-LatentLPIPS (train/methods/diffusion2gan/latent_lpips.py): zero for identical latents, one augmentation shared by both sides,
gradients through the augmentations, the LPIPS formula, and the published checkpoints' parameter names."""

from __future__ import annotations

import pytest
import torch

from addpipe.train.methods.diffusion2gan.latent_lpips import LatentAugment, LatentLPIPS, unit_normalise
from addpipe.train.models import ModelLoadError

# torchvision's VGG16-BN configuration: channels of each 3x3 convolution, M a max-pool (each conv is followed by
# batch norm and ReLU); the published slices cut features at 7, 14, 24, 34 and 44
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def published_names(latent_channels: int = 4) -> dict[str, tuple[int, ...]]:
    """The state-dict names and shapes of the authors' ELatentLPIPS(net='vgg16'), written out from its layout."""
    names, index, previous = {}, 0, latent_channels
    bounds = [0, 7, 14, 24, 34, 44]
    where = lambda i: next(k for k in range(5) if bounds[k] <= i < bounds[k + 1]) + 1  # noqa: E731
    for item in VGG16:
        if item == "M":
            index += 1
            continue
        conv, bn = f"net.slice{where(index)}.{index}", f"net.slice{where(index + 1)}.{index + 1}"
        names[f"{conv}.weight"], names[f"{conv}.bias"] = (item, previous, 3, 3), (item,)
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            names[f"{bn}.{suffix}"] = (item,)
        names[f"{bn}.num_batches_tracked"] = ()
        previous, index = item, index + 3
    for k, channels in enumerate((64, 128, 256, 512, 512)):
        names[f"lin{k}.model.1.weight"] = names[f"lins.{k}.model.1.weight"] = (1, channels, 1, 1)
    return names


def heads_positive(model: LatentLPIPS) -> LatentLPIPS:
    with torch.no_grad():
        for head in model.lins:
            head.model[1].weight.uniform_(0.1, 1.0)
    return model


def test_the_parameter_names_and_shapes_are_the_published_ones(tmp_path):
    model = LatentLPIPS(latent_channels=4)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == published_names(4)
    sd3 = LatentLPIPS(latent_channels=16)
    assert sd3.state_dict()["net.slice1.0.weight"].shape == (64, 16, 3, 3)
    # a checkpoint in the published layout loads unchanged (and one saved without the `lins` alias too)
    reference = heads_positive(LatentLPIPS())
    torch.save(reference.state_dict(), tmp_path / "sd15_latest_vgg16_tuned.pth")
    loaded = LatentLPIPS.from_pretrained(tmp_path / "sd15_latest_vgg16_tuned.pth")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.state_dict().items())
    torch.save({k: v for k, v in reference.state_dict().items() if not k.startswith("lins.")}, tmp_path / "plain.pt")
    assert torch.equal(LatentLPIPS.from_pretrained(tmp_path / "plain.pt").lins[3].model[1].weight,
                       reference.lin3.model[1].weight)
    narrow = heads_positive(LatentLPIPS(width=0.125))  # what the offline demo trains: same layout, fewer channels
    assert narrow.state_dict()["net.slice5.34.weight"].shape == (64, 64, 3, 3)
    narrow.save(tmp_path / "narrow.pth")
    back = LatentLPIPS.from_pretrained(tmp_path / "narrow.pth")
    assert back.width == 0.125 and all(torch.equal(back.state_dict()[k], v) for k, v in narrow.state_dict().items())
    with pytest.raises(ModelLoadError, match="16 latent channels"):
        LatentLPIPS.from_pretrained(tmp_path / "sd15_latest_vgg16_tuned.pth", latent_channels=16)
    with pytest.raises(ModelLoadError, match="not found"):
        LatentLPIPS.from_pretrained(tmp_path / "missing.pth")


def test_identical_latents_are_at_distance_zero_and_different_ones_are_not():
    torch.manual_seed(0)
    model = heads_positive(LatentLPIPS())
    a, b = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    for ensemble in (False, True):
        assert torch.equal(model(a, a.clone(), ensemble=ensemble), torch.zeros(3))
        assert (model(a, b, ensemble=ensemble) > 0).all()
    with pytest.raises(ValueError, match="one shape"):
        model(a, b[:, :, :8])


def test_without_augmentation_the_distance_is_the_lpips_formula_plus_l1():
    torch.manual_seed(1)
    model = heads_positive(LatentLPIPS())
    a, b = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    expected = (a - b).abs().mean(dim=(1, 2, 3))
    x, y = a, b
    for stage, head in zip(model.net.stages(), (model.lin0, model.lin1, model.lin2, model.lin3, model.lin4)):
        x, y = stage(x), stage(y)
        diff = (x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) - y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)) ** 2
        expected = expected + (diff * head.model[1].weight.view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
    torch.testing.assert_close(model(a, b, ensemble=False), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(unit_normalise(torch.tensor([[[[3.0]], [[4.0]]]])).flatten(), torch.tensor([0.6, 0.8]))
    model.train()  # a loss network stays in eval mode: batch-norm statistics and no dropout
    assert not model.training and not model.net.slice1[1].training
    torch.testing.assert_close(model(a, b, ensemble=False), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kinds", ["bg", "bgco", "o", "c"])
def test_the_ensemble_applies_one_transform_to_both_sides(kinds):
    augment = LatentAugment(kinds)
    a, b = torch.randn(4, 4, 12, 12), torch.randn(4, 4, 12, 12)
    both = augment(a, b, generator=torch.Generator().manual_seed(7))
    alone_a = augment(a, generator=torch.Generator().manual_seed(7))[0]
    alone_b = augment(b, generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(both[0], alone_a) and torch.equal(both[1], alone_b)
    assert both[0].shape == a.shape
    assert not torch.allclose(both[0], a)  # it does transform
    again = augment(a, b, generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(again[0], both[0])  # a new draw each evaluation: the ensemble over calls
    if "g" in kinds or "b" in kinds:  # samples of one batch are transformed differently
        params = augment.draw(4, 12, 12, torch.Generator().manual_seed(7))
        assert not torch.allclose(params["matrix"][0], params["matrix"][1])


def test_gradients_flow_through_the_augmentations_to_the_generated_latent():
    augment = LatentAugment("bgco")
    params = augment.draw(2, 6, 6, torch.Generator().manual_seed(3))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: augment.apply(t, params), (x,))
    model = heads_positive(LatentLPIPS())
    fake = torch.randn(2, 4, 16, 16, requires_grad=True)
    target = torch.randn(2, 4, 16, 16)
    model(fake, target, generator=torch.Generator().manual_seed(0)).sum().backward()
    assert fake.grad is not None and torch.isfinite(fake.grad).all() and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # the loss network itself stays frozen


def test_unknown_augmentation_letters_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown augmentation\\(s\\) 'xz'"):
        LatentLPIPS(augment="bxz")
