"""The training stage's config tree, common to every method: run, models, student, optimisers, data, engine,
checkpoints, logs. Each method adds its own sections in its folder (train/methods/<name>/config.py) by subclassing
TrainConfig; `method:` picks the subclass. Defaults are the ADD paper's constants (docs/method.md).

Each field's docstring is read back by `addpipe.config` for `--dry-run` and for the error
that lists valid keys, so keep them short and specific.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, Optional, Union

from addpipe.assets import ASSET_MODEL, ASSET_PIPELINE


@dataclass
class ModelConfig:
    teacher: str = field(default="stable-diffusion-v1-5/stable-diffusion-v1-5", metadata=ASSET_PIPELINE)
    """Hub id or local diffusers-format directory of the teacher pipeline (unet, vae, text encoder(s), tokenizer(s), scheduler)."""
    revision: Optional[str] = None
    """Hub revision of the teacher (branch, tag or commit)."""
    variant: Optional[str] = None
    """Weight file variant to load, e.g. fp16."""
    architecture: str = "auto"
    """Model family (train/families/): sd (UNet, one CLIP text encoder), sdxl (UNet, two encoders, pooled embedding and
    size/crop ids), a registered plug-in's name, or auto: found from the teacher's model_index.json."""
    vae: Optional[str] = field(default=None, metadata=ASSET_MODEL)
    """Hub id or directory of a replacement VAE (e.g. madebyollin/sdxl-vae-fp16-fix); default: the teacher's."""
    student_init: Optional[str] = field(default=None, metadata=ASSET_MODEL)
    """Directory or hub id of a UNet to start the student from; default: a copy of the teacher's UNet."""
    gradient_checkpointing: Union[Literal["auto"], bool] = False
    """Recompute the student's (and the VAE decoder's) activations in the backward to save memory, at the cost of a
    second forward. auto: on a GPU, off when the memory plan without it fits the GPU (see `--dry-run`), on
    otherwise; off on a CPU."""
    frozen_placement: Literal["replicate", "partition"] = "replicate"
    """Frozen teacher UNet: a full copy per rank, or partitioned across ranks by a ZeRO-3 inference engine (needs engine.zero=3)."""

    def __post_init__(self) -> None:
        if self.architecture != "auto":
            from addpipe.train.families import family_names

            if self.architecture not in family_names():
                raise ValueError(f"model.architecture={self.architecture!r} is not a known model family: auto or one of "
                                 f"{', '.join(family_names())}")


ATTENTION_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
# What LCM-LoRA (diffusers' train_lcm_distill_lora_sd(xl)) and DMD2's SDXL LoRA adapt besides attention
CONVOLUTION_MODULES = ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
                       "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


