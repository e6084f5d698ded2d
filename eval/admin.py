"""The study admin page and its statistics: progress per rater, the golden-pair screen, exports.

The screen is the one `addpipe eval elo` applies (ratings.reliable_raters): a rater with at least
`min_golden` golden votes and an accuracy below `min_accuracy` fails it and is dropped from the analysis;
one with fewer golden votes is not screened yet. The page shows who fails, so a study lead can withdraw
an invite before that rater spends more of the budget.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from typing import Any, Optional
from urllib.parse import urlencode

from sqlalchemy import select
from sqlalchemy.orm import Session

from addpipe.eval.db import Rater
from addpipe.eval.ratings import rater_accuracy
from addpipe.eval.votes import votes_frame

# column key -> (heading, what it means), in table order
COLUMNS = {
    "name": ("rater", "the name given at invitation"),
    "pairs_rated": ("progress", "pairs voted on / pairs in the rater's queue (regular and golden)"),
    "golden_votes": ("golden votes", "answers on golden pairs, whose right answer is known in advance"),
    "golden_accuracy": ("golden accuracy", "share of golden answers that were right; the screen drops raters below the "
                                           "threshold once they have enough golden votes"),
    "median_response_s": ("median s / pair", "median seconds from showing a pair to the vote: very short times suggest "
                                             "clicking without looking"),
    "status": ("status", "fails screen, not screened yet (too few golden votes), passes, or withdrawn"),
}
PAGE_SIZES = (25, 50, 100, 500)


def screen_status(rater: dict[str, Any], min_accuracy: float, min_golden: int) -> str:
    if rater["revoked"]:
        return "withdrawn"
    if rater["golden_votes"] < max(1, min_golden):
        return "not screened yet"
    return "passes" if (rater["golden_accuracy"] or 0.0) >= min_accuracy else "fails screen"


def admin_stats(session: Session, min_accuracy: float = 0.7, min_golden: int = 2) -> dict:
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
        entry = {"name": rater.name, "quota": rater.quota, "pairs_rated": int(mine["pair_id"].nunique()),
                 "votes": int(len(mine)), "golden_votes": golden_votes, "golden_accuracy": golden_accuracy,
                 "median_response_s": float(per_pair.median()) / 1000 if len(per_pair) else None, "revoked": rater.revoked}
        entry["status"] = screen_status(entry, min_accuracy, min_golden)
        out.append(entry)
    return {"votes": int(len(frame)), "pairs_rated": sum(r["pairs_rated"] for r in out),
            "pairs_assigned": sum(r["quota"] for r in out), "active_raters": sum(1 for r in out if r["votes"]),
            "failing_raters": sum(1 for r in out if r["status"] == "fails screen"),
            "screen": {"min_golden_accuracy": min_accuracy, "min_golden_votes": min_golden},
            "raters": out, "generated_at": dt.datetime.now(dt.timezone.utc).isoformat()}


def _sort_key(column: str):
    def key(rater: dict[str, Any]):
        value = rater[column]
        if column == "pairs_rated":
            value = rater["pairs_rated"] / max(1, rater["quota"])
        # Missing values (no golden votes yet, no timing) sort after every real one in either direction.
        return (value is None, value if value is not None else 0)
    return key


def _cell(rater: dict[str, Any], column: str) -> str:
    value = rater[column]
    if column == "pairs_rated":
        return f"{rater['pairs_rated']} / {rater['quota']}"
    if column == "golden_accuracy":
        return "" if value is None else f"{100 * value:.0f}%"
    if column == "median_response_s":
        return "" if value is None else f"{value:.1f}"
    return html.escape(str(value))


def render_page(stats: dict, token: str, sort: str, order: str, page: int, per_page: int) -> str:
    raters = sorted(stats["raters"], key=_sort_key(sort), reverse=order == "desc")
    if order == "desc":  # keep missing values last when descending, too
        raters = [r for r in raters if r[sort] is not None] + [r for r in raters if r[sort] is None]
    pages = max(1, math.ceil(len(raters) / per_page))
    page = min(max(1, page), pages)
    shown = raters[(page - 1) * per_page: page * per_page]

    def link(**changes) -> str:
        query = {"sort": sort, "order": order, "page": page, "per_page": per_page, **changes}
        return f"/admin/{html.escape(token)}?{html.escape(urlencode(query))}"

    headings = []
    for column, (title, meaning) in COLUMNS.items():
        flip = "asc" if column == sort and order == "desc" else ("desc" if column == sort else "asc")
        arrow = (" ▲" if order == "asc" else " ▼") if column == sort else ""
        headings.append(f"<th title='{html.escape(meaning)}'><a href='{link(sort=column, order=flip, page=1)}'>"
                        f"{html.escape(title)}{arrow}</a></th>")
    rows = []
    for rater in shown:
        css = {"fails screen": "fails", "withdrawn": "withdrawn"}.get(rater["status"], "")
        cells = "".join(f"<td>{_cell(rater, column)}</td>" for column in COLUMNS)
        rows.append(f"<tr class='{css}'>{cells}</tr>")
    nav = " ".join(f"<a href='{link(page=p)}'>{p}</a>" if p != page else f"<b>{p}</b>" for p in range(1, pages + 1))
    sizes = " ".join(f"<a href='{link(per_page=n, page=1)}'>{n}</a>" if n != per_page else f"<b>{n}</b>" for n in PAGE_SIZES)
    legend = "".join(f"<dt>{html.escape(title)}</dt><dd>{html.escape(meaning)}</dd>" for title, meaning in COLUMNS.values())
    screen = stats["screen"]
    failing = stats["failing_raters"]
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Study admin</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2rem;color:#222}td,th{padding:.2rem .8rem;border-bottom:1px solid #ddd;text-align:left}"
        "th a{color:inherit}tr.fails td{background:#fde2e2}tr.withdrawn td{color:#999}.warn{color:#b00;font-weight:600}"
        "dt{font-weight:600;margin-top:.4rem}dd{margin-left:1rem;color:#555}nav{margin:.6rem 0}</style></head><body>"
        f"<h1>Study progress</h1><p id='summary'>{stats['pairs_rated']} of {stats['pairs_assigned']} assigned pairs rated "
        f"({stats['votes']} votes) by {stats['active_raters']} of {len(stats['raters'])} raters.</p>"
        + (f"<p class='warn' id='failing'>{failing} rater(s) fail the golden-pair screen (highlighted): their votes are "
           "left out of the analysis; consider withdrawing their invites.</p>" if failing else "")
        + f"<p>Golden-pair screen: at least {screen['min_golden_votes']} golden votes and at least "
        f"{100 * screen['min_golden_accuracy']:.0f}% of them right (as <code>addpipe eval elo</code> applies it).</p>"
        f"<p><a href='/api/admin/votes.csv?token={html.escape(token)}'>votes.csv</a> · "
        f"<a href='/api/admin/votes.jsonl?token={html.escape(token)}'>votes.jsonl</a></p>"
        f"<nav>page {nav} · per page {sizes}</nav>"
        f"<table id='raters'><tr>{''.join(headings)}</tr>{''.join(rows)}</table>"
        f"<h2>Columns</h2><dl>{legend}</dl><p>Click a heading to sort by it; click again to reverse.</p></body></html>")


def page_arguments(sort: Optional[str], order: Optional[str], page: Optional[int], per_page: Optional[int]) -> tuple[str, str, int, int]:
    """Query arguments of the admin page, falling back to defaults for anything not understood."""
    sort = sort if sort in COLUMNS else "name"
    order = order if order in ("asc", "desc") else "asc"
    per_page = per_page if per_page in PAGE_SIZES else PAGE_SIZES[1]
    return sort, order, max(1, page or 1), per_page
