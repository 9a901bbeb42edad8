"""The `events` table: a flat, queryable mirror of every recorded event.

A batch arrives as (position, fact JSON) pairs, the exact bytes the ledger stores and
publishes. They are bulk-appended as one Arrow table and parsed by DuckDB itself, so no
per-event Python work happens here. Personal fields (marked `x-personal` in the catalogue)
are removed: analysts get behaviour, not identities. An event id already mirrored is
skipped, so a redelivered event changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb
import orjson
import pyarrow as pa

from domain.events import EVENT_MODELS
from projections.schema import one, run

#: Personal data fields per event type, read from the catalogue's `x-personal` marks.
PERSONAL_FIELDS: dict[str, frozenset[str]] = {}
for _model in EVENT_MODELS:
    _data_model = _model.model_fields["data"].annotation
    _marked = frozenset(
        name
        for name, info in getattr(_data_model, "model_fields", {}).items()
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("x-personal")
    )
    if _marked:
        PERSONAL_FIELDS[_model.__name__] = _marked

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

_PERSONAL_TYPES = ", ".join(f"'{t}'" for t in sorted(PERSONAL_FIELDS))

STAGE_BATCH = f"""
CREATE OR REPLACE TEMP TABLE batch AS
SELECT position, f.event_id, f.type, f.schema_version, f.customer_id, f.occurred_at,
       f.recorded_at, f.source, f.actor, f.source_event_id,
       CASE WHEN f.type IN ({_PERSONAL_TYPES or "''"})
            THEN json_merge_patch(f.data, '{_REMOVE_PERSONAL}') ELSE f.data END AS data
FROM (SELECT position, json_transform(fact, '{_FACT_SHAPE}') AS f FROM incoming)
"""

APPEND_NEW = """
INSERT INTO events
SELECT * FROM (SELECT DISTINCT ON (event_id) * FROM batch ORDER BY event_id, position)
WHERE event_id NOT IN (SELECT event_id FROM events)
"""

_INCOMING_SCHEMA = pa.schema([("position", pa.int64()), ("fact", pa.string())])


def append(con: duckdb.DuckDBPyConnection, batch: Sequence[tuple[int, bytes]]) -> int:
    """Mirror (position, fact JSON) pairs; leaves them in temp table `batch`; returns how
    many were new."""
    incoming = pa.table(
        [
            pa.array([position for position, _ in batch], pa.int64()),
            pa.array([document.decode() for _, document in batch], pa.string()),
        ],
        schema=_INCOMING_SCHEMA,
    )
    con.register("incoming", incoming)
    try:
        run(con, STAGE_BATCH)
    finally:
        con.unregister("incoming")
    before = _count(con)
    run(con, APPEND_NEW)
    return _count(con) - before


def _count(con: duckdb.DuckDBPyConnection) -> int:
    row = one(con, "SELECT count(*) FROM events")
    return int(row[0]) if row else 0
