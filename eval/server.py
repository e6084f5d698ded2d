"""The rating server: a FastAPI app over the study database.

Raters open `/rate/<token>`; the page asks `/api/next` for their next pair and posts `/api/vote`.
Images are served by pair and side, never by arm, so nothing in the page or its URLs names a model.
Every request that cannot be honoured is a 4xx with a `detail` message and leaves the database as it was.

Concurrency (sized so that 200 raters at once never wait on the pool):
- Every handler is a plain function run in AnyIO's worker threads, `threads` of them at most, and opens its
  database session inside its body, so a connection is held only while the handler runs: at most `threads`
  connections are ever checked out, and the pool has that many plus a margin.
- An image request uses no connection at all once /api/next has shown the pair (eval/access.py keeps the grant),
  and one indexed lookup otherwise; the file is sent afterwards by the event loop, with no session open.
- SQLite writers queue on a lock in the process instead of sleeping in SQLite's busy handler.
- Request bodies are counted as they arrive and refused past the limit without reading the rest.

Exposure (eval/guards.py): a NUL or non-UTF-8 byte anywhere in a request's path, query or headers is a 400 before
any route or the database sees it; a request must arrive whole within `header_timeout` seconds of its first byte
(slow-header clients are cut off with a 408), and past `max_connections` open connections new requests get a 503.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import parse_qs

from fastapi import FastAPI, Header, HTTPException, Path as PathParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from addpipe.eval import rounds
from addpipe.eval.access import Access, AccessDenied
from addpipe.eval.admin import admin_stats, page_arguments, render_page
from addpipe.eval.db import MAX_ID, QUESTION_TEXT, QUESTIONS, Setting, connect, session_factory, utcnow
from addpipe.eval.guards import DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_CONNECTIONS, HeaderDeadlineProtocol, TextGuard
from addpipe.eval.votes import votes_frame

MAX_BODY_BYTES = 4096
DEFAULT_THREADS = 8
PAGE = (Path(__file__).parent / "static" / "rate.html").read_text()
ID = PathParam(ge=1, le=MAX_ID)
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


class VoteBody(BaseModel):
    # strict: JSON true is not pair 1, "7" is not 7
    model_config = ConfigDict(extra="forbid", strict=True)
    pair_id: int = Field(ge=1, le=MAX_ID)
    submission_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    answers: dict[Literal["adherence", "quality"], Literal["left", "right", "tie"]]
    response_ms: Optional[int] = Field(default=None, ge=0, le=24 * 3600 * 1000)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 as soon as the limit is passed, by the
    declared Content-Length or by what arrives (chunked bodies too), without reading the rest into memory."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(send)
        received: list[dict] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                received.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._refuse(send)
            received.append(message)
            if not message.get("more_body", False):
                break

        async def replay():
            return received.pop(0) if received else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = f'{{"detail": "request body larger than {self.limit} bytes"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class ImageFastPath:
    """ASGI middleware answering the image route itself, `GET /api/image/<pair>/<left|right>?token=...`: half of a
    rating round's requests, and ones that, once /api/next has shown the pair, need no database. Through FastAPI's
    routing, dependency solving and exception layers each cost several times the lookup and the read (measured
    per round with benchmarks/vote_server.py). A request it cannot parse falls through to the app's own route,
    which answers it with the usual 422."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        parsed = self._parse(scope) if scope["type"] == "http" and scope["method"] == "GET" else None
        if parsed is None:
            return await self.app(scope, receive, send)
        import anyio.to_thread

        response = await anyio.to_thread.run_sync(image_response, self.access, *parsed)
        await response(scope, receive, send)

    @staticmethod
    def _parse(scope) -> Optional[tuple[Optional[str], int, str]]:
        parts = scope["path"].split("/")
        if len(parts) != 5 or parts[1:3] != ["api", "image"] or parts[4] not in ("left", "right"):
            return None
        if not parts[3].isdigit() or not 1 <= int(parts[3]) <= MAX_ID:
            return None
        tokens = parse_qs(scope["query_string"].decode("latin-1")).get("token")
        return (tokens[0] if tokens else None), int(parts[3]), parts[4]



def image_response(access: Access, token: Optional[str], pair_id: int, side: str) -> Response:
    """The image a rater sees on `side` of a pair, or the 4xx that says why not. Read in the caller's worker
    thread: study images are small, and FileResponse would hop to a worker thread again for each of stat, open,
    read and close."""
    try:
        path = access.image(token, pair_id, side)
    except AccessDenied as denied:
        return JSONResponse({"detail": str(denied)}, status_code=denied.status)
    try:
        if path is None:  # its recorded path leads outside the study
            raise FileNotFoundError
        content = path.read_bytes()
    except OSError:
        return JSONResponse({"detail": "image missing from the study directory"}, status_code=404)
    return Response(content, media_type=IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream"),
                    headers={"Cache-Control": "private, max-age=3600"})


