"""`customer_profiles`: one row per customer, recomputed from the mirror for the customers
a batch touched; then the ABC classes, which depend on every customer's spend.

Definitions (pinned by tests/test_profiles.py):
- contacts are `ContactLogged` events; `last_seen_at` is the latest event of any type;
- `purchase_count` counts purchases; refunds do not lower it but reduce `total_spend`;
- money is in the reporting currency: `reporting_amount` when given, else `amount`; a
  refund is converted at its order's rate; divisions round half up to 4 decimals in exact
  integer arithmetic (`money_div`), never through binary floats;
- `open_complaints`: filed and neither resolved nor closed after the last reopening;
- satisfaction is each survey score normalised to 0..1 on its scale (highest is best);
- `marketing_consent`: the latest `ConsentChanged` for purpose `marketing`.
"""

from __future__ import annotations

import duckdb

from projections.schema import run

REFRESH_TOUCHED = """
DELETE FROM customer_profiles WHERE customer_id IN (SELECT customer_id FROM touched);

INSERT INTO customer_profiles
WITH ev AS (
    SELECT * FROM events WHERE customer_id IN (SELECT customer_id FROM touched)
),
purchases AS (
    SELECT customer_id, data->>'order_id' AS order_id,
           CAST(data->>'amount' AS DECIMAL(18, 4)) AS amount,
           CAST(coalesce(data->>'reporting_amount', data->>'amount') AS DECIMAL(18, 4)) AS spend
    FROM ev WHERE type = 'PurchaseRecorded'
),
refunds AS (
    SELECT r.customer_id,
           CAST(sum(CASE WHEN p.spend = p.amount THEN CAST(r.data->>'amount' AS DECIMAL(18, 4))
                         ELSE money_div(CAST(r.data->>'amount' AS DECIMAL(18, 4)) * p.spend,
                                        p.amount) END) AS DECIMAL(18, 4)) AS refunded
    FROM ev AS r
    JOIN purchases AS p ON p.customer_id = r.customer_id AND p.order_id = r.data->>'order_id'
    WHERE r.type = 'PurchaseRefunded'
    GROUP BY r.customer_id
),
spend AS (
    SELECT customer_id, count(*) AS purchase_count, sum(spend) AS gross_spend
    FROM purchases GROUP BY customer_id
),
surveys AS (
    SELECT ev.customer_id, ev.occurred_at, ev.position,
           CAST((CAST(ev.data->>'score' AS INTEGER) - s.lowest)
                / (s.highest - s.lowest) AS DECIMAL(6, 4)) AS satisfaction
    FROM ev JOIN survey_scales AS s ON s.kind = ev.data->>'kind'
    WHERE ev.type = 'SurveyAnswered'
),
satisfaction AS (
    SELECT customer_id, count(*) AS survey_count,
           CAST(sum(satisfaction) / count(*) AS DECIMAL(6, 4)) AS avg_satisfaction,
           first(satisfaction ORDER BY occurred_at DESC, position DESC) AS last_satisfaction
    FROM surveys GROUP BY customer_id
),
complaint_steps AS (
    SELECT customer_id, data->>'complaint_id' AS complaint_id, type, occurred_at, position
    FROM ev WHERE type IN ('ComplaintFiled', 'ComplaintResolved', 'ComplaintReopened',
                           'ComplaintClosed')
),
complaints AS (
    SELECT customer_id, complaint_id,
           first(type ORDER BY occurred_at DESC, position DESC) AS last_step
    FROM complaint_steps GROUP BY customer_id, complaint_id
),
complaint_counts AS (
    SELECT customer_id, count(*) AS complaint_count,
           count(*) FILTER (WHERE last_step IN ('ComplaintFiled', 'ComplaintReopened'))
               AS open_complaints
    FROM complaints GROUP BY customer_id
),
basics AS (
    SELECT
        customer_id,
        min(occurred_at) FILTER (WHERE type = 'CustomerRegistered') AS registered_at,
        first(data->>'region' ORDER BY occurred_at DESC, position DESC)
            FILTER (WHERE data->>'region' IS NOT NULL) AS region,
        first(data->>'province' ORDER BY occurred_at DESC, position DESC)
            FILTER (WHERE data->>'province' IS NOT NULL) AS province,
        first(data->>'city' ORDER BY occurred_at DESC, position DESC)
            FILTER (WHERE data->>'city' IS NOT NULL) AS city,
        first(data->>'segment' ORDER BY occurred_at DESC, position DESC)
            FILTER (WHERE data->>'segment' IS NOT NULL) AS segment,
        min(occurred_at) AS first_seen_at,
        max(occurred_at) AS last_seen_at,
        count(*) AS event_count,
        min(occurred_at) FILTER (WHERE type = 'ContactLogged') AS first_contact_at,
        max(occurred_at) FILTER (WHERE type = 'ContactLogged') AS last_contact_at,
        count(*) FILTER (WHERE type = 'ContactLogged') AS contact_count,
        count(*) FILTER (WHERE type = 'ContactLogged' AND data->>'direction' = 'inbound')
            AS inbound_contacts,
        count(*) FILTER (WHERE type = 'ContactLogged' AND data->>'direction' = 'outbound')
            AS outbound_contacts,
        min(occurred_at) FILTER (WHERE type = 'PurchaseRecorded') AS first_purchase_at,
        max(occurred_at) FILTER (WHERE type = 'PurchaseRecorded') AS last_purchase_at,
        first(CAST(data->>'granted' AS BOOLEAN) ORDER BY occurred_at DESC, position DESC)
            FILTER (WHERE type = 'ConsentChanged' AND data->>'purpose' = 'marketing')
            AS marketing_consent
    FROM ev
    GROUP BY customer_id
)
SELECT
    b.customer_id, b.registered_at, b.region, b.province, b.city, b.segment,
    b.first_seen_at, b.last_seen_at, b.event_count,
    b.first_contact_at, b.last_contact_at, b.contact_count, b.inbound_contacts,
    b.outbound_contacts,
    coalesce(s.purchase_count, 0) AS purchase_count,
    coalesce(s.gross_spend, 0) AS gross_spend,
    coalesce(r.refunded, 0) AS refunded,
    coalesce(s.gross_spend, 0) - coalesce(r.refunded, 0) AS total_spend,
    money_div(s.gross_spend, s.purchase_count) AS avg_order_value,
    b.first_purchase_at, b.last_purchase_at,
    coalesce(c.complaint_count, 0) AS complaint_count,
    coalesce(c.open_complaints, 0) AS open_complaints,
    coalesce(sat.survey_count, 0) AS survey_count,
    sat.avg_satisfaction, sat.last_satisfaction,
    b.marketing_consent,
    NULL AS abc_class,
    coalesce(stage.stage, 'potential') AS loyalty_stage
FROM basics AS b
LEFT JOIN spend AS s USING (customer_id)
LEFT JOIN refunds AS r USING (customer_id)
LEFT JOIN complaint_counts AS c USING (customer_id)
LEFT JOIN satisfaction AS sat USING (customer_id)
LEFT JOIN loyalty_stage_history AS stage
    ON stage.customer_id = b.customer_id AND stage.exited_at IS NULL;
"""

