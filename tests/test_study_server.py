"""The rating server over HTTP on loopback, against SQLite always and PostgreSQL where one can be started:
the rater flow, every bad request (4xx, database unchanged), concurrent voters with retries (nothing lost,
nothing counted twice), SQL-injection text stored literally, admin statistics and exports."""

from __future__ import annotations

import csv
import io
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from addpipe.eval.db import Assignment, Pair, Rater, Vote, connect, session_factory
from addpipe.eval.server import create_app
from addpipe.eval.study import invite
from live_server import PostgresServer, ServerThread

INJECTION = "a cat'); DROP TABLE votes; -- \" OR 1=1 --"
PROMPTS = ["a red fox in snow", "a bowl of ramen, studio light", "un château près de la forêt", INJECTION,
           "two robots playing chess", "a watercolor lighthouse"]
ARMS = ["teacher", "add1", "add4"]


def write_study(directory: Path) -> Path:
    """A study as `eval generate` leaves it: images per arm and generations.jsonl (images synthetic here)."""
    rng = np.random.default_rng(0)
    lines = []
    for arm_index, arm in enumerate(ARMS):
        (directory / "images" / arm).mkdir(parents=True)
        for prompt_id, prompt in enumerate(PROMPTS):
            array = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
            path = directory / "images" / arm / f"{prompt_id:05d}.png"
            Image.fromarray(array).save(path)
            lines.append({"arm": arm, "prompt_id": prompt_id, "prompt": prompt, "category": "test", "seed": prompt_id,
                          "steps": 1 + arm_index, "guidance": 0.0, "latency_s": 0.01, "image": str(path.relative_to(directory))})
    (directory / "generations.jsonl").write_text("\n".join(json.dumps(l, ensure_ascii=False) for l in lines) + "\n")
    return directory


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    if not server.available():
        yield None
        return
    try:
        server.__enter__()
    except Exception:  # no usable PostgreSQL here: those parameters skip, SQLite still runs
        yield None
        return
    yield server
    server.__exit__(None, None, None)


@pytest.fixture(params=["sqlite", "postgresql"])
def study(request, tmp_path, postgres):
    directory = write_study(tmp_path / "study")
    if request.param == "sqlite":
        url = f"sqlite:///{directory / 'votes.db'}"
    else:
        if postgres is None:
            pytest.skip("PostgreSQL cannot be started here (Debian's postgresql package and runuser are needed)")
        url = postgres.create_database("study_" + uuid.uuid4().hex[:10])
    engine = connect(url)
    sessions = session_factory(engine)
    with sessions() as session:
        raters = invite(session, directory, raters=4, pairs_per_rater=None, golden_fraction=0.2, base_url="http://x")
    app = create_app(directory, url)
    with ServerThread(app) as server:
        yield {"dir": directory, "url": url, "sessions": sessions, "raters": raters, "server": server.url}
    engine.dispose()
    app.state.engine.dispose()


def vote_count(study) -> int:
    with study["sessions"]() as session:
        return session.scalar(select(func.count(Vote.id)))


def post_vote(client, token, pair_id, answers=None, submission=None, **extra):
    body = {"pair_id": pair_id, "submission_id": submission or uuid.uuid4().hex,
            "answers": answers or {"adherence": "left", "quality": "right"}, **extra}
    return client.post("/api/vote", json=body, headers={"X-Token": token})


