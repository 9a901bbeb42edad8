"""The loyalty ladder (domain.policy.LadderPolicy) as projected into `loyalty_stage_history`.

Defaults: positive survey ≥ 0.75, content ≥ 0.5, retained: a purchase 7+ days after the
first, loyal: 4+ purchases spanning 180+ days. Expected histories are worked out by hand.
"""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
from conftest import event, project, record

from bootstrap import Settings, open_ledger
from domain.demo_history import generate_history
from domain.ledger import Ledger

Row = tuple[Any, ...]


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def purchase(customer: str, at: str, order_id: str, amount: str = "100") -> dict[str, Any]:
    data = {"order_id": order_id, "amount": amount, "currency": "EUR"}
    return event("PurchaseRecorded", customer, at, data)


def survey(customer: str, at: str, survey_id: str, kind: str, score: int) -> dict[str, Any]:
    return event(
        "SurveyAnswered", customer, at, {"survey_id": survey_id, "kind": kind, "score": score}
    )


def recorded(ledger: Ledger, events: list[dict[str, Any]]) -> list[str]:
    """Record events; returns their event ids (all must be accepted)."""
    outcomes = record(ledger, events)
    assert [o.status for o in outcomes] == ["accepted"] * len(events), outcomes
    return [o.event_id for o in outcomes]


def history(con: duckdb.DuckDBPyConnection, customer: str) -> list[Row]:
    """(stage, entered_at, exited_at, previous_stage, reason, trigger_event_id) in order."""
    return con.execute(
        "SELECT stage, entered_at, exited_at, previous_stage, reason, CAST(trigger_event_id "
        "AS VARCHAR) FROM loyalty_stage_history WHERE customer_id = ? ORDER BY entered_at",
        [customer],
    ).fetchall()


def stage_of(con: duckdb.DuckDBPyConnection, customer: str) -> str:
    row = con.execute(
        "SELECT loyalty_stage FROM customer_profiles WHERE customer_id = ?", [customer]
    ).fetchone()
    assert row is not None
    return str(row[0])


# The whole ladder up, one step down, and back up.
LADDER = [
    event("CustomerRegistered", "L-1", "2025-01-01T09:00:00Z", {"region": "East"}),
    purchase("L-1", "2025-01-10T09:00:00Z", "o1"),
    survey("L-1", "2025-01-12T09:00:00Z", "s1", "csat", 4),  # (4-1)/4 = 0.75 ≥ 0.75
    # exactly 7 days after the first purchase
    purchase("L-1", "2025-01-17T09:00:00Z", "o2"),
    event(
        "ContactLogged", "L-1", "2025-02-01T09:00:00Z", {"channel": "sms", "direction": "outbound"}
    ),
    purchase("L-1", "2025-03-01T09:00:00Z", "o3"),
    # 4th purchase; 01-10 → 07-09 = 21 + 28 + 31 + 30 + 31 + 30 + 9 = 180 days
    purchase("L-1", "2025-07-09T09:00:00Z", "o4"),
    survey("L-1", "2025-08-01T09:00:00Z", "s2", "csat", 2),  # (2-1)/4 = 0.25 < 0.5
    survey("L-1", "2025-08-15T09:00:00Z", "s3", "nps", 10),  # 10/10 = 1.0
]


def expected_ladder(ids: list[str]) -> list[Row]:
    reg, p1, s1, p2, _contact, _p3, p4, s2, s3 = ids
    return [
        ("potential", utc("2025-01-01T09:00:00"), utc("2025-01-10T09:00:00"), None,
         "first interaction (CustomerRegistered)", reg),
        ("new", utc("2025-01-10T09:00:00"), utc("2025-01-12T09:00:00"), "potential",
         "first purchase", p1),
        ("satisfied", utc("2025-01-12T09:00:00"), utc("2025-01-17T09:00:00"), "new",
         "positive survey after a purchase", s1),
        ("retained", utc("2025-01-17T09:00:00"), utc("2025-07-09T09:00:00"), "satisfied",
         "purchased again 7+ days after the first", p2),
        ("loyal", utc("2025-07-09T09:00:00"), utc("2025-08-01T09:00:00"), "retained",
         "4+ purchases over 180+ days", p4),
        # the negative survey breaks loyal/retained (0.25 < 0.5) and satisfied (< 0.75)
        ("new", utc("2025-08-01T09:00:00"), utc("2025-08-15T09:00:00"), "loyal",
         "latest survey score 0.2500 (SurveyAnswered)", s2),
        ("loyal", utc("2025-08-15T09:00:00"), None, "new",
         "4+ purchases over 180+ days", s3),
    ]  # fmt: skip


