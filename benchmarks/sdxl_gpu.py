"""The ADD training step at SDXL scale on one GPU: images/s, peak GPU memory and MFU per precision and batch size.

    python benchmarks/sdxl_gpu.py --out sdxl_gpu [--runs bf16:4 bf16:4:z2:expandable ...] [--steps 5]
    python benchmarks/sdxl_gpu.py --out /tmp/check --scale tiny --runs fp32:2 fp32:2:nockpt   # the same code on CPU

The default runs, in this order (each its own process; the whole list is meant to finish in under 8 minutes on
one H100/H200): today's ZeRO-3 with checkpointing at batch 4; ZeRO-2 with expandable segments; unsharded (FSDP2
on one rank, nothing resharded); the same without activation checkpointing; and at batch 8.

No weights can be downloaded here, so it builds SDXL base 1.0's published architecture with random weights (UNet
2.6B parameters, CLIP ViT-L and OpenCLIP bigG text encoders, the 4-level VAE; DINOv2-small for the discriminator),
saves them in diffusers/transformers format and trains through the same `from_pretrained` path and the shipped
configs/sdxl_add.yaml (512^2, ZeRO-3, gradient checkpointing, NFSD with guidance, R1). Speed and memory do not
depend on the weights' values. Each run is its own process, so one that runs out of memory leaves the next
unaffected. Writes sdxl_gpu.json and sdxl_gpu.md under --out; copy the table into benchmarks/RESULTS.md.

MFU counts the model FLOPs of one training step with torch's FLOP formulas (both UNets, the VAE decoder, DINOv2,
the heads and R1's double backward) and divides them by the step time and the GPU's dense bf16 peak. Model FLOPs
leave out what a run may or may not spend: the recomputation of gradient checkpointing (a checkpointed block's
second forward is not counted, so the count is the same with and without it) and data preparation (the VAE
encoding of the batch, the text encoders and the image condition, which precomputed latents remove).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peaks from the vendors' data sheets, FLOP/s.
PEAK_BF16 = {"H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.5e12, "H100 NVL": 835.5e12, "H200": 989.4e12,
             "A100": 312e12, "L40S": 362e12}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the fields that differ from diffusers' defaults).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
# text_encoder: CLIP ViT-L/14's text tower; text_encoder_2: OpenCLIP ViT-bigG/14's, with its 1280-d projection.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)
# stabilityai/stable-diffusion-3.5-large and -medium, transformer/config.json; the SD3 VAE (16 latent channels,
# a shift factor, no quant convs); T5 v1.1 XXL's encoder (text_encoder_3). 8.06e9, 2.24e9 and 4.76e9 parameters.
SD35_LARGE = dict(attention_head_dim=64, caption_projection_dim=2432, in_channels=16, joint_attention_dim=4096,
                  num_attention_heads=38, num_layers=38, out_channels=16, patch_size=2, pooled_projection_dim=2048,
                  pos_embed_max_size=192, qk_norm="rms_norm", sample_size=128)
SD35_MEDIUM = dict(SD35_LARGE, caption_projection_dim=1536, num_attention_heads=24, num_layers=24,
                   dual_attention_layers=tuple(range(13)), pos_embed_max_size=384)
SD3_VAE = dict(SDXL_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu")
DINOV2_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                    image_size=518, layerscale_value=1.0)


def build_sdxl(directory: Path, device: str) -> Path:
    """SDXL base 1.0's architecture with random weights, saved in bf16 as a diffusers pipeline directory."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from addpipe.train.tiny import write_clip_tokenizer

    def text_config(fields: dict) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                              pad_token_id=49407, **fields)

    torch.manual_seed(0)
    with torch.device(device):  # random init of 3.5B parameters takes minutes on a CPU, a second on a GPU
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        text_encoder = CLIPTextModel(text_config(CLIP_L))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(CLIP_BIGG))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    tokenizer_dir = directory.parent / "tokenizer"  # may be written beforehand where open_clip is not installed
    if not (tokenizer_dir / "vocab.json").is_file():
        write_clip_tokenizer(tokenizer_dir, 77)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipeline.to(torch.bfloat16).save_pretrained(directory)
    return directory


def build_models(work: Path, scale: str, device: str) -> tuple[Path, Path, int]:
    """(teacher directory, DINOv2 directory, image resolution)."""
    from transformers import Dinov2Config, Dinov2Model

    from addpipe.train.tiny import build_tiny_dinov2, build_tiny_pipeline

    if scale == "tiny":
        return (build_tiny_pipeline(work / "teacher", "sdxl", latent_size=8),
                build_tiny_dinov2(work / "dinov2", image_size=32), 16)
    teacher = work / "teacher"
    if not (teacher / "model_index.json").is_file():
        build_sdxl(teacher, device)
    dino = work / "dinov2"
    if not (dino / "config.json").is_file():
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(**DINOV2_SMALL)).save_pretrained(dino)
    return teacher, dino, 512


