"""The `addpipe` command line: each command parses its config and calls one library function."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from addpipe.errors import UserError as BaseUserError

# Plain (click) help, not typer's rich panels: rich help labels every flag `<bool>` as if it took a value, and
# costs a further ~0.3 s of imports on every --help. -h works everywhere: click's child contexts inherit it.
# Off a terminal click assumes 80 columns and cuts each command's one-line description at about 45 characters:
# 120 columns keep them whole in the command lists (and in a log file).
_APP = dict(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
            context_settings={"help_option_names": ["-h", "--help"], "terminal_width": 120, "max_content_width": 120})
app = typer.Typer(no_args_is_help=True, help="Adversarial Diffusion Distillation: prep -> train -> sample -> eval.", **_APP)


def _version(value: bool) -> None:
    if value:
        from addpipe import __version__

        typer.echo(f"addpipe {__version__}")
        raise typer.Exit()


DEBUG = {"on": os.environ.get("ADDPIPE_DEBUG", "") not in ("", "0")}


@app.callback()
def _root(version: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=_version,
                                       help="Print the version and exit"),
          debug: bool = typer.Option(False, "--debug", help="Print the traceback of an unexpected error (also: "
                                     "ADDPIPE_DEBUG=1)")) -> None:
    """Adversarial Diffusion Distillation: prep -> train -> sample -> eval."""
    DEBUG["on"] = DEBUG["on"] or debug


class UserError(BaseUserError):
    """A command's own refusal of its arguments (printed without a traceback)."""


@app.command(short_help="Train a student (ADD, Diffusion2GAN, LoRA) on one process or many (torchrun, srun); --dry-run plans it.")
def train(
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. optim.student_lr=1e-5 data.shards='/d/{000..099}.tar'"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (configs/*.yaml)"),
    backend: Optional[str] = typer.Option(None, "--backend", help="deepspeed (default) or fsdp2"),
    zero: Optional[int] = typer.Option(None, "--zero", help="DeepSpeed ZeRO stage of the student (0-3)"),
    offload: Optional[str] = typer.Option(None, "--offload", help="Offload optimizer state: none, cpu or nvme"),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Shortcut for run_dir=..."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest complete checkpoint in run_dir"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config with its documentation, the plan "
                                 "and the memory per rank, and exit"),
    world_size: Optional[int] = typer.Option(None, "--world-size", help="--dry-run: plan memory for this many ranks "
                                             "[default: WORLD_SIZE, else 1]"),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", help="--dry-run: say whether the plan fits a GPU "
                                               "of this many GiB"),
) -> None:
    """Train a student (ADD, or Diffusion2GAN with method=diffusion2gan): one process, or several under torchrun, the deepspeed launcher or srun.

    SIGUSR1 or SIGTERM: every rank finishes its step, a checkpoint is written and the command exits with status 75
    (slurm/train.sbatch requeues the job on it; --resume continues)."""
    from addpipe.config import load
    from addpipe.train.config import TrainConfig

    extra = list(overrides or [])
    if backend is not None:
        extra.append(f"engine.backend={backend}")
    if zero is not None:
        extra.append(f"engine.zero={zero}")
    if offload is not None:
        extra.append(f"engine.offload_optimizer={offload}")
    if run_dir is not None:
        extra.append(f"run_dir={run_dir}")
    cfg = load(TrainConfig, config, extra)
    if dry_run:
        from addpipe.train.plan import dry_run as describe_dry_run

        from addpipe.train.preflight import check

        try:
            typer.echo(describe_dry_run(cfg, world_size or int(os.environ.get("WORLD_SIZE", "1")), gpu_memory))
        except ValueError as error:  # an unknown method, a world size below 1
            raise UserError(str(error)) from error
        check(cfg)  # what the run would stop on: --dry-run fails the same way
        return
    from addpipe.train.loop import train as run_training
    from addpipe.train.preemption import REQUEUE_EXIT, Preempted

    try:
        student = run_training(cfg, resume=resume)
    except Preempted as stopped:
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(str(stopped), err=True)
        raise typer.Exit(REQUEUE_EXIT)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"student exported to {student}")


@app.command(short_help="Download the models a config names into the hub cache for offline nodes; offline, check them.")
def fetch(
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides of the training config, e.g. model.teacher=org/name"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Training config whose models to fetch (configs/*.yaml)"),
    prep: bool = typer.Option(False, "--prep", help="Also the curation's models (open_clip, the aesthetic predictor)"),
    prep_set: Optional[List[str]] = typer.Option(None, "--prep-set", help="A prep setting, as `addpipe prep --set` takes it "
                                                 "(repeatable), e.g. embed.pretrained=laion2b_s32b_b82k"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Hub cache to fill [default: HF_HUB_CACHE, "
                                            "else ~/.cache/huggingface/hub]"),
) -> None:
    """Download every model a config names into the cache, once, for nodes without a network; offline
    (HF_HUB_OFFLINE=1) only check that each is there, naming what is missing in one line.

    Hub pipelines come without what addpipe never loads (single-file checkpoints at the repository's root, ONNX or
    Flax exports, other variants' weights); local paths in the config are not fetched."""
    from addpipe.assets import assets, fetch_all, offline

    found = []
    if config is not None or overrides:
        from addpipe.config import load
        from addpipe.train.config import TrainConfig

        found += list(assets(load(TrainConfig, config, list(overrides or []))))
    if prep:
        from addpipe.config import load
        from addpipe.dataprep.config import PrepConfig

        found += list(assets(load(PrepConfig, None, list(prep_set or []))))
    if not found:
        if config is None and not prep:
            raise UserError("nothing to fetch: pass --config CONFIG and/or --prep")
        typer.echo("nothing to fetch: every model the config names is a local path")
        return
    paths, problems = fetch_all(found, cache_dir)
    for asset, path in paths.items():
        typer.echo(f"ok       {asset} -> {path}")
    if problems:
        raise UserError(("missing (offline, HF_HUB_OFFLINE=1): " if offline() else "could not fetch: ")
                        + "; ".join(problems))
    from huggingface_hub import constants

    typer.echo(f"all {len(paths)} model(s) are in the cache. On the nodes: export HF_HUB_OFFLINE=1"
               f" HF_HUB_CACHE={cache_dir or constants.HF_HUB_CACHE}"
               + (" (and TORCH_HOME as here, for the aesthetic weights)" if any(a.kind == "url" for a in paths) else ""))


