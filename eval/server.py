"""The rating server: a FastAPI app over the study database.

Raters open `/rate/<token>`; the page asks `/api/next` for their next pair and posts `/api/vote`.
Images are served by pair and side, never by arm, so nothing in the page or its URLs names a model.
Every request that cannot be honoured is a 4xx with a `detail` message and leaves the database as it was.
"""

from __future__ import annotations

import datetime as dt
import html
import io
import socket
import threading
import time
from pathlib import Path
from typing import Literal, Optional

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from addpipe.eval.db import QUESTION_TEXT, QUESTIONS, Assignment, Pair, Rater, Setting, Vote, connect, session_factory, utcnow
from addpipe.eval.ratings import rater_accuracy
from addpipe.eval.votes import votes_frame

MAX_BODY_BYTES = 4096
PAGE = (Path(__file__).parent / "static" / "rate.html").read_text()


class VoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pair_id: int = Field(ge=1)
    submission_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    answers: dict[Literal["adherence", "quality"], Literal["left", "right", "tie"]]
    response_ms: Optional[int] = Field(default=None, ge=0, le=24 * 3600 * 1000)


def create_app(study_dir: Path, db_url: str, questions: tuple[str, ...] = QUESTIONS) -> FastAPI:
    study_dir = Path(study_dir).resolve()
    engine = connect(db_url)
    sessions = session_factory(engine)
    app = FastAPI(title="addpipe rating server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        # Refuse oversized bodies before parsing them: by the declared length, or by what actually arrives.
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            return JSONResponse({"detail": f"request body larger than {MAX_BODY_BYTES} bytes"}, status_code=413)
        if request.method == "POST":
            body = await request.body()
            if len(body) > MAX_BODY_BYTES:
                return JSONResponse({"detail": f"request body larger than {MAX_BODY_BYTES} bytes"}, status_code=413)
        return await call_next(request)

    def db():
        with sessions() as session:
            yield session

    def rater_for(token: Optional[str], session: Session) -> Rater:
        rater = session.scalar(select(Rater).where(Rater.token == token)) if token else None
        if rater is None:
            raise HTTPException(401, "unknown invite token")
        if rater.revoked:
            raise HTTPException(403, "this invite has been withdrawn")
        return rater

    def progress(session: Session, rater: Rater) -> int:
        return session.scalar(select(func.count(func.distinct(Vote.pair_id))).where(Vote.rater_id == rater.id)) or 0

    def require_admin(token: Optional[str], session: Session) -> None:
        setting = session.get(Setting, "admin_token")
        if setting is None or not token or token != setting.value:
            raise HTTPException(401, "unknown admin token")

    @app.get("/rate/{token}", response_class=HTMLResponse)
    def page(token: str, session: Session = Depends(db)):
        rater_for(token, session)
        return HTMLResponse(PAGE.replace("__TOKEN__", html.escape(token)))

    @app.get("/api/next")
    def next_pair(x_token: Optional[str] = Header(None), session: Session = Depends(db)):
        rater = rater_for(x_token, session)
        done = progress(session, rater)
        voted = select(Vote.pair_id).where(Vote.rater_id == rater.id)
        assignment = session.scalar(select(Assignment).where(Assignment.rater_id == rater.id, Assignment.pair_id.not_in(voted))
                                    .order_by(Assignment.position).limit(1))
        if assignment is None:
            return {"finished": True, "done": done, "total": rater.quota}
        pair = session.get(Pair, assignment.pair_id)
        if assignment.shown_at is None:
            assignment.shown_at = utcnow()
            session.commit()
        return {"finished": False, "done": done, "total": rater.quota, "pair_id": pair.id, "prompt": pair.prompt,
                "left": f"/api/image/{pair.id}/left?token={rater.token}", "right": f"/api/image/{pair.id}/right?token={rater.token}",
                "questions": [{"id": q, "text": QUESTION_TEXT[q]} for q in questions]}

    @app.get("/api/image/{pair_id}/{side}")
    def image(pair_id: int, side: Literal["left", "right"], token: Optional[str] = None, session: Session = Depends(db)):
        rater = rater_for(token, session)
        assignment = session.scalar(select(Assignment).where(Assignment.rater_id == rater.id, Assignment.pair_id == pair_id))
        if assignment is None:
            raise HTTPException(404, f"unknown pair {pair_id}")
        pair = session.get(Pair, pair_id)
        show_a = assignment.a_on_left == (side == "left")
        path = (study_dir / (pair.image_a if show_a else pair.image_b)).resolve()
        if study_dir not in path.parents or not path.is_file():
            raise HTTPException(404, "image missing from the study directory")
        return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/vote")
    def vote(body: VoteBody, x_token: Optional[str] = Header(None), session: Session = Depends(db)):
        rater = rater_for(x_token, session)
        if set(body.answers) != set(questions):
            raise HTTPException(422, f"answers must cover exactly the questions {list(questions)}")
        assignment = session.scalar(select(Assignment).where(Assignment.rater_id == rater.id, Assignment.pair_id == body.pair_id))
        if assignment is None:
            raise HTTPException(404, f"unknown pair {body.pair_id} for this invite")
        previous = session.scalar(select(Vote).where(Vote.rater_id == rater.id, Vote.pair_id == body.pair_id).limit(1))
        if previous is not None:
            same = previous.submission_id == body.submission_id
            raise HTTPException(409, "this submission was already recorded" if same else "this pair already has your vote")
        for question, side in body.answers.items():
            choice = "tie" if side == "tie" else ("a" if (side == "left") == assignment.a_on_left else "b")
            session.add(Vote(rater_id=rater.id, pair_id=body.pair_id, question=question, choice=choice, side=side,
                             submission_id=body.submission_id, response_ms=body.response_ms))
        try:
            session.commit()
        except IntegrityError:  # a concurrent duplicate won the race: the database kept exactly one
            session.rollback()
            raise HTTPException(409, "this pair already has your vote")
        return {"recorded": len(body.answers), "done": progress(session, rater), "total": rater.quota}

    @app.get("/admin/{token}", response_class=HTMLResponse)
    def admin_page(token: str, session: Session = Depends(db)):
        require_admin(token, session)
        stats = admin_stats(session)
        rows = "".join(admin_row(r) for r in stats["raters"])
        return HTMLResponse(
            f"<!doctype html><html><head><meta charset='utf-8'><title>Study admin</title>"
            f"<style>body{{font-family:system-ui,sans-serif;margin:2rem}}td,th{{padding:.2rem .8rem;border-bottom:1px solid #ddd}}</style></head>"
            f"<body><h1>Study progress</h1><p id='summary'>{stats['pairs_rated']} of {stats['pairs_assigned']} assigned pairs rated "
            f"({stats['votes']} votes) by {stats['active_raters']} of {len(stats['raters'])} raters.</p>"
            f"<p><a href='/api/admin/votes.csv?token={html.escape(token)}'>votes.csv</a> · "
            f"<a href='/api/admin/votes.jsonl?token={html.escape(token)}'>votes.jsonl</a></p>"
            f"<table><tr><th>rater</th><th>progress</th><th>golden votes</th><th>golden accuracy</th><th>median s / pair</th><th></th></tr>"
            f"{rows}</table></body></html>")

    @app.get("/api/admin/stats")
    def stats(token: Optional[str] = None, x_token: Optional[str] = Header(None), session: Session = Depends(db)):
        require_admin(x_token or token, session)
        return admin_stats(session)

    @app.get("/api/admin/votes.{fmt}")
    def export(fmt: Literal["csv", "jsonl"], token: Optional[str] = None, x_token: Optional[str] = Header(None),
               session: Session = Depends(db)):
        require_admin(x_token or token, session)
        frame = votes_frame(session)
        buffer = io.StringIO()
        if fmt == "csv":
            frame.to_csv(buffer, index=False)
            return Response(buffer.getvalue(), media_type="text/csv")
        frame.to_json(buffer, orient="records", lines=True, force_ascii=False)
        return Response(buffer.getvalue(), media_type="application/x-ndjson")

    return app


def admin_row(rater: dict) -> str:
    accuracy = "" if rater["golden_accuracy"] is None else f"{100 * rater['golden_accuracy']:.0f}%"
    seconds = "" if rater["median_response_s"] is None else f"{rater['median_response_s']:.1f}"
    cells = [html.escape(rater["name"]), f"{rater['pairs_rated']} / {rater['quota']}", str(rater["golden_votes"]), accuracy,
             seconds, "withdrawn" if rater["revoked"] else ""]
    return "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def admin_stats(session: Session) -> dict:
    frame = votes_frame(session)
    raters = session.scalars(select(Rater).order_by(Rater.id)).all()
    accuracy = rater_accuracy(frame) if len(frame) else None
    out = []
    for rater in raters:
        mine = frame[frame["rater"] == rater.name]
        golden_votes = int(accuracy.loc[rater.name, "golden_votes"]) if accuracy is not None and rater.name in accuracy.index else 0
        golden_accuracy = (float(accuracy.loc[rater.name, "golden_accuracy"])
                           if golden_votes and accuracy is not None else None)
        per_pair = mine.drop_duplicates("pair_id")["response_ms"].dropna()
        out.append({"name": rater.name, "quota": rater.quota, "pairs_rated": int(mine["pair_id"].nunique()),
                    "votes": int(len(mine)), "golden_votes": golden_votes, "golden_accuracy": golden_accuracy,
                    "median_response_s": float(per_pair.median()) / 1000 if len(per_pair) else None, "revoked": rater.revoked})
    return {"votes": int(len(frame)), "pairs_rated": sum(r["pairs_rated"] for r in out),
            "pairs_assigned": sum(r["quota"] for r in out), "active_raters": sum(1 for r in out if r["votes"]),
            "raters": out, "generated_at": dt.datetime.now(dt.timezone.utc).isoformat()}


def listening_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A bound socket for uvicorn with TCP_NODELAY: without it, keep-alive responses on loopback wait for
    delayed ACKs (measured: ~45 ms per request instead of ~2 ms)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


class ServerThread:
    """A uvicorn server for `app` on 127.0.0.1 (a free port), in a daemon thread."""

    def __init__(self, app, workers_limit: int = 64):
        import uvicorn

        self.socket = listening_socket("127.0.0.1", 0)
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", limit_concurrency=workers_limit, timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError("uvicorn did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


def serve(study_dir: Path, db_url: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """`addpipe eval serve`: run the rating server until interrupted."""
    import uvicorn

    sock = listening_socket(host, port)
    print(f"rating server on http://{host}:{sock.getsockname()[1]} (invite links: {Path(study_dir) / 'invites.csv'})", flush=True)
    uvicorn.Server(uvicorn.Config(create_app(study_dir, db_url), log_level="info")).run(sockets=[sock])
