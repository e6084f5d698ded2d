import pytest
import torch

from addpipe.train.methods.add.config import DiscriminatorConfig
from addpipe.train.methods.add.discriminator import LocalBatchNorm, build_discriminator, evenly_spaced_layers


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


def test_c_text_can_come_from_a_separate_clip_text_encoder(tiny_sd, tiny_sdxl, tiny_dino, digit_shards, tmp_path):
    """discriminator.text_encoder (the paper: CLIP ViT-g-14) gives c_text as that model's projected embedding of
    each caption, and sizes the heads' condition to it; a missing directory is named."""
    import shutil

    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from addpipe.config import load
    from addpipe.train.config import TrainConfig
    from addpipe.train.loop import Trainer
    from addpipe.train.models import ModelLoadError
    from conftest import TINY_CONFIG, tiny_overrides

    encoder = tmp_path / "clip_text"  # a CLIP text model with projection and its tokenizer in one directory
    shutil.copytree(tiny_sdxl / "text_encoder_2", encoder)
    for file in (tiny_sdxl / "tokenizer_2").iterdir():
        shutil.copy(file, encoder / file.name)
    trainer = Trainer(load(TrainConfig, TINY_CONFIG, tiny_overrides(
        tiny_sd, tiny_dino, digit_shards, tmp_path / "run", steps=1,
        **{"engine.zero": 0, "discriminator.text_encoder": str(encoder)})))
    batch = next(trainer.data)
    inputs = trainer.method.prepare(batch)
    model, tokenizer = CLIPTextModelWithProjection.from_pretrained(encoder), CLIPTokenizer.from_pretrained(encoder)
    ids = tokenizer(batch.captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).text_embeds
    torch.testing.assert_close(trainer.method.text_condition(inputs), expected)
    assert expected.shape[1] == model.config.projection_dim
    assert not torch.allclose(expected, inputs.conditioning.pooled)  # not the teacher's own pooled embedding
    trainer.run()  # the heads take the new width through a whole step
    assert (tmp_path / "run" / "student").is_dir()

    # a whole CLIP model's directory (as laion/CLIP-ViT-g-14 is): the text tower and its projection, whose width
    # sits at the top of the config
    from transformers import CLIPConfig, CLIPModel

    from addpipe.train.models import TextEmbedder

    text = model.config.to_dict() | {"projection_dim": 512}  # text_config's own default, not the model's
    clip = CLIPModel(CLIPConfig(text_config=text, projection_dim=24,
                                vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "image_size": 32, "patch_size": 16}))
    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    embedder = TextEmbedder(str(tmp_path / "clip"), "cpu")
    with torch.no_grad():  # CLIP's text features: the projection of the text tower's pooled (EOS) output
        features = clip.text_projection(clip.text_model(ids).pooler_output)
    assert embedder.dim == 24 and torch.allclose(embedder(batch.captions), features, atol=1e-5)

    with pytest.raises(ModelLoadError, match="no_such_clip"):
        Trainer(load(TrainConfig, TINY_CONFIG, tiny_overrides(
            tiny_sd, tiny_dino, digit_shards, tmp_path / "bad", steps=1,
            **{"discriminator.text_encoder": str(tmp_path / "no_such_clip")})))


def test_spectral_norm_holds_each_heads_largest_singular_value_at_one_and_keeps_no_state():
    """The heads' convolutions (discriminator.spectral_norm) have spectral norm 1 as matrices (out, in x kernel),
    gradients reach the raw weights, and nothing but the trained parameters is state (a resume restores it all)."""
    from addpipe.train.methods.add.discriminator import DiscriminatorHead

    torch.manual_seed(0)
    head = DiscriminatorHead(24, 8, 16, 9, virtual_batch_size=4, spectral_norm=True)
    convolutions = [head.stem[0], head.residual[0], head.to_logits]
    for conv in convolutions:
        with torch.no_grad():
            conv.parametrizations.weight.original.mul_(5.0)  # whatever scale the raw weights have
        raw = torch.linalg.matrix_norm(conv.parametrizations.weight.original.detach().flatten(1), ord=2)
        singular = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert raw > 3 and singular.item() == pytest.approx(1.0, rel=2e-3)
    assert not list(head.buffers())
    out = head(torch.randn(8, 24, 10), torch.randn(8, 8))
    out.sum().backward()
    assert all(conv.parametrizations.weight.original.grad.abs().sum() > 0 for conv in convolutions)
    plain = DiscriminatorHead(24, 8, 16, 9, virtual_batch_size=4)
    assert {n.replace(".parametrizations.weight.original", ".weight") for n, _ in head.named_parameters()} == \
        {n for n, _ in plain.named_parameters()}


def test_diffaugment_is_a_function_of_seed_step_and_stream_and_lets_gradients_through():
    """discriminator.augment: the same draws for a sample whatever rank holds it and after a resume; translation
    moves the image by whole pixels with zero fill, cutout zeroes a half-size square, colour is affine per sample."""
    from addpipe.train.methods.add.augment import augment, draw, parse_policy

    torch.manual_seed(0)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    whole = draw(7, 3, [0, 0, 5, 5], purpose=12)
    split = torch.cat([draw(7, 3, [0, 0], 12).values, draw(7, 3, [5, 5], 12).values])
    assert torch.equal(whole.values, split)  # two ranks draw what one does
    assert not torch.equal(whole.values, draw(7, 4, [0, 0, 5, 5], 12).values)  # another step, other draws

    shifted = augment(images, ("translation",), whole)
    moved = 0
    for i in range(4):  # each output is the input shifted by whole pixels, zero filled
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                expected = torch.zeros_like(images[i])
                ys, yd = slice(max(0, dy), 16 + min(0, dy)), slice(max(0, -dy), 16 + min(0, -dy))
                xs, xd = slice(max(0, dx), 16 + min(0, dx)), slice(max(0, -dx), 16 + min(0, -dx))
                expected[:, yd, xd] = images[i][:, ys, xs]
                if torch.equal(shifted[i], expected):
                    found, moved = True, moved + int((dy, dx) != (0, 0))
        assert found
    assert moved >= 1
    cut = augment(images, ("cutout",), whole)
    zeroed = (cut == 0).all(dim=1)
    assert all(zeroed[i].sum() > 0 and zeroed[i].sum() <= 64 for i in range(4))  # at most an 8 x 8 square
    coloured = augment(images, ("color",), whole)
    assert not torch.allclose(coloured, images)

    x = images.clone().requires_grad_(True)
    augment(x, parse_policy("color,translation,cutout"), whole).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown flips"):
        parse_policy("color,flips")