def invite_page(status: int, title: str, message: str) -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Image comparison</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem;color:#222}</style>"
        f"</head><body><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p></body></html>", status_code=status)


def create_app(study_dir: Path, db_url: str, questions: tuple[str, ...] = QUESTIONS, threads: int = DEFAULT_THREADS) -> FastAPI:
    study_dir = Path(study_dir).resolve()
    # Handlers never hold more than one session each, and at most `threads` run at once.
    engine = connect(db_url, pool_size=threads + 4)
    sessions = session_factory(engine)
    access = Access(engine, study_dir)
    question_list = [{"id": q, "text": QUESTION_TEXT[q]} for q in questions]

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        yield

    app = FastAPI(title="addpipe rating server", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(ImageFastPath, access=access)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(TextGuard)  # outermost: nothing below sees a NUL or undecodable byte

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError):
        # FastAPI's default echoes the input back; a short reason per field is enough and never reflects a large body.
        reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in error.errors())
        return JSONResponse({"detail": reasons or "invalid request"}, status_code=422)

    def require_admin(token: Optional[str], session: Session) -> None:
        setting = session.get(Setting, "admin_token")
        if setting is None or not token or token != setting.value:
            raise HTTPException(401, "unknown admin token")

    def invite_of(token: Optional[str], connection: Connection):
        try:
            return access.invite(token, connection)
        except AccessDenied as denied:
            raise HTTPException(denied.status, str(denied)) from None

    @app.get("/rate/{token}", response_class=HTMLResponse)
    def page(token: str):
        with engine.connect() as connection:
            try:
                access.invite(token, connection)
            except AccessDenied as denied:
                if denied.status == 403:
                    return invite_page(403, "This invite has been withdrawn",
                                       "The study lead has withdrawn this invite link. Thank you for your help so far.")
                return invite_page(401, "This invite link is not valid",
                                   "Check that the whole link was copied; if it was, ask the study lead for a new one.")
        return HTMLResponse(PAGE.replace("__TOKEN__", html.escape(token)))

    @app.get("/api/next")
    def next_pair(x_token: Optional[str] = Header(None)):
        with engine.connect() as connection:
            rater = invite_of(x_token, connection)
            done = rounds.progress(connection, rater.id)
            row = rounds.next_assignment(connection, rater.id)
            if row is None:
                return JSONResponse({"finished": True, "done": done, "total": rater.quota})
            if row.shown_at is None:
                with access.writing():
                    rounds.mark_shown(connection, row.id, utcnow())
                    connection.commit()
        access.grant(rater.token, row.pair_id, row.a_on_left, row.image_a, row.image_b)
        # A JSONResponse is returned as it is; a dict would go through FastAPI's encoder, which costs more here.
        return JSONResponse({"finished": False, "done": done, "total": rater.quota, "pair_id": row.pair_id, "prompt": row.prompt,
                             "left": f"/api/image/{row.pair_id}/left?token={rater.token}",
                             "right": f"/api/image/{row.pair_id}/right?token={rater.token}", "questions": question_list})

    @app.get("/api/image/{pair_id}/{side}")
    def image(side: Literal["left", "right"], pair_id: int = ID, token: Optional[str] = None):
        # ImageFastPath answers every well-formed request before it gets here; this route validates the rest (422).
        return image_response(access, token, pair_id, side)

    @app.post("/api/vote")
    def vote(body: VoteBody, x_token: Optional[str] = Header(None)):
        with engine.connect() as connection:
            rater = invite_of(x_token, connection)
            if set(body.answers) != set(questions):
                raise HTTPException(422, f"answers must cover exactly the questions {list(questions)}")
            assignment = rounds.assignment(connection, rater.id, body.pair_id)
            if assignment is None:
                raise HTTPException(404, f"unknown pair {body.pair_id} for this invite")
            if assignment.previous is not None:
                raise HTTPException(409, "this submission was already recorded" if assignment.previous == body.submission_id
                                    else "this pair already has your vote")
            if assignment.shown_at is None:
                # Only /api/next shows a pair: a vote for one still waiting in the queue was cast without seeing it.
                raise HTTPException(409, f"pair {body.pair_id} has not been shown to you yet")
            rows = rounds.vote_rows(rater.id, body.pair_id, body.answers, assignment.a_on_left, body.submission_id,
                                    body.response_ms, utcnow())
            try:
                with access.writing():
                    rounds.insert_votes(connection, rows)
                    connection.commit()
            except IntegrityError:  # a concurrent duplicate won the race: the database kept exactly one
                connection.rollback()
                raise HTTPException(409, "this pair already has your vote") from None
            return JSONResponse({"recorded": len(rows), "done": rounds.progress(connection, rater.id), "total": rater.quota})

    @app.get("/admin/{token}", response_class=HTMLResponse)
    def admin_page(token: str, sort: Optional[str] = None, order: Optional[str] = None, page: Optional[int] = None,
                   per_page: Optional[int] = None):
        with sessions() as session:
            require_admin(token, session)
            stats = admin_stats(session)
        return HTMLResponse(render_page(stats, token, *page_arguments(sort, order, page, per_page)))

    @app.get("/api/admin/stats")
    def stats(token: Optional[str] = None, x_token: Optional[str] = Header(None)):
        with sessions() as session:
            require_admin(x_token or token, session)
            return admin_stats(session)

    @app.get("/api/admin/votes.{fmt}")
    def export(fmt: Literal["csv", "jsonl"], token: Optional[str] = None, x_token: Optional[str] = Header(None)):
        with sessions() as session:
            require_admin(x_token or token, session)
            frame = votes_frame(session)
        buffer = io.StringIO()
        if fmt == "csv":
            frame.to_csv(buffer, index=False)
            return Response(buffer.getvalue(), media_type="text/csv")
        frame.to_json(buffer, orient="records", lines=True, force_ascii=False)
        return Response(buffer.getvalue(), media_type="application/x-ndjson")

    return app


