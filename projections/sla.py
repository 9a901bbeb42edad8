"""`complaint_sla`: first-response and resolution clocks of every complaint.

Targets come from `sla_targets` (domain.policy.SlaPolicy), by the priority the complaint was
filed with. Definitions (pinned by tests/test_sla.py):
- a complaint is defined by its first `ComplaintFiled` (the ledger files each once; a
  repeat that a foreign producer put on the topic is a step without effect);
- the first response is the first acknowledgement, resolution or close;
- the resolution is the first resolution or close after the last reopening;
- the resolution clock is paused on hold, from ComplaintOnHold to the next resume,
  resolution or close (or the as-of clock while still on hold), and while resolved or
  closed before a reopening (`paused_hours` adds both up); a pause moves the resolution
  warning and due times later only if it began before they were reached, so a reopening
  reveals no warning or breach dated while the complaint was resolved, and a hold after
  a breach cannot undo it;
- a clock that stopped by its due time is `met`, after it `breached`; a running clock is
  `breached` once the as-of clock passes its due time, else `pending`.
The as-of clock is explicit (`projection_clock`), never the wall clock, so a rebuild at
the same clock gives the same table.

A batch recomputes from their steps (`internal.complaint_steps`) the complaints of the
customers with new steps or a complaint on hold; any other clock still running depends on
the as-of clock only through its status, which an UPDATE turns `breached` once the clock
passes its due time.
"""

from __future__ import annotations

from datetime import datetime

import duckdb

from projections.schema import run

DELETE_IN_SCOPE = """
DELETE FROM complaint_sla WHERE customer_id IN (SELECT customer_id FROM sla_walks)
"""

