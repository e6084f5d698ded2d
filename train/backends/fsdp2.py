"""PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`): every parameter a DTensor sharded over the ranks.

- The student UNet is sharded block by block (each down, mid and up block is its own unit, then the root), so
  a forward gathers one block's parameters at a time. With bf16 the gathered copies are bf16 and gradients are
  reduced in fp32, while the sharded parameters (the optimizer's master weights) stay fp32.
- `engine.offload_param=cpu` (or `offload_optimizer=cpu`) keeps the shards, gradients and optimizer step on the
  CPU (FSDP2's CPUOffloadPolicy); NVMe offload is DeepSpeed's alone.
- The discriminator heads are replicated, their gradients averaged over the ranks before each step: a few
  million parameters, and R1 differentiates through them twice, which FSDP2's gradient hooks do not follow
  (sharded heads were tried: they drifted 1% from the single-process reference by the second step). The frozen
  teacher UNet is sharded without an optimizer with `model.frozen_placement=partition`.
- Checkpoints hold the DTensors themselves: torch.distributed.checkpoint writes each rank's shards and reads
  them back on any other number of ranks. Replicated models are written by owner, as the DeepSpeed backend
  does, so either backend reads the other's checkpoints.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from addpipe.train import distributed
from addpipe.train.backends.base import Backend, OptimizerSettings, StateBytes, Trained, broadcast_owned, owner

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one: a diffusers UNet's down, mid and up blocks; otherwise the elements of the
    module's ModuleLists (e.g. the discriminator's heads)."""
    if all(hasattr(module, name) for name in ("down_blocks", "up_blocks", "mid_block")):
        return [*module.down_blocks, *([module.mid_block] if module.mid_block is not None else []), *module.up_blocks]
    return [child for list_ in module.children() if isinstance(list_, nn.ModuleList) for child in list_]


def is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


