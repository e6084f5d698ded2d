"""`addpipe fetch`: the models a config names, found in a hub cache laid out as huggingface_hub lays it out (a tiny
local stand-in for the Hugging Face cache, filled with the session's tiny models), the one-line error for what is
missing offline, and the file choice for real repositories' listings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from addpipe.assets import assets, choose_files, weight_variant
from conftest import TINY_CONFIG, run_cli

# The files of stabilityai/stable-diffusion-xl-base-1.0 that decide the choice (its listing, abridged).
SDXL_FILES = [
    "model_index.json", "sd_xl_base_1.0.safetensors", "sd_xl_offset_example-lora_1.0.safetensors",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors", "text_encoder/flax_model.msgpack", "text_encoder/model.onnx",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors", "text_encoder_2/model.fp16.safetensors",
    "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer_2/merges.txt", "tokenizer_2/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/openvino_model.xml", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae_decoder/model.onnx", "vae_encoder/config.json", "vae_1_0/diffusion_pytorch_model.safetensors",
]


def test_only_what_from_pretrained_reads_is_chosen_in_the_asked_variant():
    configs = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
               "text_encoder_2/config.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
               "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "tokenizer_2/merges.txt",
               "tokenizer_2/vocab.json", "unet/config.json", "unet/openvino_model.xml", "vae/config.json"]
    assert choose_files(SDXL_FILES, "pipeline", None) == sorted(configs + [
        "text_encoder/model.safetensors", "text_encoder_2/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors"])
    assert choose_files(SDXL_FILES, "pipeline", "fp16") == sorted(configs + [
        "text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"])
    # a CLIP repository that also holds open_clip's copy: only the transformers weights; sharded weights whole
    clip = ["config.json", "open_clip_pytorch_model.bin", "open_clip_model.safetensors", "model.safetensors",
            "pytorch_model.bin", "tokenizer.json", "flax_model.msgpack"]
    assert choose_files(clip, "model", None) == ["config.json", "model.safetensors", "tokenizer.json"]
    sharded = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
               "model.safetensors.index.json", "pytorch_model.bin"]
    assert choose_files(sharded, "model", None) == sharded[:4]
    assert choose_files(["config.json", "pytorch_model.bin"], "model", "fp16") == ["config.json", "pytorch_model.bin"]
    assert [weight_variant(n) for n in ("model.fp16.safetensors", "model.fp16-00001-of-00002.safetensors",
                                        "diffusion_pytorch_model.safetensors.index.fp16.json",
                                        "model-00001-of-00002.safetensors", "model.safetensors")] == [
        "fp16", "fp16", "fp16", None, None]


def test_a_config_names_its_hub_models_and_not_its_local_paths(tiny_sd):
    from addpipe.config import load
    from addpipe.dataprep.config import PrepConfig
    from addpipe.train.config import TrainConfig

    sdxl = load(TrainConfig, TINY_CONFIG.with_name("sdxl_add.yaml"), ["model.variant=fp16"])
    assert [(a.field, a.name, a.kind, a.variant) for a in assets(sdxl)] == [
        ("model.teacher", "stabilityai/stable-diffusion-xl-base-1.0", "pipeline", "fp16"),
        ("model.vae", "madebyollin/sdxl-vae-fp16-fix", "model", None),
        ("discriminator.feature_network", "facebook/dinov2-small", "model", None),
        ("discriminator.image_encoder", "facebook/dinov2-large", "model", None),
        ("discriminator.text_encoder", "laion/CLIP-ViT-g-14-laion2B-s12B-b42K", "model", None)]
    local = load(TrainConfig, TINY_CONFIG, [f"model.teacher={tiny_sd}", "discriminator.feature_network=./dino"])
    assert [a.field for a in assets(local)] == []
    assert [(a.field, a.name) for a in assets(PrepConfig())] == [
        ("embed.pretrained", "ViT-L-14@openai"),
        ("filter.aesthetic_weights", "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                                     "sac+logos+ava1-l14-linearMSE.pth")]


def hub_cache(root: Path, models: dict[str, Path], commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """A Hugging Face hub cache as huggingface_hub lays it out (models--org--name/refs/main, snapshots/<commit>/)."""
    for repo, source in models.items():
        folder = root / f"models--{repo.replace('/', '--')}"
        shutil.copytree(source, folder / "snapshots" / commit)
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(commit)
    return root


def test_offline_fetch_finds_the_cached_models_and_names_the_missing_one_at_once(tiny_sd, tiny_dino, tmp_path):
    cache = hub_cache(tmp_path / "hub", {"tiny/sd": tiny_sd, "tiny/dinov2": tiny_dino})
    names = ["model.teacher=tiny/sd", "discriminator.feature_network=tiny/dinov2"]
    done = run_cli("fetch", "-c", str(TINY_CONFIG), *names, "--cache-dir", str(cache))
    assert done.returncode == 0, done.stderr[-2000:]
    snapshot = cache / "models--tiny--sd" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    assert f"ok       model.teacher: tiny/sd -> {snapshot}" in done.stdout
    assert f"all 2 model(s) are in the cache. On the nodes: export HF_HUB_OFFLINE=1 HF_HUB_CACHE={cache}" in done.stdout

    started = time.monotonic()
    missing = run_cli("fetch", "-c", str(TINY_CONFIG), "model.teacher=tiny/sd", "discriminator.feature_network=tiny/nope",
                      "discriminator.text_encoder=tiny/clip", "--cache-dir", str(cache))
    assert time.monotonic() - started < 10
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    errors = [line for line in missing.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: missing (offline, HF_HUB_OFFLINE=1): discriminator.feature_network: tiny/nope is not in "
                      f"the cache ({cache}); discriminator.text_encoder: tiny/clip is not in the cache ({cache})"]
    nothing = run_cli("fetch")
    assert nothing.returncode == 2 and "pass --config CONFIG and/or --prep" in nothing.stderr


@pytest.mark.slow
def test_the_nodes_train_from_the_fetched_cache_by_hub_id(tiny_sd, tiny_dino, digit_shards, tmp_path):
    """What fetch prints is what a node needs: with HF_HUB_OFFLINE=1 and HF_HUB_CACHE set, the same hub ids load
    (the memory plan builds every model from its config in the cache)."""
    cache = hub_cache(tmp_path / "hub", {"tiny/sd": tiny_sd, "tiny/dinov2": tiny_dino})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-m", "addpipe.pipeline", "train", "-c", str(TINY_CONFIG), "--dry-run",
                             "model.teacher=tiny/sd", "discriminator.feature_network=tiny/dinov2",
                             f"data.shards={digit_shards}"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory plan: not available" not in result.stdout and "teacher UNet (frozen)" in result.stdout