@dataclass
class StudentLoraConfig:
    rank: int = 0
    """LoRA rank of the student's adapters; 0: a full student (every UNet weight trained, a second UNet in memory)."""
    alpha: Optional[float] = None
    """LoRA alpha (the update is scaled by alpha / rank); default: the rank (scale 1)."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: tuple[str, ...] = ATTENTION_MODULES
    """Module names (suffixes) that get adapters: by default the attention projections."""
    convolutions: bool = False
    """Also adapt the rest of what LCM-LoRA and DMD2 adapt: the ResNet convolutions and shortcuts, down/upsamplers,
    time-embedding projections, the transformer blocks' proj_in/proj_out and feed-forward layers."""
    init: Literal["default", "gaussian"] = "default"
    """Adapter initialisation (peft): default = Kaiming A and zero B, gaussian = normal A and zero B. Either way the
    update starts at zero, so the student starts as the teacher (the initialisation the paper calls crucial)."""
    export_fused: bool = True
    """Also export the full pipeline with the adapters merged into the UNet (run_dir/student), besides the LoRA
    (run_dir/student_lora)."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"student.lora.rank must be 0 (no LoRA) or more, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"student.lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"student.lora.dropout is a probability in [0, 1), got {self.dropout}")
        if self.rank and not self.modules():
            raise ValueError("student.lora.target_modules is empty and student.lora.convolutions is off: nothing to adapt")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def modules(self) -> list[str]:
        extra = [m for m in CONVOLUTION_MODULES if m not in self.target_modules] if self.convolutions else []
        return list(self.target_modules) + extra


@dataclass
class StudentConfig:
    num_timesteps: int = 4
    """N, the number of student timesteps; tau_i = T-1 - floor(i*T/N), e.g. {999, 749, 499, 249} for N=4."""
    timesteps: tuple[int, ...] = ()
    """Explicit student timesteps (descending, first = T-1) instead of the evenly spaced default."""
    prediction_type: Literal["auto", "epsilon", "v_prediction", "sample"] = "auto"
    """What the student's output means. auto: the teacher's own (its scheduler config), so the copy the student
    starts as already predicts well at every timestep, the initialisation the paper calls crucial; an epsilon
    teacher gives an epsilon student, as SDXL-Turbo ships. Another type makes the copy learn a new output first."""
    zero_terminal_snr: Union[Literal["auto"], bool] = "auto"
    """Rescale the student's betas so alpha at T-1 is exactly 0 (Lin et al. 2024). auto: as the teacher's scheduler
    config says (rescale_betas_zero_snr); SD 1.5/2.1 and SDXL were not trained for it, and on their own betas
    alpha at 999 is small but not zero (SDXL-Turbo keeps them). true is for a teacher trained at zero terminal SNR,
    or a deliberate change of schedule, and needs a v- or x0-prediction student (epsilon has no x0 at alpha = 0)."""
    change_parameterisation: bool = False
    """Acknowledge a student whose prediction type or terminal SNR differs from the teacher's (an explicit
    prediction_type or zero_terminal_snr that is not the teacher's own). The copy of the teacher then starts by
    predicting the wrong quantity (an epsilon UNet read as v makes its first x0 pure noise) and must relearn its
    output before distillation helps; refused unless this is true."""
    timestep_weights: tuple[float, ...] = ()
    """Relative probability of training at each student timestep (one per timestep, largest first); default uniform
    as in the paper. Weighting the first (pure-noise) timestep up trains the one-step sampler more often."""
    backward_simulation: float = 0.0
    """Share of samples at a later student timestep whose input is the student's own earlier output re-noised (what the few-step sampler feeds it) instead of a noised real image; 0 = the paper's ADD."""
    lora: StudentLoraConfig = field(default_factory=StudentLoraConfig)
    """A LoRA student: the teacher's UNet plus trainable adapters; the teacher is the same UNet with them off."""

    def __post_init__(self) -> None:
        if self.num_timesteps < 1:
            raise ValueError("student.num_timesteps must be at least 1")
        if not 0.0 <= self.backward_simulation <= 1.0:
            raise ValueError(f"student.backward_simulation is a share in [0, 1], got {self.backward_simulation}")
        if self.timesteps and list(self.timesteps) != sorted(self.timesteps, reverse=True):
            raise ValueError(f"student.timesteps must be descending, got {list(self.timesteps)}")
        count = len(self.timesteps) or self.num_timesteps
        if self.timestep_weights and (len(self.timestep_weights) != count or min(self.timestep_weights) < 0
                                      or sum(self.timestep_weights) <= 0):
            raise ValueError(f"student.timestep_weights needs {count} non-negative weights (one per student timestep) "
                             f"with a positive sum, got {list(self.timestep_weights)}")