def listening_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A bound socket for uvicorn with TCP_NODELAY: without it, keep-alive responses on loopback wait for
    delayed ACKs (measured: ~45 ms per request instead of ~2 ms)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def server_options(header_timeout: float = DEFAULT_HEADER_TIMEOUT, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> dict:
    """uvicorn settings for an internet-facing rating server: keep-alive for raters' next vote, a deadline on each
    request's arrival, a cap on open connections."""
    return dict(timeout_keep_alive=30, http=HeaderDeadlineProtocol.with_timeout(header_timeout),
                limit_concurrency=max_connections)


class ServerThread:
    """A uvicorn server for `app` on 127.0.0.1 (a free port), in a daemon thread."""

    def __init__(self, app, header_timeout: float = DEFAULT_HEADER_TIMEOUT, max_connections: int = DEFAULT_MAX_CONNECTIONS):
        import uvicorn

        self.socket = listening_socket("127.0.0.1", 0)
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", **server_options(header_timeout, max_connections))
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


SETTINGS_ENV = "ADDPIPE_SERVE_SETTINGS"


def app_from_environment() -> FastAPI:
    """The app of one `eval serve --workers N` process (uvicorn imports it by name in each worker)."""
    settings = json.loads(os.environ[SETTINGS_ENV])
    # uvicorn builds each worker's protocol from the class it was given (pickled by name): its deadline is set here
    HeaderDeadlineProtocol.header_timeout = settings["header_timeout"]
    return create_app(Path(settings["study"]), settings["db"], threads=settings["threads"])


def serve(study_dir: Path, db_url: str, host: str = "127.0.0.1", port: int = 8000, threads: int = DEFAULT_THREADS,
          access_log: bool = True, workers: int = 1, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
          max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
    """`addpipe eval serve`: run the rating server until interrupted. With workers > 1, uvicorn runs that many
    processes on the one port (Python runs one thread at a time per process: more processes use more cores);
    `max_connections` is then per process."""
    import uvicorn

    options = dict(log_level="info", access_log=access_log, **server_options(header_timeout, max_connections))
    if workers <= 1:
        sock = listening_socket(host, port)
        print(f"rating server on http://{host}:{sock.getsockname()[1]} (invite links: {Path(study_dir) / 'invites.csv'})", flush=True)
        uvicorn.Server(uvicorn.Config(create_app(study_dir, db_url, threads=threads), **options)).run(sockets=[sock])
        return
    os.environ[SETTINGS_ENV] = json.dumps({"study": str(Path(study_dir).resolve()), "db": db_url, "threads": threads,
                                           "header_timeout": header_timeout})
    options["http"] = HeaderDeadlineProtocol  # by name into the workers; app_from_environment sets its deadline
    print(f"rating server on http://{host}:{port} with {workers} processes (invite links: {Path(study_dir) / 'invites.csv'})",
          flush=True)
    uvicorn.run("addpipe.eval.server:app_from_environment", factory=True, host=host, port=port, workers=workers, **options)
