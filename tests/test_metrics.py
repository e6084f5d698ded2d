"""Automated metrics against their definitions: the Fréchet distance against a direct eigenvalue formula and
a closed form, each feature network's loading path, and the CLIP score on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from addpipe.eval.metrics import (clean_resize, clip_scores, features_of, frechet_between, frechet_distance,
                                  load_feature_network, statistics)


def random_images(count, size, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)) for _ in range(count)]


def test_frechet_distance_matches_a_direct_formula_on_random_features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 8))
    b = rng.normal(loc=0.3, scale=1.5, size=(250, 8)) @ rng.normal(size=(8, 8)) * 0.5
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    # Tr((S1 S2)^1/2) = sum of square roots of the eigenvalues of S1 S2 (real, non-negative for SPD S1, S2)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)))
    assert frechet_between(a, b) == pytest.approx(direct, rel=1e-6)
    assert frechet_between(a, a) == pytest.approx(0.0, abs=1e-8)
    # diagonal Gaussians: |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    va, vb = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    assert frechet_distance(np.zeros(3), np.diag(va), np.ones(3), np.diag(vb)) == pytest.approx(3 + 1 + 1 + 0)


def test_clean_resize_keeps_values_and_identity():
    image = random_images(1, 24, 1)[0]
    assert np.array_equal(clean_resize(image, 24), np.asarray(image, dtype=np.float32))
    flat = Image.new("RGB", (40, 40), (10, 200, 77))
    np.testing.assert_allclose(clean_resize(flat, 13), np.broadcast_to([10, 200, 77], (13, 13, 3)), atol=1e-3)


def test_dinov2_feature_network_computes_fd_on_its_cls_tokens(tmp_path):
    from transformers import AutoModel

    from addpipe.train.tiny import build_tiny_dinov2

    directory = build_tiny_dinov2(tmp_path / "dino", image_size=32)
    network = load_feature_network(f"dinov2:{directory}", size=32)
    a, b = random_images(12, 48, 1), random_images(12, 48, 2)
    features = features_of(a, network, batch_size=5)
    model = AutoModel.from_pretrained(directory).eval()
    pixels = torch.from_numpy(np.stack([clean_resize(image, 32) for image in a])).permute(0, 3, 1, 2) / 255.0
    pixels = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(features, expected, atol=1e-5)
    assert frechet_between(features, features_of(a, network)) == pytest.approx(0.0, abs=1e-6)
    assert frechet_between(features, features_of(b, network)) > 0


class ScriptedInception(torch.nn.Module):
    """The calling convention of the TorchScript FID Inception: 0-255 input, `return_features=True`."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = self.conv(x / 255.0).mean(dim=(2, 3))
        return pooled if return_features else pooled.sum(dim=1, keepdim=True)


def test_inception_loads_from_a_torchscript_file_or_a_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    module = ScriptedInception().eval()
    torch.jit.script(module).save(str(tmp_path / "inception.pt"))
    network = load_feature_network(f"inception:{tmp_path / 'inception.pt'}", size=32)
    images = random_images(3, 40, 3)
    batch = torch.from_numpy(np.stack([clean_resize(i, 32) for i in images])).permute(0, 3, 1, 2)
    with torch.no_grad():
        np.testing.assert_allclose(network(images), module(batch, return_features=True).numpy(), atol=1e-6)

    from torchvision.models import inception_v3

    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(), tmp_path / "tv.pth")
    features = load_feature_network(f"inception:{tmp_path / 'tv.pth'}")(random_images(2, 64, 4))
    assert features.shape == (2, 2048) and np.isfinite(features).all()
    with pytest.raises(FileNotFoundError, match="Inception weights"):
        load_feature_network("inception:/nonexistent.pt")
    with pytest.raises(ValueError, match="unknown feature network"):
        load_feature_network("vgg:x")


def test_clip_score_is_100_times_the_clipped_cosine(tmp_path):
    import open_clip

    from addpipe.clip import EmbedConfig, load_clip
    from addpipe.dataprep.tiny import build_tiny_clip

    tiny = build_tiny_clip(tmp_path / "clip")
    embedder = load_clip(EmbedConfig(**tiny))
    images = random_images(4, 40, 5)
    prompts = ["a red square", "noise", "a cat", "ein Hund"]
    scores = clip_scores(images, prompts, embedder)
    model, _, preprocess = open_clip.create_model_and_transforms(tiny["model"], pretrained=tiny["pretrained"])
    tokenizer = open_clip.get_tokenizer(tiny["model"])
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(i) for i in images]))
        text_features = model.encode_text(tokenizer(prompts))
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features).numpy()
    np.testing.assert_allclose(scores, 100 * np.maximum(cosine, 0), atol=1e-3)
    # the same model as an FD feature network: its image embeddings of clean-resized, CLIP-normalised pixels
    network = load_feature_network(f"clip:{tiny['model_config']}@{tiny['pretrained']}", "cpu")
    batch = torch.from_numpy(np.stack([clean_resize(i, 32) for i in images])).permute(0, 3, 1, 2) / 255.0
    mean, std = torch.tensor(model.visual.preprocess_cfg["mean"]), torch.tensor(model.visual.preprocess_cfg["std"])
    with torch.no_grad():
        expected = model.encode_image((batch - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).numpy()
    np.testing.assert_allclose(network(images), expected, atol=1e-5)
    assert statistics(np.ones((3, 2)))[0].tolist() == [1.0, 1.0]