INSERT_IN_SCOPE = """
INSERT INTO complaint_sla
WITH steps AS (
    SELECT * FROM internal.complaint_steps
    WHERE customer_id IN (SELECT customer_id FROM sla_walks)
    QUALIFY type <> 'ComplaintFiled'
         OR row_number() OVER (PARTITION BY customer_id, complaint_id, type
                               ORDER BY occurred_at, position) = 1
),
filed AS (
    SELECT s.customer_id, s.complaint_id, s.occurred_at AS filed_at,
           coalesce(s.priority, 'normal') AS priority, s.category, s.channel,
           t.first_response_hours, t.resolution_hours, t.warning_fraction,
           CAST(t.resolution_hours * 3600000000 AS BIGINT) AS resolution_us,
           CAST(t.resolution_hours * 3600000000 * t.warning_fraction AS BIGINT)
               AS resolution_warning_us
    FROM steps AS s JOIN sla_targets AS t ON t.priority = coalesce(s.priority, 'normal')
    WHERE s.type = 'ComplaintFiled'
),
status_steps AS (
    SELECT *,
        lead(occurred_at) OVER (PARTITION BY customer_id, complaint_id
                                ORDER BY occurred_at, position) AS next_status_at,
        max(occurred_at) FILTER (WHERE type = 'ComplaintReopened')
            OVER (PARTITION BY customer_id, complaint_id) AS last_reopened_at
    FROM steps
    WHERE type IN ('ComplaintFiled', 'ComplaintOnHold', 'ComplaintResumed',
                   'ComplaintResolved', 'ComplaintReopened', 'ComplaintClosed')
),
-- The resolution clock stops while the complaint waits: on hold (until the next status
-- step, or the as-of clock), and resolved or closed until a reopening restarts it.
pauses AS (
    SELECT customer_id, complaint_id, occurred_at AS paused_at, position,
           epoch_us(coalesce(next_status_at, $as_of)) - epoch_us(occurred_at) AS paused_us
    FROM status_steps
    WHERE type = 'ComplaintOnHold'
       OR (type IN ('ComplaintResolved', 'ComplaintClosed') AND occurred_at < last_reopened_at)
),
-- A target is reached in the first running stretch long enough for it: only the pauses
-- before that point move it (a hold after the warning leaves the warning where it was,
-- and a hold after the due time cannot undo a breach).
pause_marks AS (
    SELECT p.customer_id, p.complaint_id, p.paused_us,
           epoch_us(p.paused_at) - epoch_us(f.filed_at) - p.paused_before_us AS running_us,
           p.paused_before_us, f.resolution_us, f.resolution_warning_us
    FROM (
        SELECT *, coalesce(sum(paused_us) OVER (
                      PARTITION BY customer_id, complaint_id ORDER BY paused_at, position
                      ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS paused_before_us
        FROM pauses
    ) AS p
    JOIN filed AS f USING (customer_id, complaint_id)
),
paused AS (
    SELECT customer_id, complaint_id,
        CAST(sum(paused_us) AS BIGINT) AS paused_us,
        CAST(coalesce(min(paused_before_us) FILTER (WHERE running_us >= resolution_us),
                      sum(paused_us)) AS BIGINT) AS paused_before_due_us,
        CAST(coalesce(min(paused_before_us) FILTER (WHERE running_us >= resolution_warning_us),
                      sum(paused_us)) AS BIGINT) AS paused_before_warning_us
    FROM pause_marks
    GROUP BY customer_id, complaint_id
),
summary AS (
    SELECT customer_id, complaint_id,
        min(occurred_at) FILTER (WHERE type IN ('ComplaintAcknowledged', 'ComplaintResolved',
                                                'ComplaintClosed')) AS first_response_at,
        count(*) FILTER (WHERE type = 'ComplaintEscalated') AS escalations,
        count(*) FILTER (WHERE type = 'ComplaintReopened') AS reopened,
        max(occurred_at) FILTER (WHERE type = 'ComplaintReopened') AS last_reopened_at,
        max(occurred_at) FILTER (WHERE type = 'ComplaintClosed') AS last_closed_at,
        first(type ORDER BY occurred_at DESC, position DESC)
            FILTER (WHERE type IN ('ComplaintFiled', 'ComplaintOnHold', 'ComplaintResumed',
                                   'ComplaintResolved', 'ComplaintReopened', 'ComplaintClosed'))
            AS last_status_step,
        first(root_cause ORDER BY occurred_at DESC, position DESC)
            FILTER (WHERE type = 'ComplaintResolved') AS root_cause,
        sum(compensation) FILTER (WHERE type = 'ComplaintResolved') AS compensation
    FROM steps GROUP BY customer_id, complaint_id
),
resolution AS (
    SELECT s.customer_id, s.complaint_id, min(s.occurred_at) AS resolved_at
    FROM steps AS s JOIN summary AS m USING (customer_id, complaint_id)
    WHERE s.type IN ('ComplaintResolved', 'ComplaintClosed')
      AND (m.last_reopened_at IS NULL OR s.occurred_at >= m.last_reopened_at)
    GROUP BY s.customer_id, s.complaint_id
),
clocks AS (
    SELECT f.*, m.*, coalesce(p.paused_us, 0) AS paused_us,
        CASE m.last_status_step WHEN 'ComplaintOnHold' THEN 'on_hold'
                                WHEN 'ComplaintResolved' THEN 'resolved'
                                WHEN 'ComplaintClosed' THEN 'closed'
                                ELSE 'open' END AS status,
        f.filed_at + to_hours(f.first_response_hours) AS first_response_due,
        f.filed_at + to_microseconds(CAST(f.first_response_hours * 3600000000
                                          * f.warning_fraction AS BIGINT))
            AS first_response_warning_at,
        f.filed_at + to_microseconds(f.resolution_us + coalesce(p.paused_before_due_us, 0))
            AS resolution_due,
        f.filed_at + to_microseconds(f.resolution_warning_us
                                     + coalesce(p.paused_before_warning_us, 0))
            AS resolution_warning_at
    FROM filed AS f
    JOIN summary AS m USING (customer_id, complaint_id)
    LEFT JOIN paused AS p USING (customer_id, complaint_id)
)
SELECT
    c.customer_id, c.complaint_id, c.priority, c.category, c.channel, c.status, c.filed_at,
    c.first_response_due, c.first_response_warning_at, c.first_response_at,
    CASE WHEN c.first_response_at IS NOT NULL THEN
              CASE WHEN c.first_response_at <= c.first_response_due THEN 'met' ELSE 'breached' END
         WHEN $as_of > c.first_response_due THEN 'breached'
         ELSE 'pending' END AS first_response_status,
    CAST(money_div(c.paused_us, 3600000000) AS DECIMAL(12, 4)) AS paused_hours,
    c.resolution_due, c.resolution_warning_at,
    CASE WHEN c.status IN ('resolved', 'closed') THEN r.resolved_at END AS resolved_at,
    CASE WHEN c.status IN ('resolved', 'closed') THEN
              CASE WHEN r.resolved_at <= c.resolution_due THEN 'met' ELSE 'breached' END
         WHEN $as_of > c.resolution_due THEN 'breached'
         ELSE 'pending' END AS resolution_status,
    c.escalations, c.reopened,
    CASE WHEN c.status = 'closed' THEN c.last_closed_at END AS closed_at,
    c.root_cause, c.compensation
FROM clocks AS c
LEFT JOIN resolution AS r USING (customer_id, complaint_id)
"""

