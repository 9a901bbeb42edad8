"""`loyalty_stage_history`: each customer's way up (and down) the ladder.

The ladder's rules are `domain.policy.LadderPolicy`. Walking a customer's events in
business-time order, the running purchase count, purchase span and latest survey give a
stage; consecutive equal stages collapse into one history row (entered_at, exited_at).
Only the first event, purchases and surveys can change the stage, so those are all the
ladder keeps (`internal.ladder_facts`), with where each customer stands after its latest
fact (`internal.ladder_positions`). Nothing here reads a clock: stages follow from events.

A batch walks on from where each customer stands: the stored position is the first row
of the walk, followed by the batch's facts. A customer whose batch holds a fact earlier
than one already walked (a late event) is walked again from its first event, so the
history is the same whatever order events arrive in.
"""

from __future__ import annotations

import duckdb

from domain.policy import LadderPolicy
from projections.schema import run

STORE_FACTS = """
INSERT INTO internal.ladder_facts
SELECT customer_id, event_id, type, occurred_at, key, satisfaction
FROM fresh WHERE type IN ('PurchaseRecorded', 'SurveyAnswered')
"""

# How each touched customer is walked: 'on' from its stored position, or 'again' from its
# first event (a new customer, or a late event); customers with no new fact are not walked.
PLAN_WALKS = """
CREATE OR REPLACE TEMP TABLE ladder_walks AS
WITH batch AS (
    SELECT customer_id, min(key) AS first_key,
           min(key) FILTER (WHERE type IN ('PurchaseRecorded', 'SurveyAnswered')) AS fact_key
    FROM fresh GROUP BY customer_id
)
SELECT b.customer_id,
       CASE WHEN p.customer_id IS NULL OR b.first_key < p.first_key OR b.fact_key < p.last_key
            THEN 'again' ELSE 'on' END AS walk
FROM batch AS b LEFT JOIN internal.ladder_positions AS p USING (customer_id)
WHERE p.customer_id IS NULL OR b.first_key < p.first_key OR b.fact_key IS NOT NULL
"""

# The first event of every customer walked again: the stored one or an earlier new one.
FIRST_EVENTS = """
CREATE OR REPLACE TEMP TABLE ladder_firsts AS
SELECT customer_id, arg_min(event_id, key) AS event_id, arg_min(type, key) AS type,
       arg_min(occurred_at, key) AS occurred_at, min(key) AS key
FROM (
    SELECT customer_id, event_id, type, occurred_at, key FROM fresh
    WHERE customer_id IN (SELECT customer_id FROM ladder_walks WHERE walk = 'again')
    UNION ALL
    SELECT customer_id, first_event_id, first_type, first_at, first_key
    FROM internal.ladder_positions
    WHERE customer_id IN (SELECT customer_id FROM ladder_walks WHERE walk = 'again')
)
GROUP BY customer_id
"""

# One row per step of each walk. A stored position opens its walk (`seed`), carrying the
# running values; a purchase adds 1 to the count and is both the first and the latest
# purchase of its own row, so running sums, minima and maxima continue across the seam.
WALK = """
CREATE OR REPLACE TEMP TABLE ladder_walked AS
WITH facts AS (
    SELECT f.customer_id, f.event_id, f.type, f.occurred_at, f.key, f.satisfaction
    FROM fresh AS f JOIN ladder_walks AS w USING (customer_id)
    WHERE w.walk = 'on' AND f.type IN ('PurchaseRecorded', 'SurveyAnswered')
    UNION ALL
    SELECT f.customer_id, f.event_id, f.type, f.occurred_at, f.key, f.satisfaction
    FROM internal.ladder_facts AS f JOIN ladder_walks AS w USING (customer_id)
    WHERE w.walk = 'again'
),
steps AS (
    SELECT p.customer_id, NULL::UUID AS event_id, NULL AS type, NULL::TIMESTAMPTZ AS occurred_at,
           p.last_key AS key, TRUE AS seed, p.purchases AS purchase_count,
           p.first_purchase AS purchase_from, p.last_purchase AS purchase_to,
           p.last_satisfaction AS satisfaction, p.stage AS seed_stage,
           p.first_event_id, p.first_type, p.first_at, p.first_key
    FROM internal.ladder_positions AS p JOIN ladder_walks AS w USING (customer_id)
    WHERE w.walk = 'on'
    UNION ALL
    SELECT customer_id, event_id, type, occurred_at, key, FALSE,
           CASE WHEN type = 'PurchaseRecorded' THEN 1 ELSE 0 END,
           CASE WHEN type = 'PurchaseRecorded' THEN occurred_at END,
           CASE WHEN type = 'PurchaseRecorded' THEN occurred_at END,
           satisfaction, NULL, NULL, NULL, NULL, NULL
    FROM facts
    UNION ALL
    SELECT customer_id, event_id, type, occurred_at, key, FALSE, 0, NULL, NULL, NULL, NULL,
           NULL, NULL, NULL, NULL
    FROM ladder_firsts
    WHERE type NOT IN ('PurchaseRecorded', 'SurveyAnswered')
),
running AS (
    SELECT *,
           sum(purchase_count) OVER upto AS purchases,
           min(purchase_from) OVER upto AS first_purchase,
           max(purchase_to) OVER upto AS last_purchase,
           last_value(satisfaction IGNORE NULLS) OVER upto AS last_satisfaction
    FROM steps
    WINDOW upto AS (PARTITION BY customer_id ORDER BY key
                    ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
)
SELECT *,
    CASE
        WHEN seed THEN seed_stage
        WHEN purchases >= $loyal_purchases
             AND last_purchase - first_purchase >= to_days($loyal_span_days)
             AND coalesce(last_satisfaction, 1) >= $content THEN 'loyal'
        WHEN last_purchase - first_purchase >= to_days($repeat_after_days)
             AND coalesce(last_satisfaction, 1) >= $content THEN 'retained'
        WHEN purchases >= 1 AND last_satisfaction >= $positive THEN 'satisfied'
        WHEN purchases >= 1 THEN 'new'
        ELSE 'potential'
    END AS stage
FROM running
"""

