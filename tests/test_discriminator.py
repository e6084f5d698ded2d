import pytest
import torch

from addpipe.train.config import DiscriminatorConfig
from addpipe.train.discriminator import LocalBatchNorm, build_discriminator, evenly_spaced_layers


@pytest.fixture()
def discriminator(tiny_dino):
    config = DiscriminatorConfig(feature_network=str(tiny_dino), input_size=32, num_heads=4, projection_dim=8,
                                 virtual_batch_size=2)
    torch.manual_seed(0)
    return build_discriminator(config, text_dim=6)


def test_layers_are_evenly_spaced():
    assert evenly_spaced_layers(12, 4) == [3, 6, 9, 12]
    assert evenly_spaced_layers(4, 4) == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        evenly_spaced_layers(4, 5)


def test_backbone_frozen_in_eval_and_heads_get_gradients(discriminator):
    discriminator.train()
    assert not discriminator.feature_network.training
    assert all(not p.requires_grad for p in discriminator.feature_network.parameters())
    assert len(discriminator.heads) == 4 and discriminator.heads.training
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    text, image = torch.randn(4, 6), discriminator.image_embedding(images)
    logits = discriminator(discriminator.features(images), text, image)
    sum(l.mean() for l in logits).backward()
    assert all(p.grad is None for p in discriminator.feature_network.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in discriminator.heads.parameters())


def test_each_condition_changes_the_output(discriminator):
    discriminator.eval()
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    features = discriminator.features(images)
    text, image = torch.randn(4, 6), discriminator.image_embedding(images)
    base = discriminator(features, text, image)
    other_text = discriminator(features, torch.randn(4, 6), image)
    other_image = discriminator(features, text, discriminator.image_embedding(images.flip(0)))
    assert not torch.allclose(base[0], other_text[0])
    assert not torch.allclose(base[0], other_image[0])


def test_fake_gradients_reach_pixels_not_backbone(discriminator):
    images = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    logits = discriminator(discriminator.features(images), torch.randn(2, 6), torch.randn(2, 32))
    sum(l.mean() for l in logits).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_unconditional_heads_when_both_conditions_off(tiny_dino):
    config = DiscriminatorConfig(feature_network=str(tiny_dino), input_size=32, num_heads=2,
                                 text_conditioning=False, image_conditioning=False)
    disc = build_discriminator(config, text_dim=6)
    logits = disc(disc.features(torch.zeros(2, 3, 16, 16)), None, None)
    assert [l.shape for l in logits] == [torch.Size([2, 65])] * 2  # 8x8 patches + CLS


def test_local_batch_norm_normalises_each_group_separately():
    norm = LocalBatchNorm(3, virtual_batch_size=2)
    x = torch.cat([torch.randn(2, 3, 5), 100 + 10 * torch.randn(2, 3, 5)])
    y = norm(x).detach()
    for group in (y[:2], y[2:]):
        torch.testing.assert_close(group.mean(dim=(0, 2)), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(group.var(dim=(0, 2), unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    assert norm.group_count(6) == 3 and norm.group_count(5) == 5
