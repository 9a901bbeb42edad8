"""Canned summaries of the projections (the demo's report; also handy for analysts)."""

from __future__ import annotations

from typing import Any

import duckdb

Report = tuple[str, list[str], list[tuple[Any, ...]]]

SUMMARIES: dict[str, str] = {
    "Customers per loyalty stage": """
        SELECT s.stage, count(p.customer_id) AS customers,
               round(100.0 * count(p.customer_id) / nullif(sum(count(p.customer_id)) OVER (), 0), 1)
                   AS percent
        FROM loyalty_stages AS s
        LEFT JOIN customer_profiles AS p ON p.loyalty_stage = s.stage
        GROUP BY s.stage, s.rank ORDER BY s.rank
    """,
    "ABC classification (reporting currency)": """
        SELECT abc_class, count(*) AS customers, sum(total_spend) AS spend,
               round(100.0 * sum(total_spend) / sum(sum(total_spend)) OVER (), 1) AS spend_percent
        FROM customer_profiles GROUP BY abc_class ORDER BY abc_class
    """,
    "Complaint SLA compliance": """
        SELECT priority, count(*) AS complaints,
               count(*) FILTER (WHERE first_response_status = 'met') AS resp_met,
               count(*) FILTER (WHERE first_response_status = 'breached') AS resp_breached,
               count(*) FILTER (WHERE resolution_status = 'met') AS res_met,
               count(*) FILTER (WHERE resolution_status = 'breached') AS res_breached,
               count(*) FILTER (WHERE status IN ('open', 'on_hold')) AS open
        FROM complaint_sla
        GROUP BY priority
        ORDER BY array_position(['urgent', 'high', 'normal', 'low'], priority)
    """,
    "Response alarm: waits for an answer, by channel": """
        SELECT channel, count(*) AS waits,
               count(*) FILTER (WHERE status = 'answered') AS answered,
               count(*) FILTER (WHERE status = 'answered_late') AS answered_late,
               count(*) FILTER (WHERE status = 'overdue') AS overdue,
               count(*) FILTER (WHERE status = 'waiting') AS waiting,
               round(median(epoch(answered_at - started_at)) / 3600, 1) AS median_hours
        FROM response_waits GROUP BY channel ORDER BY channel
    """,
    "Top complaint categories": """
        SELECT category, count(*) AS complaints,
               count(*) FILTER (WHERE resolution_status = 'breached') AS resolution_breached,
               mode(root_cause) AS usual_root_cause
        FROM complaint_sla GROUP BY category ORDER BY complaints DESC, category LIMIT 5
    """,
}


def summary(con: duckdb.DuckDBPyConnection) -> list[Report]:
    reports: list[Report] = []
    for title, sql in SUMMARIES.items():
        result = con.execute(sql)
        columns = [d[0] for d in result.description or []]
        reports.append((title, columns, result.fetchall()))
    return reports