@app.command(short_help="Turn a single-file .safetensors/.ckpt fine-tune into the diffusers folder training loads.")
def convert(
    checkpoint: Path = typer.Argument(..., help="The single-file checkpoint (original SD/SDXL layout)"),
    out: Path = typer.Option(..., "--out", "-o", help="New folder for the diffusers pipeline"),
    like: Optional[str] = typer.Option(None, "--like", help="A diffusers folder or hub id of the same architecture, for "
                                       "the configs, tokenizers and scheduler [default: the base model diffusers infers "
                                       "from the checkpoint's keys]"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16 for the saved weights"),
) -> None:
    """Convert a single-file fine-tune (what most shared SD 1.5/2.1 and SDXL fine-tunes are) into a diffusers folder,
    through diffusers' from_single_file; pass the folder as model.teacher= afterwards. Offline, --like must be a
    local folder or a hub id already in the cache (addpipe fetch)."""
    import torch

    from addpipe.train.families.single_file import ConversionError, convert_single_file

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise UserError(f"--dtype {dtype}: one of {', '.join(dtypes)}")
    try:
        summary = convert_single_file(checkpoint, out, like, dtypes[dtype])
    except ConversionError as error:
        raise UserError(str(error)) from error
    typer.echo(f"converted {checkpoint} ({summary['family']}, configs from {summary['like']}) into {out}: "
               f"{', '.join(summary['components'])}")
    typer.echo(f"train on it with: addpipe train --config CONFIG model.teacher={out}")


@app.command()
def pairs(
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. pairs.guidance=8 pairs.steps=50"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (configs/*_d2g.yaml)"),
    prompts: str = typer.Option(..., "--prompts", help="Prompt table: parquet, csv, tsv, jsonl (column pairs.prompt_column) "
                                "or .txt (one prompt per line)"),
    out: Path = typer.Option(..., "--out", "-o", help="Directory of the pair shards (reruns continue it)"),
    task: Optional[int] = typer.Option(None, "--task", help="This worker's index [default: SLURM_ARRAY_TASK_ID, else 0]"),
    tasks: Optional[int] = typer.Option(None, "--tasks", help="Workers in all [default: SLURM_ARRAY_TASK_COUNT, else 1]"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
) -> None:
    """Diffusion2GAN's ODE pairs: the teacher's DDIM sampler from stored noise, into WebDataset shards.

    Split across SLURM array tasks (and torchrun ranks inside each): shard N goes to worker N mod workers, so any
    split writes the same files; a rerun skips finished shards."""
    from addpipe.config import load
    from addpipe.train.config import TrainConfig
    from addpipe.train.methods.diffusion2gan.pairs import collect_pairs

    # the pairs section is Diffusion2GAN's: without a config, its defaults
    cfg = load(TrainConfig, config, (["method=diffusion2gan"] if config is None else []) + list(overrides or []))
    if not hasattr(cfg, "pairs"):
        raise UserError(f"addpipe pairs reads the pairs section of a method: diffusion2gan config; {config} says "
                        f"method: {cfg.method} (see configs/sd15_d2g.yaml)")
    task = task if task is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))
    tasks = tasks if tasks is not None else int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    try:
        counts = collect_pairs(cfg, prompts, str(out), task=task, tasks=tasks, device=device)
    except ValueError as error:  # --task out of range
        raise UserError(str(error)) from error
    typer.echo(f"pairs: {counts['pairs']} written in {counts['written_shards']} shard(s), {counts['skipped']} prompt(s) "
               f"skipped, {counts['reused_shards']} shard(s) already done; this worker's {counts['worker_shards']} of "
               f"{counts['shards']} shard(s) for {counts['prompts']} prompt(s) in {out}")
    if counts["complete"]:
        typer.echo(f"the set is complete: {counts['total_pairs']} pairs + {counts['total_skipped']} skipped = "
                   f"{counts['prompts']} prompts (summary.json)")
    else:
        typer.echo("other workers' shards are not all done yet; the last worker to finish writes summary.json")


