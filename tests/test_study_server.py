"""The rating server over HTTP on loopback, against SQLite always and PostgreSQL where one can be started:
the rater flow, every bad request (4xx, database unchanged), concurrent voters with retries (nothing lost,
nothing counted twice), SQL-injection text stored literally, admin statistics and exports."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import socket
import time
import uuid
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
        with study["sessions"]() as session:  # a pair still waiting in this rater's queue: never shown
            waiting = session.scalar(select(Assignment.pair_id).where(Assignment.rater_id == 1, Assignment.shown_at.is_(None))
                                     .order_by(Assignment.position).limit(1))
        cases = [
            (post_vote(client, token, waiting), 409, "has not been shown to you yet"),
            (post_vote(client, token, 2**31), 422, "less than or equal"),
            (post_vote(client, token, 2**63), 422, "less than or equal"),
            (post_vote(client, token, 10**30), 422, ""),
            (post_vote(client, token, True), 422, "valid integer"),
            (post_vote(client, token, "1"), 422, "valid integer"),
            (post_vote(client, token, 1.0), 422, "valid integer"),
            (post_vote(client, token, pair_id, response_ms=True), 422, "valid integer"),
            (post_vote(client, token, pair_id, submission="x" * 8 + "/" * 4), 422, "pattern"),
            (client.get(f"/api/image/{2**31}/left?token={token}"), 422, "less than or equal"),
            (client.get(f"/api/image/{2**63}/left?token={token}"), 422, ""),
            (client.get(f"/api/image/0/left?token={token}"), 422, "greater than or equal"),
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
        ]
        for response, status, message in cases:
            assert response.status_code == status, (response.request.url, response.status_code, response.text)
            assert message in response.json()["detail"] if message else "detail" in response.json()
        assert vote_count(study) == before
        page = client.get("/rate/forged")  # a person opened it: a page, not JSON
        assert page.status_code == 401 and page.headers["content-type"].startswith("text/html")
        assert "This invite link is not valid" in page.text and "detail" not in page.text
        # a finished (spent) invite can vote no more, and a withdrawn one is refused
        with study["sessions"]() as session:
            rater = session.scalar(select(Rater).where(Rater.token == other))
            rater.revoked = True
            session.commit()
        time.sleep(1.1)  # the server re-reads withdrawals at most once a second
        response = post_vote(client, other, pair_id)
        assert response.status_code == 403 and "withdrawn" in response.json()["detail"]
        assert client.get("/api/next", headers={"X-Token": other}).status_code == 403
        page = client.get(f"/rate/{other}")
        assert page.status_code == 403 and "This invite has been withdrawn" in page.text
        assert vote_count(study) == before


def test_oversized_chunked_body_is_refused_without_reading_it(study):
    """A chunked body with no declared length is cut off at the limit: the 413 comes while the client is still
    sending (it never finishes the body here), so the server cannot have read it all into memory."""
    token = study["raters"][0]["token"]
    host, port = study["server"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /api/vote HTTP/1.1\r\nHost: {host}\r\nX-Token: {token}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"x" * 1024
        for _ in range(6):  # 6 KiB, over the 4 KiB limit; the terminating chunk is never sent
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        answer = sock.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 413") and "larger than 4096 bytes" in answer


@pytest.mark.slow
def test_two_hundred_raters_fetching_images_and_voting_at_once_lose_nothing(tmp_path, postgres):
    """200 raters against `addpipe eval serve` in its own process, each a browser: next pair, both images at once,
    then the vote, sent twice (a retry after a lost answer) and, every third round, twice at the same moment.
    No request fails; every acknowledged vote is stored exactly once; replays are answered 409."""
    import asyncio

    from live_server import ServeProcess

    # One server process, and two (`--workers 2`: grants made by one process, images asked of the other; SQLite
    # writers of both processes taking turns on the write lock).
    for backend, workers in (("sqlite", 1), ("sqlite", 2), ("postgresql", 2)):
        if backend == "postgresql" and postgres is None:
            continue  # the SQLite runs still count; test_bad_requests reports the missing PostgreSQL
        directory = write_study(tmp_path / f"{backend}-{workers}")
        url = f"sqlite:///{directory / 'votes.db'}" if backend == "sqlite" else postgres.create_database("many_" + uuid.uuid4().hex[:10])
        engine = connect(url)
        with session_factory(engine)() as session:
            raters = invite(session, directory, raters=200, pairs_per_rater=3, golden_fraction=0.3)
            quotas = dict(session.execute(select(Rater.token, Rater.quota)).all())
        statuses: list[tuple[str, int]] = []
        acknowledged: list[tuple[str, int]] = []

        async def rater(client, token):
            headers = {"X-Token": token}
            for round_index in range(quotas[token] + 1):
                task = (await client.get("/api/next", headers=headers))
                statuses.append(("next", task.status_code))
                task = task.json()
                if task["finished"]:
                    return
                images = await asyncio.gather(client.get(task["left"]), client.get(task["right"]))
                statuses.extend(("image", r.status_code) for r in images)
                assert all(r.content[:8] == b"\x89PNG\r\n\x1a\n" for r in images)
                body = {"pair_id": task["pair_id"], "submission_id": uuid.uuid4().hex,
                        "answers": {"adherence": "left", "quality": "tie"}}
                if round_index % 3 == 0:  # the same submission twice at once: one 200, one 409
                    answers = await asyncio.gather(*(client.post("/api/vote", json=body, headers=headers) for _ in range(2)))
                else:
                    answers = [await client.post("/api/vote", json=body, headers=headers)]
                    answers.append(await client.post("/api/vote", json=body, headers=headers))
                codes = sorted(r.status_code for r in answers)
                statuses.append(("vote", codes[0]))
                assert codes == [200, 409], (codes, [r.text for r in answers])
                acknowledged.append((token, task["pair_id"]))

        async def everyone(base):
            clients = [httpx.AsyncClient(base_url=base, timeout=120, verify=False) for _ in raters]
            try:
                await asyncio.gather(*(rater(c, r["token"]) for c, r in zip(clients, raters)))
            finally:
                await asyncio.gather(*(c.aclose() for c in clients))

        with ServeProcess(directory, url, workers=workers) as server:
            asyncio.run(everyone(server.url))
        assert {code for _, code in statuses} == {200}, [s for s in statuses if s[1] != 200][:5]
        assert len(acknowledged) == sum(quotas.values()) == len(set(acknowledged))
        with session_factory(engine)() as session:
            stored = session.execute(select(Rater.token, Vote.pair_id, Vote.question).join(Rater)).all()
        assert len(stored) == 2 * len(acknowledged) and len(set(stored)) == len(stored)
        assert {(t, p) for t, p, _ in stored} == set(acknowledged)
        engine.dispose()


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
        for assignment in session.scalars(select(Assignment).join(Rater).where(Rater.token == token)):
            assignment.shown_at = assignment.shown_at or dt.datetime(2026, 1, 1)  # as if /api/next had shown them
        session.commit()
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


def test_admin_page_sorts_pages_and_flags_raters_who_fail_the_golden_screen(study):
    """Two raters answer their golden pairs wrongly through the rating flow, one rightly: the page says how many
    fail, highlights exactly them, sorts by any column both ways, pages a long rater list and explains its columns."""
    import re

    admin = (study["dir"] / "admin.txt").read_text().strip().rsplit("/", 1)[1]
    with study["sessions"]() as session:
        invite(session, study["dir"], raters=26, pairs_per_rater=2, golden_fraction=0.0)  # 30 raters in all
    with httpx.Client(base_url=study["server"]) as client:
        for rater, right in zip(study["raters"][:3], (False, False, True)):
            token = rater["token"]
            task = client.get("/api/next", headers={"X-Token": token}).json()
            while not task["finished"]:
                with study["sessions"]() as session:
                    pair, a_on_left = session.execute(select(Pair, Assignment.a_on_left).join(Assignment).join(Rater).where(
                        Rater.token == token, Pair.id == task["pair_id"])).one()
                expected_side = "left" if a_on_left else "right"
                wrong_side = "right" if a_on_left else "left"
                side = (expected_side if right else wrong_side) if pair.golden else "tie"
                assert post_vote(client, token, task["pair_id"], {"adherence": side, "quality": side}).status_code == 200
                task = client.get("/api/next", headers={"X-Token": token}).json()

        page = client.get(f"/admin/{admin}", params={"per_page": 25})
        assert page.status_code == 200
        assert "2 rater(s) fail the golden-pair screen" in page.text
        failing = set(re.findall(r"<tr class='fails'><td>([^<]+)</td>", page.text))
        assert failing == {study["raters"][0]["name"], study["raters"][1]["name"]}
        assert len(re.findall(r"<tr class='[a-z]*'>", page.text)) == 25  # page 1 of 2
        second = client.get(f"/admin/{admin}", params={"per_page": 25, "page": 2}).text
        assert len(re.findall(r"<tr class='[a-z]*'>", second)) == 5
        for column in ("golden accuracy", "median s / pair", "progress"):
            assert f"<dt>{column}</dt>" in page.text  # the columns are explained

        by_accuracy = client.get(f"/admin/{admin}", params={"sort": "golden_accuracy", "order": "asc"}).text
        names = re.findall(r"<tr class='[a-z]*'><td>([^<]+)</td>", by_accuracy)
        assert set(names[:2]) == failing and names[2] == study["raters"][2]["name"]  # 0%, 0%, 100%, then unscreened
        descending = re.findall(r"<tr class='[a-z]*'><td>([^<]+)</td>",
                                client.get(f"/admin/{admin}", params={"sort": "golden_accuracy", "order": "desc"}).text)
        assert descending[0] == study["raters"][2]["name"] and set(descending[1:3]) == failing
        stats = client.get("/api/admin/stats", headers={"X-Token": admin}).json()
        assert stats["failing_raters"] == 2
        assert {r["name"]: r["status"] for r in stats["raters"]}[study["raters"][2]["name"]] == "passes"
        assert client.get(f"/admin/{admin}", params={"sort": "nonsense", "page": -3}).status_code == 200


def raw_status(server: str, request: bytes) -> int:
    """Send `request` as it is (bytes httpx would refuse to send) and -> the answer's status code (0: no answer)."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def test_nul_and_undecodable_bytes_in_every_request_field_are_4xx(study):
    """PostgreSQL refuses a NUL in a string (a 500 with a traceback, where SQLite answered 401): every text that could
    reach the database is checked first, in the path, the query, the token header and the JSON body, percent-encoded
    or raw. Each answer is a 4xx on both databases and nothing changes."""
    token = study["raters"][0]["token"]
    with httpx.Client(base_url=study["server"]) as client:
        pair_id = client.get("/api/next", headers={"X-Token": token}).json()["pair_id"]
        before = vote_count(study)
        bad = ["%00", "a%00", token + "%00", "%00" + token, "%ff", "a%c3%28", "%ed%a0%80", "%f4%90%80%80"]  # NUL, not UTF-8
        responses = []
        for text in bad:
            responses += [
                client.get(f"/rate/{text}"),
                client.get(f"/api/image/{pair_id}/left?token={text}"),
                client.get(f"/api/image/{pair_id}/left?token={token}&x={text}"),
                client.get(f"/api/image/{pair_id}/{text}?token={token}"),
                client.get(f"/api/next?x={text}", headers={"X-Token": token}),
                client.get(f"/admin/{text}"),
                client.get(f"/admin/{text}?sort={text}&order={text}"),
                client.get(f"/api/admin/stats?token={text}"),
                client.get(f"/api/admin/votes.csv?token={text}"),
                client.get(f"/api/admin/votes.{text}"),
            ]
        for value in ("\x00", "a\x00b", token + "\x00", "\ud800", "\udcff"):
            responses += [
                client.post("/api/vote", headers={"X-Token": token}, content=json.dumps(
                    {"pair_id": pair_id, "submission_id": "abcdefgh" + value, "answers": {"adherence": "left", "quality": "left"}})),
                client.post("/api/vote", headers={"X-Token": token}, content=json.dumps(
                    {"pair_id": pair_id, "submission_id": uuid.uuid4().hex, "answers": {"adherence" + value: "left", "quality": "left"}})),
                client.post("/api/vote", headers={"X-Token": token}, content=json.dumps(
                    {"pair_id": pair_id, "submission_id": uuid.uuid4().hex, "answers": {"adherence": value, "quality": "left"}})),
            ]
        for response in responses:
            assert 400 <= response.status_code < 500, (response.request.url, response.status_code, response.text[:300])
        body = b'{"pair_id": %d, "submission_id": "abcdefgh\xff\xfe", "answers": {"adherence": "left", "quality": "left"}}' % pair_id
        host = study["server"].removeprefix("http://").encode()
        raw = [
            b"GET /rate/a\x00b HTTP/1.1\r\nHost: %s\r\n\r\n" % host,
            b"GET /rate/a\xffb HTTP/1.1\r\nHost: %s\r\n\r\n" % host,
            b"GET /api/image/%d/left?token=a\x00b HTTP/1.1\r\nHost: %s\r\n\r\n" % (pair_id, host),
            b"GET /api/image/%d/left?token=a\xffb HTTP/1.1\r\nHost: %s\r\n\r\n" % (pair_id, host),
            b"GET /api/next HTTP/1.1\r\nHost: %s\r\nX-Token: a\x00b\r\n\r\n" % host,
            b"GET /api/next HTTP/1.1\r\nHost: %s\r\nX-Token: %s\xff\r\n\r\n" % (host, token.encode()),
            b"GET /api/next HTTP/1.1\r\nHost: %s\r\nX-Token: \xc3\x28\r\n\r\n" % host,
            b"GET /api/admin/stats HTTP/1.1\r\nHost: %s\r\nX-Token: a\x00\r\n\r\n" % host,
            b"GET /api/admin/stats HTTP/1.1\r\nHost: %s\r\nX-Token: \xff\r\n\r\n" % host,
            b"POST /api/vote HTTP/1.1\r\nHost: %s\r\nX-Token: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (host, token.encode(), len(body), body),
            b"POST /api/vote HTTP/1.1\r\nHost: %s\r\nX-Token: \xff%s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (host, token.encode(), len(body), body),
        ]
        for request in raw:
            status = raw_status(study["server"], request)
            assert 400 <= status < 500, (request[:80], status)
        assert vote_count(study) == before
        assert client.get(f"/rate/{token}").status_code == 200  # the server still answers, and the good token still works