class FSDP2Trained(Trained):
    def __init__(self, name: str, module: nn.Module, trainable: list[nn.Parameter], settings: OptimizerSettings,
                 shard: bool, mesh, mp_policy, offload_policy, reshard_after_forward: bool):
        from torch.distributed.fsdp import fully_shard

        self.name, self.sharded, self.settings, self.mesh = name, shard, settings, mesh
        self.shards_parameters = shard
        wanted = {id(p) for p in trainable}
        names = [n for n, p in module.named_parameters() if id(p) in wanted]
        if shard:
            options = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
            if offload_policy is not None:
                options["offload_policy"] = offload_policy
            units = shard_units(module)
            for unit in units:
                fully_shard(unit, **options)
            if all(p.requires_grad for p in module.parameters()) or not units:
                fully_shard(module, **options)  # the root too, when it has no frozen parts to keep whole
        self.module = module
        # fully_shard replaces parameters with DTensors: look the trainable ones up again by name
        by_name = dict(module.named_parameters())
        self.trainable = [by_name[n] for n in names]
        self.names = names
        self.optimizer = torch.optim.AdamW(self.trainable, lr=settings.lr, betas=settings.betas,
                                           weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, settings.schedule)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _average_replicated_gradients(self) -> None:
        import torch.distributed as dist

        if self.sharded or distributed.world_size() == 1:
            return  # FSDP2 has reduce-scattered (averaged) the sharded gradients already
        for parameter in self.trainable:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad.div_(distributed.world_size())

    def step(self) -> None:
        self._average_replicated_gradients()
        if self.settings.gradient_clipping > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.settings.gradient_clipping)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_hyperparameters(self, settings: OptimizerSettings) -> None:
        self.settings = settings
        scheduler = self.scheduler
        scheduler.base_lrs = [settings.lr] * len(scheduler.base_lrs)
        rates = [settings.lr * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
        scheduler._last_lr = rates
        for group, rate in zip(self.optimizer.param_groups, rates):
            group.update(lr=rate, initial_lr=settings.lr, betas=tuple(settings.betas), weight_decay=settings.weight_decay)

    def local_tensors(self) -> list[torch.Tensor]:
        return [p.data.to_local() if is_dtensor(p) else p.data for p in self.trainable]

    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        full = {}
        for name, value in self.module.state_dict().items():
            whole = value.full_tensor() if is_dtensor(value) else value  # collective for DTensors
            if distributed.is_main():
                full[name] = whole.detach().float().cpu().clone()
        return full if distributed.is_main() else None

    # ---- checkpoints ------------------------------------------------------------------------------------
    def _ensure_optimizer_state(self) -> None:
        """AdamW creates its moments at the first step; a checkpoint is loaded into them before that."""
        for parameter in self.trainable:
            state = self.optimizer.state[parameter]
            if not state:
                state.update({moment: torch.zeros_like(parameter, memory_format=torch.preserve_format)
                              for moment in ADAM_STATES}, step=torch.tensor(0.0))

    @staticmethod
    def _owned(index: int, tensor: torch.Tensor) -> bool:
        return is_dtensor(tensor) or owner(index) == distributed.rank()

    def checkpoint_state(self) -> dict[str, Any]:
        self._ensure_optimizer_state()
        entries: dict[str, Any] = {}
        for index, (name, parameter) in enumerate(zip(self.names, self.trainable)):
            if not self._owned(index, parameter):
                continue
            entries[f"model.{name}"] = parameter.detach() if is_dtensor(parameter) else parameter.detach().float().cpu().clone()
            for moment in ADAM_STATES:
                value = self.optimizer.state[parameter][moment]
                entries[f"optim.{name}.{moment}"] = value if is_dtensor(value) else value.float().cpu().clone()
        return entries

    def optimizer_steps(self) -> int:
        steps = [int(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        return max(steps) if steps else 0

    def load_checkpoint_state(self, load: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self._ensure_optimizer_state()
        template: dict[str, Any] = {}
        for index, (name, parameter) in enumerate(zip(self.names, self.trainable)):
            if not self._owned(index, parameter):
                continue
            # DTensors are filled in place, shard by shard; whole tensors come back and are broadcast below
            template[f"model.{name}"] = parameter.detach() if is_dtensor(parameter) else torch.empty(parameter.shape)
            for moment in ADAM_STATES:
                value = self.optimizer.state[parameter][moment]
                template[f"optim.{name}.{moment}"] = value if is_dtensor(value) else torch.empty(parameter.shape)
        loaded = load(template)
        with torch.no_grad():
            for index, (name, parameter) in enumerate(zip(self.names, self.trainable)):
                if is_dtensor(parameter):
                    continue
                for key, target in [(f"model.{name}", parameter.data)] + [
                        (f"optim.{name}.{m}", self.optimizer.state[parameter][m]) for m in ADAM_STATES]:
                    target.copy_(broadcast_owned(index, loaded, key, tuple(parameter.shape)).to(target.device, target.dtype))

    @staticmethod
    def _like(parameter: nn.Parameter, local: torch.Tensor):
        """`local` as a DTensor placed like `parameter` (a view: filling it fills `local`)."""
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, parameter.device_mesh, parameter.placements, shape=parameter.shape,
                                  stride=parameter.stride(), run_check=False)

    def parameter_entries(self, prefix: str, tensors: list[torch.Tensor]) -> dict[str, Any]:
        entries = {}
        for index, ((name, parameter), local) in enumerate(zip(zip(self.names, self.trainable), tensors)):
            if is_dtensor(parameter):
                entries[f"{prefix}.{name}"] = self._like(parameter, local.detach())
            elif owner(index) == distributed.rank():
                entries[f"{prefix}.{name}"] = local.detach().float().cpu().clone()
        return entries

    def load_parameter_entries(self, prefix: str, load: Callable[[dict[str, Any]], dict[str, Any]]) -> list[torch.Tensor]:
        named = list(zip(self.names, self.trainable))
        buffers = [torch.empty_like(local, dtype=torch.float32) for local in self.local_tensors()]
        template = {}
        for index, ((name, parameter), buffer) in enumerate(zip(named, buffers)):
            if is_dtensor(parameter):
                template[f"{prefix}.{name}"] = self._like(parameter, buffer)
            elif owner(index) == distributed.rank():
                template[f"{prefix}.{name}"] = torch.empty(parameter.shape)
        loaded = load(template)
        for index, ((name, parameter), buffer) in enumerate(zip(named, buffers)):
            if not is_dtensor(parameter):
                buffer.copy_(broadcast_owned(index, loaded, f"{prefix}.{name}", tuple(parameter.shape)))
        return buffers

    def set_optimizer_steps(self, steps: int) -> None:
        self._ensure_optimizer_state()
        for state in self.optimizer.state.values():
            state["step"] = torch.tensor(float(steps))

    def describe(self) -> str:
        if not self.sharded:
            return "replicated (gradients all-reduced)"
        if self.mesh.ndim == 2:
            return f"FSDP2 HSDP: sharded over {self.mesh.shape[1]} ranks, replicated {self.mesh.shape[0]}x"
        return "FSDP2 fully_shard"


class FSDP2Backend(Backend):
    name = "fsdp2"

    def __init__(self, engine_config, device: torch.device, dtype: torch.dtype):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        self.config, self.device, self.dtype = engine_config, device, dtype
        world = distributed.world_size()
        group = engine_config.shard_group or world
        if world % group:
            raise ValueError(f"engine.shard_group={group} does not divide the {world} ranks: use a divisor of "
                             f"{world} (the GPUs per node), or 0 to shard over all ranks")
        if group == world:
            self.mesh = init_device_mesh(device.type, (world,))
        else:  # HSDP: fully_shard on a 2-D mesh shards over the inner dimension and replicates over the outer one
            self.mesh = init_device_mesh(device.type, (world // group, group), mesh_dim_names=("replicate", "shard"))
        self.mp_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                          if dtype == torch.bfloat16 else MixedPrecisionPolicy())
        offload = "cpu" in (engine_config.offload_param, engine_config.offload_optimizer)
        self.offload_policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else None

    @classmethod
    def create(cls, config, device: torch.device, dtype: torch.dtype) -> "FSDP2Backend":
        return cls(config.engine, device, dtype)

    @staticmethod
    def shards_weights(engine) -> bool:
        return True

    @staticmethod
    def state_bytes(engine, params: int, dtype: torch.dtype, world: int, sharded: bool, ema: bool) -> StateBytes:
        share = 1 / min(engine.shard_group or world, world) if sharded else 1.0  # HSDP: a shard group's share
        # the shards are the fp32 masters; one gathered block in the compute dtype at a time (not counted here:
        # a block of an SDXL UNet is a few hundred MB)
        out = StateBytes(weights=4 * params * share, gradients=4 * params * share, optimizer=8 * params * share,
                         ema=4 * params * share if ema else 0.0)
        if sharded and not engine.reshard_after_forward:  # the gathered compute copy stays from forward to backward
            out.weights += dtype.itemsize * params
            out.note = f"gathered {str(dtype).replace('torch.', '')} copy kept (reshard_after_forward false)"
        if sharded and engine.offload_param == "cpu":
            out.weights = 0.0 if engine.reshard_after_forward else dtype.itemsize * params
            out.gradients = out.optimizer = 0.0
            out.note = "shards, gradients, optimizer on the CPU"
        return out

    def wrap(self, name: str, module: nn.Module, trainable: list[nn.Parameter], settings: OptimizerSettings,
             shard: bool) -> Trained:
        return FSDP2Trained(name, module, trainable, settings, shard, self.mesh, self.mp_policy,
                            self.offload_policy if shard else None, self.config.reshard_after_forward)

    def place_frozen(self, module: nn.Module, shard: bool) -> nn.Module:
        if shard:
            from torch.distributed.fsdp import fully_shard

            for unit in shard_units(module):
                fully_shard(unit, mesh=self.mesh, mp_policy=self.mp_policy)
            fully_shard(module, mesh=self.mesh, mp_policy=self.mp_policy)
        return module

    @staticmethod
    def describe_plan(config) -> dict[str, str]:
        engine = config.engine
        precision = "bf16 gathers, fp32 reductions and fp32 shards" if engine.precision == "bf16" else (
            "bf16 gathers where the GPU supports it" if engine.precision == "auto" else "fp32")
        offload = ", shards and optimizer on the CPU" if "cpu" in (engine.offload_param, engine.offload_optimizer) else ""
        over = (f"within groups of {engine.shard_group} ranks, replicated across the groups (HSDP)"
                if engine.shard_group else "over all ranks")
        return {"student": f"FSDP2: each denoiser block and the root sharded {over} ({precision}{offload})",
                "discriminator heads": "replicated, gradients all-reduced",
                "frozen teacher UNet": ("FSDP2: sharded by block, no optimizer" if config.model.frozen_placement == "partition"
                                        else "replicated on every rank"),
                "VAE, text encoders, DINOv2": "replicated on every rank (frozen)"}
