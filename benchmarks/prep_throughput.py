"""Benchmark: `addpipe prep` end to end against img2dataset alone on the same loopback data.

Serves N real images (scikit-learn's sample photos, cropped and resized so every URL is a distinct
image) from a 127.0.0.1 server and measures, in one run and alternating the order over --repeats:
  - img2dataset alone (same download settings)            -> images/s
  - addpipe prep end to end (download, embed, score, filter, dedup, shards, report) -> images/s and the ratio
  - the embed stage against a bare open_clip loop over the same decoded images       -> images/s and the ratio
The CLIP model is random-init (no weights can be downloaded here) but has the real architecture, so its
speed is representative. Prints the machine it ran on; results are recorded in benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/prep_throughput.py --images 400 --model ViT-B-32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def distinct_images(count: int):
    from image_server import sample_photos

    photos = sample_photos()
    for i in range(count):
        photo = photos[i % len(photos)]
        left, top = (i * 7) % 200, (i * 3) % 120
        crop = photo.crop((left, top, left + 400, top + 300))
        yield crop.resize((320 + (i % 5) * 16, 240 + (i % 3) * 16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random-init)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()

    import pandas as pd
    import torch
    from img2dataset import download as img2dataset_download

    from addpipe.clip import load_clip
    from addpipe.dataprep.config import PrepConfig
    from addpipe.shards import read_images
    from addpipe.dataprep.prep import run_download, run_embed, run_merge
    from addpipe.dataprep.tiny import build_tiny_aesthetic
    from image_server import ImageServer, Route, jpeg

    work = Path(tempfile.mkdtemp(prefix="prep_bench_"))
    routes = {f"/{i}.jpg": Route(jpeg(image)) for i, image in enumerate(distinct_images(args.images))}
    timings: dict[str, list[float]] = {"img2dataset": [], "prep": [], "prep_download": [], "prep_embed": [], "prep_merge": [], "bare_clip": []}
    with ImageServer(routes) as server:
        table = pd.DataFrame({"url": [server.url(p) for p in routes], "caption": [f"a photo crop number {i}" for i in range(len(routes))]})
        table.to_parquet(work / "urls.parquet")
        clip_probe = load_clip(PrepConfig().embed.__class__(model=args.model, pretrained=""))
        dim = int(clip_probe.images([next(distinct_images(1))]).shape[1])
        aesthetic = build_tiny_aesthetic(work / "aesthetic.pth", dim)
        for repeat in range(args.repeats):
            order = ["img2dataset", "prep"] if repeat % 2 == 0 else ["prep", "img2dataset"]
            for arm in order:
                out = work / f"{arm}_{repeat}"
                started = time.perf_counter()
                if arm == "img2dataset":
                    img2dataset_download(url_list=str(work / "urls.parquet"), input_format="parquet", url_col="url", caption_col="caption",
                                         output_folder=str(out), output_format="webdataset", image_size=512, resize_mode="keep_ratio",
                                         resize_only_if_bigger=True, processes_count=args.processes, thread_count=args.threads,
                                         number_sample_per_shard=100, timeout=10, compute_hash="sha256", enable_wandb=False)
                    timings["img2dataset"].append(time.perf_counter() - started)
                    continue
                config = PrepConfig(out=str(out))
                config.input.urls = str(work / "urls.parquet")
                config.download.allowed_networks = ["127.0.0.1/32"]  # the loopback image server
                config.download.processes, config.download.threads, config.download.samples_per_shard = args.processes, args.threads, 100
                config.embed.model, config.embed.pretrained, config.embed.batch_size = args.model, "", 32
                config.filter.aesthetic_weights, config.filter.min_aesthetic = str(aesthetic), None
                config.filter.min_clip_similarity, config.filter.min_resolution = None, 64
                t0 = time.perf_counter(); run_download(config)
                t1 = time.perf_counter(); run_embed(config)
                t2 = time.perf_counter(); run_merge(config)
                t3 = time.perf_counter()
                timings["prep_download"].append(t1 - t0)
                timings["prep_embed"].append(t2 - t1)
                timings["prep_merge"].append(t3 - t2)
                timings["prep"].append(t3 - t0)
                # bare open_clip over the same decoded images, same batch size: the embed stage's reference
                from PIL import Image
                import io as _io

                images = []
                for tar in sorted((out / "download").glob("*.tar")):
                    images += [Image.open(_io.BytesIO(data)).convert("RGB") for _, data in read_images(tar).values()]
                started = time.perf_counter()
                for start in range(0, len(images), 32):
                    clip_probe.images(images[start : start + 32])
                    clip_probe.texts(["a photo crop"] * len(images[start : start + 32]))
                timings["bare_clip"].append(time.perf_counter() - started)
    n = args.images
    median = {k: statistics.median(v) for k, v in timings.items() if v}
    result = {
        "images": n, "model": args.model, "repeats": args.repeats, "processes": args.processes, "threads": args.threads,
        "img2dataset_images_per_s": n / median["img2dataset"],
        "prep_images_per_s": n / median["prep"],
        "prep_over_img2dataset_time": median["prep"] / median["img2dataset"],
        "download_stage_over_img2dataset_time": median["prep_download"] / median["img2dataset"],
        "embed_images_per_s": n / median["prep_embed"],
        "bare_clip_images_per_s": n / median["bare_clip"],
        "embed_stage_over_bare_clip_time": median["prep_embed"] / median["bare_clip"],
        "merge_seconds": median["prep_merge"],
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
                   f"{'cuda ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}",
        "raw_seconds": timings,
    }
    print(json.dumps(result, indent=2))
    print(f"""
{n} loopback images, {args.processes} download processes x {args.threads} threads, open_clip {args.model} (random-init), medians of {args.repeats}
img2dataset alone           {result['img2dataset_images_per_s']:8.1f} images/s
addpipe prep end to end     {result['prep_images_per_s']:8.1f} images/s   time ratio prep / img2dataset: {result['prep_over_img2dataset_time']:.2f}
  its download stage        time ratio / img2dataset alone: {result['download_stage_over_img2dataset_time']:.2f}
  its embed + score stage   {result['embed_images_per_s']:8.1f} images/s   bare open_clip loop {result['bare_clip_images_per_s']:.1f} images/s, ratio {result['embed_stage_over_bare_clip_time']:.2f}
  its merge stage           {result['merge_seconds']:.1f} s (filters, dedup, output shards, report, plots)
machine: {result['machine']}""")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
