"""Votes out of the database as one flat table (for ratings, exports and the admin page)."""

from __future__ import annotations

import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from addpipe.eval.db import Pair, Rater, Vote

COLUMNS = ["vote_id", "rater", "pair_id", "prompt_id", "prompt", "category", "arm_a", "arm_b", "golden", "expected",
           "question", "choice", "side", "submission_id", "response_ms", "created_at"]


def votes_frame(session: Session) -> pd.DataFrame:
    rows = session.execute(
        select(Vote, Pair, Rater.name).join(Pair, Vote.pair_id == Pair.id).join(Rater, Vote.rater_id == Rater.id).order_by(Vote.id)
    ).all()
    records = []
    for vote, pair, rater in rows:
        expected = pair.expected_adherence if vote.question == "adherence" else pair.expected_quality
        records.append([vote.id, rater, pair.id, pair.prompt_id, pair.prompt, pair.category, pair.arm_a, pair.arm_b,
                        pair.golden, expected, vote.question, vote.choice, vote.side, vote.submission_id,
                        vote.response_ms, vote.created_at.isoformat()])
    return pd.DataFrame(records, columns=COLUMNS)
