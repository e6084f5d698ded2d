"""The memory plan of `addpipe train --dry-run`: states from exact parameter counts by hand-written formulas, and
the SDXL-scale plan against the peak memory measured on an H100 (benchmarks/RESULTS.md, 2026-11-23)."""

import importlib.util
import json
import pytest
import torch

from addpipe.config import load
from addpipe.train.config import TrainConfig
from addpipe.train.memory import GIB, plan_memory
from conftest import REPO, TINY_CONFIG, TINY_D2G_CONFIG, tiny_overrides


def lines(plan):
    return {line.name.split(" (")[0]: line for line in plan.lines}


@pytest.mark.parametrize("backend, zero, world", [("deepspeed", 2, 1), ("deepspeed", 3, 4), ("fsdp2", 0, 2)])
def test_states_per_rank_follow_the_parameter_counts(backend, zero, world, tiny_sd, tiny_dino, digit_shards, tmp_path):
    from diffusers import UNet2DConditionModel

    from addpipe.train.methods.add.discriminator import build_discriminator

    config = load(TrainConfig, TINY_CONFIG, tiny_overrides(tiny_sd, tiny_dino, digit_shards, tmp_path, **{
        "engine.backend": backend, "engine.zero": max(zero, 0), "optim.ema_decay": 0.99}))
    plan = plan_memory(config, world)  # bf16, as on a GPU
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    p = sum(t.numel() for t in unet.parameters())
    student, teacher = lines(plan)["student UNet"], lines(plan)["teacher UNet"]
    assert student.params == teacher.params == p and teacher.weights == 2 * p
    if backend == "fsdp2":  # fp32 shards are the masters: weights, gradients, two moments, EMA, all sharded
        assert (student.weights, student.gradients, student.optimizer, student.ema) == (4 * p / world, 4 * p / world,
                                                                                       8 * p / world, 4 * p / world)
    elif zero == 2:  # bf16 weights and gradients whole, fp32 gradient partition, master + moments partitioned
        assert (student.weights, student.gradients, student.optimizer, student.ema) == (2 * p, 2 * p + 4 * p / world,
                                                                                       12 * p / world, 4 * p)
    else:  # ZeRO-3: everything partitioned
        assert (student.weights, student.gradients, student.optimizer, student.ema) == (2 * p / world, 2 * p / world,
                                                                                       12 * p / world, 4 * p / world)
    text_dim = 32  # the tiny teacher's text width: heads counted as build_discriminator builds them
    heads = build_discriminator(config.discriminator, text_dim).heads
    assert lines(plan)["discriminator heads"].params == sum(t.numel() for t in heads.parameters())
    assert plan.activations > 0 and plan.total == pytest.approx(sum(l.total for l in plan.lines) + plan.activations)


def sdxl_configs(directory):
    """SDXL base 1.0's published architecture as config files only (the plan needs no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, Dinov2Config

    sdxl = benchmark_constants()
    with torch.device("meta"):
        UNet2DConditionModel(**sdxl.SDXL_UNET).save_config(directory / "unet")
        AutoencoderKL(**sdxl.SDXL_VAE).save_config(directory / "vae")
    CLIPTextConfig(**sdxl.CLIP_L).save_pretrained(directory / "text_encoder")
    CLIPTextConfig(**sdxl.CLIP_BIGG).save_pretrained(directory / "text_encoder_2")
    (directory / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    Dinov2Config(**sdxl.DINOV2_SMALL).save_pretrained(directory / "dinov2")
    return directory


def sd35_configs(directory, transformer):
    """An SD3.5 pipeline's published architecture as config files only: the transformer given, CLIP-L and
    OpenCLIP-bigG with projections, T5-XXL's encoder, the SD3 VAE."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, Dinov2Config, T5Config

    sdxl = benchmark_constants()
    with torch.device("meta"):
        SD3Transformer2DModel(**transformer).save_config(directory / "transformer")
        AutoencoderKL(**sdxl.SD3_VAE).save_config(directory / "vae")
    CLIPTextConfig(**sdxl.CLIP_L).save_pretrained(directory / "text_encoder")
    CLIPTextConfig(**sdxl.CLIP_BIGG).save_pretrained(directory / "text_encoder_2")
    T5Config(**sdxl.T5_XXL).save_pretrained(directory / "text_encoder_3")
    (directory / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
        "text_encoder_3": ["transformers", "T5EncoderModel"]}))
    Dinov2Config(**sdxl.DINOV2_SMALL).save_pretrained(directory / "dinov2")
    return directory


