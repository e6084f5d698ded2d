"""`addpipe demo`: the whole job offline on CPU, every stage through the code used at scale.

1. web: scikit-learn's handwritten digits, upscaled, coloured and captioned ("a handwritten seven in red on a
   blue background"), served as PNGs from a loopback HTTP server, plus some bad rows (dead links,
   truncated files, byte-identical copies) so curation has something to catch;
2. prep: `addpipe prep` on that URL table: img2dataset download, open_clip embeddings and aesthetic scores
   (tiny random-init models: no weights can be downloaded), filters, dedup, WebDataset shards;
3. models: the teacher (shipped in pipeline/assets, trained by `addpipe demo --train-teacher`, or trained
   here), a DINOv2-architecture ViT trained on the curated shards for the discriminator, and a separate
   content classifier (a CNN) for the metrics and the judge;
4. train: ADD distillation with the real trainer (DeepSpeed engine) from configs/tiny.yaml;
5. eval: paired generation (teacher at 50 and 4 guided steps, student at 1, 2 and 4 steps), Fréchet
   distance in the classifier's feature space and prompt adherence, and a pairwise study whose votes
   come from judge-model raters through the rating server and database, then Elo / Bradley–Terry;
6. report: demo_out/report.html with the image grid, the numbers and the plots.

Every stage skips work whose output already exists, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent
CONFIG = ROOT.parent / "configs" / "tiny.yaml"
CONFIG_D2G = ROOT.parent / "configs" / "tiny_d2g.yaml"
METHOD_CONFIGS = {"add": CONFIG, "diffusion2gan": CONFIG_D2G}
"""The demo's config of each method it trains (a method's sections exist only in its own config)."""
SHIPPED_TEACHER = ROOT / "assets" / "digits_teacher"
FIELDS = ["digit", "ink", "background"]
# The curation's tiny CLIP (tiny_clip) and the near-duplicate threshold its embeddings call for (measured on the
# planted re-encodings; the report gives the filter's precision and recall).
CLIP_DIM, DEDUP_THRESHOLD = 64, 0.9996
PROMPT_PATTERN = r"handwritten (?P<digit>\w+) in (?P<ink>\w+) on an? (?P<background>\w+) background"
GRID_PROMPTS = ["a handwritten seven in red on a blue background", "a handwritten two in white on a black background",
                "a handwritten four in yellow on a purple background", "a handwritten zero in green on a white background",
                "a handwritten three in orange on a black background", "a handwritten nine in blue on a yellow background"]


@dataclass
class DemoSettings:
    out: str = "demo_out"
    images: int = 1500               # rows of the URL table (digits; a few are made bad on purpose)
    resolution: int = 32
    teacher: str = "shipped"         # "shipped", "train", or a diffusers pipeline directory
    teacher_images: int = 4000       # when training the teacher
    teacher_vae_steps: int = 2500
    teacher_unet_steps: int = 10000
    clip_steps: int = 300            # the curation's tiny CLIP (batches of 128 served images and captions)
    backbone_steps: int = 1200       # DINOv2-architecture feature network
    classifier_steps: int = 800
    steps: int = 600                 # ADD steps
    prompts: int = 200               # prompts per arm (fewer: FID is mostly its small-sample term)
    judges: int = 3
    seed: int = 0
    device: str = "auto"             # evaluation and grid; the trainer takes the GPU when there is one

    def __post_init__(self) -> None:
        if self.images < 20 or self.prompts < 2 or self.judges < 1 or self.steps < 1 or self.clip_steps < 1:
            raise ValueError("demo needs images >= 20, prompts >= 2, judges >= 1, steps >= 1 and clip steps >= 1")
        if self.device != "auto":  # checked here, not after prep and training have run
            try:
                torch.device(self.device)
            except RuntimeError as error:
                raise ValueError(f"--device {self.device!r} is not a torch device (auto, cpu, cuda, cuda:1 ...): {error}") from None


def labels(meta: dict[str, Any]) -> dict[str, str]:
    """The label fields (FIELDS) of a digit from dataprep.digits' metadata, as words the prompts use."""
    from addpipe.dataprep.digits import NUMBER_WORDS

    return {"digit": NUMBER_WORDS[meta["label"]], "ink": meta["foreground"], "background": meta["background"]}


