"""`customer_profiles`: one row per customer, recomputed for the customers a batch touched
from their running totals (`internal.profile_totals`, updated from the batch's own events);
then the ABC classes, which depend on every customer's spend.

Definitions (pinned by tests/test_profiles.py):
- contacts are `ContactLogged` events; `last_seen_at` is the latest event of any type;
- `purchase_count` counts purchases; refunds do not lower it but reduce `total_spend`;
- money is in the reporting currency: `reporting_amount` when given, else `amount`; a
  refund is converted at its order's rate; divisions round half up to 4 decimals in exact
  integer arithmetic (`money_div`), never through binary floats;
- `open_complaints`: complaints whose status in `complaint_sla` is open or on hold;
- satisfaction is each survey score normalised to 0..1 on its scale (highest is best);
- `marketing_consent`: the latest `ConsentChanged` for purpose `marketing`.
"""

from __future__ import annotations

import duckdb

from projections.schema import one, run

STORE_ORDERS = """
INSERT INTO internal.orders
SELECT customer_id, order_id, CAST(amount AS DECIMAL(18, 4)),
       CAST(coalesce(reporting_amount, amount) AS DECIMAL(18, 4)), 0
FROM fresh WHERE type = 'PurchaseRecorded'
"""

# The batch's totals per customer (partial aggregates), then combined with the stored
# totals by the same kind of aggregate: counts and sums add, minima and maxima compare, and
# a latest value is the one with the greatest event_key. Order of arrival does not matter.
ADD_TO_TOTALS = """
-- The batch's refunds per order, in the order's currency, and what they add to the spend
-- refunded: all of the order's refunds converted together, less those before the batch
-- (each part rounded on its own would drift from the order's spend).
CREATE OR REPLACE TEMP TABLE order_refunds AS
SELECT o.customer_id, o.order_id, o.amount, o.spend,
       o.refunded AS refunded_before, o.refunded + r.refunded AS refunded_after
FROM (
    SELECT customer_id, order_id, sum(CAST(amount AS DECIMAL(18, 4))) AS refunded
    FROM fresh WHERE type = 'PurchaseRefunded' GROUP BY customer_id, order_id
) AS r
JOIN internal.orders AS o USING (customer_id, order_id);

UPDATE internal.orders AS o SET refunded = r.refunded_after
FROM order_refunds AS r
WHERE o.customer_id = r.customer_id AND o.order_id = r.order_id;

CREATE OR REPLACE TEMP TABLE batch_totals AS
WITH refunds AS (
    SELECT customer_id,
           CASE WHEN spend = amount THEN refunded_after - refunded_before
                ELSE money_div(refunded_after * spend, amount)
                     - money_div(refunded_before * spend, amount)
           END AS refunded
    FROM order_refunds
),
batch AS (
    SELECT
        customer_id,
        min(occurred_at) FILTER (WHERE type = 'CustomerRegistered') AS registered_at,
        arg_max(region, key) FILTER (WHERE region IS NOT NULL) AS region,
        max(key) FILTER (WHERE region IS NOT NULL) AS region_key,
        arg_max(province, key) FILTER (WHERE province IS NOT NULL) AS province,
        max(key) FILTER (WHERE province IS NOT NULL) AS province_key,
        arg_max(city, key) FILTER (WHERE city IS NOT NULL) AS city,
        max(key) FILTER (WHERE city IS NOT NULL) AS city_key,
        arg_max(segment, key) FILTER (WHERE segment IS NOT NULL) AS segment,
        max(key) FILTER (WHERE segment IS NOT NULL) AS segment_key,
        min(occurred_at) AS first_seen_at,
        max(occurred_at) AS last_seen_at,
        count(*) AS event_count,
        min(occurred_at) FILTER (WHERE type = 'ContactLogged') AS first_contact_at,
        max(occurred_at) FILTER (WHERE type = 'ContactLogged') AS last_contact_at,
        count(*) FILTER (WHERE type = 'ContactLogged') AS contact_count,
        count(*) FILTER (WHERE type = 'ContactLogged' AND direction = 'inbound')
            AS inbound_contacts,
        count(*) FILTER (WHERE type = 'ContactLogged' AND direction = 'outbound')
            AS outbound_contacts,
        count(*) FILTER (WHERE type = 'PurchaseRecorded') AS purchase_count,
        coalesce(sum(CAST(coalesce(reporting_amount, amount) AS DECIMAL(38, 4)))
                     FILTER (WHERE type = 'PurchaseRecorded'), 0) AS gross_spend,
        0 AS refunded,
        min(occurred_at) FILTER (WHERE type = 'PurchaseRecorded') AS first_purchase_at,
        max(occurred_at) FILTER (WHERE type = 'PurchaseRecorded') AS last_purchase_at,
        count(satisfaction) AS survey_count,
        coalesce(sum(satisfaction), 0) AS satisfaction_sum,
        arg_max(satisfaction, key) FILTER (WHERE satisfaction IS NOT NULL)
            AS last_satisfaction,
        max(key) FILTER (WHERE satisfaction IS NOT NULL) AS last_satisfaction_key,
        arg_max(CAST(granted AS BOOLEAN), key)
            FILTER (WHERE type = 'ConsentChanged' AND purpose = 'marketing')
            AS marketing_consent,
        max(key) FILTER (WHERE type = 'ConsentChanged' AND purpose = 'marketing')
            AS marketing_consent_key
    FROM fresh
    GROUP BY customer_id
)
SELECT b.* REPLACE (coalesce(r.refunded, 0) AS refunded)
FROM batch AS b
LEFT JOIN (SELECT customer_id, sum(refunded) AS refunded FROM refunds GROUP BY customer_id)
    AS r USING (customer_id);

CREATE OR REPLACE TEMP TABLE combined_totals AS
SELECT
    customer_id,
    min(registered_at) AS registered_at,
    arg_max(region, region_key) AS region, max(region_key) AS region_key,
    arg_max(province, province_key) AS province, max(province_key) AS province_key,
    arg_max(city, city_key) AS city, max(city_key) AS city_key,
    arg_max(segment, segment_key) AS segment, max(segment_key) AS segment_key,
    min(first_seen_at) AS first_seen_at,
    max(last_seen_at) AS last_seen_at,
    sum(event_count) AS event_count,
    min(first_contact_at) AS first_contact_at,
    max(last_contact_at) AS last_contact_at,
    sum(contact_count) AS contact_count,
    sum(inbound_contacts) AS inbound_contacts,
    sum(outbound_contacts) AS outbound_contacts,
    sum(purchase_count) AS purchase_count,
    sum(gross_spend) AS gross_spend,
    sum(refunded) AS refunded,
    min(first_purchase_at) AS first_purchase_at,
    max(last_purchase_at) AS last_purchase_at,
    sum(survey_count) AS survey_count,
    sum(satisfaction_sum) AS satisfaction_sum,
    arg_max(last_satisfaction, last_satisfaction_key) AS last_satisfaction,
    max(last_satisfaction_key) AS last_satisfaction_key,
    arg_max(marketing_consent, marketing_consent_key) AS marketing_consent,
    max(marketing_consent_key) AS marketing_consent_key
FROM (
    SELECT * FROM batch_totals
    UNION ALL BY NAME
    SELECT * FROM internal.profile_totals
    WHERE customer_id IN (SELECT customer_id FROM touched)
)
GROUP BY customer_id;

DELETE FROM internal.profile_totals WHERE customer_id IN (SELECT customer_id FROM touched);
INSERT INTO internal.profile_totals BY NAME SELECT * FROM combined_totals;
"""

