"""The database work of one rating round (show the next pair, record a vote), as statements built once.

Building a SQLAlchemy statement per request cost more CPU than running it (coercions, bind parameters and
cache keys, measured with yappi under load); these are built at import with named parameters, so a
request only binds values, and they run on a plain Connection rather than an ORM Session.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from sqlalchemy import Connection, bindparam, func, insert, select, update
from sqlalchemy.engine import Row

from addpipe.eval.db import Assignment, Pair, Rater, Vote

INVITE = select(Rater.id, Rater.quota).where(Rater.token == bindparam("token"))
WITHDRAWN = select(Rater.token).where(Rater.revoked.is_(True))
PROGRESS = select(func.count(func.distinct(Vote.pair_id))).where(Vote.rater_id == bindparam("rater"))
_VOTED = select(Vote.id).where(Vote.rater_id == bindparam("rater"), Vote.pair_id == Assignment.pair_id)
NEXT = (select(Assignment.id, Assignment.pair_id, Assignment.a_on_left, Assignment.shown_at, Pair.prompt, Pair.image_a,
               Pair.image_b)
        .join(Pair, Pair.id == Assignment.pair_id)
        .where(Assignment.rater_id == bindparam("rater"), ~_VOTED.exists())
        .order_by(Assignment.position).limit(1))
SHOW = (update(Assignment).where(Assignment.id == bindparam("assignment"), Assignment.shown_at.is_(None))
        .values(shown_at=bindparam("now")))
_PREVIOUS = (select(Vote.submission_id).where(Vote.rater_id == bindparam("rater"), Vote.pair_id == bindparam("pair"))
             .limit(1).scalar_subquery())
ASSIGNMENT = (select(Assignment.a_on_left, Assignment.shown_at, Pair.image_a, Pair.image_b, _PREVIOUS.label("previous"))
              .join(Pair, Pair.id == Assignment.pair_id)
              .where(Assignment.rater_id == bindparam("rater"), Assignment.pair_id == bindparam("pair")))
INSERT_VOTE = insert(Vote)


def progress(connection: Connection, rater_id: int) -> int:
    """Pairs this rater has voted on."""
    return connection.execute(PROGRESS, {"rater": rater_id}).scalar() or 0


def next_assignment(connection: Connection, rater_id: int) -> Optional[Row]:
    """The first pair of the rater's queue without a vote (id, pair_id, a_on_left, shown_at, prompt, images)."""
    return connection.execute(NEXT, {"rater": rater_id}).first()


def mark_shown(connection: Connection, assignment_id: int, now: dt.datetime) -> None:
    connection.execute(SHOW, {"assignment": assignment_id, "now": now})


def assignment(connection: Connection, rater_id: int, pair_id: int) -> Optional[Row]:
    """(a_on_left, shown_at, image_a, image_b, previous) of this rater's pair, `previous` being the submission id of
    the vote already recorded for it (or None); None when the pair is not in their queue."""
    return connection.execute(ASSIGNMENT, {"rater": rater_id, "pair": pair_id}).first()


def vote_rows(rater_id: int, pair_id: int, answers: dict[str, str], a_on_left: bool, submission_id: str,
              response_ms: Optional[int], now: dt.datetime) -> list[dict[str, Any]]:
    """One row per question; `choice` names the arm ('a', 'b' or 'tie'), `side` what the rater clicked."""
    return [{"rater_id": rater_id, "pair_id": pair_id, "question": question, "side": side,
             "choice": "tie" if side == "tie" else ("a" if (side == "left") == a_on_left else "b"),
             "submission_id": submission_id, "response_ms": response_ms, "created_at": now}
            for question, side in answers.items()]


def insert_votes(connection: Connection, rows: list[dict[str, Any]]) -> None:
    connection.execute(INSERT_VOTE, rows)
