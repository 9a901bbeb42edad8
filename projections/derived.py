"""`derived_events`: the facts the projections discover, for downstream systems.

- `LoyaltyStageChanged` for every stage a customer enters (from loyalty_stage_history);
- `SlaWarning` when 75 % of a target elapsed with its clock still running;
- `SlaBreached` when a target was missed;
- `ResponseOverdue` when a customer's wait for an answer reached its alarm time
  unanswered (`response_waits`).

Each transition has one deterministic event id (the MD5 of what changed, as a UUID), and is
stamped with the business time it happened (entered_at, warning time, due time), not
the moment it was noticed, so a rebuild derives the same events with the same ids.
`derived_events` is a projection like the others: stage changes follow the stages the
ladder entered in the batch (all of a customer's again when a late event made the ladder
walk it again), SLA transitions are recomputed with the complaint clocks in scope, so it
always says what the events imply now, and a rebuild equals it row for
row. `derived_published` remembers which ids went out; a rebuild carries it over, so it
does not alert again unless asked. The Kafka consumer publishes a transition only once
every partition with records still to read has reached its time (`unpublished(until=)`,
see consumers.derived_publishing.publish_until), so how partitions interleave changes
nothing that goes out. An event recorded late (a backfill) can still reveal a transition
earlier than ones already published, or retract one: a published id that no longer
appears in `derived_events`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from domain.events import SCHEMA_VERSION
from projections.schema import one, run

DELETE_IN_SCOPE = """
DELETE FROM derived_events
WHERE (type = 'LoyaltyStageChanged'
       AND customer_id IN (SELECT customer_id FROM ladder_walks WHERE walk = 'again'))
   OR (type IN ('SlaWarning', 'SlaBreached')
       AND customer_id IN (SELECT customer_id FROM sla_scope))
   OR (type = 'ResponseOverdue'
       AND customer_id IN (SELECT customer_id FROM response_scope))
