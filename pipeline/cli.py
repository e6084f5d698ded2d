"""The `addpipe` command line: each command parses its config and calls one library function."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Adversarial Diffusion Distillation: prep -> train -> sample -> eval.")


class UserError(Exception):
    """Errors caused by input, printed without a traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from addpipe.dataprep.prep import PrepError
    from addpipe.dataprep.table import InputError
    from addpipe.pipeline.config import ConfigError
    from addpipe.train.data import ShardError
    from addpipe.train.models import ModelLoadError

    return (ConfigError, ShardError, ModelLoadError, UserError, PrepError, InputError)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def train(
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. optim.student_lr=1e-5 data.shards='/d/{000..099}.tar'"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (configs/*.yaml)"),
    zero: Optional[int] = typer.Option(None, "--zero", help="DeepSpeed ZeRO stage of the student (0-3)"),
    offload: Optional[str] = typer.Option(None, "--offload", help="Offload optimizer state: none, cpu or nvme"),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Shortcut for run_dir=..."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest complete checkpoint in run_dir"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config with its documentation and exit"),
) -> None:
    """Train an ADD student (one process, or several under torchrun / the deepspeed launcher)."""
    from addpipe.pipeline.config import load, to_yaml
    from addpipe.train.config import TrainConfig

    extra = list(overrides or [])
    if zero is not None:
        extra.append(f"engine.zero={zero}")
    if offload is not None:
        extra.append(f"engine.offload_optimizer={offload}")
    if run_dir is not None:
        extra.append(f"run_dir={run_dir}")
    cfg = load(TrainConfig, config, extra)
    if dry_run:
        typer.echo(to_yaml(cfg, with_docs=True))
        return
    from addpipe.train.loop import train as run_training

    student = run_training(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"student exported to {student}")


@app.command()
def sample(
    student: Path = typer.Option(..., "--student", help="Exported student directory (run_dir/student)"),
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="Prompt; repeat for several images"),
    steps: int = typer.Option(1, "--steps", help="Sampling steps (1-4 for the default student)"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("sample.png"), "--out", "-o", help="PNG file (a grid when several prompts)"),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Default: the student's native size"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
) -> None:
    """Sample from an exported student: deterministic for a seed, no guidance."""
    import torch

    from addpipe.train.sampling import generate, load_student, sample_timesteps, save_grid, vae_downsample_factor

    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    components, schedule, info = load_student(str(student), target)
    try:
        timesteps = sample_timesteps(info, steps)
    except ValueError as error:
        raise UserError(str(error)) from error
    size = resolution or components.unet.config.sample_size * vae_downsample_factor(components)
    images = generate(components.unet, components, schedule, list(prompt), timesteps, seed, size, target)
    save_grid(images.cpu(), out, rows=1)
    typer.echo(f"wrote {out} ({len(prompt)} image(s), {steps} step(s), timesteps {timesteps})")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Working directory of the demo"),
    steps: int = typer.Option(300, "--steps", help="ADD training steps"),
    images: int = typer.Option(400, "--images", help="Digit images to build shards from"),
    teacher_steps: int = typer.Option(600, "--teacher-steps", help="Steps of the small teacher's own diffusion training"),
) -> None:
    """The main job offline on CPU: digit shards -> small teacher -> ADD student -> 1/2/4-step grid."""
    from addpipe.pipeline.demo import run_demo

    grid = run_demo(out, steps=steps, images=images, teacher_steps=teacher_steps)
    typer.echo(f"demo finished: {grid}")


prep_app = typer.Typer(no_args_is_help=False, add_completion=False, pretty_exceptions_enable=False,
                       help="Curate a URL table into filtered WebDataset shards (all stages, or one with a subcommand).")
app.add_typer(prep_app, name="prep")

