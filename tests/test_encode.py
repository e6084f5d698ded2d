"""`addpipe prep encode`: precomputed latents and text embeddings equal the on-the-fly ones, the trainer
uses them (same losses, fewer encoder calls), ignores them when they do not fit, and reruns skip work."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds

from addpipe.config import load
from addpipe.train.config import TrainConfig
from conftest import TINY_CONFIG, tiny_overrides
from test_train import cli


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def encoded(tiny_sdxl, tiny_dino, digit_shards, tmp_path_factory):
    shards = tmp_path_factory.mktemp("encoded") / "shards"
    shutil.copytree(digit_shards, shards)
    overrides = tiny_overrides(tiny_sdxl, tiny_dino, shards, shards.parent / "unused")
    result = cli("prep", "encode", "--shards", str(shards), "--config", str(TINY_CONFIG), "--storage", "float32", *overrides)
    assert "encoded 8 of 8 shard(s) (96 samples" in result.stdout
    return shards


def test_encoded_tensors_equal_the_trainers_own_encoding(encoded, tiny_sdxl, tiny_dino):
    from addpipe.train.data import decode_sample
    from addpipe.train.models import encode_prompts, load_teacher, vae_encode

    config = load(TrainConfig, TINY_CONFIG, tiny_overrides(tiny_sdxl, tiny_dino, encoded, encoded.parent / "unused"))
    teacher = load_teacher(config.model)
    samples = list(wds.tarfile_samples([{"url": str(encoded / "00003.tar")}]))
    assert len(samples) == 12
    decoded = [decode_sample(s, 16, "txt", None) for s in samples]
    with torch.no_grad():
        latents = vae_encode(teacher, torch.stack([d["pixels"] for d in decoded]))
        text = encode_prompts(teacher, [d["caption"] for d in decoded], "cpu")
    for i, sample in enumerate(samples):
        assert json.loads(sample["json"])["addpipe_encoded"]["resolution"] == 16
        torch.testing.assert_close(torch.from_numpy(np.load(io.BytesIO(sample["latents.npy"]))), latents[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(np.load(io.BytesIO(sample["prompt_embeds.npy"]))), text.hidden_states[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(np.load(io.BytesIO(sample["pooled_embeds.npy"]))), text.pooled[i], atol=1e-5, rtol=1e-5)
        assert "jpg" in sample and "txt" in sample  # the images stay: the discriminator still needs real pixels


@pytest.mark.parametrize("student", ["full", "lora"])
def test_trainer_uses_matching_precomputed_tensors_with_the_same_losses(encoded, tiny_sdxl, tiny_dino, digit_shards, tmp_path,
                                                                        student):
    from addpipe.train.loop import train

    # a LoRA student's teacher is the same base UNet, VAE and text encoders: the same precomputed tensors serve it
    kind = {"student.lora.rank": 4, "student.lora.init": "gaussian"} if student == "lora" else {}

    def run(shards, name, **extra):
        config = load(TrainConfig, TINY_CONFIG, tiny_overrides(tiny_sdxl, tiny_dino, shards, tmp_path / name, steps=2,
                                                               **kind, **extra))
        train(config)
        return losses(tmp_path / name)

    raw, pre = run(digit_shards, "raw"), run(encoded, "pre")
    assert [m["data/precomputed_batches"] for m in pre] == [1, 2]
    assert [m["data/precomputed_batches"] for m in raw] == [0, 0]
    for a, b in zip(raw, pre):
        for term in ("loss/generator_adversarial", "loss/distillation", "loss/discriminator_real", "loss/r1"):
            assert a[term] == pytest.approx(b[term], rel=1e-4, abs=1e-6), term
    if student == "lora":
        return
    # another resolution (or random crops) cannot use latents of 16px centre crops: encoded on the fly instead
    other = run(encoded, "other", **{"data.resolution": 32, "discriminator.input_size": 32})
    assert [m["data/precomputed_batches"] for m in other] == [0, 0]


def test_rerunning_encode_skips_finished_shards(encoded, tiny_sdxl, tiny_dino):
    before = (encoded / "00000.tar").read_bytes()
    overrides = tiny_overrides(tiny_sdxl, tiny_dino, encoded, encoded.parent / "unused")
    result = cli("prep", "encode", "--shards", str(encoded), "--config", str(TINY_CONFIG), "--storage", "float32", *overrides)
    assert "encoded 0 of 8 shard(s)" in result.stdout
    assert (encoded / "00000.tar").read_bytes() == before


def test_the_unconditional_branch_is_zeros_for_sdxl_and_the_empty_prompt_for_sd(tiny_sd, tiny_sdxl, tmp_path):
    """What diffusers' pipelines feed the guidance's unconditional branch: SDXL zero embeddings (unless its
    model_index.json sets force_zeros_for_empty_prompt false), SD the encoding of ""."""
    from addpipe.train.config import ModelConfig
    from addpipe.train.models import encode_prompts, load_teacher, unconditional

    sdxl = load_teacher(ModelConfig(teacher=str(tiny_sdxl)))
    zeros = unconditional(sdxl, "cpu")
    assert sdxl.zero_unconditional and zeros.hidden_states.abs().sum() == 0 and zeros.pooled.abs().sum() == 0
    assert zeros.hidden_states.shape == encode_prompts(sdxl, [""], "cpu").hidden_states.shape
    assert encode_prompts(sdxl, [""], "cpu").hidden_states.abs().sum() > 0  # so zeros are a real difference

    sd = load_teacher(ModelConfig(teacher=str(tiny_sd)))
    assert not sd.zero_unconditional
    torch.testing.assert_close(unconditional(sd, "cpu").hidden_states, encode_prompts(sd, [""], "cpu").hidden_states)

    opted_out = shutil.copytree(tiny_sdxl, tmp_path / "sdxl")
    index = json.loads((opted_out / "model_index.json").read_text())
    (opted_out / "model_index.json").write_text(json.dumps(index | {"force_zeros_for_empty_prompt": False}))
    assert not load_teacher(ModelConfig(teacher=str(opted_out))).zero_unconditional


def test_a_two_token_tokenizer_is_refused_saying_why(tmp_path):
    """Offline with no cache, CLIPTokenizer.from_pretrained(<hub id>) returns 2 tokens instead of failing."""
    from addpipe.train.models import ModelLoadError, check_tokenizer

    class Hollow:
        def __len__(self):
            return 2

    with pytest.raises(ModelLoadError, match="laion/CLIP-ViT-g-14.*2 tokens; the hub is unreachable"):
        check_tokenizer(Hollow(), "laion/CLIP-ViT-g-14-laion2B-s12B-b42K")
    with pytest.raises(ModelLoadError, match="vocab.json/merges.txt are missing"):
        check_tokenizer(Hollow(), str(tmp_path))


def test_an_fp16_decode_with_an_upcasting_vae_is_finite():
    """A VAE whose config says force_upcast (the original SDXL VAE, whose decoder overflows fp16) decodes in fp32
    even when the run holds it in fp16 or decodes under an fp16 autocast; without the upcast it gives NaNs."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL

    from addpipe.train.models import vae_decode

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        force_upcast=True).eval()
    with torch.no_grad():  # activations past fp16's 65504 in the decoder's first layer, as SDXL's VAE has deeper in
        vae.decoder.conv_in.weight.mul_(3e4)
    latents = 20 * torch.randn(1, 4, 8, 8)
    teacher = SimpleNamespace(vae=vae.to(torch.float16), latent_scale=1.0, latent_shift=0.0)
    with torch.no_grad():
        plain = vae.decode(latents.half()).sample  # what a decode that ignores force_upcast does
        upcast = vae_decode(teacher, latents)
        assert next(vae.parameters()).dtype == torch.float32  # upcast once, for good
        with torch.autocast("cpu", dtype=torch.float16):
            under_autocast = vae_decode(teacher, latents)
    assert not torch.isfinite(plain).all()
    assert torch.isfinite(upcast).all() and torch.isfinite(under_autocast).all()
    torch.testing.assert_close(under_autocast, upcast)
    vae.config.force_upcast = False  # a VAE that does not ask for it (the fp16-fix VAE) keeps the run's dtype
    vae.to(torch.float16)
    with torch.no_grad():
        assert not torch.isfinite(vae_decode(teacher, latents)).all()
