"""`response_waits`: the response alarm of the founding documents (an inbound email still
unanswered after 12 hours alerts the service staff).

Rules from `response_alarm_channels` (domain.policy.ResponsePolicy). Definitions (pinned
by tests/test_responses.py):
- a wait starts at an inbound contact on an alarm channel that concerns no complaint (a
  complaint's first-response clock covers those: `complaint_sla`);
- it ends at the next outbound contact to the customer, on any channel; inbound contacts
  on alarm channels meanwhile join it (`contacts`), inbound contacts on other channels
  neither start nor join one;
- its alarm is due `alarm_after_hours` (of its first contact's channel) after it started;
- status: `answered` by the alarm time (at it included), `answered_late` after it,
  `overdue` when unanswered and the as-of clock has passed the alarm time, else
  `waiting` (as the complaint clocks: a reply at the alarm time itself is in time).
- inbound contacts naming a complaint are left to the complaint's handling, whatever
  state that complaint is in.
Contacts are ordered by (business time, store position). The as-of clock is explicit
(`projection_clock`), so a rebuild at the same clock gives the same table.
"""

from __future__ import annotations

from datetime import datetime

import duckdb

from projections.schema import run

STORE_TURNS = """
INSERT INTO internal.contact_turns
SELECT customer_id, event_id, occurred_at, position, direction, channel
FROM fresh
WHERE type = 'ContactLogged' AND (direction = 'outbound' OR complaint_id IS NULL)
"""

# Customers whose waits need recomputing: those with new contacts, and those with a wait
# whose state depends on the as-of clock (an overdue one stays so until a contact comes).
SCOPE = """
CREATE OR REPLACE TEMP TABLE response_scope AS
SELECT customer_id FROM fresh WHERE type = 'ContactLogged'
UNION
SELECT DISTINCT customer_id FROM response_waits WHERE status = 'waiting'
"""

DELETE_IN_SCOPE = """
DELETE FROM response_waits WHERE customer_id IN (SELECT customer_id FROM response_scope)
"""

INSERT_IN_SCOPE = """
INSERT INTO response_waits
WITH turns AS (
    SELECT t.*, a.alarm_after_hours, event_key(t.occurred_at, t.position) AS key
    FROM internal.contact_turns AS t
    LEFT JOIN response_alarm_channels AS a ON t.direction = 'inbound' AND a.channel = t.channel
    WHERE t.customer_id IN (SELECT customer_id FROM response_scope)
      AND (t.direction = 'outbound' OR a.channel IS NOT NULL)
),
-- the number of outbound contacts up to each contact: the inbound ones with the same
-- number wait together, and the next outbound one (number + 1) answers them
numbered AS (
    SELECT *, count(*) FILTER (WHERE direction = 'outbound') OVER (
                  PARTITION BY customer_id ORDER BY key
                  ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS answers
    FROM turns
),
waits AS (
    SELECT customer_id, answers, min(occurred_at) AS started_at,
           arg_min(event_id, key) AS started_by, arg_min(channel, key) AS channel,
           min(occurred_at) + to_hours(arg_min(alarm_after_hours, key)) AS alarm_at,
           count(*) AS contacts
    FROM numbered WHERE direction = 'inbound'
    GROUP BY customer_id, answers
),
replies AS (
    SELECT customer_id, answers, occurred_at AS answered_at, event_id AS answered_by
    FROM numbered WHERE direction = 'outbound'
)
SELECT w.customer_id, w.started_at, w.started_by, w.channel, w.contacts, w.alarm_at,
       r.answered_at, r.answered_by,
       CASE WHEN r.answered_at IS NOT NULL THEN
                 CASE WHEN r.answered_at <= w.alarm_at THEN 'answered' ELSE 'answered_late' END
            WHEN $as_of > w.alarm_at THEN 'overdue'
            ELSE 'waiting' END AS status
FROM waits AS w
LEFT JOIN replies AS r ON r.customer_id = w.customer_id AND r.answers = w.answers + 1
"""


def refresh(con: duckdb.DuckDBPyConnection, as_of: datetime) -> None:
    """Recompute the waits of the customers in scope from their contacts
    (`internal.contact_turns`); leaves those customers in temp table `response_scope`."""
    run(con, STORE_TURNS)
    run(con, SCOPE)
    run(con, DELETE_IN_SCOPE)
    run(con, INSERT_IN_SCOPE, {"as_of": as_of})
