"""Where distribution happens: wrapping the two trainable models in DeepSpeed engines.

- The student gets the user's ZeRO stage (0-3) with optional CPU/NVMe offload.
- The discriminator heads get min(zero, 2) unless told otherwise: they are a few million parameters,
  so partitioning them saves nothing, and R1 differentiates through them twice per step.
- The frozen teacher UNet is replicated (default) or partitioned by a ZeRO-3 engine with no
  optimizer. VAE, text encoders and DINOv2 stay replicated: together under 1.5 GB in bf16 for SDXL,
  against about 5 GB for the teacher UNet, which is the one worth sharding on small GPUs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn



def deepspeed_config(stage: int, micro_batch: int, gradient_clipping: float, dtype: torch.dtype,
                     offload_optimizer: str = "none", offload_param: str = "none", nvme_path: str = "/local_nvme") -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        # Defaults sized for SDXL-class UNets; gather whole small modules in one go.
        zero.update({"stage3_param_persistence_threshold": 1e5, "stage3_prefetch_bucket_size": 5e7,
                     "stage3_gather_16bit_weights_on_model_save": False,
                     # Left on, ZeRO-3 replaces torch.nn.functional.linear for the whole process with a custom
                     # autograd Function that ignores torch.autocast on CUDA: the bf16 student then fails on its
                     # fp32 inputs ("mat1 and mat2 must have the same dtype"), and so would every frozen network.
                     "memory_efficient_linear": False})
    if offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": offload_optimizer, "pin_memory": torch.cuda.is_available()}
        if offload_optimizer == "nvme":
            zero["offload_optimizer"]["nvme_path"] = nvme_path
    if offload_param != "none":
        zero["offload_param"] = {"device": offload_param, "pin_memory": torch.cuda.is_available()}
        if offload_param == "nvme":
            zero["offload_param"]["nvme_path"] = nvme_path
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        # DeepSpeed silently clips at 1.0 unless told (DESIGN §4): always state it.
        "gradient_clipping": gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        # Our torch AdamW with offload needs this, or DeepSpeed refuses the client optimizer.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: nn.Module, parameters: list[nn.Parameter], lr: float, betas: tuple[float, float],
                 weight_decay: float, lr_lambda: Callable[[int], float], config: dict[str, Any]):
    import deepspeed

    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=betas, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def partitioned_frozen(model: nn.Module, micro_batch: int, dtype: torch.dtype) -> nn.Module:
    """A frozen network partitioned across ranks by a ZeRO-3 engine without an optimizer."""
    import deepspeed

    config = deepspeed_config(3, micro_batch, 0.0, dtype)
    engine, _, _, _ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def is_partitioned(parameter: torch.Tensor) -> bool:
    return hasattr(parameter, "ds_tensor")


def local_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The parameter storage this rank owns: its ZeRO-3 shard, or the whole parameter otherwise.
    The EMA lives on these, so it is partitioned exactly like the model."""
    return [p.ds_tensor if is_partitioned(p) else p.data for p in module.parameters()]


@contextlib.contextmanager
def full_parameters(module: nn.Module) -> Iterator[None]:
    """Inside: every parameter of `module` is whole on every rank (a no-op unless ZeRO-3 partitioned it).
    All ranks must enter together."""
    params = [p for p in module.parameters() if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def learning_rate(engine) -> float:
    return float(engine.get_lr()[0])


def set_hyperparameters(engine, lr: float, betas: tuple[float, float], weight_decay: float) -> None:
    """Put the configured optimizer settings into an engine restored from a checkpoint (which brings back the
    values it was saved with). The schedule's base rate moves too, so warm-up and later steps scale the new rate."""
    scheduler = engine.lr_scheduler
    if scheduler is not None:
        scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
        # LambdaLR's rate at its current step, from the new base: what its next step() would also compute
        rates = [lr * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
        scheduler._last_lr = rates
    else:
        rates = [lr] * len(engine.optimizer.param_groups)
    for group, rate in zip(engine.optimizer.param_groups, rates):
        group.update(lr=rate, initial_lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def set_requires_grad(parameters: list[nn.Parameter], flag: bool) -> None:
    for parameter in parameters:
        parameter.requires_grad_(flag)