"""

INSERT_IN_SCOPE = """
INSERT INTO derived_events
WITH stage_changes AS (
    SELECT md5('derived|stage|' || customer_id || '|' || trigger_event_id || '|' || stage)::UUID
               AS event_id,
           'LoyaltyStageChanged' AS type, customer_id, entered_at AS occurred_at,
           json_object('from_stage', previous_stage, 'to_stage', stage, 'reason', reason,
                       'trigger_event_id', trigger_event_id::VARCHAR) AS data
    FROM ladder_entries
),
clocks AS (
    SELECT customer_id, complaint_id, priority, category, 'first_response' AS clock,
           first_response_warning_at AS warning_at, first_response_due AS due_at,
           first_response_at AS stopped_at, first_response_status AS status
    FROM complaint_sla WHERE customer_id IN (SELECT customer_id FROM sla_scope)
    UNION ALL
    SELECT customer_id, complaint_id, priority, category, 'resolution',
           resolution_warning_at, resolution_due, resolved_at, resolution_status
    FROM complaint_sla WHERE customer_id IN (SELECT customer_id FROM sla_scope)
),
sla_transitions AS (
    SELECT 'SlaWarning' AS type, warning_at AS occurred_at, *
    FROM clocks
    WHERE warning_at <= $as_of AND (stopped_at IS NULL OR stopped_at > warning_at)
    UNION ALL
    SELECT 'SlaBreached', due_at, *
    FROM clocks WHERE status = 'breached'
),
-- one alarm per wait, named by the contact that started it (its id holds no '|')
response_alarms AS (
    SELECT md5('derived|response|' || customer_id || '|' || started_by::VARCHAR)::UUID
               AS event_id,
           'ResponseOverdue' AS type, customer_id, alarm_at AS occurred_at,
           json_object('channel', channel, 'waiting_since', iso(started_at),
                       'contact_event_id', started_by::VARCHAR,
                       'alarm_after_hours', CAST(epoch(alarm_at - started_at) // 3600 AS INTEGER))
               AS data
    FROM response_waits
    WHERE customer_id IN (SELECT customer_id FROM response_scope)
      AND status IN ('overdue', 'answered_late')
)
SELECT * FROM (
    SELECT * FROM stage_changes
    UNION ALL
    SELECT * FROM response_alarms
    UNION ALL
    -- Two free-text ids: joined with '|' they could collide ("a|b"+"c", "a"+"b|c"), so
    -- ids holding one are hashed as a JSON array instead (the ids of all others stay).
    SELECT md5(CASE WHEN contains(customer_id, '|') OR contains(complaint_id, '|')
                    THEN 'derived|sla-json|' || to_json([customer_id, complaint_id, clock, type])
                    ELSE 'derived|sla|' || customer_id || '|' || complaint_id || '|' || clock
                         || '|' || type END)::UUID,
           type, customer_id, occurred_at,
           json_object('complaint_id', complaint_id, 'clock', clock, 'priority', priority,
                       'category', category, 'due_at', iso(due_at),
                       'warning_at', iso(warning_at))
    FROM sla_transitions
) AS found
"""


INTRODUCED_IN: dict[str, int] = {"ResponseOverdue": 4}
"""The projections' schema version that first derived each type (the others: from the
start). A rebuild that upgrades a file counts the new types' events up to the old file's
clock as published (`count_history_as_published`): they describe the past, and nobody
was waiting for them."""


def count_history_as_published(
    con: duckdb.DuckDBPyConnection, previous_version: int, until: datetime
) -> dict[str, int]:
    """Mark as published the derived events of types newer than `previous_version` that
    happened by `until`; returns how many, by type."""
    new_types = sorted(t for t, since in INTRODUCED_IN.items() if since > previous_version)
    if not new_types:
        return {}
    history = """
        SELECT event_id, type FROM derived_events
        WHERE list_contains($types, type) AND occurred_at <= $until
          AND event_id NOT IN (SELECT event_id FROM derived_published)
    """
    params = {"types": new_types, "until": until}
    counted = con.execute(f"SELECT type, count(*) FROM ({history}) GROUP BY type", params)
    by_type = {str(kind): int(n) for kind, n in counted.fetchall()}
    run(con, f"INSERT INTO derived_published SELECT event_id FROM ({history})", params)
    return by_type


def refresh(con: duckdb.DuckDBPyConnection, as_of: object) -> None:
    """Derive the stages entered (`ladder_entries`), the transitions of the complaint
    clocks in scope (`sla_scope`) and the response alarms in scope (`response_scope`)."""
    run(con, DELETE_IN_SCOPE)
    run(con, INSERT_IN_SCOPE, {"as_of": as_of})


UNPUBLISHED = """
SELECT d.event_id::VARCHAR, d.type, d.customer_id, iso(d.occurred_at), d.data
FROM derived_events AS d
WHERE d.event_id NOT IN (SELECT event_id FROM derived_published)
  AND ($until IS NULL OR d.occurred_at < $until)
ORDER BY d.occurred_at, d.event_id
"""


def unpublished(
    con: duckdb.DuckDBPyConnection, until: datetime | None = None
) -> list[dict[str, Any]]:
    """Derived events the broker has not acknowledged yet (those before business time
    `until`, when given), oldest first, in the contract's recorded shape (see
    domain.events: the derived catalogue)."""
    return [
        {
            "event_id": event_id,
            "type": kind,
            "schema_version": SCHEMA_VERSION,
            "customer_id": customer_id,
            "occurred_at": occurred_at,
            "source": "customer-ledger",
            "data": orjson.loads(data),
        }
        for event_id, kind, customer_id, occurred_at, data in con.execute(
            UNPUBLISHED, {"until": until}
        ).fetchall()
    ]


def mark_published(con: duckdb.DuckDBPyConnection, event_ids: list[str]) -> None:
    con.register("acknowledged", pa.table({"event_id": pa.array(event_ids, pa.string())}))
    try:
        run(con, "INSERT OR IGNORE INTO derived_published SELECT event_id::UUID FROM acknowledged")
    finally:
        con.unregister("acknowledged")


def publication(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    """(derived, published): how many derived events the projections hold, and how many of
    them the broker acknowledged."""
    row = one(
        con,
        """
        SELECT count(*), count(p.event_id)
        FROM derived_events AS d LEFT JOIN derived_published AS p USING (event_id)
        """,
    )
    return (int(row[0]), int(row[1])) if row else (0, 0)


def withdrawn_after_publication(con: duckdb.DuckDBPyConnection) -> int:
    """How many derived events the broker acknowledged that the projections no longer
    derive: an event recorded late (a backfill) took them back, and subscribers still
    hold them (no withdrawal goes out yet: README, Known limits)."""
    row = one(
        con,
        "SELECT count(*) FROM derived_published AS p "
        "ANTI JOIN derived_events AS d USING (event_id)",
    )
    return int(row[0]) if row else 0