def test_slow_header_clients_are_cut_off_while_others_are_served(tmp_path):
    """Dozens of connections that never finish their request head (silent, a partial head, one byte at a time, a second
    request on a kept-alive connection left unfinished) are each answered 408 and closed once the header deadline
    passes, and not before; a normal rater is served meanwhile. Without the deadline uvicorn kept them open for ever."""
    directory = write_study(tmp_path / "study")
    url = f"sqlite:///{directory / 'votes.db'}"
    with session_factory(connect(url))() as session:
        token = invite(session, directory, raters=1, pairs_per_rater=None, golden_fraction=0.0, base_url="http://x")[0]["token"]
    timeout = 1.5
    app = create_app(directory, url)
    with ServerThread(app, header_timeout=timeout) as server:
        address = ("127.0.0.1", server.port)
        kinds = ["silent", "partial", "trickle", "kept-alive"]
        clients = []
        for index in range(40):
            kind = kinds[index % len(kinds)]
            sock = socket.create_connection(address, timeout=10)
            if kind == "partial":
                sock.sendall(f"GET /api/next HTTP/1.1\r\nHost: x\r\nX-Token: {token}\r\n".encode())
            elif kind == "trickle":
                sock.sendall(b"GET /api/next HTTP/1.1\r\nHost: x\r\nX-Pad: ")
            elif kind == "kept-alive":  # a whole request answered, then the next one left unfinished
                sock.sendall(f"GET /rate/{token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
                sock.sendall(b"GET /rate/")
            sock.setblocking(False)
            clients.append({"kind": kind, "socket": sock, "opened": time.monotonic(), "closed": None, "answer": b""})
        with httpx.Client(base_url=server.url, timeout=10) as rater:  # served while the slow ones hang
            for _ in range(3):
                assert rater.get("/api/next", headers={"X-Token": token}).status_code == 200
        deadline = time.monotonic() + timeout + 10
        while any(c["closed"] is None for c in clients) and time.monotonic() < deadline:
            for client in clients:
                if client["closed"] is not None:
                    continue
                try:
                    if client["kind"] == "trickle":
                        client["socket"].send(b"a")  # a byte every 0.1 s: uvicorn's keep-alive timer never fired
                    while chunk := client["socket"].recv(4096):
                        client["answer"] += chunk
                    client["closed"] = time.monotonic()  # recv returned b"": closed by the server
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    client["closed"] = time.monotonic()
            time.sleep(0.1)
        for client in clients:
            client["socket"].close()
        still_open = [c["kind"] for c in clients if c["closed"] is None]
        assert not still_open, f"{len(still_open)} slow connections still open after {timeout + 10} s: {still_open}"
        waited = [c["closed"] - c["opened"] for c in clients]
        assert min(waited) >= timeout * 0.9, min(waited)  # the deadline, not something earlier, closed them
        assert all(c["answer"].startswith(b"HTTP/1.1 408") for c in clients if c["kind"] != "trickle" or c["answer"]), \
            [c["answer"][:40] for c in clients]
        with httpx.Client(base_url=server.url, timeout=10) as rater:  # and the server still answers
            assert rater.get(f"/rate/{token}").status_code == 200
    app.state.engine.dispose()


def test_connections_past_the_cap_get_a_503_and_service_returns_when_they_go(tmp_path):
    directory = write_study(tmp_path / "study")
    url = f"sqlite:///{directory / 'votes.db'}"
    with session_factory(connect(url))() as session:
        token = invite(session, directory, raters=1, pairs_per_rater=None, golden_fraction=0.0, base_url="http://x")[0]["token"]
    app = create_app(directory, url)
    with ServerThread(app, max_connections=8) as server:
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(8)]
        time.sleep(0.2)  # accepted by the event loop
        with httpx.Client(base_url=server.url, timeout=10) as rater:
            assert rater.get(f"/rate/{token}").status_code == 503
        for sock in held:
            sock.close()
        time.sleep(0.2)
        with httpx.Client(base_url=server.url, timeout=10) as rater:
            assert rater.get(f"/rate/{token}").status_code == 200
    app.state.engine.dispose()