# The touched customers' profiles, from their totals, complaints and ladder position.
REFRESH_TOUCHED = """
DELETE FROM customer_profiles WHERE customer_id IN (SELECT customer_id FROM touched);

INSERT INTO customer_profiles
WITH complaint_counts AS (
    SELECT customer_id, count(*) AS complaint_count,
           count(*) FILTER (WHERE status IN ('open', 'on_hold')) AS open_complaints
    FROM complaint_sla
    WHERE customer_id IN (SELECT customer_id FROM touched)
    GROUP BY customer_id
)
SELECT
    t.customer_id, t.registered_at, t.region, t.province, t.city, t.segment,
    t.first_seen_at, t.last_seen_at, t.event_count,
    t.first_contact_at, t.last_contact_at, t.contact_count, t.inbound_contacts,
    t.outbound_contacts,
    t.purchase_count, t.gross_spend, t.refunded,
    t.gross_spend - t.refunded AS total_spend,
    CASE WHEN t.purchase_count > 0 THEN money_div(t.gross_spend, t.purchase_count) END
        AS avg_order_value,
    t.first_purchase_at, t.last_purchase_at,
    coalesce(c.complaint_count, 0) AS complaint_count,
    coalesce(c.open_complaints, 0) AS open_complaints,
    t.survey_count,
    CASE WHEN t.survey_count > 0
         THEN CAST(money_div(t.satisfaction_sum, t.survey_count) AS DECIMAL(6, 4)) END
        AS avg_satisfaction,
    t.last_satisfaction,
    t.marketing_consent,
    NULL AS abc_class,
    coalesce(l.stage, 'potential') AS loyalty_stage
FROM internal.profile_totals AS t
LEFT JOIN complaint_counts AS c USING (customer_id)
LEFT JOIN internal.ladder_positions AS l USING (customer_id)
WHERE t.customer_id IN (SELECT customer_id FROM touched);
"""

