"""Write a diffusers SD pipeline folder as one file in the original Stable Diffusion (LDM) layout, the way shared
fine-tunes come: `model.diffusion_model.*` (the UNet's input/middle/output blocks), `first_stage_model.*` (the VAE's
encoder.down/decoder.up blocks, 1x1-conv attention) and `cond_stage_model.transformer.*` (the CLIP text model).

The test's own key mapping, written from the LDM layout, so that `addpipe convert` (diffusers' from_single_file) is
checked against a file diffusers did not write; the round trip must give back every tensor exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


def _resnet(rest: str) -> str:
    for new, old in RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_key(key: str, layers: int, up_attention: set[int]) -> str:
    """diffusers UNet2DConditionModel key -> LDM UNetModel key (`layers` resnets per down block)."""
    prefix, dot, rest = key.rpartition(".")[0], ".", key.rpartition(".")[2]
    for new, old in UNET_FIXED.items():
        if prefix == new:
            return old + dot + rest
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, tail = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * (layers + 1) + layer
        return f"input_blocks.{index}.0.{_resnet(tail)}" if kind == "resnets" else f"input_blocks.{index}.1.{tail}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, tail = int(m[1]), m[2], int(m[3]), m[4]
        index = block * (layers + 1) + layer  # an up block has one resnet more than a down block: layers + 1
        return f"output_blocks.{index}.0.{_resnet(tail)}" if kind == "resnets" else f"output_blocks.{index}.1.{tail}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(m[1])
        return f"output_blocks.{block * (layers + 1) + layers}.{2 if block in up_attention else 1}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


def vae_key(key: str, blocks: int) -> tuple[str, bool]:
    """diffusers AutoencoderKL key -> (LDM key, whether it is an attention projection stored as a 1x1 conv)."""
    fixed = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    prefix, rest = key.rpartition(".")[0], key.rpartition(".")[2]
    if prefix in fixed:
        return f"{fixed[prefix]}.{rest}", False
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):  # LDM numbers the decoder's up blocks backwards
        return f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        tail = m[2]
        for new, old in VAE_ATTENTION:
            if tail.startswith(new + "."):
                return f"{m[1]}.mid.attn_1.{old}{tail[len(new):]}", new != "group_norm"
    if prefix in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv",
                  "post_quant_conv"):
        return key, False
    raise KeyError(f"no LDM name for VAE key {key}")


def write_sd_single_file(pipeline: Path, path: Path) -> dict[str, int]:
    """Write the SD pipeline folder `pipeline` as one LDM-layout safetensors file at `path`; -> tensors per part."""
    pipeline = Path(pipeline)
    unet_config = json.loads((pipeline / "unet" / "config.json").read_text())
    layers = unet_config["layers_per_block"]
    up_attention = {i for i, kind in enumerate(unet_config["up_block_types"]) if "CrossAttn" in kind}
    blocks = len(json.loads((pipeline / "vae" / "config.json").read_text())["up_block_types"])
    state: dict[str, torch.Tensor] = {}
    for key, value in _weights(pipeline / "unet").items():
        state["model.diffusion_model." + unet_key(key, layers, up_attention)] = value
    for key, value in _weights(pipeline / "vae").items():
        name, conv = vae_key(key, blocks)
        state["first_stage_model." + name] = value[:, :, None, None] if conv and value.dim() == 2 else value
    for key, value in _weights(pipeline / "text_encoder").items():  # the original's names start text_model.
        state["cond_stage_model.transformer." + ("" if key.startswith("text_model.") else "text_model.") + key] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return {part: sum(k.startswith(part) for k in state)
            for part in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")}