@app.command()
def sample(
    student: Path = typer.Option(..., "--student", help="Exported student directory (run_dir/student)"),
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="Prompt; repeat for several images"),
    steps: int = typer.Option(1, "--steps", help="Sampling steps (1-4 for the default student)"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("sample.png"), "--out", "-o", help="PNG file (a grid when several prompts)"),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Default: the student's native size"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    untrained_steps: bool = typer.Option(False, "--untrained-steps",
                                         help="Allow a step count whose timesteps the student was not trained on"),
    plain: bool = typer.Option(False, "--plain", help="The images alone, side by side at their size, without labels"),
) -> None:
    """Sample from an exported student on the timesteps it was trained on: deterministic for a seed, no guidance.

    The PNG is a grid with each prompt above its image and the steps and seed beside them, small images upscaled
    (nearest neighbour) to 256 pixels so they stay readable; --plain writes the bare images."""
    from addpipe.devices import resolve_device
    from addpipe.train.sampling import generate, load_student, sample_timesteps, save_grid, vae_downsample_factor

    target = resolve_device(device)
    components, schedule, info = load_student(str(student), target)
    try:
        timesteps = sample_timesteps(info, steps, untrained_steps)
    except ValueError as error:
        raise UserError(str(error)) from error
    size = resolution or components.unet.config.sample_size * vae_downsample_factor(components)
    images = generate(components.unet, components, schedule, list(prompt), timesteps, seed, size, target)
    if plain:
        save_grid(images.cpu(), out, rows=1)
    else:
        from addpipe.eval.report import labelled_grid

        labelled_grid(images.float().cpu(), [f"{steps} step(s), seed {seed}"], list(prompt), out, cell=max(size, 256))
    typer.echo(f"wrote {out} ({len(prompt)} image(s), {steps} step(s), timesteps {timesteps})")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Working directory of the demo (reruns continue in it)"),
    images: int = typer.Option(1500, "--images", help="Rows of the digit URL table that prep curates"),
    steps: int = typer.Option(600, "--steps", help="ADD training steps"),
    prompts: Optional[int] = typer.Option(None, "--prompts", help="Prompts per arm in the evaluation; fewer make FID mostly its small-sample term [default: 200]"),
    judges: int = typer.Option(3, "--judges", help="Judge-model raters in the pairwise study"),
    teacher: str = typer.Option("shipped", "--teacher", help="shipped (pipeline/assets), train (train it here, ~31 min on 2 cores), or a pipeline directory"),
    teacher_unet_steps: int = typer.Option(10000, "--teacher-steps", help="UNet steps when --teacher train"),
    clip_steps: int = typer.Option(300, "--clip-steps", help="Training steps of the curation's tiny CLIP"),
    backbone_steps: int = typer.Option(1200, "--backbone-steps", help="Training steps of the DINOv2-architecture feature network"),
    classifier_steps: int = typer.Option(800, "--classifier-steps", help="Training steps of the evaluation classifier"),
    full: bool = typer.Option(False, "--full", help="The reproduction table: teacher vs student vs ablations over seeds (long)"),
    seeds: int = typer.Option(3, "--seeds", help="Seeds for --full"),
    runs: Optional[str] = typer.Option(None, "--runs", help="--full: only these runs, comma-separated (add is always "
                                       "run), e.g. add,lora or d2g,d2g-regression [default: all]"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="Evaluation device: auto (a GPU when there is one), cpu, cuda, cuda:1 ... "
                               "ADD training follows the GPU too; hide GPUs (CUDA_VISIBLE_DEVICES=) for an all-CPU run"),
) -> None:
    """The main job offline on CPU: digits served over HTTP -> prep -> teacher -> ADD -> judged study -> report."""
    from addpipe.pipeline.demo import DemoSettings, run_demo

    try:
        settings = DemoSettings(out=str(out), images=images, steps=steps, prompts=prompts or 200, judges=judges, teacher=teacher,
                                teacher_unet_steps=teacher_unet_steps, teacher_vae_steps=max(1, teacher_unet_steps // 4),
                                clip_steps=clip_steps, backbone_steps=backbone_steps, classifier_steps=classifier_steps, seed=seed,
                                device=device)
    except ValueError as error:
        raise UserError(str(error)) from error
    if full:
        from addpipe.pipeline.reproduce import check_runs, run_reproduction

        only = [r.strip() for r in runs.split(",") if r.strip()] if runs else None
        try:
            check_runs(only)
        except ValueError as error:
            raise UserError(str(error)) from error
        report = run_reproduction(settings, seeds, only)
        typer.echo(f"reproduction finished: {report}")
        return
    report = run_demo(settings)
    typer.echo(f"demo finished: {report}")


prep_app = typer.Typer(no_args_is_help=False, **_APP,
                        help="Curate a URL table into filtered WebDataset shards (all stages, or one with a subcommand).")
app.add_typer(prep_app, name="prep")

_OUT = typer.Option(None, "--out", "-o", help="Output directory (its prep_config.yaml is reused on reruns)")
_CONFIG = typer.Option(None, "--config", "-c", help="Prep config YAML (default: <out>/prep_config.yaml, else built-in defaults)")
_SET = typer.Option(None, "--set", "-s", help="Dotted override, repeatable: --set filter.min_aesthetic=4.5")


def _prep_config(out: Optional[Path], urls: Optional[str], config: Optional[Path], overrides: Optional[List[str]]):
    from addpipe.dataprep.config import PrepConfig
    from addpipe.config import load

    if config is None and out is not None and (out / "prep_config.yaml").is_file():
        config = out / "prep_config.yaml"
    cfg = load(PrepConfig, config, list(overrides or []))
    if out is not None:
        cfg.out = str(out)
    if urls is not None:
        cfg.input.urls = urls
    return cfg


def _local_images(images: Path, urls: Optional[str], out: Optional[Path]) -> str:
    """`prep --images DIR`: the table of DIR's images, written under <out>/input (the same on every rerun)."""
    from addpipe.dataprep.images import local_image_table
    from addpipe.files import write_parquet_atomic

    if urls is not None:
        raise UserError("--images and --urls name two inputs: give one")
    if out is None:
        raise UserError("--images needs --out (where the table of the images, the shards and the report go)")
    table = local_image_table(images)
    path = out / "input" / "local_images.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(table, path)
    typer.echo(f"{len(table)} image(s) under {images}, {int((table['caption'] != '').sum())} with a caption file")
    return str(path)


def _prep_failures(run):
    """Runs a prep stage, turning failures caused by input or settings into clear errors."""
    from addpipe.dataprep.prep import PrepError

    try:
        return run()
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        if isinstance(error, BaseUserError):
            raise
        raise PrepError(str(error)) from error


@prep_app.callback(invoke_without_command=True)
def prep(
    ctx: typer.Context,
    urls: Optional[str] = typer.Option(None, "--urls", help="URL table: parquet, csv, tsv or jsonl (optionally .gz), or a directory"),
    images: Optional[Path] = typer.Option(None, "--images", help="Instead of --urls: the image files under this "
                                          "directory, captions from sidecar <name>.txt files"),
    out: Optional[Path] = _OUT,
    config: Optional[Path] = _CONFIG,
    overrides: Optional[List[str]] = _SET,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config with its documentation and exit"),
) -> None:
    """All stages: download -> embed + score -> filter + dedup -> shards and report. Rerun to resume."""
    if ctx.invoked_subcommand is not None:
        return
    from addpipe.dataprep.prep import run_prep
    from addpipe.config import to_yaml

    if images is not None:
        urls = _local_images(images, urls, out)
        overrides = list(overrides or []) + ["input.url_column=url", "input.caption_column=caption",
                                             "download.allowed_schemes=[file]",
                                             f"download.allowed_file_roots=[{images.expanduser().resolve()}]"]
    cfg = _prep_config(out, urls, config, overrides)
    if dry_run:
        typer.echo(to_yaml(cfg, with_docs=True))
        return
    report = _prep_failures(lambda: run_prep(cfg))
    typer.echo(f"kept {report['kept']} of {report['input_rows']} rows -> {report['shard_pattern']} "
               f"(report: {Path(cfg.out) / 'report.md'})")


@prep_app.command("download", short_help="Stage 1: normalise the URL table and download it with img2dataset (or Spark).")
def prep_download(urls: Optional[str] = typer.Option(None, "--urls", help="URL table"), out: Optional[Path] = _OUT,
                  config: Optional[Path] = _CONFIG, overrides: Optional[List[str]] = _SET) -> None:
    """Stage 1: normalise the URL table and download it with img2dataset (download.distributor=pyspark to scale out)."""
    from addpipe.dataprep.prep import run_download

    shards = _prep_failures(lambda: run_download(_prep_config(out, urls, config, overrides)))
    typer.echo(f"downloaded {len(shards)} shard(s)")


@prep_app.command("embed", short_help="Stage 2: CLIP embeddings and scores of this task's shards (a SLURM array task).")
def prep_embed(out: Optional[Path] = _OUT, config: Optional[Path] = _CONFIG, overrides: Optional[List[str]] = _SET,
               task_index: int = typer.Option(int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)), "--task-index", help="This task's index (default $SLURM_ARRAY_TASK_ID)"),
               task_count: int = typer.Option(int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)), "--task-count", help="Number of tasks (default $SLURM_ARRAY_TASK_COUNT)")) -> None:
    """Stage 2: CLIP embeddings and scores for the shards with id % task-count == task-index (a SLURM array task)."""
    from addpipe.dataprep.prep import run_embed

    shards = _prep_failures(lambda: run_embed(_prep_config(out, None, config, overrides), task_index, task_count))
    typer.echo(f"task {task_index}/{task_count}: {len(shards)} shard(s) embedded and scored")