# Customers ranked by spend (ties by id, so the split is deterministic). A customer is A
# while the spend ranked before them is under 80 % of the total, B under 95 %, else C.
# Customers who spent nothing (or were refunded in full) are C.
#
# Spend ranked before rises strictly along the ranking (every spend in it is positive), so
# each class ends at one customer: the last A and the last B. Every
# customer is then classed by comparing its own (spend, id) with theirs, in one scan that
# rewrites only the classes that changed (a join of every customer with its rank cost
# twice as much).
_BOUNDS_RANKED = """
WITH ranked AS (
    SELECT customer_id, total_spend,
           coalesce(sum(total_spend) OVER (
               ORDER BY total_spend DESC, customer_id
               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS spend_before,
           sum(total_spend) OVER () AS grand_total
    FROM customer_profiles WHERE total_spend > 0
)
SELECT
    arg_max(total_spend, spend_before) FILTER (WHERE spend_before < 0.80 * grand_total)
        AS last_a_spend,
    arg_max(customer_id, spend_before) FILTER (WHERE spend_before < 0.80 * grand_total)
        AS last_a,
    arg_max(total_spend, spend_before) FILTER (WHERE spend_before < 0.95 * grand_total)
        AS last_b_spend,
    arg_max(customer_id, spend_before) FILTER (WHERE spend_before < 0.95 * grand_total)
        AS last_b
FROM ranked
"""

# A batch that changed no customer's spend leaves the ranking as it was: the ends are read
# from the classes before the batch's profiles replace the touched ones (the last A is the
# A ranked lowest; the last B, the A or B ranked lowest), without ranking anyone (the
# ranking cost ~10 ms a batch at 35k customers).
KEEP_BOUNDS = """
CREATE OR REPLACE TEMP TABLE abc_bounds AS
WITH last_a AS (
    SELECT total_spend, customer_id FROM customer_profiles WHERE abc_class = 'A'
    ORDER BY total_spend, customer_id DESC LIMIT 1
),
last_b AS (
    SELECT total_spend, customer_id FROM customer_profiles WHERE abc_class IN ('A', 'B')
    ORDER BY total_spend, customer_id DESC LIMIT 1
)
SELECT a.total_spend AS last_a_spend, a.customer_id AS last_a,
       b.total_spend AS last_b_spend, b.customer_id AS last_b
FROM (SELECT 1) AS one LEFT JOIN last_a AS a ON TRUE LEFT JOIN last_b AS b ON TRUE
"""

SPEND_CHANGED = "SELECT count(*) FROM batch_totals WHERE gross_spend <> 0 OR refunded <> 0"

_CLASS_OF = """
    CASE WHEN p.total_spend <= 0 OR b.last_a_spend IS NULL THEN 'C'
         WHEN p.total_spend > b.last_a_spend
              OR (p.total_spend = b.last_a_spend AND p.customer_id <= b.last_a) THEN 'A'
         WHEN p.total_spend > b.last_b_spend
              OR (p.total_spend = b.last_b_spend AND p.customer_id <= b.last_b) THEN 'B'
         ELSE 'C' END"""

_UPDATE_CLASSES = f"""
UPDATE customer_profiles AS p SET abc_class = {_CLASS_OF}
FROM {{bounds}} AS b
WHERE p.abc_class IS DISTINCT FROM {_CLASS_OF}
"""

CLASSIFY_RANKED = f"WITH bounds AS ({_BOUNDS_RANKED})" + _UPDATE_CLASSES.format(bounds="bounds")
CLASSIFY_KEPT = _UPDATE_CLASSES.format(bounds="abc_bounds")


def refresh(con: duckdb.DuckDBPyConnection) -> None:
    """Add the batch to the touched customers' totals and recompute their profiles (after
    the ladder and the complaint clocks), then ABC across all customers."""
    run(con, STORE_ORDERS)
    run(con, ADD_TO_TOTALS)
    changed = one(con, SPEND_CHANGED)
    spend_changed = bool(changed and changed[0])
    if not spend_changed:
        run(con, KEEP_BOUNDS)  # from the classes before the touched profiles are replaced
    run(con, REFRESH_TOUCHED)
    run(con, CLASSIFY_RANKED if spend_changed else CLASSIFY_KEPT)