@dataclass
class OptimConfig:
    student_lr: float = 1e-5
    """Peak AdamW learning rate of the student."""
    discriminator_lr: float = 2e-5
    """Peak AdamW learning rate of the discriminator heads."""
    student_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas of the student."""
    discriminator_betas: tuple[float, float] = (0.0, 0.99)
    """AdamW betas of the heads (StyleGAN-T style)."""
    weight_decay: float = 0.0
    """AdamW weight decay, both optimizers."""
    warmup_steps: int = 500
    """Linear learning-rate warm-up from 0 over this many steps, then constant."""
    gradient_clipping: float = 1.0
    """Global gradient-norm clip for both models; 0 disables (DeepSpeed's own default would be 1.0 silently)."""
    ema_decay: float = 0.0
    """Constant EMA decay of the student's weights (0: off). Over a short run a constant decay keeps much of the
    initial copy (0.9999^4000 = 0.67): prefer ema_halflife_kimg."""
    ema_halflife_kimg: float = 0.0
    """EMA by half-life, in thousands of images (0: off; EDM-style): the average halves its weight every
    min(this, ema_rampup * images seen) images, so it follows the weights early and averages the last stretch late."""
    ema_rampup: float = 0.05
    """EMA half-life ramp: the half-life is at most this share of the images seen so far (0: no ramp)."""
    discriminator_interval: int = 1
    """Run the discriminator phase every this many steps."""

    def __post_init__(self) -> None:
        for key, value in (("optim.student_lr", self.student_lr), ("optim.discriminator_lr", self.discriminator_lr)):
            if value <= 0:
                raise ValueError(f"{key} must be positive, got {value}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("optim.ema_decay must be in [0, 1)")
        if self.ema_halflife_kimg < 0 or self.ema_rampup < 0:
            raise ValueError("optim.ema_halflife_kimg and optim.ema_rampup must be >= 0")
        if self.ema_decay > 0 and self.ema_halflife_kimg > 0:
            raise ValueError("set one of optim.ema_decay (constant) and optim.ema_halflife_kimg (half-life), not both")

        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.discriminator_interval < 1:
            raise ValueError(f"optim.discriminator_interval must be >= 1 (the discriminator runs every that many steps), "
                             f"got {self.discriminator_interval}")
        if self.gradient_clipping < 0 or self.weight_decay < 0:
            raise ValueError("optim.gradient_clipping and optim.weight_decay must be >= 0 "
                             f"(0 disables), got {self.gradient_clipping}, {self.weight_decay}")
        for key, betas in (("optim.student_betas", self.student_betas), ("optim.discriminator_betas",
                                                                          self.discriminator_betas)):
            if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
                raise ValueError(f"{key} must be two numbers in [0, 1), got {list(betas)}")

    @property
    def ema_enabled(self) -> bool:
        return self.ema_decay > 0 or self.ema_halflife_kimg > 0


@dataclass
class DataConfig:
    shards: str = ""
    """WebDataset shards: a brace pattern ('/data/{00000..01023}.tar'), a directory, or several joined by '::'."""
    resolution: int = 512
    """Training images are resized (shorter side) and cropped to this square size."""
    batch_size: int = 4
    """Micro-batch per rank; the global batch is batch_size * world_size."""
    num_workers: int = 2
    """DataLoader workers per rank; each reads its own stream of shards."""
    random_crop: bool = False
    """Random instead of centre crops (the crop corner is passed to SDXL's time ids either way)."""
    caption_key: str = "txt"
    """Sample key holding the caption."""
    seed: int = 0
    """Seed of the shard order; each epoch reshuffles shards deterministically."""
    use_precomputed: bool = True
    """Use latents and text embeddings written by `addpipe prep encode` when they match the teacher, VAE and resolution (centre crops only)."""

    def __post_init__(self) -> None:
        for key, value, low in (("data.resolution", self.resolution, 8), ("data.batch_size", self.batch_size, 1),
                                ("data.num_workers", self.num_workers, 0)):
            if value < low:
                raise ValueError(f"{key} must be >= {low}, got {value}")


@dataclass
class EngineConfig:
    backend: Literal["deepspeed", "fsdp2"] = "deepspeed"
    """How the trained models are distributed: DeepSpeed engines (ZeRO 0-3), or PyTorch FSDP2 (fully_shard)."""
    zero: int = 2
    """DeepSpeed ZeRO stage of the student: 0, 1, 2 or 3 (deepspeed only; FSDP2 always shards parameters)."""
    discriminator_zero: Optional[int] = None
    """ZeRO stage of the discriminator heads; default min(zero, 2): they are small and R1 needs a double backward."""
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """ZeRO-Offload of the student's optimizer state (stage >= 1)."""
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    """Offload of the student's parameters (stage 3 only)."""
    nvme_path: str = "/local_nvme"
    """Directory for NVMe offload."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 on devices that support it (auto), or force one."""
    process_group: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed process-group backend: nccl on GPUs, gloo on CPU."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after each block's forward (ZeRO-3-like memory); false keeps them until the
    backward (ZeRO-2-like: more memory, one gather fewer)."""
    shard_group: int = 0
    """FSDP2: shard the models within groups of this many consecutive ranks and replicate them across the groups
    (HSDP, a 2-D device mesh: replicate x shard). The GPUs of one node is the usual choice: the parameter gathers
    stay on the node's links, and only the gradient all-reduce crosses nodes. 0: shard over all ranks."""

    def __post_init__(self) -> None:
        if self.backend == "fsdp2" and "nvme" in (self.offload_optimizer, self.offload_param):
            raise ValueError("NVMe offload is DeepSpeed's: with engine.backend=fsdp2 use offload_param=cpu (FSDP2's "
                             "CPUOffloadPolicy) or engine.backend=deepspeed")
        if self.shard_group < 0:
            raise ValueError(f"engine.shard_group must be 0 (all ranks) or a group size, got {self.shard_group}")
        if self.shard_group and self.backend != "fsdp2":
            raise ValueError("engine.shard_group (HSDP) is FSDP2's: set engine.backend=fsdp2, or leave it 0")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"engine.zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.discriminator_zero is not None and self.discriminator_zero not in (0, 1, 2, 3):
            raise ValueError("engine.discriminator_zero must be 0..3")
        if self.backend == "deepspeed" and self.offload_param != "none" and self.zero != 3:
            raise ValueError("engine.offload_param needs engine.zero=3")
        if self.backend == "deepspeed" and self.offload_optimizer != "none" and self.zero == 0:
            raise ValueError("engine.offload_optimizer needs engine.zero >= 1")


@dataclass
class CheckpointConfig:
    every: int = 1000
    """Save a checkpoint every this many steps (and always at the end)."""
    keep_last: int = 3
    """Keep this many most recent checkpoints."""
    export_ema: bool = True
    """With the EMA on, both are exported: `run_dir/student` holds the EMA weights and `run_dir/student_raw` the
    trained ones (false: `student` the trained ones and `student_ema` the EMA)."""

    def __post_init__(self) -> None:
        for key in ("every", "keep_last"):
            if getattr(self, key) < 1:
                raise ValueError(f"checkpoint.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class LogConfig:
    every: int = 10
    """Write metrics.jsonl / TensorBoard every this many steps."""
    sample_every: int = 500
    """Write a sample grid every this many steps (0: only at the end)."""
    sample_prompts: tuple[str, ...] = (
        "a photo of a red fox in the snow",
        "an astronaut riding a horse, oil painting",
        "a bowl of ramen, studio lighting",
        "a lighthouse at dusk",
    )
    """Prompts of the sample grid."""
    tensorboard: bool = True
    """Also log to TensorBoard under run_dir/tensorboard."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    term_norms: bool = True
    """On the last step of each log window, measure the gradient norm each weighted loss term contributes at the
    student's output (and, for the discriminator, at its heads' parameters), logged as grad_norm/*: a user sees an
    inert or a dominant term in the first log lines. Costs one extra backward per term on those steps only."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"log.every must be >= 1, got {self.every}")
        if self.sample_every < 0:
            raise ValueError(f"log.sample_every must be >= 0 (0: only at the end), got {self.sample_every}")


@dataclass
class TrainConfig:
    """The sections every method shares; a method's config class adds its own (train/methods/<name>/config.py)."""

    run_dir: str = "runs/add"
    """Where config, metrics, checkpoints, samples and the exported student go."""
    method: str = "add"
    """The training method, a name registered in train/methods: add (Adversarial Diffusion Distillation; its sections
    discriminator and distill) or diffusion2gan (on `addpipe pairs` shards; its sections pairs and d2g). A method's
    own sections come with it: the config is the method's subclass of this tree (TrainConfig.variant)."""
    steps: int = 10000
    """Total optimisation steps."""
    seed: int = 0
    """Seed of all training noise; noise is a function of (seed, step, stream), so resumes are exact."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Teacher and student networks."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """Student timesteps and parameterisation."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimisers, schedules, EMA."""
    data: DataConfig = field(default_factory=DataConfig)
    """WebDataset input."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """DeepSpeed and precision."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and export."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics, TensorBoard, sample grids."""

    @classmethod
    def variant(cls, data: dict) -> type:
        """The config class of the method `data` names: this tree plus that method's own sections (each method
        owns its config in its folder under train/methods/; addpipe.config.build asks this before building)."""
        from addpipe.train.methods import method_class, method_names

        name = str(data.get("method", cls.method))
        config_class = method_class(name).config_class
        if not (isinstance(config_class, type) and issubclass(config_class, TrainConfig)):
            raise TypeError(f"method {name!r}: config_class must subclass TrainConfig")
        mine = {f.name for f in fields(config_class)}
        for key in sorted(set(data) - mine):  # another method's section: say whose, not just "unknown"
            owners = [other for other in method_names()
                      if key in {f.name for f in fields(method_class(other).config_class)}]
            if owners:
                own = ", ".join(sorted(mine - _COMMON)) or "none"
                raise ValueError(f"config section {key!r} belongs to method {' and '.join(owners)}; this config says "
                                 f"method: {name} (its own sections: {own})")
        return config_class

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be at least 1")
        if self.student.lora.enabled and self.model.student_init:
            raise ValueError("student.lora adapts the teacher's own UNet: model.student_init does not apply (unset it, "
                             "or set student.lora.rank=0 for a full student initialised from it)")
        if self.model.frozen_placement == "partition" and self.engine.backend == "deepspeed" and self.engine.zero != 3:
            raise ValueError("model.frozen_placement=partition needs engine.zero=3 (or engine.backend=fsdp2)")


_COMMON = {f.name for f in fields(TrainConfig)}
"""The sections of every method's config."""