@prep_app.command("merge")
def prep_merge(out: Optional[Path] = _OUT, config: Optional[Path] = _CONFIG, overrides: Optional[List[str]] = _SET) -> None:
    """Stage 3: global filters and dedup over all shards, output shards and the report."""
    from addpipe.dataprep.prep import run_merge

    cfg = _prep_config(out, None, config, overrides)
    report = _prep_failures(lambda: run_merge(cfg))
    typer.echo(f"kept {report['kept']} of {report['input_rows']} rows -> {report['shard_pattern']}")


@prep_app.command("encode", short_help="Optional: the teacher's latents and text embeddings into the shards.")
def prep_encode(
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides of the training config, e.g. data.resolution=1024"),
    shards: str = typer.Option(..., "--shards", help="Shards to encode in place: brace pattern or directory"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="The training config (teacher, VAE, data.resolution)"),
    batch_size: int = typer.Option(32, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    storage: str = typer.Option("float16", "--storage", help="float16 or float32"),
) -> None:
    """Optional: precompute the teacher's VAE latents and text embeddings into the shards; training then skips those encoders."""
    from addpipe.train.encode import encode_shards
    from addpipe.config import load
    from addpipe.train.config import TrainConfig

    if storage not in ("float16", "float32"):
        raise UserError(f"--storage must be float16 or float32, got {storage}")
    cfg = load(TrainConfig, config, list(overrides or []))
    counts = encode_shards(cfg, shards, batch_size=batch_size, device=device, storage=storage)
    typer.echo(f"encoded {counts['encoded_shards']} of {counts['shards']} shard(s) ({counts['samples']} samples, "
               f"{counts['skipped']} unreadable left as they were) at resolution {cfg.data.resolution}")


slurm_app = typer.Typer(no_args_is_help=True, **_APP,
                         help="Render and submit the SLURM batch scripts (slurm/*.sbatch) for an allocation.")
app.add_typer(slurm_app, name="slurm")
_NODES = typer.Option(1, "--nodes", help="Nodes")
_GPUS = typer.Option(0, "--gpus-per-node", help="GPUs per node, one training task each; 0: a CPU partition")
_TIME = typer.Option(None, "--time", help="Time limit (HH:MM:SS, D-HH:MM:SS) [default: the script's]")
_PARTITION = typer.Option(None, "--partition", "-p", help="Partition [default: the cluster's]")
_ACCOUNT = typer.Option(None, "--account", "-A", help="Account to charge")
_CPUS = typer.Option(None, "--cpus-per-task", help="CPUs per task [default: the script's, or the node's share per GPU]")
_LOGS = typer.Option(Path("logs"), "--log-dir", help="Logs and the rendered scripts (created)")
_SBATCH = typer.Option(None, "--sbatch", help="A further sbatch option, verbatim (repeatable), e.g. --sbatch=--qos=high")
_SLURM_DRY = typer.Option(False, "--dry-run", help="Print the rendered script(s) and the sbatch command(s); submit nothing")


def _slurm_errors(run):
    from addpipe.slurm.submit import SlurmError

    try:
        return run()
    except SlurmError as error:
        raise UserError(str(error)) from None


@slurm_app.command("train", short_help="Submit `addpipe train` as one SLURM job that requeues itself on preemption.",
                   context_settings={"allow_extra_args": True,
                                               "ignore_unknown_options": True})
def slurm_train(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", "-c", help="YAML config"),
    nodes: int = _NODES, gpus_per_node: int = _GPUS,
    tasks_per_node: Optional[int] = typer.Option(None, "--tasks-per-node", help="Without GPUs: training tasks per node [1]"),
    cpus_per_task: Optional[int] = _CPUS, time: Optional[str] = _TIME, partition: Optional[str] = _PARTITION,
    account: Optional[str] = _ACCOUNT,
    signal_before: Optional[int] = typer.Option(None, "--signal-before", help="Seconds before the time limit to "
                                                "checkpoint and requeue [600, or a quarter of a short limit]"),
    log_dir: Path = _LOGS, sbatch: Optional[List[str]] = _SBATCH, dry_run: bool = _SLURM_DRY,
) -> None:
    """Submit `addpipe train` as one SLURM job: srun starts one task per GPU on every node; on the time limit or a
    preemption the run checkpoints, the job requeues itself and resumes. Arguments after the options go to
    `addpipe train` (e.g. --zero 3 data.shards=...)."""
    from addpipe.slurm.submit import Allocation, submit_train

    allocation = Allocation(nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=tasks_per_node,
                            cpus_per_task=cpus_per_task, time=time, partition=partition, account=account,
                            signal_before=signal_before, log_dir=log_dir, extra=list(sbatch or []))
    if config.is_file():  # refused here, as `addpipe train` would refuse it, not on every rank after the queue
        _check_train_arguments(config, list(ctx.args))
    notes: list[str] = []
    script, job = _slurm_errors(lambda: submit_train(config, list(ctx.args), allocation, dry_run, notes))
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    if dry_run:
        typer.echo(script + "\n# save the script above as train.sbatch and submit it with:\n" + job)
    else:
        typer.echo(f"submitted job {job}; log: {log_dir / f'addpipe-train-{job}.out'}")


def _check_train_arguments(config: Path, args: list[str]) -> None:
    """Parse `args` with `addpipe train`'s own command line and load the config with its overrides, as the job would."""
    from typer.main import get_command

    from addpipe.config import load
    from addpipe.train.config import TrainConfig

    command = get_command(app).get_command(None, "train")
    try:
        with command.make_context("addpipe train", ["--config", str(config), *args]) as context:
            params = dict(context.params)
    except Exception as error:  # typer's own click: a usage error (unknown option, bad value), or --help's exit
        message = error.format_message() if hasattr(error, "format_message") else "see `addpipe train --help`"
        raise UserError(f"addpipe train would refuse these arguments: {message}") from None
    extra = list(params["overrides"] or [])  # the same translation as `addpipe train`'s
    for option, key in (("backend", "engine.backend"), ("zero", "engine.zero"), ("offload", "engine.offload_optimizer"),
                        ("run_dir", "run_dir")):
        if params.get(option) is not None:
            extra.append(f"{key}={params[option]}")
    load(TrainConfig, config, extra)


@slurm_app.command("prep")
def slurm_prep(
    urls: str = typer.Option(..., "--urls", help="URL table"), out: Path = typer.Option(..., "--out", help="Output directory"),
    tasks: int = typer.Option(4, "--tasks", help="Embed array tasks"),
    config: Optional[Path] = _CONFIG, overrides: Optional[List[str]] = _SET,
    gpus_per_node: int = typer.Option(0, "--gpus-per-node", help="GPUs per embed task; 0: CPU"),
    cpus_per_task: Optional[int] = _CPUS, time: Optional[str] = _TIME, partition: Optional[str] = _PARTITION,
    account: Optional[str] = _ACCOUNT, log_dir: Path = _LOGS, sbatch: Optional[List[str]] = _SBATCH,
    dry_run: bool = _SLURM_DRY,
) -> None:
    """Submit the curation as three dependent jobs: download -> embed array -> merge. Resubmitting resumes."""
    from addpipe.slurm.submit import Allocation, submit_prep

    options = (["--config", str(Path(config).resolve())] if config else []) + [a for o in overrides or [] for a in ("--set", o)]
    allocation = Allocation(gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task, time=time, partition=partition,
                            account=account, log_dir=log_dir, extra=list(sbatch or []))
    _prep_config(out, urls, config, overrides)  # the settings, refused here as `addpipe prep` would refuse them
    notes: list[str] = []
    scripts, jobs = _slurm_errors(lambda: submit_prep(urls, out, tasks, options, allocation, dry_run, notes))
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    if dry_run:
        for script, command, name in zip(scripts, jobs, ("prep_download", "prep_embed", "prep_merge")):
            typer.echo(script + f"\n# save the script above as {name}.sbatch and submit it with:\n" + command + "\n")
    else:
        typer.echo(f"submitted download {jobs[0]} -> embed array {jobs[1]} ({tasks} tasks) -> merge {jobs[2]}; logs in {log_dir}\n"
                   "a stage that fails or is cancelled makes SLURM cancel the stages after it; resubmitting the same "
                   "command resumes where the work stopped")


@slurm_app.command("pairs", context_settings={"allow_extra_args": True,
                                               "ignore_unknown_options": True})
def slurm_pairs(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", "-c", help="YAML config (its model and pairs sections)"),
    prompts: str = typer.Option(..., "--prompts", help="Prompt table"),
    out: Path = typer.Option(..., "--out", help="Directory of the pair shards"),
    tasks: int = typer.Option(4, "--tasks", help="Array tasks (shard N goes to task N mod tasks)"),
    gpus_per_node: int = typer.Option(0, "--gpus-per-node", help="GPUs per task; 0: CPU"),
    cpus_per_task: Optional[int] = _CPUS, time: Optional[str] = _TIME, partition: Optional[str] = _PARTITION,
    account: Optional[str] = _ACCOUNT, log_dir: Path = _LOGS, sbatch: Optional[List[str]] = _SBATCH,
    dry_run: bool = _SLURM_DRY,
) -> None:
    """Submit `addpipe pairs` as a job array. Resubmitting (or a requeued task) continues: receipted shards are
    skipped. Arguments after the options are config overrides (e.g. pairs.guidance=8)."""
    from addpipe.slurm.submit import Allocation, submit_pairs

    allocation = Allocation(gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task, time=time, partition=partition,
                            account=account, log_dir=log_dir, extra=list(sbatch or []))
    script, job = _slurm_errors(lambda: submit_pairs(config, prompts, out, tasks, list(ctx.args), allocation, dry_run))
    if dry_run:
        typer.echo(script + "\n# save the script above as pairs.sbatch and submit it with:\n" + job)
    else:
        typer.echo(f"submitted pairs array {job} ({tasks} tasks); logs in {log_dir}")


eval_app = typer.Typer(no_args_is_help=True, **_APP,
                        help="Human-preference studies and automated metrics: generate -> invite -> serve -> elo; metrics.")
app.add_typer(eval_app, name="eval")
_STUDY = typer.Option(..., "--study", help="Study directory (images, generations.jsonl, votes.db, report/)")
_DB = typer.Option(None, "--db", help="SQLAlchemy URL of the votes database (default: sqlite in the study directory; "
                                      "postgresql+psycopg://user@host/db for PostgreSQL)")


def _db_url(study: Path, db: Optional[str]) -> str:
    """The votes database of an existing study (a missing study directory is named, not a database error)."""
    from addpipe.eval.db import default_url
    from addpipe.eval.study import StudyError

    if not Path(study).is_dir():
        raise StudyError(f"study directory {study} does not exist: make it with `addpipe eval generate --study {study}`")
    return db or default_url(study)


def _eval_failures(run):
    from addpipe.eval.study import StudyError

    try:
        return run()
    except (FileNotFoundError, ValueError) as error:
        if isinstance(error, BaseUserError):
            raise
        raise StudyError(str(error)) from error


@eval_app.command("generate")
def eval_generate(
    study: Path = _STUDY,
    model: List[str] = typer.Option(..., "--model", "-m", help="Arm: name=DIR_OR_HUB_ID[+LORA_DIR][:steps=N][:cfg=G][:scheduler=S][:resolution=R]; repeat"),
    prompts: str = typer.Option("bundled", "--prompts", help="bundled, parti, a PartiPrompts-format .tsv or a text file"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N prompts"),
    seed: int = typer.Option(0, "--seed", help="Prompt i starts from the noise of seed+i, the same for every arm"),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16"),
) -> None:
    """Generate paired images: every arm on the same prompts and initial noise, with latency."""
    from addpipe.eval.generate import Arm, generate_study, load_prompts

    arms = _eval_failures(lambda: [Arm.parse(spec) for spec in model])
    prompt_list = _eval_failures(lambda: load_prompts(prompts, limit))
    path = _eval_failures(lambda: generate_study(study, arms, prompt_list, seed, device, dtype))
    typer.echo(f"{len(arms)} arm(s) x {len(prompt_list)} prompt(s) -> {path}")


@eval_app.command("invite")
def eval_invite(
    study: Path = _STUDY, db: Optional[str] = _DB,
    raters: int = typer.Option(..., "--raters", help="Number of new invite links"),
    pairs_per_rater: Optional[int] = typer.Option(None, "--pairs-per-rater", help="Regular pairs per rater (default: all)"),
    golden_fraction: float = typer.Option(0.15, "--golden-fraction", help="Golden pairs added per rater, as a fraction of the quota"),
    base_url: str = typer.Option("http://localhost:8000", "--base-url", help="Where raters will reach `eval serve`"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Create the study's pairs (once) and one invite link per rater; writes invites.csv and admin.txt."""
    from addpipe.eval.db import connect, session_factory
    from addpipe.eval.study import invite

    engine = connect(_db_url(study, db))
    with session_factory(engine)() as session:
        created = _eval_failures(lambda: invite(session, study, raters, pairs_per_rater, golden_fraction, base_url, seed))
    typer.echo(f"{len(created)} invite(s) written to {study / 'invites.csv'}; admin page: {(study / 'admin.txt').read_text().strip()}")


@eval_app.command("serve")
def eval_serve(study: Path = _STUDY, db: Optional[str] = _DB, host: str = typer.Option("127.0.0.1", "--host"),
               port: int = typer.Option(8000, "--port"),
               threads: int = typer.Option(8, "--threads", help="Worker threads; the database pool gets this many connections plus 4"),
               workers: int = typer.Option(1, "--workers", help="Server processes on the port (one per core to spare)"),
               access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="Log every request"),
               header_timeout: float = typer.Option(10.0, "--header-timeout",
                                                    help="Seconds a request may take to arrive whole (slow clients get a 408)"),
               max_connections: int = typer.Option(1000, "--max-connections",
                                                   help="Open connections per process beyond which requests get a 503")) -> None:
    """Serve the rating page and API (raters open their invite links)."""
    from addpipe.eval.server import serve

    if threads < 1 or workers < 1:
        raise UserError(f"--threads and --workers must be at least 1, got {threads} and {workers}")
    if not header_timeout > 0 or max_connections < 1:
        raise UserError(f"--header-timeout must be positive and --max-connections at least 1, got {header_timeout} and "
                        f"{max_connections}")
    serve(study, _db_url(study, db), host, port, threads, access_log, workers, header_timeout, max_connections)


@eval_app.command("judge")
def eval_judge(
    study: Path = _STUDY,
    db: Optional[str] = _DB,
    classifier: str = typer.Option(..., "--classifier", help="Content-classifier directory (eval/classifier.py) the judges see with"),
    judges: int = typer.Option(3, "--judges", help="Judge raters (invited once; a rerun finishes their queues)"),
    pairs_per_judge: Optional[int] = typer.Option(None, "--pairs-per-judge", help="Regular pairs per judge [default: all]"),
    server: Optional[str] = typer.Option(None, "--server", help="Vote on this running server (e.g. http://127.0.0.1:8000) "
                                         "instead of starting one"),
    temperature: float = typer.Option(0.05, "--temperature", help="Logistic temperature of each judge's choice"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Automated raters: judge models vote through the rating server like people, golden pairs included."""
    from addpipe.eval.judge import judge_study

    result = _eval_failures(lambda: judge_study(study, _db_url(study, db), classifier, judges, pairs_per_judge,
                                                temperature=temperature, seed=seed, base_url=server))
    typer.echo(f"{', '.join(result['judges'])}: {result['assignments']} assignment(s) answered in this run ({result['votes']} "
               f"votes by these judges on the study's {result['pairs']} pairs); next: addpipe eval elo --study {study}")


@eval_app.command("elo")
def eval_elo(
    study: Path = _STUDY, db: Optional[str] = _DB,
    min_golden_accuracy: float = typer.Option(0.7, "--min-golden-accuracy", help="Drop raters below this golden-pair accuracy"),
    min_golden: int = typer.Option(2, "--min-golden", help="...or with fewer golden votes (0 keeps everyone)"),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap rounds for the Bradley-Terry intervals"),
    k: float = typer.Option(4.0, "--k", help="Online Elo K-factor"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Win rates, online Elo and Bradley-Terry with bootstrap intervals, per question and combined; report."""
    from addpipe.eval.analysis import run_ratings
    from addpipe.eval.ratings import EloSettings

    result = run_ratings(study, _db_url(study, db), min_golden_accuracy, min_golden, bootstrap, seed, EloSettings(k=k))
    combined = result["questions"].get("combined")
    if combined:
        for arm in combined["arms"]:
            bt = combined["bradley_terry"][arm]
            typer.echo(f"{arm:>16}  BT {bt['rating']:7.1f}  [{bt.get('low', float('nan')):.1f}, {bt.get('high', float('nan')):.1f}]  Elo {combined['elo'][arm]:7.1f}")
    else:
        typer.echo("no usable votes yet")
    typer.echo(f"report: {result['report']['markdown']}")


@eval_app.command("metrics", short_help="Per arm against a reference set: FD, FD-infinity, KID, precision, recall, CLIP score, with intervals.")
def eval_metrics(
    study: Path = _STUDY,
    reference: Optional[str] = typer.Option(None, "--reference", help="Reference images: a directory or WebDataset shards"),
    features: str = typer.Option("dinov2:facebook/dinov2-large", "--features",
                                 help="inception:PATH, dinov2:ID_OR_DIR, clip:MODEL[@PRETRAINED] or classifier:DIR"),
    clip_model: Optional[str] = typer.Option(None, "--clip-model", help="open_clip MODEL@PRETRAINED for the CLIP score, e.g. ViT-L-14@openai"),
    classifier: Optional[str] = typer.Option(None, "--classifier", help="Content-classifier directory: prompt adherence per arm"),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many reference images"),
    resamples: int = typer.Option(25, "--resamples", help="Bootstrap resamples for FD's interval (each is one FD: "
                                                          "seconds apiece in 2048 dimensions on CPU)"),
    seed: int = typer.Option(0, "--seed", help="Seed of the subsets and resamples behind the intervals"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Per arm against a reference set: FD at the stated counts, FD-infinity, KID, precision and recall, CLIP score,
    adherence and latency, each with a 95% interval; metrics.json and the report."""
    from addpipe.eval.analysis import run_metrics
    from addpipe.eval.report import DISTANCES, distance_cells, with_interval

    if resamples < 2:
        raise UserError(f"--resamples must be at least 2 (an interval needs a spread), got {resamples}")
    metrics = _eval_failures(lambda: run_metrics(study, reference, features, clip_model, device, limit, classifier=classifier,
                                                 resamples=resamples, seed=seed))
    for arm, entry in metrics["arms"].items():
        counted = entry.get("samples", {})
        parts = [f"{arm:>16}", f"steps {entry['steps']}", f"latency {with_interval(entry, 'latency_median_s', '.3g')} s"]
        labels = {"frechet_distance": f"FD@{counted.get('generated')}/{counted.get('reference')}", "fd_infinity": "FD-inf",
                  "kid": "KID x1e3", "precision": "precision", "recall": "recall"}
        parts += [f"{labels[name]} {cell}" for (name, _, _), cell in zip(DISTANCES, distance_cells(entry)) if cell]
        if "clip_score" in entry:
            parts.append(f"CLIP {with_interval(entry, 'clip_score', '.2f')}")
        if "all" in entry.get("adherence", {}):
            parts.append(f"adherence {with_interval(entry, 'adherence', '.1%', value=entry['adherence']['all'])}")
        typer.echo("  ".join(parts))
    typer.echo("intervals: 95% (FD: bootstrap; FD-inf: fit; KID: subsets; precision, recall, adherence: Wilson; CLIP, latency: "
               "bootstrap)")


@eval_app.command("export")
def eval_export(study: Path = _STUDY, db: Optional[str] = _DB,
                out: Path = typer.Option(..., "--out", "-o", help="votes.csv or votes.jsonl")) -> None:
    """Export every vote with its pair, arms, rater and timing."""
    from addpipe.eval.db import connect, session_factory
    from addpipe.eval.votes import votes_frame

    with session_factory(connect(_db_url(study, db)))() as session:
        frame = votes_frame(session)
    if out.suffix == ".csv":
        frame.to_csv(out, index=False)
    elif out.suffix == ".jsonl":
        frame.to_json(out, orient="records", lines=True, force_ascii=False)
    else:
        raise UserError(f"--out must end in .csv or .jsonl, got {out}")
    typer.echo(f"{len(frame)} votes -> {out}")


def main() -> None:
    from addpipe.threads import apply_thread_defaults

    try:
        apply_thread_defaults()  # torch's threads = the allotted CPUs; must precede any import of torch
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    if sys.argv[1:2] == ["train"]:  # catch SIGUSR1/SIGTERM from here on, before seconds of imports
        from addpipe.train.preemption import STOP

        STOP.__enter__()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if not any(os.path.exists(f"/dev/{name}") for name in ("nvidiactl", "nvidia0", "kfd")):
        # no GPU device: DeepSpeed (imported by libraries that only check for it) would warn on every command
        # that it falls back to the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    invoke()


def invoke(args: Optional[List[str]] = None) -> None:
    """The commands on `args` (default: the command line) with their error mapping: an error caused by input prints
    `error: ...` without a traceback and exits 2. Ends in SystemExit, as click's commands do."""
    try:
        app(args)
    except BaseUserError as error:  # every stage's input errors subclass it (addpipe/errors.py)
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    except Exception as error:  # a defect, not the input: one line, and the traceback kept in a file
        if DEBUG["on"]:
            raise
        import tempfile
        import traceback

        text = "".join(traceback.format_exception(error))
        with tempfile.NamedTemporaryFile("w", prefix="addpipe-traceback-", suffix=".txt", delete=False) as file:
            file.write(text)
        frame = traceback.extract_tb(error.__traceback__)[-1]
        typer.echo(f"error: unexpected {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                   f" (at {Path(frame.filename).name}:{frame.lineno}; the traceback is in {file.name}, or rerun with "
                   "addpipe --debug to print it). Please report it with that file.", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