def test_the_whole_ladder(ledger: Ledger, settings: Settings) -> None:
    ids = recorded(ledger, LADDER)
    con = project(ledger, settings)
    assert history(con, "L-1") == expected_ladder(ids)
    assert stage_of(con, "L-1") == "loyal"


def test_the_ladder_projected_event_by_event(ledger: Ledger, settings: Settings) -> None:
    ids: list[str] = []
    stages: list[str] = []
    for e in LADDER:
        ids += recorded(ledger, [e])
        con = project(ledger, settings)
        stages.append(stage_of(con, "L-1"))
        con.close()
    assert stages == [
        "potential",
        "new",
        "satisfied",
        "retained",
        "retained",  # a contact changes nothing
        "retained",  # 3 purchases
        "loyal",
        "new",
        "loyal",
    ]
    con = project(ledger, settings)
    assert history(con, "L-1") == expected_ladder(ids)


def test_thresholds_are_inclusive_and_exact(ledger: Ledger, settings: Settings) -> None:
    recorded(
        ledger,
        [
            # L-2: second purchase 1 s short of 7 days: still new
            purchase("L-2", "2025-01-10T09:00:00Z", "o1"),
            purchase("L-2", "2025-01-17T08:59:59Z", "o2"),
            # L-3: 4 purchases spanning 1 s short of 180 days: retained, not loyal
            purchase("L-3", "2025-01-10T09:00:00Z", "o1"),
            purchase("L-3", "2025-02-10T09:00:00Z", "o2"),
            purchase("L-3", "2025-04-10T09:00:00Z", "o3"),
            purchase("L-3", "2025-07-09T08:59:59Z", "o4"),
            # L-4: 3 purchases over 200 days is not enough for loyal either
            purchase("L-4", "2025-01-10T09:00:00Z", "o1"),
            purchase("L-4", "2025-03-10T09:00:00Z", "o2"),
            purchase("L-4", "2025-07-29T09:00:00Z", "o3"),
            # L-5: csat 3 = (3-1)/4 = 0.5: content but not positive → new
            purchase("L-5", "2025-01-10T09:00:00Z", "o1"),
            survey("L-5", "2025-01-11T09:00:00Z", "s1", "csat", 3),
            # L-6: ces 6 = 5/6 = 0.8333 ≥ 0.75 → satisfied
            purchase("L-6", "2025-01-10T09:00:00Z", "o1"),
            survey("L-6", "2025-01-11T09:00:00Z", "s1", "ces", 6),
        ],
    )
    con = project(ledger, settings)
    assert stage_of(con, "L-2") == "new"
    assert stage_of(con, "L-3") == "retained"
    assert stage_of(con, "L-4") == "retained"
    assert stage_of(con, "L-5") == "new"
    assert stage_of(con, "L-6") == "satisfied"
    # the first event of L-2 is a purchase: it enters straight at new
    assert history(con, "L-2")[0][:5] == (
        "new",
        utc("2025-01-10T09:00:00"),
        None,
        None,
        "first interaction (PurchaseRecorded)",
    )


def test_content_survey_keeps_retained_and_poor_one_drops_it(
    ledger: Ledger, settings: Settings
) -> None:
    ids = recorded(
        ledger,
        [
            purchase("L-7", "2025-01-10T09:00:00Z", "o1"),
            survey("L-7", "2025-01-11T09:00:00Z", "s1", "csat", 3),  # 0.5: new stays new
            purchase("L-7", "2025-01-20T09:00:00Z", "o2"),  # 10 days later, 0.5 ≥ 0.5
            survey("L-7", "2025-01-25T09:00:00Z", "s2", "ces", 3),  # (3-1)/6 = 0.3333 < 0.5
            survey("L-7", "2025-02-01T09:00:00Z", "s3", "callback", 4),  # (4-1)/4 = 0.75
        ],
    )
    p1, _s1, p2, s2, s3 = ids
    con = project(ledger, settings)
    assert history(con, "L-7") == [
        ("new", utc("2025-01-10T09:00:00"), utc("2025-01-20T09:00:00"), None,
         "first interaction (PurchaseRecorded)", p1),
        ("retained", utc("2025-01-20T09:00:00"), utc("2025-01-25T09:00:00"), "new",
         "purchased again 7+ days after the first", p2),
        ("new", utc("2025-01-25T09:00:00"), utc("2025-02-01T09:00:00"), "retained",
         "latest survey score 0.3333 (SurveyAnswered)", s2),
        # 0.75 ≥ 0.5 with a repeat purchase: retained (higher than satisfied)
        ("retained", utc("2025-02-01T09:00:00"), None, "new",
         "purchased again 7+ days after the first", s3),
    ]  # fmt: skip
    assert stage_of(con, "L-7") == "retained"


