"""The `events` table: a flat, queryable mirror of every recorded event.

A batch arrives as (position, fact JSON) pairs, the exact bytes the ledger stores and
publishes. They are bulk-appended as one Arrow table and parsed by DuckDB itself, so no
per-event Python work happens here. Personal fields (marked `x-personal` in the catalogue)
are removed: analysts get behaviour, not identities. An event id already mirrored is
skipped, so a redelivered event changes nothing.

The events a batch adds are left in the temp table `fresh`, with the data fields the
projections read parsed once into typed columns, and `key`: the event's place in business
time, (occurred_at, position) as one number. Every projection updates from `fresh` alone,
so a batch costs the same however long the history behind it.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb
import orjson
import pyarrow as pa

from domain.events import PERSONAL_FIELDS
from projections.schema import one, run

# A JSON merge patch setting every personal field to null removes it (RFC 7396).
_REMOVE_PERSONAL = orjson.dumps(
    {name: None for names in PERSONAL_FIELDS.values() for name in sorted(names)}
).decode()

_FACT_SHAPE = orjson.dumps(
    {
        "event_id": "UUID",
        "type": "VARCHAR",
        "schema_version": "INTEGER",
        "customer_id": "VARCHAR",
        "occurred_at": "TIMESTAMPTZ",
        "recorded_at": "TIMESTAMPTZ",
        "source": "VARCHAR",
        "actor": "VARCHAR",
        "source_event_id": "VARCHAR",
        "data": "JSON",
    }
).decode()

#: The data fields the projections read (text, as in the JSON; cast where used, so money
#: stays exact). A field an event type lacks is NULL.
TYPED_FIELDS = (
    "order_id", "amount", "reporting_amount", "direction", "purpose", "granted",
    "region", "province", "city", "segment", "kind", "score",
    "complaint_id", "priority", "category", "channel", "root_cause", "compensation",
)  # fmt: skip
_DATA_SHAPE = orjson.dumps(dict.fromkeys(TYPED_FIELDS, "VARCHAR")).decode()

_PERSONAL_TYPES = ", ".join(f"'{t}'" for t in sorted(PERSONAL_FIELDS))

STAGE_BATCH = f"""
CREATE OR REPLACE TEMP TABLE batch AS
SELECT position, f.event_id, f.type, f.schema_version, f.customer_id, f.occurred_at,
       f.recorded_at, f.source, f.actor, f.source_event_id,
       CASE WHEN f.type IN ({_PERSONAL_TYPES or "''"})
            THEN json_merge_patch(f.data, '{_REMOVE_PERSONAL}') ELSE f.data END AS data
FROM (SELECT position, json_transform(fact, '{_FACT_SHAPE}') AS f FROM incoming)
"""

# New events only: the first delivery of each id in the batch, if not mirrored before.
SELECT_FRESH = f"""
CREATE OR REPLACE TEMP TABLE fresh AS
WITH new AS (
    SELECT b.*, event_key(b.occurred_at, b.position) AS key,
           unnest(json_transform(b.data, '{_DATA_SHAPE}'))
    FROM batch AS b
    SEMI JOIN (SELECT min(rowid) AS first FROM batch GROUP BY event_id) ON b.rowid = first
    ANTI JOIN events USING (event_id)
)
SELECT new.*,
       -- a survey score on 0..1 (highest is best), as profiles and the ladder read it
       CAST((CAST(new.score AS INTEGER) - s.lowest) / (s.highest - s.lowest) AS DECIMAL(6, 4))
           AS satisfaction
FROM new LEFT JOIN survey_scales AS s ON new.type = 'SurveyAnswered' AND s.kind = new.kind
"""

APPEND_FRESH = """
INSERT INTO events
SELECT position, event_id, type, schema_version, customer_id, occurred_at, recorded_at,
       source, actor, source_event_id, data
FROM fresh
"""

_INCOMING_SCHEMA = pa.schema([("position", pa.int64()), ("fact", pa.string())])


def append(con: duckdb.DuckDBPyConnection, batch: Sequence[tuple[int, bytes]]) -> int:
    """Mirror (position, fact JSON) pairs; leaves the new ones in temp table `fresh` and
    their customers in `touched`; returns how many were new."""
    incoming = pa.table(
        [
            pa.array([position for position, _ in batch], pa.int64()),
            # bytes straight into Arrow, then viewed as UTF-8: no Python str per event
            pa.array([document for _, document in batch], pa.binary()).cast(pa.string()),
        ],
        schema=_INCOMING_SCHEMA,
    )
    con.register("incoming", incoming)
    try:
        run(con, STAGE_BATCH)
    finally:
        con.unregister("incoming")
    run(con, SELECT_FRESH)
    run(con, APPEND_FRESH)
    run(con, "CREATE OR REPLACE TEMP TABLE touched AS SELECT DISTINCT customer_id FROM fresh")
    row = one(con, "SELECT count(*) FROM fresh")
    return int(row[0]) if row else 0