def test_a_rater_session_maps_clicked_sides_to_arms_and_finishes(study):
    token = study["raters"][0]["token"]
    with httpx.Client(base_url=study["server"]) as client:
        page = client.get(f"/rate/{token}")
        assert page.status_code == 200 and "Which image" not in page.text and token in page.text
        task = client.get("/api/next", headers={"X-Token": token}).json()
        total = task["total"]
        assert total == 3 * len(PROMPTS) + 4  # every regular pair, plus ceil(0.2 * 18) golden ones
        for teacher_or_student in ("teacher", "add1", "add4"):
            assert teacher_or_student not in json.dumps(task) and teacher_or_student not in page.text
        seen = 0
        while not task["finished"]:
            left = client.get(task["left"]).content
            right = client.get(task["right"]).content
            answers = {"adherence": ["left", "right", "tie"][seen % 3], "quality": ["right", "tie", "left"][seen % 3]}
            response = post_vote(client, token, task["pair_id"], answers, response_ms=1500)
            assert response.status_code == 200, response.text
            with study["sessions"]() as session:
                pair = session.get(Pair, task["pair_id"])
                a_on_left = session.scalar(select(Assignment.a_on_left).where(Assignment.pair_id == pair.id, Assignment.rater_id == 1))
                image_a = (study["dir"] / pair.image_a).read_bytes()
                assert (left if a_on_left else right) == image_a  # the left/right randomisation is what the page showed
                votes = {v.question: v for v in session.scalars(select(Vote).where(Vote.pair_id == pair.id, Vote.rater_id == 1))}
                for question, side in answers.items():
                    expected = "tie" if side == "tie" else ("a" if (side == "left") == a_on_left else "b")
                    assert votes[question].choice == expected and votes[question].side == side
            seen += 1
            task = client.get("/api/next", headers={"X-Token": token}).json()
        assert seen == total and task["done"] == total
    assert vote_count(study) == 2 * total


def test_bad_requests_are_4xx_with_a_message_and_change_nothing(study):
    token, other = study["raters"][0]["token"], study["raters"][1]["token"]
    with httpx.Client(base_url=study["server"]) as client:
        pair_id = client.get("/api/next", headers={"X-Token": token}).json()["pair_id"]
        submission = uuid.uuid4().hex
        assert post_vote(client, token, pair_id, submission=submission).status_code == 200
        before = vote_count(study)
        with study["sessions"]() as session:
            foreign = session.scalar(select(Assignment.pair_id).where(Assignment.rater_id == 2, Assignment.pair_id.not_in(
                select(Assignment.pair_id).where(Assignment.rater_id == 1))))
        cases = [
            (post_vote(client, token, 999_999), 404, "unknown pair"),
            (post_vote(client, "forged-token-0000", pair_id), 401, "unknown invite token"),
            (post_vote(client, "' OR '1'='1", pair_id), 401, "unknown invite token"),
            (post_vote(client, token, pair_id, submission=submission), 409, "already recorded"),
            (post_vote(client, token, pair_id), 409, "already has your vote"),
            (post_vote(client, token, pair_id + 1 if foreign is None else foreign) if foreign else
             post_vote(client, token, 999_998), 404, "unknown pair"),
            (client.post("/api/vote", content=b"{not json", headers={"X-Token": token, "Content-Type": "application/json"}), 422, ""),
            (post_vote(client, token, pair_id, answers={"adherence": "left"}), 422, "answers must cover"),
            (post_vote(client, token, pair_id, answers={"adherence": "up", "quality": "left"}), 422, ""),
            (post_vote(client, token, pair_id, extra_field=1), 422, ""),
            (post_vote(client, token, -3), 422, ""),
            (client.post("/api/vote", content=b"x" * 10_000, headers={"X-Token": token, "Content-Type": "application/json"}), 413, "larger than"),
            (client.get("/api/next"), 401, "unknown invite token"),
            (client.get(f"/api/image/{pair_id}/left?token=forged"), 401, "unknown invite token"),
            (client.get(f"/api/image/999999/left?token={token}"), 404, "unknown pair"),
            (client.get(f"/api/image/{pair_id}/middle?token={token}"), 422, ""),
            (client.get("/api/admin/stats", headers={"X-Token": token}), 401, "unknown admin token"),
            (client.get("/rate/forged"), 401, "unknown invite token"),
        ]
        for response, status, message in cases:
            assert response.status_code == status, (response.request.url, response.status_code, response.text)
            assert message in response.json()["detail"] if message else "detail" in response.json()
        assert vote_count(study) == before
        # a finished (spent) invite can vote no more, and a withdrawn one is refused
        with study["sessions"]() as session:
            rater = session.scalar(select(Rater).where(Rater.token == other))
            rater.revoked = True
            session.commit()
        response = post_vote(client, other, pair_id)
        assert response.status_code == 403 and "withdrawn" in response.json()["detail"]
        assert vote_count(study) == before