def done(path: Path) -> bool:
    return (path / "DONE").is_file()


def mark_done(path: Path, info: Any = "ok") -> None:
    (path / "DONE").write_text(json.dumps(info, default=str))


# --- 1. the web -------------------------------------------------------------------------------------------

def web_rows(count: int, resolution: int, seed: int) -> tuple[pd.DataFrame, dict[str, bytes], dict[str, dict[int, int]]]:
    """The URL table (url path, caption, label columns), the bodies to serve, and the planted duplicates
    {"exact_copy" | "reencoding": {row: row it copies}} among the served rows. Every 40th row is a dead link,
    every 50th truncated, every 60th a byte-identical copy of the previous image, every 70th a JPEG re-encoding of
    the image seven rows back (a re-post: same caption, other bytes), which only the near-duplicate filter can find."""
    from addpipe.dataprep.digits import digit_images

    rows, bodies, served = [], {}, []
    planted: dict[str, dict[int, int]] = {"exact_copy": {}, "reencoding": {}}
    for index, (caption, image, meta) in enumerate(digit_images(count, size=2 * resolution, seed=seed)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        body, path, kind = buffer.getvalue(), f"/digits/{index:06d}.png", None
        if index % 60 == 59:
            kind, source = "exact_copy", index - 1
            caption, image, meta, body = served[source]
        elif index % 70 == 69:
            kind, source = "reencoding", index - 7
            caption, image, meta, _ = served[source]
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            body, path = buffer.getvalue(), f"/digits/{index:06d}.jpg"
        elif index % 50 == 49:
            body = body[: len(body) // 3]
        if index % 40 != 39:
            bodies[path] = body
            if kind is not None:
                planted[kind][index] = source
        served.append((caption, image, meta, body))
        rows.append({"url": path, "caption": caption, **labels(meta)})
    return pd.DataFrame(rows), bodies, planted


def tiny_clip(directory: Path, table: pd.DataFrame, bodies: dict[str, bytes], settings: DemoSettings) -> dict[str, str]:
    """The curation's CLIP: open_clip's tiny architecture trained once on the served images and their captions
    (dead links and truncated bodies left out); -> the embed.* settings that load it."""
    from PIL import Image

    from addpipe.dataprep.tiny import build_tiny_clip, train_clip

    if done(directory):
        return json.loads((directory / "DONE").read_text())["settings"]
    clip = build_tiny_clip(directory, embed_dim=CLIP_DIM, image_size=settings.resolution, seed=settings.seed)
    images, captions = [], []
    for path, caption in zip(table["url"], table["caption"]):
        try:
            with Image.open(io.BytesIO(bodies[path])) as image:
                images.append(image.convert("RGB"))
        except (KeyError, OSError):  # a dead link or a truncated body
            continue
        captions.append(caption)
    logger.info("demo: training the tiny CLIP on %d served images and captions (a few CPU minutes)", len(images))
    training = train_clip(clip, images, captions, steps=settings.clip_steps, seed=settings.seed)
    mark_done(directory, {"settings": clip, **training})
    return clip


def curate(settings: DemoSettings, out: Path) -> dict[str, Any]:
    """Stages 1-2: serve the digits on 127.0.0.1 and run `addpipe prep` on them."""
    from addpipe.dataprep.config import PrepConfig
    from addpipe.dataprep.loopback import ImageServer, Route
    from addpipe.dataprep.prep import run_prep
    from addpipe.dataprep.tiny import build_tiny_aesthetic
    from addpipe.config import load, to_yaml

    prep_dir = out / "prep"
    if (prep_dir / "report.json").is_file() and done(prep_dir):
        return json.loads((prep_dir / "report.json").read_text())
    prep_dir.mkdir(parents=True, exist_ok=True)
    table, bodies, planted = web_rows(settings.images, settings.resolution, settings.seed)
    (out / "planted.json").write_text(json.dumps(planted))
    clip = tiny_clip(out / "models" / "clip", table, bodies, settings)
    # The port is kept across reruns: a resumed download must find the URLs its table already holds.
    web_file = out / "web.json"
    port = json.loads(web_file.read_text())["port"] if web_file.is_file() else 0
    routes = {path: Route(body, "image/jpeg" if path.endswith(".jpg") else "image/png") for path, body in bodies.items()}
    with ImageServer(routes, port=port) as server:
        web_file.write_text(json.dumps({"port": server.port}))
        table["url"] = server.base + table["url"]
        urls = out / "urls.parquet"
        if not urls.is_file():
            table.to_parquet(urls)
        aesthetic = out / "models" / "aesthetic.pt"
        if not aesthetic.is_file():
            build_tiny_aesthetic(aesthetic, CLIP_DIM)
        config = load(PrepConfig, None, [
            f"out={prep_dir}", f"input.urls={urls}", f"download.image_size={settings.resolution}",
            "download.processes=1", "download.threads=16", "download.timeout=5", "download.samples_per_shard=500",
            "download.allowed_networks=[127.0.0.1/32]",  # the loopback web above; every other non-public address stays refused
            "download.encode_format=png", "download.encode_quality=6",
            f"embed.model={clip['model']}", f"embed.model_config={clip['model_config']}", f"embed.pretrained={clip['pretrained']}",
            "embed.batch_size=128", "embed.device=cpu",
            f"filter.min_resolution={settings.resolution}", "filter.min_clip_similarity=null",
            # the trained tiny CLIP ranks captions (cut its worst 5%); the random-init aesthetic model scores nothing
            # real (reported, not cut). Its image embeddings carry little beyond what captions name, so images with
            # one caption sit close: the near-duplicate threshold is high (precision and recall in the report)
            "filter.clip_keep_fraction=0.95", f"filter.aesthetic_weights={aesthetic}", "filter.min_aesthetic=null",
            "dedup.enabled=true", f"dedup.threshold={DEDUP_THRESHOLD}",
        ])
        (prep_dir / "prep_config.yaml").write_text(to_yaml(config))
        report = run_prep(config)
    mark_done(prep_dir)
    return report


# --- 3. models --------------------------------------------------------------------------------------------

def teacher_directory(settings: DemoSettings, out: Path) -> Path:
    """The teacher pipeline, always at out/models/teacher (where configs/tiny.yaml looks for it after a demo): a copy
    of the shipped one (15 MB), or trained here; a pipeline directory given by the user is used where it is."""
    if settings.teacher not in ("shipped", "train"):
        return Path(settings.teacher)
    teacher = out / "models" / "teacher"
    if settings.teacher == "shipped" and not done(teacher):
        if not (SHIPPED_TEACHER / "model_index.json").is_file():
            raise FileNotFoundError(f"the shipped teacher is missing from {SHIPPED_TEACHER}; run `addpipe demo --teacher train`")
        shutil.rmtree(teacher, ignore_errors=True)  # a copy cut short
        shutil.copytree(SHIPPED_TEACHER, teacher)
        mark_done(teacher)
    elif not done(teacher):
        train_teacher(teacher, settings, teacher_shards(out / "teacher_data", settings))
    return teacher


def teacher_shards(directory: Path, settings: DemoSettings) -> str:
    """The teacher's own pretraining data: digits rendered straight into shards (as SD's LAION is not the ADD
    data either), `teacher_images` of them with the demo's captions."""
    from addpipe.dataprep.digits import write_digit_shards
    from addpipe.shards import shard_pattern

    if not done(directory):
        write_digit_shards(directory, settings.teacher_images, settings.resolution, samples_per_shard=500,
                           seed=settings.seed, metadata=labels)
        mark_done(directory, {"images": settings.teacher_images})
    return shard_pattern(sorted(directory.glob("*.tar")))


def train_teacher(directory: Path, settings: DemoSettings, shards: str) -> Path:
    """The teacher's own diffusion training: VAE, then UNet (how pipeline/assets/digits_teacher was made)."""
    from addpipe.train.teacher import pretrain_teacher
    from addpipe.train.tiny import build_tiny_pipeline

    shutil.rmtree(directory, ignore_errors=True)
    # v-prediction on a zero-terminal-SNR schedule: with SD's schedule the last step keeps sqrt(0.0047) of the
    # image, which the model learns to read; sampling from pure noise it then takes the digit's shape from
    # the noise's low frequencies instead of the prompt (measured: the requested digit 16-22% of the time).
    # It is also the parametrisation the student trains in, so the student starts where the teacher is.
    build_tiny_pipeline(directory, "sd", latent_size=settings.resolution // 2, seed=settings.seed,
                        prediction_type="v_prediction", zero_terminal_snr=True)
    pretrain_teacher(directory, shards, settings.resolution, vae_steps=settings.teacher_vae_steps,
                     unet_steps=settings.teacher_unet_steps, seed=settings.seed)
    info = {"images": settings.teacher_images, "resolution": settings.resolution, "vae_steps": settings.teacher_vae_steps,
            "unet_steps": settings.teacher_unet_steps, "seed": settings.seed, "trained_by": "addpipe demo --teacher train"}
    (directory / "addpipe_teacher.json").write_text(json.dumps(info, indent=2))
    mark_done(directory, info)
    return directory


def feature_models(settings: DemoSettings, out: Path, shards: str) -> tuple[Path, Path]:
    """The discriminator's DINOv2-architecture ViT and the evaluation's content classifier, both trained on `shards`."""
    from addpipe.eval.classifier import train_classifier
    from addpipe.backbone import train_dinov2

    dino, classifier = out / "models" / "dinov2", out / "models" / "classifier"
    if not done(dino):
        train_dinov2(shards, dino, FIELDS, image_size=settings.resolution, steps=settings.backbone_steps, seed=settings.seed)
        mark_done(dino)
    if not done(classifier):
        train_classifier(shards, classifier, FIELDS, PROMPT_PATTERN, image_size=settings.resolution,
                         steps=settings.classifier_steps, seed=settings.seed + 7)
        mark_done(classifier)
    return dino, classifier


# --- 4. ADD -----------------------------------------------------------------------------------------------

def train_student(run_dir: Path, teacher: Path, dino: Path, shards: str, settings: DemoSettings, seed: int,
                  overrides: Optional[list[str]] = None) -> Path:
    """ADD-distil `teacher` with configs/tiny.yaml; -> the exported student directory (skipped when it exists)."""
    from addpipe.config import load
    from addpipe.train.checkpoint import latest
    from addpipe.train.config import TrainConfig
    from addpipe.train.loop import train

    student = run_dir / "student"
    if (student / "addpipe_student.json").is_file():
        return student
    every = max(1, settings.steps // 3)
    method = next((o.split("=", 1)[1] for o in overrides or [] if o.startswith("method=")), "add")
    own = {"add": [f"discriminator.feature_network={dino}", f"discriminator.input_size={settings.resolution}"]}
    config = load(TrainConfig, METHOD_CONFIGS[method], [
        f"run_dir={run_dir}", f"steps={settings.steps}", f"seed={seed}", f"model.teacher={teacher}", *own.get(method, []),
        f"data.shards={shards}", f"data.resolution={settings.resolution}", f"checkpoint.every={every}",
        f"log.sample_every={every}", f"log.sample_prompts={json.dumps(GRID_PROMPTS[:4])}", *(overrides or []),
    ])
    train(config, resume=latest(run_dir) is not None)  # continue an interrupted demo; a fresh one starts quietly
    return student


# --- 5. evaluation ----------------------------------------------------------------------------------------

def held_out_digits(count: int, size: int, seed: int):
    """The evaluation's digits, drawn with another colour seed than the training data: their captions are the
    held-out prompts, their images what real data scores on those prompts."""
    from addpipe.dataprep.digits import digit_images

    return digit_images(count, size=size, seed=seed + 1000)


def write_prompts(path: Path, count: int, seed: int) -> Path:
    """Held-out prompts: the captions of held_out_digits, category = the digit."""
    lines = ["Prompt\tCategory"]
    for caption, _, meta in held_out_digits(count, 8, seed):
        lines.append(f"{caption}\t{labels(meta)['digit']}")
    path.write_text("\n".join(lines) + "\n")
    return path


def real_reference(settings: DemoSettings, shards: str, classifier: Path, seed: int) -> dict[str, Any]:
    """The same metrics for the real digits whose captions are the held-out prompts (write_prompts): what real
    images score at this prompt count, the level below which a generator's FID is not resolvable by this metric."""
    from addpipe.eval.analysis import distance_metrics, share_interval
    from addpipe.eval.classifier import adherence, load_classifier
    from addpipe.eval.metrics import features_of, iter_images, load_feature_network
    from addpipe.devices import resolve_device

    device = str(resolve_device(settings.device))
    pairs = [(caption, image) for caption, image, _ in held_out_digits(settings.prompts, settings.resolution, seed)]
    network = load_feature_network(f"classifier:{classifier}", device)
    reference = features_of(iter_images(shards), network, desc="reference features")
    images = [image for _, image in pairs]
    shares = adherence(load_classifier(classifier, device), images, [caption for caption, _ in pairs])
    found = distance_metrics(reference, features_of(images, network, desc="real features"), seed, network=network.name)
    found["intervals"]["adherence"] = share_interval(shares["all"], shares["counted"])
    return {**found, "adherence": shares["all"]}


def evaluate(study: Path, arms: list[str], settings: DemoSettings, shards: str, classifier: Path, judges: int,
             seed: int) -> dict[str, Any]:
    """Generate the arms, compute metrics, let judges vote, analyse; -> {"metrics", "ratings", "judging"}."""
    from addpipe.eval.analysis import run_metrics, run_ratings
    from addpipe.eval.db import default_url
    from addpipe.eval.generate import Arm, generate_study, load_prompts
    from addpipe.eval.judge import judge_study

    study.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(str(write_prompts(study / "prompts.tsv", settings.prompts, seed)))
    # fp32 on every device: the table compares arms, and fp16 sampling would add its own error to the students'
    generate_study(study, [Arm.parse(a) for a in arms], prompts, seed=seed * 100_000, device=settings.device, dtype="fp32")
    features = f"classifier:{classifier}"
    metrics = run_metrics(study, shards, features, device=settings.device, classifier=str(classifier), seed=seed)
    result: dict[str, Any] = {"metrics": metrics}
    if judges:
        db_url = default_url(study)
        result["judging"] = judge_study(study, db_url, str(classifier), judges=judges, seed=seed)
        result["ratings"] = run_ratings(study, db_url, rounds=200, seed=seed)
    return result


def demo_arms(teacher: Path, student: Path) -> list[str]:
    return [f"teacher-50={teacher}:steps=50:cfg=3:scheduler=ddim",
            f"teacher-4={teacher}:steps=4:cfg=3:scheduler=ddim",
            f"add-1={student}:steps=1", f"add-2={student}:steps=2", f"add-4={student}:steps=4"]


@torch.no_grad()
def image_grid(out: Path, teacher: Path, student: Path, resolution: int, seed: int, device: str = "cpu") -> Path:
    """Teacher at 50 guided steps on top, then the student at 1, 2 and 4 steps; same prompts and noise."""
    from addpipe.eval.generate import Arm, load_arm_pipeline
    from addpipe.devices import resolve_device
    from addpipe.eval.report import labelled_grid
    from addpipe.train.sampling import generate, load_student, student_timesteps

    target = resolve_device(device)
    pipe = load_arm_pipeline(Arm("teacher-50", str(teacher), 50, 3.0, "ddim"), target, torch.float32)
    latents = torch.randn((len(GRID_PROMPTS), pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor,
                           resolution // pipe.vae_scale_factor), generator=torch.Generator().manual_seed(seed))
    rows = [pipe(GRID_PROMPTS, num_inference_steps=50, guidance_scale=3.0, height=resolution, width=resolution,
                 latents=latents.to(target), output_type="pt").images.float().cpu()]
    components, schedule, _ = load_student(str(student), target)
    for count in (1, 2, 4):
        rows.append(generate(components.unet, components, schedule, GRID_PROMPTS, student_timesteps(count), seed=seed,
                             resolution=resolution, device=target).cpu())
    short = ["{digit}: {ink} on {background}".format(**re.search(PROMPT_PATTERN, prompt).groupdict()) for prompt in GRID_PROMPTS]
    return labelled_grid(torch.cat(rows), ["teacher, 50 steps, guidance 3"] + [f"ADD student, {n} step{'s' * (n > 1)}"
                                                                               for n in (1, 2, 4)],
                         short, out / "demo_grid.png")


def run_demo(settings: DemoSettings) -> Path:
    """The whole chain; -> demo_out/report.html."""
    from addpipe.pipeline.curation_check import curation_check, load_planted
    from addpipe.pipeline.demo_report import write_demo_report

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("demo: %d digits served on 127.0.0.1 -> prep -> teacher -> feature networks -> ADD (%d steps) -> "
                "evaluation -> report in %s", settings.images, settings.steps, out)
    started = time.perf_counter()
    # A rerun reuses finished stages: their timings stay those of the run that did the work (timings.json).
    timings_path = out / "timings.json"
    timings: dict[str, dict[str, Any]] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    finished = {"prep": lambda: done(out / "prep"), "teacher": lambda: done(out / "models" / "teacher"),
                "feature networks": lambda: done(out / "models" / "dinov2") and done(out / "models" / "classifier"),
                "ADD training": lambda: (out / "run" / "student" / "addpipe_student.json").is_file(),
                "evaluation": lambda: (out / "study" / "metrics.json").is_file(),
                "grid": lambda: (out / "demo_grid.png").is_file()}

    def timed(name: str, run):
        reused = finished[name]()
        if not reused:  # a line when a stage starts, so a long one (evaluation: minutes) is not silence in a log
            logger.info("demo stage %s: started", name)
        begin = time.perf_counter()
        value = run()
        if reused:  # seconds None: done by a run that kept no timings
            timings[name] = {"seconds": timings.get(name, {}).get("seconds"), "reused": True}
        else:
            timings[name] = {"seconds": round(time.perf_counter() - begin, 1), "reused": False}
        timings_path.write_text(json.dumps(timings, indent=2))
        logger.info("demo stage %s: %.1f s%s", name, time.perf_counter() - begin, " (reused)" if reused else "")
        return value

    prep = timed("prep", lambda: curate(settings, out))
    shards = prep["shard_pattern"]
    teacher = timed("teacher", lambda: teacher_directory(settings, out))
    dino, classifier = timed("feature networks", lambda: feature_models(settings, out, shards))
    student = timed("ADD training", lambda: train_student(out / "run", teacher, dino, shards, settings, settings.seed))
    evaluation = timed("evaluation", lambda: evaluate(out / "study", demo_arms(teacher, student), settings, shards, classifier,
                                                      settings.judges, settings.seed))
    grid = timed("grid", lambda: image_grid(out, teacher, student, settings.resolution, settings.seed, settings.device))
    summary = {"settings": asdict(settings), "teacher": str(teacher), "student": str(student), "prep": prep,
               "curation_check": curation_check(out / "prep", load_planted(out / "planted.json")),
               "real": real_reference(settings, shards, classifier, settings.seed),
               "models": {"dinov2": str(dino), "classifier": str(classifier)}, "grid": str(grid),
               "seconds": {name: entry["seconds"] for name, entry in timings.items()},
               "reused": [name for name, entry in timings.items() if entry["reused"]],
               "this_run_seconds": round(time.perf_counter() - started, 1), **evaluation}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return write_demo_report(out, summary)