_OUT = typer.Option(None, "--out", "-o", help="Output directory (its prep_config.yaml is reused on reruns)")
_CONFIG = typer.Option(None, "--config", "-c", help="Prep config YAML (default: <out>/prep_config.yaml, else built-in defaults)")
_SET = typer.Option(None, "--set", "-s", help="Dotted override, repeatable: --set filter.min_aesthetic=4.5")


def _prep_config(out: Optional[Path], urls: Optional[str], config: Optional[Path], overrides: Optional[List[str]]):
    from addpipe.dataprep.config import PrepConfig
    from addpipe.pipeline.config import load

    if config is None and out is not None and (out / "prep_config.yaml").is_file():
        config = out / "prep_config.yaml"
    cfg = load(PrepConfig, config, list(overrides or []))
    if out is not None:
        cfg.out = str(out)
    if urls is not None:
        cfg.input.urls = urls
    return cfg


def _prep_failures(run):
    """Runs a prep stage, turning failures caused by input or settings into clear errors."""
    from addpipe.dataprep.prep import PrepError

    try:
        return run()
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        if isinstance(error, (PrepError,) + _user_errors()):
            raise
        raise PrepError(str(error)) from error


@prep_app.callback(invoke_without_command=True)
def prep(
    ctx: typer.Context,
    urls: Optional[str] = typer.Option(None, "--urls", help="URL table: parquet, csv, tsv or jsonl (optionally .gz), or a directory"),
    out: Optional[Path] = _OUT,
    config: Optional[Path] = _CONFIG,
    overrides: Optional[List[str]] = _SET,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config with its documentation and exit"),
) -> None:
    """All stages: download -> embed + score -> filter + dedup -> shards and report. Rerun to resume."""
    if ctx.invoked_subcommand is not None:
        return
    from addpipe.dataprep.prep import run_prep
    from addpipe.pipeline.config import to_yaml

    cfg = _prep_config(out, urls, config, overrides)
    if dry_run:
        typer.echo(to_yaml(cfg, with_docs=True))
        return
    report = _prep_failures(lambda: run_prep(cfg))
    typer.echo(f"kept {report['kept']} of {report['input_rows']} rows -> {report['shard_pattern']} "
               f"(report: {Path(cfg.out) / 'report.md'})")


@prep_app.command("download")
def prep_download(urls: Optional[str] = typer.Option(None, "--urls", help="URL table"), out: Optional[Path] = _OUT,
                  config: Optional[Path] = _CONFIG, overrides: Optional[List[str]] = _SET) -> None:
    """Stage 1: normalise the URL table and download it with img2dataset (download.distributor=pyspark to scale out)."""
    from addpipe.dataprep.prep import run_download

    shards = _prep_failures(lambda: run_download(_prep_config(out, urls, config, overrides)))
    typer.echo(f"downloaded {len(shards)} shard(s)")


@prep_app.command("embed")
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


@prep_app.command("encode")
def prep_encode(
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides of the training config, e.g. data.resolution=1024"),
    shards: str = typer.Option(..., "--shards", help="Shards to encode in place: brace pattern or directory"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="The training config (teacher, VAE, data.resolution)"),
    batch_size: int = typer.Option(32, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    storage: str = typer.Option("float16", "--storage", help="float16 or float32"),
) -> None:
    """Optional: precompute the teacher's VAE latents and text embeddings into the shards; training then skips those encoders."""
    from addpipe.dataprep.encode import encode_shards
    from addpipe.pipeline.config import load
    from addpipe.train.config import TrainConfig

    if storage not in ("float16", "float32"):
        raise UserError(f"--storage must be float16 or float32, got {storage}")
    cfg = load(TrainConfig, config, list(overrides or []))
    counts = encode_shards(cfg, shards, batch_size=batch_size, device=device, storage=storage)
    typer.echo(f"encoded {counts['encoded_shards']} of {counts['shards']} shard(s) ({counts['samples']} samples, "
               f"{counts['skipped']} unreadable left as they were) at resolution {cfg.data.resolution}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        app()
    except _user_errors() as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