def test_the_sd35_large_plan_counts_its_networks_and_needs_its_sharding(tmp_path):
    """configs/sd35_add.yaml with SD3.5-large's architecture on 8 x 80 GB: the transformer's 8.06e9 parameters twice
    (student and frozen teacher), T5-XXL's 4.76e9 frozen, and a verdict that follows the sharding: ZeRO-3 over 8 ranks
    with the frozen teacher partitioned fits, one rank does not."""
    sdxl = benchmark_constants()
    teacher = sd35_configs(tmp_path, sdxl.SD35_LARGE)

    def plan(world, *extra):
        return plan_memory(load(TrainConfig, REPO / "configs/sd35_add.yaml", [
            f"model.teacher={teacher}", f"discriminator.feature_network={teacher / 'dinov2'}",
            "discriminator.image_encoder=null", "model.gradient_checkpointing=true", *extra]), world)

    eight = plan(8, "model.frozen_placement=partition")
    found = lines(eight)
    assert found["student transformer"].params == pytest.approx(8.0566e9, rel=1e-3)
    assert found["teacher transformer"].params == found["student transformer"].params
    assert found["teacher transformer"].weights == pytest.approx(found["student transformer"].weights)  # 1/8 each
    text = found["VAE + text encoders"].params
    assert text == pytest.approx(4.7623e9 + 0.1237e9 + 0.6946e9 + 0.0838e9, rel=0.01)  # T5, CLIP-L, CLIP-bigG, VAE
    assert eight.fits(80), eight.describe(80)
    one = plan(1)
    assert not one.fits(80) and "does NOT fit 80 GiB" in one.describe(80)


def benchmark_constants():
    spec = importlib.util.spec_from_file_location("sdxl_gpu", REPO / "benchmarks" / "sdxl_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sdxl_plan_is_within_15_percent_of_the_peaks_measured_on_an_h100(tmp_path):
    """configs/sdxl_add.yaml as the 2026-11-23 H100 run trained it (one rank, bf16, ZeRO-3, checkpointing, the
    DINOv2-small architecture for c_img and the teacher's pooled c_text). Measured peak allocated: batch 4 66.8 GiB,
    batch 1 63.2 GiB, batch 4 with the optimizer on the CPU 33.4 GiB; batch 8 and ZeRO-2 at batch 4 ran out of
    memory, which the plan must say too."""
    teacher = sdxl_configs(tmp_path)

    def plan(batch, *extra):
        return plan_memory(load(TrainConfig, REPO / "configs/sdxl_add.yaml", [
            f"model.teacher={teacher}", "model.vae=null", f"discriminator.feature_network={teacher / 'dinov2'}",
            "discriminator.image_encoder=null", "discriminator.text_encoder=null", f"data.batch_size={batch}",
            "model.gradient_checkpointing=true", *extra]), 1)

    four = plan(4)
    assert lines(four)["student UNet"].params == pytest.approx(2.567e9, rel=1e-3)
    for planned, measured in [(four, 66.8), (plan(1), 63.2), (plan(4, "engine.offload_optimizer=cpu"), 33.4)]:
        assert planned.total / GIB == pytest.approx(measured, rel=0.15), planned.describe(80)
        assert planned.fits(80)
    eight = plan(8)
    assert not eight.fits(80) and not plan(4, "engine.zero=2").fits(80)
    assert "does NOT fit 80 GiB" in eight.describe(80)


def test_dry_run_prints_the_memory_plan(tiny_sd, tiny_dino, digit_shards, tmp_path):
    from typer.testing import CliRunner

    from addpipe.pipeline.cli import app

    result = CliRunner().invoke(app, ["train", "-c", str(TINY_CONFIG), "--dry-run", "--world-size", "2", "--gpu-memory",
                                      "1", *tiny_overrides(tiny_sd, tiny_dino, digit_shards, tmp_path)])
    assert result.exit_code == 0, result.output[-2000:]
    assert "# memory per rank (2 rank(s), bfloat16; MiB)" in result.stdout and "student UNet (trained)" in result.stdout
    assert "fits 1 GiB" in result.stdout and "activations" in result.stdout


def test_auto_checkpointing_is_off_where_the_plan_without_it_fits(tiny_sd, tiny_dino, digit_shards, tmp_path):
    from addpipe.train.memory import decide_checkpointing, gpu_memory_gib

    config = load(TrainConfig, TINY_CONFIG, tiny_overrides(tiny_sd, tiny_dino, digit_shards, tmp_path,
                                                           **{"model.gradient_checkpointing": "auto"}))
    without = plan_memory(load(TrainConfig, TINY_CONFIG, tiny_overrides(tiny_sd, tiny_dino, digit_shards, tmp_path)), 1)
    need = without.total / GIB / 0.85  # the smallest GPU the plan without checkpointing fits
    assert decide_checkpointing(config, 1, need * 1.01)[0] is False
    on, why = decide_checkpointing(config, 1, need * 0.99)
    assert on is True and why.startswith("on: without it the plan takes")
    assert decide_checkpointing(config, 1, gpu_memory_gib(torch.device("cpu"))) == (False, "off: no GPU memory to save")
    config.model.teacher = str(tmp_path / "no_such_teacher")
    on, why = decide_checkpointing(config, 1, 80.0)
    assert on is True and "no memory plan" in why and "no_such_teacher" in why


def test_the_sdxl_lora_config_fits_a_24_gb_card_where_the_full_student_does_not(tmp_path):
    """configs/sdxl_add_lora.yaml with the published architectures of its discriminator networks (DINOv2 ViT-L/14 for
    c_img, OpenCLIP ViT-g/14's text tower for c_text): one UNet, adapters-only states."""
    from transformers import CLIPTextConfig, Dinov2Config

    teacher = sdxl_configs(tmp_path)
    Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
                 image_size=518, layerscale_value=1.0).save_pretrained(tmp_path / "dinov2-large")
    CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   hidden_act="gelu", projection_dim=1024).save_pretrained(tmp_path / "clip-g")

    def plan(name, *extra):
        return plan_memory(load(TrainConfig, REPO / "configs" / name, [
            f"model.teacher={teacher}", "model.vae=null", f"discriminator.feature_network={teacher / 'dinov2'}",
            f"discriminator.image_encoder={tmp_path / 'dinov2-large'}", f"discriminator.text_encoder={tmp_path / 'clip-g'}",
            "model.gradient_checkpointing=true", *extra]), 1)

    lora, full = plan("sdxl_add_lora.yaml"), plan("sdxl_add.yaml", "data.batch_size=2")
    found = lines(lora)
    assert "teacher UNet" not in found and found["UNet base"].params == pytest.approx(2.567e9, rel=1e-3)
    assert found["UNet base"].weights == 2 * found["UNet base"].params  # bf16, once
    adapters = found["student LoRA adapters, rank 64"]
    assert 0 < adapters.params < 0.1 * found["UNet base"].params
    assert lora.fits(24) and not full.fits(24) and not full.fits(48), (lora.describe(24), full.describe(24))
    assert not plan("sdxl_add_lora.yaml", "data.batch_size=4").fits(24)  # why the config trains at batch 2


