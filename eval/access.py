"""Who may see and vote what, kept in memory so the rating server's hot paths spend little time in the database.

- An invite's id and quota never change once created: cached for the server's lifetime (a token invited
  while the server runs is found on its first request).
- Withdrawn invites are re-read as one small query at most once per `refresh_s` (default 1 s): a withdrawal
  takes effect within that time on every route.
- Image grants: when `/api/next` shows a rater a pair, it records which file is on each side for that
  token, so the two image requests that follow need no database at all. A grant that is missing (a server
  restarted between showing a pair and loading its images) is looked up once and recorded.
- SQLite lets one writer in at a time and makes the others sleep and retry (its busy handler backs off to
  tens of milliseconds per try), which is what made rounds take seconds under load; writers queue on a lock
  instead and go in one after another without sleeping: a thread lock within the process, and a POSIX
  record lock on `<database>.write-lock` between the processes of `eval serve --workers N`. PostgreSQL
  locks rows itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from sqlalchemy import Connection, Engine

from addpipe.eval import rounds
from addpipe.eval.guards import clean_text


class AccessDenied(Exception):
    """An invite that is unknown (401) or withdrawn (403), or a pair not in its queue (404); `status` says which."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Invite:
    id: int
    token: str
    quota: int


class Access:
    def __init__(self, engine: Engine, study_dir: Path, refresh_s: float = 1.0):
        self.engine = engine
        self.study_dir = Path(study_dir).resolve()
        self.refresh_s = refresh_s
        self._invites: dict[str, Invite] = {}
        self._grants: dict[tuple[str, int], tuple[Optional[Path], Optional[Path]]] = {}
        self._revoked: frozenset[str] = frozenset()
        self._revoked_at = float("-inf")
        self._lock = threading.Lock()
        self._sqlite_writer = threading.Lock() if engine.dialect.name == "sqlite" else None
        database = engine.url.database if self._sqlite_writer is not None else None
        self._writer_file = (os.open(f"{database}.write-lock", os.O_RDWR | os.O_CREAT, 0o644)
                             if database and database != ":memory:" else None)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold around a write transaction (its statements and commit)."""
        if self._sqlite_writer is None:
            yield
            return
        with self._sqlite_writer:
            if self._writer_file is not None:
                fcntl.lockf(self._writer_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if self._writer_file is not None:
                    fcntl.lockf(self._writer_file, fcntl.LOCK_UN)

    def _revoked_tokens(self, connection: Connection) -> frozenset[str]:
        now = time.monotonic()
        if now - self._revoked_at >= self.refresh_s:
            tokens = frozenset(connection.execute(rounds.WITHDRAWN).scalars().all())
            with self._lock:
                self._revoked, self._revoked_at = tokens, now
        return self._revoked

    def invite(self, token: Optional[str], connection: Connection) -> Invite:
        """The invite behind `token`, or AccessDenied (401 unknown, 403 withdrawn)."""
        # Tokens are ours (secrets.token_urlsafe) and at most 64 characters: text that cannot be one never reaches the
        # database, where PostgreSQL would refuse a NUL with an error instead of finding nothing.
        if not token or len(token) > 64 or not clean_text(token):
            raise AccessDenied(401, "unknown invite token")
        found = self._invites.get(token)
        if found is None:
            row = connection.execute(rounds.INVITE, {"token": token}).first()
            if row is None:
                raise AccessDenied(401, "unknown invite token")
            found = Invite(row.id, token, row.quota)
            with self._lock:
                self._invites[token] = found
        if token in self._revoked_tokens(connection):
            raise AccessDenied(403, "this invite has been withdrawn")
        return found

    def grant(self, token: str, pair_id: int, a_on_left: bool, image_a: str, image_b: str) -> None:
        """Let `token` load this pair's images; the paths are resolved once, here (None: outside the study)."""
        a, b = self._inside(image_a), self._inside(image_b)
        with self._lock:
            self._grants[(token, pair_id)] = (a, b) if a_on_left else (b, a)

    def _inside(self, relative: str) -> Optional[Path]:
        path = (self.study_dir / relative).resolve()
        return path if self.study_dir in path.parents else None

    def image(self, token: Optional[str], pair_id: int, side: str) -> Optional[Path]:
        """The file of the image on `side` (None: its recorded path lies outside the study). Raises AccessDenied for a
        bad invite or a pair outside its queue. Uses the database only on a cold grant or a due revocation refresh."""
        granted = self._grants.get((token or "", pair_id))
        if granted is None or time.monotonic() - self._revoked_at >= self.refresh_s or token not in self._invites:
            with self.engine.connect() as connection:
                invite = self.invite(token, connection)
                if granted is None:
                    row = rounds.assignment(connection, invite.id, pair_id)
                    if row is None:
                        raise AccessDenied(404, f"unknown pair {pair_id}")
                    self.grant(invite.token, pair_id, row.a_on_left, row.image_a, row.image_b)
                    granted = self._grants[(invite.token, pair_id)]
        elif token in self._revoked:
            raise AccessDenied(403, "this invite has been withdrawn")
        return granted[0] if side == "left" else granted[1]
