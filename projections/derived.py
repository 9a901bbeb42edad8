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
earlier than ones already published, or take one back: a published id that no longer
appears in `derived_events` goes out again as a `DerivedEventWithdrawn` naming it (and
should the transition hold again later, it goes out again under its own id).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

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
        SELECT event_id, type, customer_id, occurred_at FROM derived_events
        WHERE list_contains($types, type) AND occurred_at <= $until
          AND event_id NOT IN (SELECT event_id FROM derived_published)
    """
    params = {"types": new_types, "until": until}
    counted = con.execute(f"SELECT type, count(*) FROM ({history}) GROUP BY type", params)
    by_type = {str(kind): int(n) for kind, n in counted.fetchall()}
    run(  # counted as sent, never sent: standing and acknowledged (the defaults)
        con,
        "INSERT INTO derived_published (event_id, type, customer_id, occurred_at) "
        f"SELECT * FROM ({history})",
        params,
    )
    return by_type


def refresh(con: duckdb.DuckDBPyConnection, as_of: object) -> None:
    """Derive the stages entered (`ladder_entries`), the transitions of the complaint
    clocks in scope (`sla_scope`) and the response alarms in scope (`response_scope`)."""
    run(con, DELETE_IN_SCOPE)
    run(con, INSERT_IN_SCOPE, {"as_of": as_of})


WITHDRAWAL = "DerivedEventWithdrawn"

WITHDRAWALS_DUE = """
-- The withdrawals the derived topic lacks: of each event sent that a late event took back,
-- or moved to another time (withdrawn, it goes out again at its new time, under its id).
-- One not acknowledged goes out again under its ordinal; a new one takes the next.
SELECT p.*, p.withdrawals + p.standing::INTEGER AS ordinal
FROM derived_published AS p LEFT JOIN derived_events AS d USING (event_id)
WHERE p.type IS NOT NULL
  AND CASE WHEN p.standing THEN d.event_id IS NULL OR d.occurred_at <> p.occurred_at
           ELSE NOT p.acknowledged AND d.event_id IS NULL END