def test_many_concurrent_voters_with_retries_lose_and_double_count_nothing(study):
    raters = study["raters"]
    with study["sessions"]() as session:
        queues = {r["token"]: session.scalars(select(Assignment.pair_id).join(Rater).where(Rater.token == r["token"])
                                              .order_by(Assignment.position)).all() for r in raters}
    jobs = [(token, pair_id, uuid.uuid4().hex) for token, queue in queues.items() for pair_id in queue]
    statuses: list[int] = []
    lock = threading.Lock()

    def send(job):
        token, pair_id, submission = job
        with httpx.Client(base_url=study["server"], timeout=60) as client:
            for _ in range(2):  # every submission is sent twice, as a client retrying after a lost response would
                status = post_vote(client, token, pair_id, submission=submission).status_code
                with lock:
                    statuses.append(status)

    with ThreadPoolExecutor(max_workers=24) as pool:
        list(pool.map(send, jobs))
    assert statuses.count(200) == len(jobs) and statuses.count(409) == len(jobs) and len(statuses) == 2 * len(jobs)
    assert vote_count(study) == 2 * len(jobs)
    with study["sessions"]() as session:
        pairs = session.execute(select(Vote.rater_id, Vote.pair_id, Vote.question)).all()
    assert len(set(pairs)) == len(pairs)


def test_injection_text_is_stored_and_served_literally(study):
    with study["sessions"]() as session:
        stored = session.scalars(select(Pair.prompt).where(Pair.prompt.like("%DROP TABLE%"))).all()
    assert stored and set(stored) == {INJECTION}
    token = study["raters"][0]["token"]
    with httpx.Client(base_url=study["server"]) as client:
        prompts = set()
        task = client.get("/api/next", headers={"X-Token": token}).json()
        while not task["finished"]:
            prompts.add(task["prompt"])
            post_vote(client, token, task["pair_id"])
            task = client.get("/api/next", headers={"X-Token": token}).json()
    assert INJECTION in prompts and "un château près de la forêt" in prompts
    assert vote_count(study) > 0  # the votes table is still there


def test_admin_page_statistics_and_exports(study):
    admin = (study["dir"] / "admin.txt").read_text().strip().rsplit("/", 1)[1]
    token = study["raters"][0]["token"]
    with study["sessions"]() as session:
        golden = session.execute(select(Pair.id, Pair.expected_quality, Pair.expected_adherence, Assignment.a_on_left)
                                 .join(Assignment, Assignment.pair_id == Pair.id).join(Rater)
                                 .where(Rater.token == token, Pair.golden.is_(True))).all()
    with httpx.Client(base_url=study["server"]) as client:
        for pair_id, expected_quality, expected_adherence, a_on_left in golden:
            correct = "left" if a_on_left else "right"  # the expected answer is always arm a
            answers = {"quality": correct if expected_quality else "tie", "adherence": correct if expected_adherence else "tie"}
            assert post_vote(client, token, pair_id, answers).status_code == 200
        stats = client.get("/api/admin/stats", headers={"X-Token": admin}).json()
        me = next(r for r in stats["raters"] if r["name"] == study["raters"][0]["name"])
        assert me["pairs_rated"] == len(golden) and me["golden_votes"] == len(golden) and me["golden_accuracy"] == 1.0
        assert stats["votes"] == 2 * len(golden)
        page = client.get(f"/admin/{admin}")
        assert page.status_code == 200 and f"{stats['pairs_rated']} of {stats['pairs_assigned']}" in page.text
        rows = list(csv.DictReader(io.StringIO(client.get("/api/admin/votes.csv", params={"token": admin}).text)))
        lines = client.get("/api/admin/votes.jsonl", params={"token": admin}).text.splitlines()
        assert len(rows) == len(lines) == 2 * len(golden)
        assert {row["golden"] for row in rows} == {"True"}
