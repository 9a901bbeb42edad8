"""`loyalty_stage_history`: each customer's way up (and down) the ladder.

The ladder's rules are `domain.policy.LadderPolicy`. For every event of a touched customer,
in business-time order, the running purchase count, purchase span and latest survey give a
stage; consecutive equal stages collapse into one history row (entered_at, exited_at).
Nothing here reads a clock: stages follow from events alone.
"""

from __future__ import annotations

import duckdb

from domain.policy import LadderPolicy
from projections.schema import run

DELETE_TOUCHED = """
DELETE FROM loyalty_stage_history WHERE customer_id IN (SELECT customer_id FROM touched)
"""

INSERT_TOUCHED = """
INSERT INTO loyalty_stage_history
WITH ev AS (
    SELECT e.customer_id, e.event_id, e.position, e.type, e.occurred_at,
           CAST((CAST(e.data->>'score' AS INTEGER) - s.lowest)
                / (s.highest - s.lowest) AS DECIMAL(6, 4)) AS satisfaction
    FROM events AS e
    LEFT JOIN survey_scales AS s ON e.type = 'SurveyAnswered' AND s.kind = e.data->>'kind'
    WHERE e.customer_id IN (SELECT customer_id FROM touched)
),
running AS (
    SELECT *,
           count(*) FILTER (WHERE type = 'PurchaseRecorded') OVER upto AS purchases,
           min(occurred_at) FILTER (WHERE type = 'PurchaseRecorded') OVER upto AS first_purchase,
           max(occurred_at) FILTER (WHERE type = 'PurchaseRecorded') OVER upto AS last_purchase,
           last_value(satisfaction IGNORE NULLS) OVER upto AS last_satisfaction
    FROM ev
    WINDOW upto AS (PARTITION BY customer_id ORDER BY occurred_at, position
                    ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
),
staged AS (
    SELECT *,
        CASE
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
),
changes AS (
    SELECT *, lag(stage) OVER (PARTITION BY customer_id ORDER BY occurred_at, position)
                  AS previous_stage
    FROM staged
),
entries AS (
    SELECT c.*, r.rank AS new_rank, pr.rank AS previous_rank
    FROM changes AS c
    JOIN loyalty_stages AS r ON r.stage = c.stage
    LEFT JOIN loyalty_stages AS pr ON pr.stage = c.previous_stage
    WHERE c.previous_stage IS DISTINCT FROM c.stage
)
SELECT
    customer_id,
    stage,
    occurred_at AS entered_at,
    lead(occurred_at) OVER (PARTITION BY customer_id ORDER BY occurred_at, position)
        AS exited_at,
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


def refresh(con: duckdb.DuckDBPyConnection, ladder: LadderPolicy) -> None:
    """Recompute the stage history of every customer in `touched`."""
    run(con, DELETE_TOUCHED)
    run(
        con,
        INSERT_TOUCHED,
        {
            "loyal_purchases": ladder.loyal_purchases,
            "loyal_span_days": ladder.loyal_span_days,
            "repeat_after_days": ladder.repeat_after_days,
            "content": ladder.content_satisfaction,
            "positive": ladder.positive_satisfaction,
        },
    )