# The stages entered on the walks: where the stage differs from the step before.
ENTRIES = """
CREATE OR REPLACE TEMP TABLE ladder_entries AS
WITH changes AS (
    SELECT *, lag(stage) OVER (PARTITION BY customer_id ORDER BY key) AS previous_stage
    FROM ladder_walked
),
entries AS (
    SELECT c.*, r.rank AS new_rank, pr.rank AS previous_rank
    FROM changes AS c
    JOIN loyalty_stages AS r ON r.stage = c.stage
    LEFT JOIN loyalty_stages AS pr ON pr.stage = c.previous_stage
    WHERE NOT c.seed AND c.previous_stage IS DISTINCT FROM c.stage
)
SELECT
    customer_id,
    stage,
    occurred_at AS entered_at,
    lead(occurred_at) OVER (PARTITION BY customer_id ORDER BY key) AS exited_at,
    previous_stage,
    CASE
        WHEN previous_rank IS NULL THEN 'first interaction (' || type || ')'
        WHEN new_rank > previous_rank THEN
            CASE stage
                WHEN 'new' THEN 'first purchase'
                WHEN 'satisfied' THEN 'positive survey after a purchase'
                WHEN 'retained'
                    THEN 'purchased again ' || $repeat_after_days || '+ days after the first'
                ELSE $loyal_purchases || '+ purchases over ' || $loyal_span_days || '+ days'
            END
        ELSE 'latest survey score ' || last_satisfaction || ' (' || type || ')'
    END AS reason,
    event_id AS trigger_event_id
FROM entries
"""

WRITE_HISTORY = """
DELETE FROM loyalty_stage_history
WHERE customer_id IN (SELECT customer_id FROM ladder_walks WHERE walk = 'again');

-- A walk that went on and entered a stage closes the stage it started in.
UPDATE loyalty_stage_history AS h SET exited_at = e.entered_at
FROM (SELECT customer_id, min(entered_at) AS entered_at FROM ladder_entries
      GROUP BY customer_id) AS e
WHERE h.customer_id = e.customer_id AND h.exited_at IS NULL
  AND h.customer_id IN (SELECT customer_id FROM ladder_walks WHERE walk = 'on');

INSERT INTO loyalty_stage_history SELECT * FROM ladder_entries;
"""

# Each walked customer's new standing: the last step of its walk.
WRITE_POSITIONS = """
CREATE OR REPLACE TEMP TABLE ladder_ends AS
SELECT w.customer_id,
       coalesce(first(w.first_event_id) FILTER (WHERE w.seed), any_value(f.event_id))
           AS first_event_id,
       coalesce(first(w.first_type) FILTER (WHERE w.seed), any_value(f.type)) AS first_type,
       coalesce(first(w.first_at) FILTER (WHERE w.seed), any_value(f.occurred_at)) AS first_at,
       coalesce(first(w.first_key) FILTER (WHERE w.seed), any_value(f.key)) AS first_key,
       max(w.key) AS last_key,
       arg_max(w.purchases, w.key) AS purchases,
       arg_max(w.first_purchase, w.key) AS first_purchase,
       arg_max(w.last_purchase, w.key) AS last_purchase,
       arg_max(w.last_satisfaction, w.key) AS last_satisfaction,
       arg_max(w.stage, w.key) AS stage
FROM ladder_walked AS w LEFT JOIN ladder_firsts AS f USING (customer_id)
GROUP BY w.customer_id;

DELETE FROM internal.ladder_positions
WHERE customer_id IN (SELECT customer_id FROM ladder_walks);

INSERT INTO internal.ladder_positions
SELECT customer_id, first_event_id, first_type, first_at, first_key, last_key, purchases,
       first_purchase, last_purchase, last_satisfaction, stage
FROM ladder_ends;
"""


def refresh(con: duckdb.DuckDBPyConnection, ladder: LadderPolicy) -> None:
    """Walk every customer with new ladder facts on (or again); leaves the stages entered
    in temp table `ladder_entries` and the customers walked in `ladder_walks`."""
    parameters = {
        "loyal_purchases": ladder.loyal_purchases,
        "loyal_span_days": ladder.loyal_span_days,
        "repeat_after_days": ladder.repeat_after_days,
        "content": ladder.content_satisfaction,
        "positive": ladder.positive_satisfaction,
    }
    run(con, STORE_FACTS)
    run(con, PLAN_WALKS)
    run(con, FIRST_EVENTS)
    run(con, WALK, parameters)
    run(
        con,
        ENTRIES,
        {k: parameters[k] for k in ("repeat_after_days", "loyal_purchases", "loyal_span_days")},
    )
    run(con, WRITE_HISTORY)
    run(con, WRITE_POSITIONS)