def test_diffusion2gan_has_its_own_plan_and_auto_checkpointing_reads_it(tiny_sd, tmp_path):
    """Diffusion2GAN's models, not ADD's: the student and the trained copy of the teacher's encoder, no teacher UNet
    and no DINOv2; `gradient_checkpointing: auto` decides from that plan (it once fell back to "on" for want of one)."""
    from diffusers import UNet2DConditionModel

    from addpipe.train.memory import decide_checkpointing
    from addpipe.train.methods.diffusion2gan.unet_discriminator import UNetEncoderDiscriminator

    def config(**extra):
        values = {"method": "diffusion2gan", "model.teacher": tiny_sd, "data.resolution": 16, "data.batch_size": 4,
                  "d2g.lpips": tmp_path / "lpips.pth", "optim.ema_decay": 0, **extra}
        return load(TrainConfig, TINY_D2G_CONFIG, [f"{k}={v}" for k, v in values.items()])

    plan = plan_memory(config(), 1, torch.float32)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    student = sum(p.numel() for p in unet.parameters())
    encoder = sum(p.numel() for p in UNetEncoderDiscriminator(unet).parameters())
    found = lines(plan)
    assert set(found) == {"student UNet", "discriminator: UNet encoder", "VAE + text encoders"}
    assert found["student UNet"].params == student and found["discriminator: UNet encoder"].params == encoder
    # fp32 AdamW under ZeRO-2 on one rank: weights 4, gradients 4, two moments 8 bytes per parameter
    assert found["student UNet"].total == 16 * student and found["discriminator: UNet encoder"].total == 16 * encoder
    assert plan.activations > 0
    regression = lines(plan_memory(config(**{"d2g.adversarial": "false"}), 1, torch.float32))
    assert "discriminator: UNet encoder" not in regression

    need = plan_memory(config(), 1).total / GIB / 0.85
    auto = config(**{"model.gradient_checkpointing": "auto"})
    on, why = decide_checkpointing(auto, 1, need * 1.01)
    assert on is False and why.startswith("off: without it the plan takes"), why
    assert decide_checkpointing(auto, 1, need * 0.99)[0] is True