def test_survey_before_any_purchase(ledger: Ledger, settings: Settings) -> None:
    ids = recorded(
        ledger,
        [
            event("CustomerRegistered", "L-8", "2025-01-01T09:00:00Z"),
            survey("L-8", "2025-01-02T09:00:00Z", "s1", "csat", 5),  # 1.0, but no purchase
            purchase("L-8", "2025-01-03T09:00:00Z", "o1"),  # purchase + latest 1.0
        ],
    )
    reg, _s1, p1 = ids
    con = project(ledger, settings)
    assert history(con, "L-8") == [
        ("potential", utc("2025-01-01T09:00:00"), utc("2025-01-03T09:00:00"), None,
         "first interaction (CustomerRegistered)", reg),
        ("satisfied", utc("2025-01-03T09:00:00"), None, "potential",
         "positive survey after a purchase", p1),
    ]  # fmt: skip


def test_out_of_order_arrival_gives_the_same_history(tmp_path: Path) -> None:
    others = [
        purchase("L-9", "2025-01-10T09:00:00Z", "o1"),
        survey("L-9", "2025-01-11T09:00:00Z", "s1", "nps", 9),  # 0.9
        purchase("L-9", "2025-01-30T09:00:00Z", "o2"),
        survey("L-9", "2025-02-11T09:00:00Z", "s2", "nps", 2),  # 0.2
    ]
    events = LADDER + others

    in_order = Settings(data_dir=tmp_path / "in-order")
    ledger_a = open_ledger(in_order)
    ids = recorded(ledger_a, events)
    con_a = project(ledger_a, in_order)

    shuffled = Settings(data_dir=tmp_path / "shuffled")
    ledger_b = open_ledger(shuffled)
    order = list(range(len(events)))
    random.Random(20250101).shuffle(order)
    assert order != sorted(order)
    for i in order:  # one event per batch, projected after each
        recorded(ledger_b, [events[i]])
        project(ledger_b, shuffled).close()
    con_b = project(ledger_b, shuffled)

    everything = "SELECT * FROM loyalty_stage_history ORDER BY ALL"
    assert con_b.execute(everything).fetchall() == con_a.execute(everything).fetchall()
    assert history(con_b, "L-1") == expected_ladder(ids[: len(LADDER)])
    for customer in ("L-1", "L-9"):
        assert stage_of(con_b, customer) == stage_of(con_a, customer)
    assert stage_of(con_b, "L-9") == "new"  # 0.2 < 0.5 after a 20-day repeat purchase


def test_history_chains_and_matches_profiles(ledger: Ledger, settings: Settings) -> None:
    history_events = generate_history(customers=60)
    recorded(ledger, history_events[:700])
    project(ledger, settings).close()
    recorded(ledger, history_events[700:])
    con = project(ledger, settings)

    rows = con.execute(
        "SELECT customer_id, stage, entered_at, exited_at, previous_stage, trigger_event_id "
        "FROM loyalty_stage_history ORDER BY customer_id, entered_at"
    ).fetchall()
    by_customer: dict[str, list[Row]] = {}
    for row in rows:
        by_customer.setdefault(row[0], []).append(row)
    customers = {r[0] for r in con.execute("SELECT customer_id FROM customer_profiles").fetchall()}
    assert set(by_customer) == customers
    assert len(customers) == 60

    stages_seen: set[str] = set()
    for customer, chain in by_customer.items():
        assert chain[0][4] is None, customer  # the first row has no previous stage
        assert chain[-1][3] is None, customer  # only the last row is open
        for before, after in itertools.pairwise(chain):
            assert before[3] == after[2], customer  # exited exactly when the next entered
            assert after[4] == before[1], customer  # previous_stage is the row before
            assert after[1] != before[1], customer  # equal stages collapse
            assert before[2] < after[2], customer
        stages_seen.update(r[1] for r in chain)
    assert stages_seen == {"potential", "new", "satisfied", "retained", "loyal"}

    mismatched = con.execute(
        """
        SELECT p.customer_id, p.loyalty_stage, h.stage
        FROM customer_profiles AS p
        LEFT JOIN loyalty_stage_history AS h
            ON h.customer_id = p.customer_id AND h.exited_at IS NULL
        WHERE h.stage IS DISTINCT FROM p.loyalty_stage
        """
    ).fetchall()
    assert mismatched == []
    # every trigger is a mirrored event of that customer, at the moment the stage began
    orphans = con.execute(
        """
        SELECT h.customer_id, h.trigger_event_id
        FROM loyalty_stage_history AS h
        LEFT JOIN events AS e
            ON e.event_id = h.trigger_event_id AND e.customer_id = h.customer_id
               AND e.occurred_at = h.entered_at
        WHERE e.event_id IS NULL
        """
    ).fetchall()
    assert orphans == []
