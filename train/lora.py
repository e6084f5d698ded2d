"""LoRA students: the teacher's own UNet with trainable peft adapters; the teacher is that UNet with them off.

One UNet in memory instead of two (the trick LCM-LoRA and DMD2 use): the frozen base weights serve both the
teacher's forward (adapters disabled) and the student's (adapters on), and only the adapters have gradients,
optimizer state, EMA and checkpoint entries. The adapters are diffusers' own peft integration
(`UNet2DConditionModel.add_adapter`), so the export is the standard diffusers LoRA file that `load_lora_weights`
reads.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from addpipe.train.models import ModelLoadError

logger = logging.getLogger(__name__)


class LoraTargetError(ModelLoadError):
    """The configured target modules are not in this UNet (printed without a traceback)."""


def peft_config(config) -> Any:
    """`student.lora` as peft's LoraConfig."""
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.alpha or config.rank, lora_dropout=config.dropout,
                      target_modules=config.modules(), init_lora_weights=True if config.init == "default" else "gaussian")


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of names


def check_targets(unet: nn.Module, config) -> None:
    """Refuse targets that adapt nothing in this UNet: every name in target_modules must match a module (a typo or
    another architecture); the optional convolution set may miss some (a UNet without upsamplers)."""
    names = [name for name, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    missing = [t for t in config.target_modules if not any(_matches(n, t) for n in names)]
    if missing or not any(_matches(n, t) for n in names for t in config.modules()):
        examples = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names})[:20])
        raise LoraTargetError(
            f"student.lora.target_modules {missing or config.modules()} match no Linear or Conv2d layer of this UNet "
            f"(looked for names ending in them among {len(names)} layers; last parts found: {examples})")
    unused = [t for t in config.modules() if t not in config.target_modules and not any(_matches(n, t) for n in names)]
    if unused:
        logger.info("student.lora.convolutions: this UNet has no %s", ", ".join(unused))


def add_adapters(unet: nn.Module, config) -> list[nn.Parameter]:
    """Freeze `unet` and add the configured adapters to it; -> the adapters' parameters (the only trainable ones)."""
    check_targets(unet, config)
    unet.requires_grad_(False)
    unet.add_adapter(peft_config(config))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if not trainable:  # peft marks the adapters trainable; nothing trainable means nothing was adapted
        raise LoraTargetError(f"student.lora.target_modules {config.modules()} added no adapter to this UNet")
    return trainable


class AdaptersOff:
    """The teacher of a LoRA student: the student's UNet called with its adapters disabled (no gradients).
    Callable like the frozen teacher UNet it replaces; all ranks call it together, as they would the teacher."""

    def __init__(self, unet: nn.Module):
        self.unet = unet

    def __call__(self, *args, **kwargs):
        self.unet.disable_adapters()
        try:
            with torch.no_grad():
                return self.unet(*args, **kwargs)
        finally:
            self.unet.enable_adapters()


def split_state(full_state: dict[str, torch.Tensor], unet_config: Any, config) -> tuple[dict[str, torch.Tensor],
                                                                                          dict[str, torch.Tensor]]:
    """From the adapted UNet's whole state dict (peft's names: `base_layer`, `lora_A.default`, ...): the LoRA in
    the peft key format diffusers' `load_lora_weights` reads (`...to_q.lora_A.weight`), and the plain UNet state
    with the adapters merged into its weights (what a full pipeline holds)."""
    from diffusers import UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_config(unet_config)
    unet.add_adapter(peft_config(config))
    unet.load_state_dict(full_state)
    # peft's own key names (lora_A/lora_B) for every adapter, as diffusers' loader reads them directly. Not
    # convert_state_dict_to_diffusers: it renames only the attention adapters to the old .lora.down/.up, and a
    # loader that finds lora_A in the file's first key then skips every renamed one (with convolutions adapted,
    # 32 of 79 modules silently lost).
    lora = get_peft_model_state_dict(unet)
    unet.fuse_lora()
    unet.unload_lora()
    return lora, unet.state_dict()


def adapter_metadata(config) -> dict[str, Any]:
    """What `save_lora_weights` records with the LoRA so that a loader rebuilds the same adapters."""
    found = peft_config(config).to_dict()
    found["target_modules"] = sorted(found["target_modules"])
    return {k: v for k, v in found.items() if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora",
                                                    "use_rslora", "init_lora_weights", "bias")}


def describe(config: Any) -> str:
    return (f"LoRA rank {config.rank}, alpha {config.alpha or config.rank} on {', '.join(config.modules())}; "
            "teacher = the same UNet with the adapters off")
