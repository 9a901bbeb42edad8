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

A batch walks on from where each customer stands, as the ladder does: when all of a
customer's new contacts came after every contact stored for it (the usual case), only its
open wait (at most one: the last) can change, so it is the first row of the walk,
followed by the batch's contacts. A customer with a contact recorded late is walked again
from all its contacts (`internal.contact_turns`). So a batch reads no history unless it
holds a late contact.
"""

from __future__ import annotations

from datetime import datetime

import duckdb

from projections.schema import one, run

# What a contact stored in `internal.contact_turns` is.
_TURN = "type = 'ContactLogged' AND (direction = 'outbound' OR complaint_id IS NULL)"

STORE_TURNS = f"""
INSERT INTO internal.contact_turns
SELECT customer_id, event_id, occurred_at, position, direction, channel
FROM fresh
WHERE {_TURN}
"""

# Customers whose waits need recomputing: those with new contacts, and those with a wait
# whose state depends on the as-of clock (an overdue one stays so until a contact comes).
SCOPE = """
CREATE OR REPLACE TEMP TABLE response_scope AS
SELECT customer_id FROM fresh WHERE type = 'ContactLogged'
UNION
SELECT DISTINCT customer_id FROM response_waits WHERE status = 'waiting'
"""

# A wait without new contacts changes only with the clock: waiting until its alarm time,
# overdue after it (the clock never goes back).
OVERDUE = """
UPDATE response_waits SET status = 'overdue' WHERE status = 'waiting' AND $as_of > alarm_at
"""

# How each customer with new contacts is walked: 'on' from its open wait when every new
# contact came after all its stored ones (`last_contact_at` of its running totals, which
# the profiles update after this module: a larger value would only walk it 'again'), else
# 'again' from all its contacts.
PLAN_WALKS = f"""
CREATE OR REPLACE TEMP TABLE response_walks AS
WITH turns AS (SELECT customer_id, occurred_at FROM fresh WHERE {_TURN})
SELECT customer_id,
       CASE WHEN t.last_contact_at IS NULL OR min(turns.occurred_at) > t.last_contact_at
            THEN 'on' ELSE 'again' END AS walk
FROM turns LEFT JOIN internal.profile_totals AS t USING (customer_id)
GROUP BY customer_id, t.last_contact_at
"""

# The waits of a walk, from `turns`: its contacts on alarm channels (inbound) and its
# outbound ones, each with the alarm time it would start and the contacts it counts.
_WAITS_OF_TURNS = """
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
           arg_min(alarm_at, key) AS alarm_at, sum(contacts) AS contacts
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

DELETE_AGAIN = """
DELETE FROM response_waits
WHERE customer_id IN (SELECT customer_id FROM response_walks WHERE walk = 'again')
"""

WALK_AGAIN = (
    """
INSERT INTO response_waits
WITH turns AS (
    SELECT t.customer_id, t.event_id, t.occurred_at, t.direction, t.channel,
           t.occurred_at + to_hours(a.alarm_after_hours) AS alarm_at, 1 AS contacts,
           event_key(t.occurred_at, t.position) AS key
    FROM internal.contact_turns AS t
    LEFT JOIN response_alarm_channels AS a ON t.direction = 'inbound' AND a.channel = t.channel
    WHERE t.customer_id IN (SELECT customer_id FROM response_walks WHERE walk = 'again')
      AND (t.direction = 'outbound' OR a.channel IS NOT NULL)
),
"""
    + _WAITS_OF_TURNS
)

# The open wait opens the walk as one inbound contact at its start, counting the contacts
# it holds (key: before any contact of the batch, all later than it), then the batch's.
WALK_ON = (
    """
CREATE OR REPLACE TEMP TABLE response_walked AS
WITH turns AS (
    SELECT customer_id, started_by AS event_id, started_at AS occurred_at,
           'inbound' AS direction, channel, alarm_at, contacts,
           event_key(started_at, 0) AS key
    FROM response_waits
    WHERE answered_at IS NULL
      AND customer_id IN (SELECT customer_id FROM response_walks WHERE walk = 'on')
    UNION ALL
    SELECT f.customer_id, f.event_id, f.occurred_at, f.direction, f.channel,
           f.occurred_at + to_hours(a.alarm_after_hours), 1, f.key
    FROM fresh AS f
    LEFT JOIN response_alarm_channels AS a ON f.direction = 'inbound' AND a.channel = f.channel
    WHERE f.customer_id IN (SELECT customer_id FROM response_walks WHERE walk = 'on')
      AND f.type = 'ContactLogged'
      AND (f.direction = 'outbound' OR (f.complaint_id IS NULL AND a.channel IS NOT NULL))
),
"""
    + _WAITS_OF_TURNS
)

WRITE_WALKED_ON = """
DELETE FROM response_waits
WHERE answered_at IS NULL
  AND customer_id IN (SELECT customer_id FROM response_walks WHERE walk = 'on');

INSERT INTO response_waits SELECT * FROM response_walked;
"""


def refresh(con: duckdb.DuckDBPyConnection, as_of: datetime) -> None:
    """Bring the waits up to the batch and the clock; leaves the customers whose waits
    may have changed in temp table `response_scope`."""
    run(con, STORE_TURNS)
    run(con, SCOPE)
    run(con, OVERDUE, {"as_of": as_of})
    run(con, PLAN_WALKS)
    again = one(con, "SELECT count(*) FROM response_walks WHERE walk = 'again'")
    if again and again[0]:
        run(con, DELETE_AGAIN)
        run(con, WALK_AGAIN, {"as_of": as_of})
    run(con, WALK_ON, {"as_of": as_of})
    run(con, WRITE_WALKED_ON)
