"""The `events` table: a flat, queryable mirror of every recorded event.

Rows are bulk-appended from an Arrow table (never one INSERT per event). Personal fields
(marked `x-personal` in the catalogue) are dropped: analysts get behaviour, not identities.
An event id already mirrored is skipped, so a redelivered event changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb
import orjson
import pyarrow as pa

from domain.events import EVENT_MODELS
from domain.ledger import Fact
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

_BATCH_SCHEMA = pa.schema(
    [
        ("position", pa.int64()),
        ("event_id", pa.string()),
        ("type", pa.string()),
        ("schema_version", pa.int32()),
        ("customer_id", pa.string()),
        ("occurred_at", pa.string()),
        ("recorded_at", pa.string()),
        ("source", pa.string()),
        ("actor", pa.string()),
        ("source_event_id", pa.string()),
        ("data", pa.string()),
    ]
)

_APPEND_NEW = """
INSERT INTO events
SELECT position, event_id::UUID, type, schema_version, customer_id,
       occurred_at::TIMESTAMPTZ, recorded_at::TIMESTAMPTZ, source, actor, source_event_id,
       data::JSON
FROM (SELECT DISTINCT ON (event_id) * FROM incoming ORDER BY event_id, position) AS b
WHERE b.event_id::UUID NOT IN (SELECT event_id FROM events)
"""


def _analytics_data(fact: Fact) -> str:
    data = fact["data"]
    personal = PERSONAL_FIELDS.get(fact["type"])
    if personal:
        data = {k: v for k, v in data.items() if k not in personal}
    return orjson.dumps(data).decode()


def append(con: duckdb.DuckDBPyConnection, batch: Sequence[tuple[int, Fact]]) -> int:
    """Mirror a batch of (position, fact); returns how many rows were new."""
    columns: dict[str, list[object]] = {name: [] for name in _BATCH_SCHEMA.names}
    for position, fact in batch:
        columns["position"].append(position)
        columns["data"].append(_analytics_data(fact))
        for name in _ENVELOPE_COLUMNS:
            columns[name].append(fact.get(name))
    incoming = pa.table(columns, schema=_BATCH_SCHEMA)
    con.register("incoming", incoming)
    try:
        before = _count(con)
        run(con, _APPEND_NEW)
        return _count(con) - before
    finally:
        con.unregister("incoming")


_ENVELOPE_COLUMNS = [n for n in _BATCH_SCHEMA.names if n not in ("position", "data")]


def _count(con: duckdb.DuckDBPyConnection) -> int:
    row = one(con, "SELECT count(*) FROM events")
    return int(row[0]) if row else 0