# Customers ranked by spend (ties by id, so the split is deterministic). A customer is A
# while the spend ranked before them is under 80 % of the total, B under 95 %, else C.
# Customers who spent nothing (or were refunded in full) are C.
CLASSIFY_ABC = """
WITH positive AS (
    SELECT customer_id, total_spend,
           coalesce(sum(total_spend) OVER (
               ORDER BY total_spend DESC, customer_id
               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS spend_before,
           sum(total_spend) OVER () AS grand_total
    FROM customer_profiles WHERE total_spend > 0
),
classes AS (
    SELECT p.customer_id,
           CASE WHEN pos.customer_id IS NULL THEN 'C'
                WHEN pos.spend_before < 0.80 * pos.grand_total THEN 'A'
                WHEN pos.spend_before < 0.95 * pos.grand_total THEN 'B'
                ELSE 'C' END AS abc_class
    FROM customer_profiles AS p LEFT JOIN positive AS pos USING (customer_id)
)
UPDATE customer_profiles SET abc_class = classes.abc_class
FROM classes
WHERE customer_profiles.customer_id = classes.customer_id
  AND customer_profiles.abc_class IS DISTINCT FROM classes.abc_class;
"""


def refresh(con: duckdb.DuckDBPyConnection) -> None:
    """Recompute the touched customers' profiles (after the loyalty history), then ABC."""
    run(con, REFRESH_TOUCHED)
    run(con, CLASSIFY_ABC)
