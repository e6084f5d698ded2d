"""DeepSpeed: each trainable model in its own engine, ZeRO stage 0-3, optional CPU/NVMe offload.

- The student gets the user's ZeRO stage. The discriminator heads get min(zero, 2) unless told otherwise:
  a few million parameters, so partitioning them saves nothing, and R1 differentiates through them twice.
- A frozen network is replicated, or partitioned by a ZeRO-3 engine with no optimizer (the teacher UNet, the
  one worth sharding on small GPUs: about 5 GB in bf16 for SDXL against 1.5 GB for VAE, encoders and DINOv2).
- Checkpoints are written in the backend-neutral, resharding format of train/checkpoint.py: DeepSpeed's own
  partitioned files only load on the same number of ranks, so each parameter's fp32 master weight and Adam
  moments are assembled whole (DeepSpeed's tensor-fragment API) and each rank writes the ones it owns
  (parameter i belongs to rank i mod world size). Loading puts every value back through the same API.

Measured pitfalls (docs/engineering.md): DeepSpeed's default gradient_clipping is 1.0 (always stated here); a client
optimizer with offload needs zero_force_ds_cpu_optimizer false; ZeRO-3's process-wide F.linear replacement
breaks autocast on CUDA (memory_efficient_linear off).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from addpipe.train import distributed
from addpipe.train.backends.base import Backend, OptimizerSettings, StateBytes, Trained, broadcast_owned, owner

ADAM_STATES = ("exp_avg", "exp_avg_sq")


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
        # DeepSpeed silently clips at 1.0 unless told (docs/engineering.md): always state it.
        "gradient_clipping": gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        # Our torch AdamW with offload needs this, or DeepSpeed refuses the client optimizer.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def is_partitioned(parameter: torch.Tensor) -> bool:
    return hasattr(parameter, "ds_tensor")


@contextlib.contextmanager
def gathered(parameters: list[nn.Parameter], modifier_rank: Optional[int] = None) -> Iterator[None]:
    """ZeRO-3 parameters whole inside (a no-op for others); with modifier_rank, changes made there are kept."""
    partitioned = [p for p in parameters if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


class DeepSpeedTrained(Trained):
    def __init__(self, name: str, module: nn.Module, trainable: list[nn.Parameter], settings: OptimizerSettings,
                 config: dict[str, Any]):
        import deepspeed

        self.name, self.stage = name, config["zero_optimization"]["stage"]
        optimizer = torch.optim.AdamW(trainable, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, settings.schedule)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.module = self.engine.module
        self.trainable = trainable
        self.scheduler = scheduler
        self.shards_parameters = self.stage == 3

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # clips as configured, steps optimizer and schedule, zeroes gradients

    def learning_rate(self) -> float:
        return float(self.engine.get_lr()[0])

    @property
    def _optimizer(self) -> torch.optim.Optimizer:
        """The client AdamW (ZeRO wraps it; its param_groups are the ones the schedule moves)."""
        optimizer = self.engine.optimizer
        return getattr(optimizer, "optimizer", optimizer)

    def set_hyperparameters(self, settings: OptimizerSettings) -> None:
        scheduler = self.engine.lr_scheduler
        scheduler.base_lrs = [settings.lr] * len(scheduler.base_lrs)
        # LambdaLR's rate at its current step, from the new base: what its next step() would also compute
        rates = [settings.lr * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
        scheduler._last_lr = rates
        for group, rate in zip(self.engine.optimizer.param_groups, rates):
            group.update(lr=rate, initial_lr=settings.lr, betas=tuple(settings.betas), weight_decay=settings.weight_decay)

    def local_tensors(self) -> list[torch.Tensor]:
        return [p.ds_tensor if is_partitioned(p) else p.data for _, p in self._named_trainable()]

    def master_tensors(self) -> list[torch.Tensor]:
        """In bf16/fp16, ZeRO-3 keeps each rank's fp32 master partition apart from its half-precision ds_tensor:
        the EMA averages those. ZeRO 0-2 partition the masters across ranks while every rank holds the whole
        parameter, so gathering them would cost an all-reduce of the model every step: there the EMA follows
        the parameters (in bf16 each one's rounding error is below the average's own resolution of a step)."""
        local = self.local_tensors()
        if self.stage != 3 or not (self.engine.bfloat16_enabled() or self.engine.fp16_enabled()):
            return local
        from deepspeed.utils import safe_get_local_fp32_param

        masters = []
        for (_, parameter), storage in zip(self._named_trainable(), local):
            master = safe_get_local_fp32_param(parameter) if parameter.requires_grad else None
            masters.append(master.view(storage.shape) if master is not None and master.numel() == storage.numel()
                           else storage)
        return masters

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[None]:
        with gathered(list(self.module.parameters())):
            yield

    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        with self.full_parameters():
            state = ({k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}
                     if distributed.is_main() else None)
        # ZeRO-3 keeps parameters under stage3_param_persistence_threshold (biases, norms, LoRA adapters) whole on
        # every rank, and gathering them is a no-op; their ds_tensor partition is what the optimizer, a checkpoint
        # load and the EMA (applied to local_tensors for the export) write. Assemble them from it (collective).
        for name, parameter in self.module.named_parameters():
            if getattr(parameter, "ds_persist", False) and is_partitioned(parameter):
                whole = self._whole(parameter, parameter.ds_tensor)
                if state is not None:
                    state[name] = whole
        return state

    # ---- checkpoints ------------------------------------------------------------------------------------
    def _named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        wanted = {id(p) for p in self.trainable}
        return [(n, p) for n, p in self.module.named_parameters() if id(p) in wanted]

    def _full(self, parameter: nn.Parameter, state: Optional[str]) -> torch.Tensor:
        """A parameter's whole fp32 master (state None) or Adam moment, on every rank (collective under ZeRO-3)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if self.stage == 0 and not hasattr(parameter, "_hp_mapping"):  # plain AdamW on the parameters themselves
            value = parameter.data if state is None else self._optimizer.state[parameter][state]
        else:
            value = safe_get_full_fp32_param(parameter) if state is None else safe_get_full_optimizer_state(parameter, state)
        return value.detach().float().cpu()

    def checkpoint_state(self) -> dict[str, Any]:
        self._ensure_optimizer_state()  # a model whose phase never ran has taken no step yet
        entries: dict[str, Any] = {}
        for index, (name, parameter) in enumerate(self._named_trainable()):
            for kind, state in (("model", None), ("optim", "exp_avg"), ("optim", "exp_avg_sq")):
                value = self._full(parameter, state)  # every rank takes part; only the owner keeps it
                if owner(index) == distributed.rank():
                    entries[f"{kind}.{name}" + (f".{state}" if state else "")] = value.clone()
        return entries

    @staticmethod
    def _whole(parameter: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
        """A ZeRO-3 partition (1/world of the flattened, padded parameter) made whole on every rank (collective)."""
        if not is_partitioned(parameter):
            return local.detach().float().cpu()
        import torch.distributed as dist

        parts = [torch.empty_like(local) for _ in range(distributed.world_size())]
        dist.all_gather(parts, local.detach().contiguous())
        return torch.cat(parts)[: parameter.ds_numel].view(parameter.ds_shape).float().cpu()

    @staticmethod
    def _partition(parameter: nn.Parameter, whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if not is_partitioned(parameter):
            return whole.to(like.device, like.dtype).clone()
        size = like.numel()
        flat = torch.zeros(size * distributed.world_size(), dtype=whole.dtype)
        flat[: whole.numel()] = whole.flatten()
        start = distributed.rank() * size
        return flat[start: start + size].to(like.device, like.dtype).clone()

    def parameter_entries(self, prefix: str, tensors: list[torch.Tensor]) -> dict[str, Any]:
        entries = {}
        for index, ((name, parameter), local) in enumerate(zip(self._named_trainable(), tensors)):
            whole = self._whole(parameter, local)
            if owner(index) == distributed.rank():
                entries[f"{prefix}.{name}"] = whole.clone()
        return entries

    def load_parameter_entries(self, prefix: str, load: Callable[[dict[str, Any]], dict[str, Any]]) -> list[torch.Tensor]:
        named = self._named_trainable()
        shapes = [tuple(getattr(p, "ds_shape", p.shape)) for _, p in named]
        template = {f"{prefix}.{name}": torch.empty(shape, dtype=torch.float32)
                    for index, ((name, _), shape) in enumerate(zip(named, shapes)) if owner(index) == distributed.rank()}
        loaded = load(template)
        return [self._partition(parameter, broadcast_owned(index, loaded, f"{prefix}.{name}", shape), local)
                for index, ((name, parameter), shape, local) in enumerate(zip(named, shapes, self.local_tensors()))]

    def optimizer_steps(self) -> int:
        steps = [int(s["step"]) for s in self._optimizer.state.values() if "step" in s]
        return max(steps) if steps else 0

    def _ensure_optimizer_state(self) -> None:
        """Adam creates its moments at the first step, and ZeRO links each parameter to its fragment of them only
        then: a checkpoint is loaded before any step, so create (zero) moments and have ZeRO link them now."""
        optimizer = self._optimizer
        # ZeRO-3 hands its flat fp32 partitions to the optimizer only for the length of a step; the others keep them
        # in the param groups.
        tensors = list(getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", None) or [])
        tensors += [t for group in optimizer.param_groups for t in group["params"]]
        for tensor in tensors:
            state = optimizer.state[tensor]
            if not state:
                state.update(exp_avg=torch.zeros_like(tensor), exp_avg_sq=torch.zeros_like(tensor), step=torch.tensor(0.0))
        link = getattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            link()

    def load_checkpoint_state(self, load: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._ensure_optimizer_state()

        named = self._named_trainable()
        keys = lambda name: (f"model.{name}", f"optim.{name}.exp_avg", f"optim.{name}.exp_avg_sq")  # noqa: E731
        template = {}
        for index, (name, parameter) in enumerate(named):
            if owner(index) == distributed.rank():
                for key in keys(name):
                    template[key] = torch.empty(tuple(getattr(parameter, "ds_shape", parameter.shape)), dtype=torch.float32)
        loaded = load(template)
        plain = self.stage == 0
        for index, (name, parameter) in enumerate(named):
            shape = tuple(getattr(parameter, "ds_shape", parameter.shape))
            # one parameter at a time, whole on every rank: each takes its part
            values = {key: broadcast_owned(index, loaded, key, shape) for key in keys(name)}
            master = values[f"model.{name}"]
            with gathered([parameter], modifier_rank=0), torch.no_grad():
                parameter.data.copy_(master.to(parameter.device, parameter.dtype))
            if plain and not hasattr(parameter, "_hp_mapping"):
                state = self._optimizer.state[parameter]
                for moment in ADAM_STATES:
                    state[moment] = values[f"optim.{name}.{moment}"].to(parameter.device, parameter.dtype).clone()
            else:
                safe_set_full_fp32_param(parameter, master.to(self._device_of(parameter)))
                for moment in ADAM_STATES:
                    safe_set_full_optimizer_state(parameter, values[f"optim.{name}.{moment}"].to(self._device_of(parameter)), moment)

    @staticmethod
    def _device_of(parameter: nn.Parameter) -> torch.device:
        return parameter.ds_tensor.device if is_partitioned(parameter) else parameter.device

    def set_optimizer_steps(self, steps: int) -> None:
        """Adam's bias correction counts its steps; a restored run continues the saved count."""
        self._ensure_optimizer_state()
        for state in self._optimizer.state.values():
            state["step"] = torch.tensor(float(steps))

    def describe(self) -> str:
        return f"DeepSpeed ZeRO-{self.stage}"


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, engine_config, micro_batch: int, dtype: torch.dtype):
        self.config, self.micro_batch, self.dtype = engine_config, micro_batch, dtype

    @classmethod
    def create(cls, config, device: torch.device, dtype: torch.dtype) -> "DeepSpeedBackend":
        return cls(config.engine, config.data.batch_size, dtype)

    @staticmethod
    def start_process_group(engine, group: str) -> None:
        from addpipe.train.backends.deepspeed_ops import start_process_group

        start_process_group(engine, group)

    @staticmethod
    def shards_weights(engine) -> bool:
        return engine.zero == 3

    @staticmethod
    def state_bytes(engine, params: int, dtype: torch.dtype, world: int, sharded: bool, ema: bool) -> StateBytes:
        # the ZeRO paper's accounting: stage 1 partitions the optimizer state, 2 also the gradients, 3 the weights
        b = dtype.itemsize
        master = 4 if b != 4 else 0  # bf16 weights need an fp32 master copy; fp32 weights are their own
        stage = engine.zero if sharded else (min(engine.zero, 2) if engine.discriminator_zero is None
                                             else engine.discriminator_zero)
        out = StateBytes(weights=b * params / (world if stage == 3 else 1),
                         gradients=b * params / (world if stage >= 2 else 1),
                         optimizer=(master + 8) * params / (world if stage >= 1 else 1),
                         ema=4 * params / (world if stage == 3 else 1) if ema else 0.0)
        if master and stage in (1, 2):  # ZeRO-1/2 also keep fp32 gradients of the rank's partition for the step
            out.gradients += 4 * params / world
        if engine.offload_optimizer != "none" and stage >= 1:
            out.optimizer, out.note = 0.0, f"optimizer state on {engine.offload_optimizer}"
        if engine.offload_param != "none" and stage == 3:
            out.weights, out.note = 0.0, f"parameters on {engine.offload_param}" + (f", {out.note}" if out.note else "")
        return out

    def stage(self, shard: bool) -> int:
        """The student's stage is the user's; a model that is not sharded by choice stays at min(zero, 2)."""
        if shard:
            return self.config.zero
        chosen = self.config.discriminator_zero
        return chosen if chosen is not None else min(self.config.zero, 2)

    def wrap(self, name: str, module: nn.Module, trainable: list[nn.Parameter], settings: OptimizerSettings,
             shard: bool) -> Trained:
        stage = self.stage(shard)
        engine = self.config
        config = deepspeed_config(stage, self.micro_batch, settings.gradient_clipping, self.dtype if shard else torch.float32,
                                  engine.offload_optimizer if shard else "none", engine.offload_param if shard else "none",
                                  engine.nvme_path)
        return DeepSpeedTrained(name, module, trainable, settings, config)

    def place_frozen(self, module: nn.Module, shard: bool) -> nn.Module:
        if not shard:
            return module
        import deepspeed

        config = deepspeed_config(3, self.micro_batch, 0.0, self.dtype)
        engine, _, _, _ = deepspeed.initialize(model=module, config=config)
        engine.eval()
        return engine

    @staticmethod
    def describe_plan(config) -> dict[str, str]:
        engine = config.engine
        heads = engine.discriminator_zero if engine.discriminator_zero is not None else min(engine.zero, 2)
        offload = f", optimizer offload {engine.offload_optimizer}" if engine.offload_optimizer != "none" else ""
        offload += f", parameter offload {engine.offload_param}" if engine.offload_param != "none" else ""
        stages = {0: "replicated, no partitioning", 1: "optimizer state partitioned",
                  2: "optimizer state and gradients partitioned", 3: "parameters, gradients and optimizer state partitioned"}
        return {"student": f"DeepSpeed ZeRO-{engine.zero}: {stages[engine.zero]}{offload}",
                "discriminator heads": f"DeepSpeed ZeRO-{heads}: {stages[heads]}",
                "frozen teacher UNet": ("partitioned by a ZeRO-3 engine without optimizer" if config.model.frozen_placement == "partition"
                                        else "replicated on every rank"),
                "VAE, text encoders, DINOv2": "replicated on every rank (frozen)"}