"""

UNPUBLISHED = f"""
WITH due AS (
    -- the event itself where subscribers may not hold it as it is: never sent, withdrawn
    -- since (it holds again), or sent without an acknowledgement (the run ended, or was
    -- killed, meanwhile: the same word again)
    SELECT d.event_id, d.type, d.customer_id, d.occurred_at, d.data,
           coalesce(p.withdrawals, 0) AS ordinal
    FROM derived_events AS d LEFT JOIN derived_published AS p USING (event_id)
    WHERE (p.event_id IS NULL OR NOT p.standing
           OR (NOT p.acknowledged AND p.occurred_at = d.occurred_at))
      AND ($until IS NULL OR d.occurred_at < $until)
    UNION ALL
    SELECT withdrawal_id(event_id, ordinal), 'DerivedEventWithdrawn', customer_id, occurred_at,
           json_object('withdrawn_event_id', event_id::VARCHAR, 'withdrawn_type', type),
           ordinal
    FROM ({WITHDRAWALS_DUE})
)
SELECT event_id::VARCHAR, type, customer_id, iso(occurred_at), data, ordinal
FROM due
ORDER BY occurred_at, event_id
"""


class Word(NamedTuple):
    """One word the derived topic still lacks on a derived event: the event itself or its
    withdrawal (`fact`, in the contract's recorded shape), and how many withdrawals of the
    event precede it (a withdrawal: its own number). An event says something new after
    each withdrawal, under the same id, so an acknowledgement is matched by both."""

    fact: dict[str, Any]
    ordinal: int

    @property
    def key(self) -> tuple[str, int]:
        return self.fact["event_id"], self.ordinal


def unpublished(con: duckdb.DuckDBPyConnection, until: datetime | None = None) -> list[Word]:
    """What the derived topic still lacks, oldest first: the derived events subscribers may
    not hold as they are (those before business time `until`, when given), and a
    withdrawal of each one sent that no longer holds, or holds at another time (whatever
    `until`: only an event recorded late changes a transition published, and it is read
    by then). Once a withdrawal is written down (`mark_sending`), the event it withdrew,
    if it holds at another time, is due again."""
    return [
        Word(
            {
                "event_id": event_id,
                "type": kind,
                "schema_version": SCHEMA_VERSION,
                "customer_id": customer_id,
                "occurred_at": occurred_at,
                "source": "customer-ledger",
                "data": orjson.loads(data),
            },
            ordinal,
        )
        for event_id, kind, customer_id, occurred_at, data, ordinal in con.execute(
            UNPUBLISHED, {"until": until}
        ).fetchall()
    ]


SENDING = """
UPDATE derived_published AS p
SET type = w.type, customer_id = w.customer_id, occurred_at = w.occurred_at::TIMESTAMPTZ,
    standing = TRUE, acknowledged = FALSE
FROM words AS w
WHERE w.type <> 'DerivedEventWithdrawn' AND p.event_id = w.event_id::UUID;

INSERT INTO derived_published
    (event_id, type, customer_id, occurred_at, standing, acknowledged)
SELECT DISTINCT ON (event_id) event_id::UUID, type, customer_id, occurred_at::TIMESTAMPTZ,
       TRUE, FALSE
FROM words
WHERE type <> 'DerivedEventWithdrawn'
  AND event_id::UUID NOT IN (SELECT event_id FROM derived_published);

UPDATE derived_published AS p
SET standing = FALSE, acknowledged = FALSE, withdrawals = w.ordinal
FROM words AS w
WHERE w.type = 'DerivedEventWithdrawn' AND p.event_id = w.withdrawn_event_id::UUID
  AND p.standing AND p.withdrawals + 1 = w.ordinal;
"""

ACKNOWLEDGED = """
UPDATE derived_published AS p
SET acknowledged = TRUE
FROM words AS w
WHERE p.event_id = coalesce(w.withdrawn_event_id, w.event_id)::UUID
  AND NOT p.acknowledged
  AND p.standing = (w.type <> 'DerivedEventWithdrawn')
  AND p.withdrawals = w.ordinal;
"""


def mark_sending(con: duckdb.DuckDBPyConnection, words: list[Word]) -> None:
    """Write down, before they are sent, the words handed to the producer: after a crash,
    what subscribers may hold is known, whether or not the broker's acknowledgement was.
    An event stands; a withdrawal withdraws its event, as the next of its withdrawals."""
    _with_words(con, words, SENDING)


def mark_acknowledged(con: duckdb.DuckDBPyConnection, words: list[Word]) -> None:
    """Record the broker's acknowledgement of words sent (`mark_sending` first). One that
    is no longer the last word sent on its event (a withdrawal, or the event again, sent
    since) changes nothing: that later word waits for its own."""
    _with_words(con, words, ACKNOWLEDGED)


def _with_words(con: duckdb.DuckDBPyConnection, words: list[Word], sql: str) -> None:
    facts = [word.fact for word in words]
    table = pa.table(
        {
            "event_id": pa.array([fact["event_id"] for fact in facts], pa.string()),
            "type": pa.array([fact["type"] for fact in facts], pa.string()),
            "customer_id": pa.array([fact["customer_id"] for fact in facts], pa.string()),
            "occurred_at": pa.array([fact["occurred_at"] for fact in facts], pa.string()),
            "withdrawn_event_id": pa.array(
                [
                    fact["data"]["withdrawn_event_id"] if fact["type"] == WITHDRAWAL else None
                    for fact in facts
                ],
                pa.string(),
            ),
            "ordinal": pa.array([word.ordinal for word in words], pa.int64()),
        }
    )
    con.register("words", table)
    try:
        con.begin()
        try:
            run(con, sql)
            con.commit()
        except BaseException:
            con.rollback()
            raise
    finally:
        con.unregister("words")


def carry_over_published(
    con: duckdb.DuckDBPyConnection, previous_version: int, *, realert: bool = False
) -> int:
    """Copy what the file attached as `previous` sent into this one (a rebuild's, which
    holds none yet): a rebuild must not alert again, and a withdrawal must know its
    customer and its ordinal. With `realert` everything counts as unacknowledged, so
    every derived event goes out again (and the withdrawals not acknowledged, under their
    ids). Returns how many events sent a late event had taken back in a file older than
    schema version 5, which kept no customer to address a withdrawal to (they are never
    announced)."""
    kept = {"kept": not realert}  # acknowledged stays acknowledged
    if previous_version >= 5:
        run(
            con,
            """
            INSERT INTO derived_published
            SELECT DISTINCT ON (event_id) event_id, type, customer_id, occurred_at, standing,
                   acknowledged AND $kept, withdrawals
            FROM previous.derived_published
            """,
            kept,
        )
        return 0
    run(
        con,
        """
        INSERT INTO derived_published
        SELECT DISTINCT ON (p.event_id) p.event_id, d.type, d.customer_id, d.occurred_at,
               d.event_id IS NOT NULL, $kept, 0
        FROM previous.derived_published AS p
        LEFT JOIN previous.derived_events AS d USING (event_id)
        """,
        kept,
    )
    row = one(con, "SELECT count(*) FROM derived_published WHERE type IS NULL")
    return int(row[0]) if row else 0


def publication(con: duckdb.DuckDBPyConnection) -> tuple[int, int, int, int]:
    """(derived, published, withdrawn, withdrawals_waiting): how many derived events the
    projections hold, how many of them subscribers hold as they are (acknowledged, at their
    time), how many withdrawals (of events a late event took back or moved) the broker
    acknowledged, and how many are still to send or to be acknowledged (`WITHDRAWALS_DUE`:
    what the publisher sends next)."""
    row = one(
        con,
        f"""
        SELECT (SELECT count(*) FROM derived_events),
               (SELECT count(*) FROM derived_events AS d JOIN derived_published AS p
                USING (event_id)
                WHERE p.standing AND p.acknowledged AND p.occurred_at = d.occurred_at),
               (SELECT coalesce(sum(withdrawals), 0)
                       - count(*) FILTER (WHERE NOT standing AND NOT acknowledged)
                FROM derived_published),
               (SELECT count(*) FROM ({WITHDRAWALS_DUE}))
        """,
    )
    return (int(row[0]), int(row[1]), int(row[2]), int(row[3])) if row else (0, 0, 0, 0)
