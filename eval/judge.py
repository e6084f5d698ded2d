"""Judge-model raters: an automated pairwise study that goes through the same server, database and
rating code as people do.

Each judge is invited like a person (`invite`, its own token and queue with golden pairs), then works
through its queue over HTTP against the real rating server: `GET /api/next`, both images from
`/api/image/...`, `POST /api/vote`. The judgement comes from the content classifier trained on the real
data (eval/classifier.py):

- adherence: the mean probability of the classes the prompt asks for (digit, ink, background);
- quality: the classifier's mean confidence over its fields (crisp, in-distribution images are classified
  confidently; blurred or noisy ones are not).

A judge is a noisy rater: it prefers the left image with probability sigmoid((score_left - score_right) /
temperature) and calls a tie when the scores differ by less than `tie_margin`, each judge with its own
random stream, so that several judges disagree the way raters do and the rating intervals mean something.
"""

from __future__ import annotations

import io
import json
import math
import random
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Optional

from PIL import Image
from tqdm.auto import tqdm

from addpipe.eval.classifier import ContentClassifier, load_classifier

JUDGE_FILE = "judges.json"


def judge_scores(classifier: ContentClassifier, image: Image.Image, prompt: str) -> dict[str, float]:
    probabilities = {field: p[0] for field, p in classifier.probabilities([image]).items()}
    wanted = classifier.requested(prompt)
    confidence = sum(float(p.max()) for p in probabilities.values()) / len(probabilities)
    if wanted:
        adherence = sum(float(probabilities[f][classifier.classes[f].index(v)]) for f, v in wanted.items()) / len(wanted)
    else:  # a prompt that names nothing the classifier knows: fall back on confidence
        adherence = confidence
    return {"adherence": adherence, "quality": confidence}


def choose(left: float, right: float, rng: random.Random, temperature: float, tie_margin: float) -> str:
    if abs(left - right) < tie_margin:
        return "tie"
    p_left = 1.0 / (1.0 + math.exp(-(left - right) / temperature))
    return "left" if rng.random() < p_left else "right"


class Client:
    """The rating API as a rater's browser uses it (urllib, no extra dependency)."""

    def __init__(self, base_url: str, token: str):
        self.base_url, self.token = base_url.rstrip("/"), token

    def get(self, path: str) -> bytes:
        request = urllib.request.Request(self.base_url + path, headers={"X-Token": self.token})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"X-Token": self.token, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())


def rate_queue(client: Client, classifier: ContentClassifier, rng: random.Random, temperature: float, tie_margin: float,
               progress: Optional[tqdm] = None) -> int:
    """Vote on every pair left in this rater's queue; -> votes cast (pairs)."""
    cast = 0
    while True:
        task = json.loads(client.get("/api/next"))
        if task["finished"]:
            return cast
        images = {side: Image.open(io.BytesIO(client.get(task[side]))).convert("RGB") for side in ("left", "right")}
        scores = {side: judge_scores(classifier, image, task["prompt"]) for side, image in images.items()}
        answers = {q["id"]: choose(scores["left"][q["id"]], scores["right"][q["id"]], rng, temperature, tie_margin)
                   for q in task["questions"]}
        client.post("/api/vote", {"pair_id": task["pair_id"], "submission_id": uuid.uuid4().hex, "answers": answers})
        cast += 1
        if progress is not None:
            progress.update(1)


def judge_study(study_dir: Path, db_url: str, classifier_dir: str, judges: int = 3, pairs_per_judge: Optional[int] = None,
                temperature: float = 0.05, tie_margin: float = 0.01, seed: int = 0, base_url: Optional[str] = None) -> dict[str, Any]:
    """Invite `judges` judge raters (once; a rerun finishes their queues) and let them vote through the server.

    With `base_url` the judges vote on a server that is already running; otherwise one is started on a
    free loopback port for the duration. -> {"judges": [...], "assignments": pairs these judges answered in this
    call (both questions each), "pairs": pairs the study holds, "votes": vote rows of these judges in the database}.
    """
    from addpipe.eval.db import Pair, Rater, Vote, connect, session_factory
    from addpipe.eval.server import ServerThread, create_app
    from addpipe.eval.study import invite

    study_dir = Path(study_dir)
    classifier = load_classifier(classifier_dir)
    record_path = study_dir / JUDGE_FILE
    record = json.loads(record_path.read_text()) if record_path.exists() else {"judges": []}
    engine = connect(db_url)
    with session_factory(engine)() as session:
        missing = judges - len(record["judges"])
        if missing > 0:
            created = invite(session, study_dir, missing, pairs_per_judge, seed=seed, prefix="judge")
            record["judges"] += [{"name": c["name"], "token": c["token"]} for c in created]
            record.update(classifier=str(classifier_dir), temperature=temperature, tie_margin=tie_margin)
            record_path.write_text(json.dumps(record, indent=2))
        quota = sum(session.query(Rater).filter(Rater.token == j["token"]).one().quota for j in record["judges"][:judges])
    engine.dispose()

    def run(url: str) -> int:
        total = 0
        with tqdm(total=quota, desc="judge votes", disable=None) as bar:
            for judge in record["judges"][:judges]:
                rng = random.Random(f"{seed}:{judge['name']}")
                total += rate_queue(Client(url, judge["token"]), classifier, rng, temperature, tie_margin, bar)
        return total

    if base_url:
        answered = run(base_url)
    else:
        with ServerThread(create_app(study_dir, db_url)) as server:
            answered = run(server.url)
    engine = connect(db_url)
    with session_factory(engine)() as session:
        tokens = [j["token"] for j in record["judges"][:judges]]
        votes = session.query(Vote).join(Rater, Rater.id == Vote.rater_id).filter(Rater.token.in_(tokens)).count()
        pairs = session.query(Pair).count()
    engine.dispose()
    return {"judges": [j["name"] for j in record["judges"][:judges]], "assignments": answered, "pairs": pairs, "votes": votes}
