"""The study database, through SQLAlchemy: SQLite by default (a file in the study directory), PostgreSQL by URL.

Tables: pairs (what can be compared, golden ones with their known answers), raters (invite tokens and
quotas), assignments (which pairs a rater sees, in which order, which arm on the left) and votes.
A vote is unique per (rater, pair, question): a retried or replayed submission can never be counted
twice, whatever the server's concurrency, because the database refuses the second row.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Optional

from sqlalchemy import (Boolean, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

QUESTIONS = ("adherence", "quality")
# The largest id any table holds: PostgreSQL's INTEGER (SQLite's is 64-bit); ids outside it are refused up front.
MAX_ID = 2**31 - 1
QUESTION_TEXT = {
    "adherence": "Which image follows the prompt better?",
    "quality": "Which image looks better (quality, realism, no artefacts)?",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Setting(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Pair(Base):
    __tablename__ = "pairs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    category: Mapped[str] = mapped_column(String(200), default="")
    arm_a: Mapped[str] = mapped_column(String(200))
    arm_b: Mapped[str] = mapped_column(String(200))
    image_a: Mapped[str] = mapped_column(Text)          # path relative to the study directory
    image_b: Mapped[str] = mapped_column(Text)
    golden: Mapped[bool] = mapped_column(Boolean, default=False)
    expected_adherence: Mapped[Optional[str]] = mapped_column(String(3), nullable=True)  # 'a' or 'b' on golden pairs
    expected_quality: Mapped[Optional[str]] = mapped_column(String(3), nullable=True)


class Rater(Base):
    __tablename__ = "raters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    token: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    quota: Mapped[int] = mapped_column(Integer)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("rater_id", "pair_id", name="one_assignment_per_pair"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id"), index=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id"))
    position: Mapped[int] = mapped_column(Integer)
    a_on_left: Mapped[bool] = mapped_column(Boolean)
    shown_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)


class Vote(Base):
    __tablename__ = "votes"
    __table_args__ = (UniqueConstraint("rater_id", "pair_id", "question", name="one_vote_per_question"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id"), index=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id"), index=True)
    question: Mapped[str] = mapped_column(String(32))
    choice: Mapped[str] = mapped_column(String(3))       # in arm terms: 'a', 'b' or 'tie'
    side: Mapped[str] = mapped_column(String(5))         # what the rater clicked: 'left', 'right' or 'tie'
    submission_id: Mapped[str] = mapped_column(String(64), index=True)
    response_ms: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


def default_url(study_dir: Path) -> str:
    return f"sqlite:///{Path(study_dir).resolve() / 'votes.db'}"


def connect(url: str, pool_size: int = 8) -> Engine:
    """An engine for `url`, tables created if missing, with `pool_size` connections (the rating server sizes it to
    its worker threads). SQLite gets WAL and a busy timeout so concurrent voters wait for the write lock instead
    of failing."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=pool_size, max_overflow=4)

        @event.listens_for(engine, "connect")
        def _pragmas(connection, _record) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
    else:
        engine = create_engine(url, pool_size=pool_size, max_overflow=4, pool_pre_ping=False)
    Base.metadata.create_all(engine)
    return engine


def session_factory(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