def write_data(work: Path, resolution: int, count: int) -> Path:
    from addpipe.dataprep.digits import write_digit_shards

    shards = work / f"shards{resolution}"
    return shards if shards.is_dir() else write_digit_shards(shards, count, resolution, 32)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


class FlopCount:
    """Model FLOPs of the matmuls, convolutions and attention run inside the block, by torch's own formulas.
    torch's FlopCounterMode cannot be used here: its per-module hooks break R1's autograd.grad on leaf features.
    `paused()` leaves work out; `model_flops(trainer)` leaves out data preparation and checkpoint recomputation."""

    def __init__(self) -> None:
        self.total = 0
        self.paused_depth = 0

    @contextlib.contextmanager
    def paused(self):
        self.paused_depth += 1
        try:
            yield
        finally:
            self.paused_depth -= 1

    def __enter__(self) -> "FlopCount":
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = flop_registry.get(func._overloadpacket)
                if formula is not None and not counter.paused_depth:
                    counter.total += formula(*args, **kwargs, out_val=out)
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)

    @contextlib.contextmanager
    def model_flops(self, trainer):
        """Inside: the trainer's data preparation is not counted, nor a checkpointed block's recomputation (non-
        reentrant checkpointing calls the block's function again in the backward: its second call is paused)."""
        method = trainer.method
        prepare = method.prepare

        def prepared(batch):
            with self.paused():
                return prepare(batch)

        hooked = [m for model in trainer.models.values() for m in model.module.modules()
                  if getattr(m, "_gradient_checkpointing_func", None) is not None]
        hooked += [m for m in method.teacher.vae.modules() if getattr(m, "_gradient_checkpointing_func", None) is not None]
        originals = {id(m): m._gradient_checkpointing_func for m in hooked}

        def once(original):
            def checkpointed(function, *args, **kwargs):
                calls = [0]

                def counted_once(*a, **k):
                    calls[0] += 1
                    with self.paused() if calls[0] > 1 else contextlib.nullcontext():
                        return function(*a, **k)
                return original(counted_once, *args, **kwargs)
            return checkpointed

        method.prepare = prepared
        for module in hooked:
            module._gradient_checkpointing_func = once(originals[id(module)])
        try:
            yield self
        finally:
            method.prepare = prepare
            for module in hooked:
                module._gradient_checkpointing_func = originals[id(module)]


def measure(spec: dict) -> dict:
    """One configuration in this process: build the trainer, time steps, count one step's FLOPs."""
    from addpipe.config import load
    from addpipe.train.config import TrainConfig
    from addpipe.train.loop import Trainer

    overrides = [
        f"run_dir={spec['work']}/run-{spec['label']}", f"model.teacher={spec['teacher']}", "model.vae=null",
        # c_img and c_text from the built networks (no ViT-L/ViT-g weights here): data preparation either way
        f"discriminator.feature_network={spec['dino']}", f"discriminator.image_encoder={spec['dino']}",
        "discriminator.text_encoder=null",
        f"data.shards={spec['shards']}", f"data.resolution={spec['resolution']}", f"data.batch_size={spec['batch']}",
        f"data.num_workers={min(2, spec['batch'])}", f"engine.precision={spec['precision']}",
        f"engine.zero={spec['zero']}", f"engine.backend={spec.get('backend', 'deepspeed')}",
        f"engine.offload_{'param' if spec.get('backend') == 'fsdp2' else 'optimizer'}={spec['offload']}", f"checkpoint.every={10**9}",
        "log.progress=false", "log.tensorboard=false", "log.sample_every=0", "optim.warmup_steps=0",
        f"model.gradient_checkpointing={str(spec.get('checkpointing', True)).lower()}",
        f"engine.reshard_after_forward={str(spec.get('reshard', True)).lower()}",
        f"log.every={spec['warmup'] + spec['steps'] + 1}",  # no flush inside the timed steps
    ]
    if spec["scale"] == "tiny":
        overrides += ["discriminator.input_size=32", "discriminator.num_heads=2", "data.num_workers=0"]
    config = load(TrainConfig, REPO / "configs/sdxl_add.yaml", overrides)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    started = time.perf_counter()
    trainer = Trainer(config)
    setup_s = time.perf_counter() - started
    times, terms = [], {}
    for _ in range(spec["warmup"] + spec["steps"]):
        sync()
        started = time.perf_counter()
        terms, _ = trainer.train_step()
        sync()
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times[spec["warmup"]:])
    with FlopCount() as counter, counter.model_flops(trainer):
        trainer.train_step()
    flops = counter.total
    peak = peak_flops(trainer.device)
    result = {
        **{k: spec[k] for k in ("label", "precision", "batch", "zero", "offload", "resolution", "steps", "warmup")},
        "backend": spec.get("backend", "deepspeed"),
        "checkpointing": spec.get("checkpointing", True), "reshard": spec.get("reshard", True),
        "expandable_segments": spec.get("expandable", False),
        "setup_s": round(setup_s, 1), "step_s": step_s, "step_s_all": times,
        "images_per_second": spec["batch"] / step_s, "tflop_per_step": flops / 1e12,
        "mfu": flops / step_s / peak if peak else None,
        "losses": {k: float(v) for k, v in terms.items()},
        "student_parameters": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                  for p in trainer.models["student"].module.parameters()),
    }
    if cuda:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return result


