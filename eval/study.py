"""A study directory and what `addpipe eval invite` puts into its database.

    studies/turbo/
      study.json           arms and their sampler settings (written by `eval generate`)
      generations.jsonl    one line per image: arm, prompt_id, prompt, category, seed, steps, guidance, latency
      images/<arm>/NNNNN.png
      golden/              degraded and mismatched images for the golden pairs
      votes.db             SQLite (default); or --db postgresql+psycopg://...
      invites.csv          one link per rater; admin.txt holds the admin link

Pairs compare every two arms on the same prompt (the same initial noise made both images). Golden pairs
have a known answer: an image against a heavily degraded copy of itself (quality) and an image against
the same arm's image for another prompt (adherence). They are mixed into every rater's queue to score
the rater's reliability and never enter the ratings.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import secrets
from itertools import combinations
from pathlib import Path
from typing import Any, Optional

from PIL import Image, ImageFilter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from addpipe.eval.db import Assignment, Pair, Rater, Setting
from addpipe.errors import UserError

GOLDEN_PREFIX = "golden:"


class StudyError(UserError, ValueError):
    """A study directory or request that cannot be used as it is."""


def read_generations(study_dir: Path) -> list[dict[str, Any]]:
    path = Path(study_dir) / "generations.jsonl"
    if not path.is_file():
        raise StudyError(f"{path} does not exist: run `addpipe eval generate --study {study_dir}` first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def degrade(image: Image.Image, seed: int) -> Image.Image:
    """Unmistakably worse: strong blur, heavy noise, then a very low JPEG quality."""
    import numpy as np

    blurred = image.convert("RGB").filter(ImageFilter.GaussianBlur(radius=max(2, image.width // 24)))
    array = np.asarray(blurred, dtype=np.float32)
    noisy = np.clip(array + np.random.default_rng(seed).normal(0, 40, array.shape), 0, 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=5)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def build_pairs(session: Session, study_dir: Path, golden_prompts: int = 8, seed: int = 0) -> int:
    """Create the study's pairs once (idempotent); -> the number of pairs."""
    existing = session.scalar(select(func.count(Pair.id)))
    if existing:
        return existing
    generations = read_generations(study_dir)
    by_prompt: dict[int, dict[str, dict[str, Any]]] = {}
    for g in generations:
        by_prompt.setdefault(int(g["prompt_id"]), {})[g["arm"]] = g
    arms = sorted({g["arm"] for g in generations})
    if len(arms) < 2:
        raise StudyError(f"a study needs at least two arms; {study_dir} has {arms}")
    complete = sorted(p for p, images in by_prompt.items() if len(images) == len(arms))
    for prompt_id in complete:
        images = by_prompt[prompt_id]
        first = images[arms[0]]
        for a, b in combinations(arms, 2):
            session.add(Pair(prompt_id=prompt_id, prompt=first["prompt"], category=first.get("category", ""),
                             arm_a=a, arm_b=b, image_a=images[a]["image"], image_b=images[b]["image"]))
    rng = random.Random(seed)
    golden_dir = Path(study_dir) / "golden"
    golden_dir.mkdir(exist_ok=True)
    chosen = rng.sample(complete, min(golden_prompts, len(complete))) if len(complete) > 1 else []
    for prompt_id in chosen:
        arm = rng.choice(arms)
        original = by_prompt[prompt_id][arm]
        with Image.open(Path(study_dir) / original["image"]) as image:
            degraded = degrade(image, prompt_id)
        degraded_path = golden_dir / f"{prompt_id:05d}_degraded.png"
        degraded.save(degraded_path)
        session.add(Pair(prompt_id=prompt_id, prompt=original["prompt"], category=original.get("category", ""),
                         arm_a=GOLDEN_PREFIX + "original", arm_b=GOLDEN_PREFIX + "degraded", image_a=original["image"],
                         image_b=str(degraded_path.relative_to(study_dir)), golden=True, expected_quality="a"))
        other = rng.choice([p for p in complete if p != prompt_id])
        session.add(Pair(prompt_id=prompt_id, prompt=original["prompt"], category=original.get("category", ""),
                         arm_a=GOLDEN_PREFIX + "matching", arm_b=GOLDEN_PREFIX + "other-prompt", image_a=original["image"],
                         image_b=by_prompt[other][arm]["image"], golden=True, expected_adherence="a"))
    session.commit()
    return session.scalar(select(func.count(Pair.id)))


def admin_token(session: Session) -> str:
    setting = session.get(Setting, "admin_token")
    if setting is None:
        setting = Setting(key="admin_token", value=secrets.token_urlsafe(24))
        session.add(setting)
        session.commit()
    return setting.value


def invite(session: Session, study_dir: Path, raters: int, pairs_per_rater: Optional[int] = None,
           golden_fraction: float = 0.15, base_url: str = "http://localhost:8000", seed: int = 0,
           prefix: str = "rater") -> list[dict[str, str]]:
    """Create `raters` new raters, each with a queue of regular pairs (spread evenly over raters so every
    pair gets votes) plus golden pairs at random positions; -> their names, tokens and links."""
    build_pairs(session, study_dir, seed=seed)
    regular = session.scalars(select(Pair.id).where(Pair.golden.is_(False)).order_by(Pair.id)).all()
    golden = session.scalars(select(Pair.id).where(Pair.golden.is_(True)).order_by(Pair.id)).all()
    quota = min(pairs_per_rater or len(regular), len(regular))
    golden_count = min(len(golden), math.ceil(golden_fraction * quota)) if golden_fraction > 0 else 0
    already = session.scalar(select(func.count(Rater.id)))
    rng = random.Random(seed * 1_000_003 + already)
    order = regular[:]
    rng.shuffle(order)
    created = []
    for r in range(raters):
        index = already + r
        start = (index * quota) % len(order)
        mine = [order[(start + k) % len(order)] for k in range(quota)] + rng.sample(golden, golden_count)
        rng.shuffle(mine)
        rater = Rater(name=f"{prefix}-{index + 1:03d}", token=secrets.token_urlsafe(18), quota=len(mine))
        session.add(rater)
        session.flush()
        for position, pair_id in enumerate(mine):
            session.add(Assignment(rater_id=rater.id, pair_id=pair_id, position=position, a_on_left=rng.random() < 0.5))
        created.append({"name": rater.name, "token": rater.token, "url": f"{base_url.rstrip('/')}/rate/{rater.token}"})
    session.commit()
    token = admin_token(session)
    invites = Path(study_dir) / "invites.csv"
    new_file = not invites.exists()
    with invites.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["name", "token", "url"])
        if new_file:
            writer.writeheader()
        writer.writerows(created)
    (Path(study_dir) / "admin.txt").write_text(f"{base_url.rstrip('/')}/admin/{token}\n")
    return created
