"""The demo history: deterministic, valid against the catalogue, accepted by a real ledger,
and varied enough that every projection (ladder, ABC, SLA) has something to show."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from domain.demo_history import generate_history
from domain.events import INCOMING
from domain.ledger import Ledger

Events = list[dict[str, Any]]


@pytest.fixture(scope="module")
def history() -> Events:
    return generate_history(customers=60)


@pytest.fixture(scope="module")
def full_history() -> Events:
    return generate_history()


def _occurred(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["occurred_at"])


def _complaints(events: Events) -> dict[tuple[str, str], list[str]]:
    steps: dict[tuple[str, str], list[str]] = defaultdict(list)
    for e in events:
        if e["type"].startswith("Complaint"):
            steps[(e["customer_id"], e["data"]["complaint_id"])].append(e["type"])
    return steps


# --- determinism ---------------------------------------------------------------------------


def test_same_arguments_give_the_same_bytes(history: Events) -> None:
    again = generate_history(customers=60)
    assert again == history
    assert json.dumps(again, sort_keys=True) == json.dumps(history, sort_keys=True)


def test_another_seed_gives_another_history(history: Events) -> None:
    assert generate_history(customers=60, seed=8) != history


def test_no_customers_no_events() -> None:
    assert generate_history(customers=0) == []


# --- the contract ------------------------------------------------------------------------


def test_every_event_validates(full_history: Events) -> None:
    for event in full_history:
        INCOMING.validate_python(event)


def test_events_are_json_ready_with_the_ingest_envelope(history: Events) -> None:
    envelope = {"type", "customer_id", "occurred_at", "source_event_id", "source", "actor", "data"}
    assert all(set(e) == envelope for e in history)
    assert json.loads(json.dumps(history)) == history  # only JSON types, no dates or Decimals
    assert all(re.fullmatch(r"C\d{5}", e["customer_id"]) for e in history)
    assert all(e["source"] for e in history)


def test_sorted_by_occurred_at_with_offsets_within_the_period(full_history: Events) -> None:
    times = [_occurred(e) for e in full_history]
    assert times == sorted(times)
    assert all(e["occurred_at"].endswith("+08:00") for e in full_history)
    start = datetime.fromisoformat("2024-01-01T00:00:00+08:00")
    assert start <= times[0] and times[-1] < start + timedelta(days=730)


def test_a_short_period_stays_within_its_bounds() -> None:
    events = generate_history(customers=40, seed=3, start=date(2023, 6, 1), days=45)
    start = datetime.fromisoformat("2023-06-01T00:00:00+08:00")
    assert events
    assert all(start <= _occurred(e) < start + timedelta(days=45) for e in events)


def test_source_event_ids_are_unique(full_history: Events) -> None:
    ids = [e["source_event_id"] for e in full_history]
    assert len(set(ids)) == len(ids)


def test_money_is_a_two_decimal_string_in_eur(full_history: Events) -> None:
    money = re.compile(r"\d+\.\d{2}")
    for e in full_history:
        if e["type"] in ("PurchaseRecorded", "PurchaseRefunded"):
            assert isinstance(e["data"]["amount"], str) and money.fullmatch(e["data"]["amount"])
        if e["type"] == "PurchaseRecorded":
            assert e["data"]["currency"] == "EUR"
        if "compensation" in e["data"]:
            assert money.fullmatch(e["data"]["compensation"])


# --- the invariants, checked by the real ledger ---------------------------------------------


def test_a_real_ledger_accepts_the_whole_history(history: Events, tmp_path: Path) -> None:
    ledger = Ledger(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(tmp_path / "events.sqlite3"),
        }
    )
    outcomes = ledger.record([INCOMING.validate_python(e) for e in history])
    assert all(o.status == "accepted" for o in outcomes), [
        o.reason for o in outcomes if o.status != "accepted"
    ][:5]
    assert ledger.head() > 0


# --- realism -------------------------------------------------------------------------------


def test_size_is_about_25_to_40_events_per_customer(full_history: Events) -> None:
    assert 25 * 500 <= len(full_history) <= 40 * 500
    assert len({e["customer_id"] for e in full_history}) == 500


def test_some_customers_never_buy_and_some_become_loyal(history: Events) -> None:
    registered = {e["customer_id"] for e in history if e["type"] == "CustomerRegistered"}
    purchases: dict[str, list[datetime]] = defaultdict(list)
    for e in history:
        if e["type"] == "PurchaseRecorded":
            purchases[e["customer_id"]].append(_occurred(e))
    assert registered - set(purchases), "no potential customers"
    assert any(
        len(days) >= 4 and days[-1] - days[0] >= timedelta(days=180) for days in purchases.values()
    ), "nobody qualifies as loyal"


def test_complaints_cover_every_priority_and_handling(history: Events) -> None:
    priorities = {e["data"]["priority"] for e in history if e["type"] == "ComplaintFiled"}
    assert priorities == {"low", "normal", "high", "urgent"}
    steps = _complaints(history)
    assert any("ComplaintReopened" in s for s in steps.values())
    assert any("ComplaintAcknowledged" not in s for s in steps.values())
    assert any(e["type"] == "PurchaseRefunded" for e in history)


def test_full_history_shows_the_crm_practice(full_history: Events) -> None:
    counts = Counter(e["type"] for e in full_history)
    assert {
        "ConsentChanged",
        "CustomerProfileUpdated",
        "ComplaintEscalated",
        "ComplaintOnHold",
        "ComplaintResumed",
    } <= set(counts)
    complainers = {e["customer_id"] for e in full_history if e["type"] == "ComplaintFiled"}
    assert 0.08 <= len(complainers) / 500 <= 0.18
    steps = _complaints(full_history)
    closed = sum(1 for s in steps.values() if s[-1] == "ComplaintClosed")
    assert closed > len(steps) / 2, "most complaints are closed"
    channels = {e["data"]["channel"] for e in full_history if e["type"] == "ContactLogged"}
    assert len(channels) == 10
    kinds = {e["data"]["kind"] for e in full_history if e["type"] == "SurveyAnswered"}
    assert {"callback", "csat", "nps"} <= kinds


def test_a_minority_brings_most_revenue_so_abc_classes_are_all_populated(
    full_history: Events,
) -> None:
    spend: dict[str, Decimal] = defaultdict(Decimal)
    for e in full_history:
        if e["type"] == "PurchaseRecorded":
            spend[e["customer_id"]] += Decimal(e["data"]["amount"])
    ranked = sorted(spend.values(), reverse=True)
    total, running, classes = sum(ranked, Decimal(0)), Decimal(0), Counter[str]()
    for amount in ranked:
        share = running / total
        classes["A" if share < Decimal("0.8") else "B" if share < Decimal("0.95") else "C"] += 1
        running += amount
    assert set(classes) == {"A", "B", "C"}
    assert sum(ranked[: len(ranked) // 5], Decimal(0)) > Decimal("0.6") * total


def test_purchases_peak_in_spring_and_before_the_year_end(full_history: Events) -> None:
    months = Counter(_occurred(e).month for e in full_history if e["type"] == "PurchaseRecorded")
    assert months[11] + months[12] > months[7] + months[8]
    assert months[3] + months[4] > months[7] + months[8]


def test_routine_inbound_emails_are_mostly_answered_within_hours(full_history: Events) -> None:
    """The response alarm needs quiet and loud cases: most routine emails get a staff reply
    ('re: <topic>') within 12 h, some later, a few never; complaint emails are left out."""
    emails: dict[str, list[tuple[datetime, str]]] = defaultdict(list)
    replies: dict[str, list[datetime]] = defaultdict(list)
    for e in full_history:
        data = e["data"]
        if e["type"] != "ContactLogged" or data["channel"] != "email":
            continue
        if data["direction"] == "inbound" and "complaint_id" not in data:
            emails[e["customer_id"]].append((_occurred(e), data["topic"]))
        elif data["topic"].startswith("re: "):
            assert data["direction"] == "outbound" and "complaint_id" not in data
            assert re.fullmatch(r"agent-\d{2}", e["actor"]) and data["agent"] == e["actor"]
            replies[e["customer_id"]].append(_occurred(e))
            earlier = [
                t for t, topic in emails[e["customer_id"]] if f"re: {topic}" == data["topic"]
            ]
            assert earlier and _occurred(e) - max(earlier) <= timedelta(hours=48)
    answered = Counter[str]()
    for customer, received in emails.items():
        for at, _ in received:
            later = [t for t in replies[customer] if t > at]
            wait = min(later) - at if later else None
            answered[
                "never" if wait is None else "soon" if wait <= timedelta(hours=12) else "late"
            ] += 1
    total = sum(answered.values())
    assert total >= 200, "too few routine emails to show the response alarm"
    assert 0.75 <= answered["soon"] / total <= 0.92
    assert answered["late"] and answered["never"]
