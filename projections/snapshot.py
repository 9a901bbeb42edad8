"""One customer's projections as they stood at a past moment (`ledger history --state`).

The projections file holds the present. An auditor asks what it said, or would have
said, at a moment past: this runs the projector itself (the live tables' definitions,
nothing restated) over the customer's own events that had happened, or had been recorded,
by then, into a DuckDB database in memory, with the as-of clock at that moment. Only what
concerns one customer alone comes out so: the ABC class ranks every customer's spend, and
is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson

from domain.ledger import Fact
from projections.projector import Projector
from projections.schema import connect, one, stored_clock

CUSTOMER_TABLES = {
    "profile": "SELECT * EXCLUDE (abc_class) FROM customer_profiles",
    "loyalty_stages": "SELECT * FROM loyalty_stage_history ORDER BY entered_at",
    "complaints": "SELECT * FROM complaint_sla ORDER BY filed_at, complaint_id",
    "response_waits": "SELECT * FROM response_waits ORDER BY started_at",
    "derived_events": """
        SELECT * FROM derived_events ORDER BY occurred_at, event_id""",
}
"""What `customer_state` returns, by name: each a list of rows (column → value)."""


def customer_state(facts: Sequence[tuple[int, Fact]], as_of: datetime | None) -> dict[str, Any]:
    """The projections of one customer's `facts` ((order of recording, fact) pairs) with
    the clock at `as_of` (None: the latest business time among them): `as_of` (the clock
    used) and the rows of each of `CUSTOMER_TABLES`."""
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
        projector = Projector(con)
        result = projector.apply([(order, orjson.dumps(fact)) for order, fact in facts], {}, as_of)
        state: dict[str, Any] = {"as_of": result.as_of}
        for name, sql in CUSTOMER_TABLES.items():
            cursor = con.execute(sql)
            columns = [column[0] for column in cursor.description or ()]
            state[name] = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
        for derived in state["derived_events"]:
            derived["data"] = orjson.loads(derived["data"])  # an object, as published
        return state
    finally:
        con.close()


def live_clock(projections: Path, known_by: datetime | None = None) -> datetime | None:
    """The clock of the live projections (None without a file): now, or, `known_by` a
    moment, what it was then as the events recorded by then set it (the latest business
    time among them; a clock moved by `project --as-of` is not remembered)."""
    if not projections.exists():
        return None
    con = connect(projections, read_only=True)
    try:
        if known_by is None:
            return stored_clock(con)
        row = one(con, "SELECT max(occurred_at) FROM events WHERE recorded_at <= ?", [known_by])
        return row[0] if row else None
    except duckdb.CatalogException:  # not projected yet
        return None
    finally:
        con.close()