STORE_STEPS = """
INSERT INTO internal.complaint_steps
SELECT customer_id, complaint_id, type, occurred_at, position, priority, category, channel,
       root_cause, CAST(compensation AS DECIMAL(18, 4))
FROM fresh WHERE type LIKE 'Complaint%'
"""

# Customers whose complaints' clocks may change: those with new complaint steps, and those
# with a clock still running, whose state depends on the as-of clock (the derived events
# are recomputed for them).
SCOPE = """
CREATE OR REPLACE TEMP TABLE sla_scope AS
SELECT customer_id FROM fresh WHERE type LIKE 'Complaint%'
UNION
SELECT DISTINCT customer_id FROM complaint_sla
WHERE first_response_status = 'pending' OR resolution_status = 'pending' OR status = 'on_hold'
"""

# Of those, the customers whose complaints are recomputed from their steps: new steps, or a
# complaint on hold (its pause runs until the as-of clock, moving its resolution times).
PLAN_WALKS = """
CREATE OR REPLACE TEMP TABLE sla_walks AS
SELECT customer_id FROM fresh WHERE type LIKE 'Complaint%'
UNION
SELECT DISTINCT customer_id FROM complaint_sla WHERE status = 'on_hold'
"""

# Any other running clock changes only with the as-of clock: pending until its due time,
# breached after it (the clock never goes back).
BREACHES = """
UPDATE complaint_sla SET
    first_response_status = CASE WHEN first_response_status = 'pending'
                                      AND $as_of > first_response_due
                                 THEN 'breached' ELSE first_response_status END,
    resolution_status = CASE WHEN resolution_status = 'pending' AND $as_of > resolution_due
                             THEN 'breached' ELSE resolution_status END
WHERE (first_response_status = 'pending' AND $as_of > first_response_due)
   OR (resolution_status = 'pending' AND $as_of > resolution_due)
"""


def refresh(con: duckdb.DuckDBPyConnection, as_of: datetime) -> None:
    """Bring the complaint clocks up to the batch and the as-of clock; leaves the customers
    whose clocks may have changed in temp table `sla_scope`."""
    run(con, STORE_STEPS)
    run(con, SCOPE)  # before BREACHES: a clock it stops is still in scope for the derived
    run(con, PLAN_WALKS)
    run(con, BREACHES, {"as_of": as_of})
    run(con, DELETE_IN_SCOPE)
    run(con, INSERT_IN_SCOPE, {"as_of": as_of})