def child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        result = measure(spec)
    except torch.cuda.OutOfMemoryError as error:
        result = {**{k: spec[k] for k in ("label", "precision", "batch", "zero", "offload")},
                  "error": f"out of GPU memory: {str(error).splitlines()[0]}"}
    Path(spec["result"]).write_text(json.dumps(result, indent=1))


def table(machine: str, results: list[dict]) -> str:
    lines = [f"Machine: {machine}", "",
             "| run | precision | batch | ZeRO / FSDP2 | optimizer | images/s | step (s) | peak allocated (GiB) | TFLOP/step | MFU "
             "| vs first run |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    base = next((r for r in results if "error" not in r), None)
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['precision']} | {r['batch']} | {r.get('zero', '')} | "
                         f"{r.get('offload', '')} | {r['error'][:80]} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        memory = f"{r['peak_allocated_gib']:.1f}" if "peak_allocated_gib" in r else "n/a"
        ratio = r["images_per_second"] / base["images_per_second"]
        where = "CPU" if r["offload"] != "none" else "GPU"
        sharding = "FSDP2" if r.get("backend") == "fsdp2" else r["zero"]
        lines.append(f"| {r['label']} | {r['precision']} | {r['batch']} | {sharding} | {where} | {r['images_per_second']:.2f} | "
                     f"{r['step_s']:.3f} | {memory} | {r['tflop_per_step']:.1f} | {mfu} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="where models and shards go (default: OUT/work)")
    parser.add_argument("--runs", nargs="+", default=["bf16:4", "bf16:4:z2:expandable", "bf16:4:fsdp2:noreshard",
                                                      "bf16:4:fsdp2:noreshard:nockpt", "bf16:8:fsdp2:noreshard:nockpt"],
                        help="PRECISION:BATCH[:zSTAGE][:offload][:fsdp2][:noreshard][:nockpt][:expandable] (default DeepSpeed "
                             "ZeRO-3 with gradient checkpointing, optimizer on the GPU; noreshard: FSDP2 keeps gathered "
                             "parameters, unsharded on one GPU; expandable: PYTORCH_CUDA_ALLOC_CONF=expandable_segments), measured "
                             "in this order, each in its own process")
    parser.add_argument("--scale", choices=["sdxl", "tiny"], default="sdxl")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.scale == "sdxl" and not torch.cuda.is_available():
        parser.error("--scale sdxl needs a CUDA GPU (use --scale tiny to check the script on a CPU)")
    out = args.out
    work = args.work or out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    teacher, dino, resolution = build_models(work, args.scale, "cuda" if torch.cuda.is_available() else "cpu")
    torch.cuda.empty_cache()  # the models were built on the GPU: give it back whole to the measured processes
    shards = write_data(work, resolution, 128)
    print(f"models and shards ready in {time.perf_counter() - started:.0f} s", flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    machine = (f"{platform.node()}, {device}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
               f"{time.strftime('%Y-%m-%d')}")
    results = []
    for run in args.runs:
        precision, batch, *options = run.split(":")
        zero = next((int(o[1:]) for o in options if o.startswith("z")), 3)
        offload = "cpu" if "offload" in options else "none"
        backend = "fsdp2" if "fsdp2" in options else "deepspeed"
        label = (f"{precision}-b{batch}-fsdp2" if backend == "fsdp2" else f"{precision}-b{batch}-zero{zero}") + (
            "-offload" if offload != "none" else "") + "".join(f"-{o}" for o in options if o in ("noreshard", "nockpt", "expandable"))
        spec = {"label": label, "precision": precision, "batch": int(batch), "scale": args.scale,
                "zero": zero, "offload": offload, "backend": backend, "checkpointing": "nockpt" not in options,
                "reshard": "noreshard" not in options, "expandable": "expandable" in options,
                "teacher": str(teacher), "dino": str(dino), "shards": str(shards), "resolution": resolution,
                "work": str(work), "steps": args.steps, "warmup": args.warmup,
                "result": str(out / f"run-{label}.json")}
        print(f"== {label}", flush=True)
        env = dict(os.environ)
        if spec["expandable"]:
            env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--child", json.dumps(spec)], env=env)
        path = Path(spec["result"])
        result = json.loads(path.read_text()) if path.is_file() else {
            **{k: spec[k] for k in ("label", "precision", "batch", "zero", "offload")},
            "error": f"process exited with {proc.returncode}"}
        results.append(result)
        text = table(machine, results)  # rewritten after every run so a cut-off job still leaves its rows
        (out / "sdxl_gpu.md").write_text(text)
        (out / "sdxl_gpu.json").write_text(json.dumps({"machine": machine, "runs": results}, indent=1))
        print(text, flush=True)


if __name__ == "__main__":
    main()
