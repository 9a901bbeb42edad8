"""`customer_profiles` and the personal-data filter of `events`, against hand-computed values.

Every expected number below is worked out by hand from the definitions in
projections/profiles.py (the arithmetic is in the comments), never read back from the code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import duckdb
import orjson
import pytest
from conftest import event

from domain.ledger import Ledger

Projected = Callable[[Sequence[dict[str, Any]]], duckdb.DuckDBPyConnection]


def utc(text: str) -> datetime:
    """A UTC instant from 'YYYY-MM-DDTHH:MM:SS'."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def profile(con: duckdb.DuckDBPyConnection, customer_id: str) -> dict[str, Any]:
    cursor = con.execute("SELECT * FROM customer_profiles WHERE customer_id = ?", [customer_id])
    columns = [d[0] for d in cursor.description]
    rows = cursor.fetchall()
    assert len(rows) == 1, f"{customer_id}: {len(rows)} profile rows"
    return dict(zip(columns, rows[0], strict=True))


def abc_classes(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    rows = con.execute("SELECT customer_id, abc_class FROM customer_profiles").fetchall()
    return dict(rows)


def purchase(
    customer: str, at: str, order_id: str, amount: str, currency: str = "EUR", **more: Any
) -> dict[str, Any]:
    data = {"order_id": order_id, "amount": amount, "currency": currency, **more}
    return event("PurchaseRecorded", customer, at, data)


def refund(customer: str, at: str, order_id: str, amount: str) -> dict[str, Any]:
    return event("PurchaseRefunded", customer, at, {"order_id": order_id, "amount": amount})


def contact(customer: str, at: str, channel: str, direction: str) -> dict[str, Any]:
    return event("ContactLogged", customer, at, {"channel": channel, "direction": direction})


def survey(customer: str, at: str, survey_id: str, kind: str, score: int) -> dict[str, Any]:
    return event(
        "SurveyAnswered", customer, at, {"survey_id": survey_id, "kind": kind, "score": score}
    )


def complaint(type_: str, customer: str, at: str, complaint_id: str) -> dict[str, Any]:
    data: dict[str, Any] = {"complaint_id": complaint_id}
    if type_ == "ComplaintFiled":
        data |= {"channel": "phone", "category": "service"}
    elif type_ == "ComplaintResolved":
        data |= {"resolution": "fixed"}
    return event(type_, customer, at, data)


def consent(customer: str, at: str, purpose: str, granted: bool) -> dict[str, Any]:
    return event("ConsentChanged", customer, at, {"purpose": purpose, "granted": granted})


# --- money -----------------------------------------------------------------------------------


def test_purchases_refunds_and_reporting_currency(projected: Projected) -> None:
    con = projected(
        [
            # 20:00+08:00 is 12:00 UTC
            purchase("P-1", "2025-01-10T20:00:00+08:00", "o1", "120.50"),
            purchase("P-1", "2025-02-01T12:00:00Z", "o2", "300", "USD", reporting_amount="270"),
            # recorded after o2 but happened before it
            purchase("P-1", "2025-01-20T12:00:00Z", "o3", "79.50"),
            # o2's rate: 270 EUR / 300 USD = 0.9 → 100 USD refunded = 90 EUR
            refund("P-1", "2025-02-05T12:00:00Z", "o2", "100"),
            refund("P-1", "2025-01-25T12:00:00Z", "o1", "20.50"),
        ]
    )
    p = profile(con, "P-1")
    # refunds do not lower the purchase count
    assert p["purchase_count"] == 3
    # 120.50 + 270 (reporting amount, not 300 USD) + 79.50 = 470.00
    assert p["gross_spend"] == Decimal("470.00")
    # 90 (100 USD at 0.9) + 20.50 = 110.50
    assert p["refunded"] == Decimal("110.50")
    # 470.00 - 110.50 = 359.50
    assert p["total_spend"] == Decimal("359.50")
    # first by business time is o1 (2025-01-10 12:00 UTC), last is o2 (2025-02-01)
    assert p["first_purchase_at"] == utc("2025-01-10T12:00:00")
    assert p["last_purchase_at"] == utc("2025-02-01T12:00:00")


def test_refund_is_converted_at_its_own_orders_rate(projected: Projected) -> None:
    con = projected(
        [
            # rate 100 / 300 = 1/3
            purchase("P-2", "2025-01-01T10:00:00Z", "usd", "300", "USD", reporting_amount="100"),
            # rate 6.10 / 1000 = 0.0061
            purchase("P-2", "2025-01-02T10:00:00Z", "jpy", "1000", "JPY", reporting_amount="6.10"),
            purchase("P-2", "2025-01-03T10:00:00Z", "eur", "40"),
            refund("P-2", "2025-01-04T10:00:00Z", "usd", "100"),  # 100 / 3 = 33.3333
            refund("P-2", "2025-01-05T10:00:00Z", "usd", "50"),  # 50 / 3 = 16.6667
            refund("P-2", "2025-01-06T10:00:00Z", "jpy", "500"),  # 500 * 0.0061 = 3.05
            refund("P-2", "2025-01-07T10:00:00Z", "eur", "10"),  # 10 (no conversion)
        ]
    )
    p = profile(con, "P-2")
    assert p["purchase_count"] == 3
    # 100 + 6.10 + 40 = 146.10
    assert p["gross_spend"] == Decimal("146.10")
    # 33.3333 + 16.6667 + 3.05 + 10 = 63.05
    assert p["refunded"] == Decimal("63.05")
    # 146.10 - 63.05 = 83.05
    assert p["total_spend"] == Decimal("83.05")


def test_refund_in_a_later_batch_reduces_total_spend(projected: Projected) -> None:
    con = projected(
        [purchase("P-3", "2025-01-01T10:00:00Z", "o1", "80", "GBP", reporting_amount="96")]
    )
    first = profile(con, "P-3")
    assert (first["purchase_count"], first["total_spend"]) == (1, Decimal("96"))
    # rate 96 / 80 = 1.2 → 25 GBP = 30 EUR
    con = projected([refund("P-3", "2025-01-09T10:00:00Z", "o1", "25")])
    p = profile(con, "P-3")
    assert p["purchase_count"] == 1
    assert p["gross_spend"] == Decimal("96")
    assert p["refunded"] == Decimal("30")
    assert p["total_spend"] == Decimal("66")  # 96 - 30


def test_a_refund_in_parts_cancels_the_orders_spend_exactly(projected: Projected) -> None:
    # rate 2 / 3: each 1 USD part alone would be 0.6667 EUR, three of them 2.0001
    projected(
        [
            purchase("P-20", "2025-01-01T10:00:00Z", "o1", "3", "USD", reporting_amount="2"),
            purchase("P-21", "2025-01-01T10:00:00Z", "o1", "10"),
        ]
    )
    spent = ("refunded", "total_spend", "abc_class")
    con = projected([refund("P-20", "2025-01-02T10:00:00Z", "o1", "1")])
    # 1 * 2 / 3 = 0.66667 → 0.6667
    assert {f: profile(con, "P-20")[f] for f in spent} == {
        "refunded": Decimal("0.6667"),
        "total_spend": Decimal("1.3333"),
        "abc_class": "B",  # 10 of 11.3333 is ranked before it: 88 %
    }
    con = projected([refund("P-20", "2025-01-03T10:00:00Z", "o1", "1")])
    # 2 * 2 / 3 = 1.33333 → 1.3333
    assert profile(con, "P-20")["refunded"] == Decimal("1.3333")
    con = projected([refund("P-20", "2025-01-04T10:00:00Z", "o1", "1")])
    # 3 * 2 / 3 = 2: refunded in full, nothing spent
    assert {f: profile(con, "P-20")[f] for f in spent} == {
        "refunded": Decimal("2"),
        "total_spend": Decimal("0"),
        "abc_class": "C",
    }


def test_avg_order_value(projected: Projected) -> None:
    con = projected(
        [
            purchase("P-4", "2025-01-01T10:00:00Z", "o1", "10"),
            purchase("P-4", "2025-01-02T10:00:00Z", "o2", "20"),
            purchase("P-4", "2025-01-03T10:00:00Z", "o3", "100", "USD", reporting_amount="30.01"),
            contact("P-5", "2025-01-01T10:00:00Z", "phone", "inbound"),
        ]
    )
    # (10 + 20 + 30.01) / 3 = 60.01 / 3 = 20.00333... → 20.0033
    assert profile(con, "P-4")["avg_order_value"] == Decimal("20.0033")
    p5 = profile(con, "P-5")
    # no purchases: no average, zero money, no purchase dates
    assert p5["avg_order_value"] is None
    assert (p5["purchase_count"], p5["gross_spend"], p5["total_spend"]) == (0, 0, 0)
    assert (p5["first_purchase_at"], p5["last_purchase_at"]) == (None, None)


# --- contacts, complaints, surveys, consent ---------------------------------------------------


def test_contacts(projected: Projected) -> None:
    con = projected(
        [
            event("CustomerRegistered", "P-6", "2025-01-01T08:00:00Z", {"region": "East"}),
            contact("P-6", "2025-01-02T09:00:00Z", "phone", "inbound"),
            contact("P-6", "2025-01-05T10:00:00Z", "email", "outbound"),
            # recorded last, happened in between
            contact("P-6", "2025-01-03T19:00:00+08:00", "chat", "inbound"),
            purchase("P-6", "2025-01-04T12:00:00Z", "o1", "5"),
        ]
    )
    p = profile(con, "P-6")
    # 3 ContactLogged: phone in, email out, chat in
    assert (p["contact_count"], p["inbound_contacts"], p["outbound_contacts"]) == (3, 2, 1)
    assert p["first_contact_at"] == utc("2025-01-02T09:00:00")
    assert p["last_contact_at"] == utc("2025-01-05T10:00:00")
    # every event counts for seen/event_count, contacts or not
    assert p["event_count"] == 5
    assert p["first_seen_at"] == utc("2025-01-01T08:00:00")
    assert p["last_seen_at"] == utc("2025-01-05T10:00:00")
    assert p["registered_at"] == utc("2025-01-01T08:00:00")


def test_complaint_counts(projected: Projected) -> None:
    c = "P-7"
    con = projected(
        [
            # k1: filed, resolved → not open
            complaint("ComplaintFiled", c, "2025-01-01T10:00:00Z", "k1"),
            complaint("ComplaintResolved", c, "2025-01-02T10:00:00Z", "k1"),
            # k2: filed, resolved, reopened → open again
            complaint("ComplaintFiled", c, "2025-01-03T10:00:00Z", "k2"),
            complaint("ComplaintResolved", c, "2025-01-04T10:00:00Z", "k2"),
            complaint("ComplaintReopened", c, "2025-01-05T10:00:00Z", "k2"),
            # k3: only filed → open
            complaint("ComplaintFiled", c, "2025-01-06T10:00:00Z", "k3"),
            # k4: filed, acknowledged, on hold → neither resolved nor closed: open
            complaint("ComplaintFiled", c, "2025-01-07T10:00:00Z", "k4"),
            complaint("ComplaintAcknowledged", c, "2025-01-07T11:00:00Z", "k4"),
            complaint("ComplaintOnHold", c, "2025-01-07T12:00:00Z", "k4"),
            # k5: filed, closed, reopened, closed again → not open
            complaint("ComplaintFiled", c, "2025-01-08T10:00:00Z", "k5"),
            complaint("ComplaintClosed", c, "2025-01-08T11:00:00Z", "k5"),
            complaint("ComplaintReopened", c, "2025-01-09T10:00:00Z", "k5"),
            complaint("ComplaintClosed", c, "2025-01-10T10:00:00Z", "k5"),
            # k6: filed, resolved, reopened, resolved again → not open
            complaint("ComplaintFiled", c, "2025-01-11T10:00:00Z", "k6"),
            complaint("ComplaintResolved", c, "2025-01-11T11:00:00Z", "k6"),
            complaint("ComplaintReopened", c, "2025-01-12T10:00:00Z", "k6"),
            complaint("ComplaintResolved", c, "2025-01-13T10:00:00Z", "k6"),
        ]
    )
    p = profile(con, c)
    assert p["complaint_count"] == 6  # k1..k6
    assert p["open_complaints"] == 3  # k2 (reopened), k3, k4 (on hold)


def test_reopening_in_a_later_batch_opens_the_complaint_again(projected: Projected) -> None:
    c = "P-8"
    con = projected(
        [
            complaint("ComplaintFiled", c, "2025-01-01T10:00:00Z", "k1"),
            complaint("ComplaintResolved", c, "2025-01-02T10:00:00Z", "k1"),
        ]
    )
    assert (profile(con, c)["complaint_count"], profile(con, c)["open_complaints"]) == (1, 0)
    con = projected([complaint("ComplaintReopened", c, "2025-01-03T10:00:00Z", "k1")])
    assert (profile(con, c)["complaint_count"], profile(con, c)["open_complaints"]) == (1, 1)


def test_satisfaction_is_normalised_and_latest_by_business_time(projected: Projected) -> None:
    c = "P-9"
    con = projected(
        [
            survey(c, "2025-02-10T10:00:00Z", "s1", "csat", 4),  # (4-1)/(5-1) = 0.75
            survey(c, "2025-02-12T10:00:00Z", "s2", "nps", 7),  # (7-0)/(10-0) = 0.70
            # recorded after s2 but answered before it
            survey(c, "2025-02-11T10:00:00Z", "s3", "ces", 5),  # (5-1)/(7-1) = 0.6667
            survey(c, "2025-02-09T10:00:00Z", "s4", "callback", 2),  # (2-1)/(5-1) = 0.25
        ]
    )
    p = profile(con, c)
    assert p["survey_count"] == 4
    # (0.75 + 0.70 + 0.666667 + 0.25) / 4 = 2.366667 / 4 = 0.591667 → 0.5917
    assert p["avg_satisfaction"] == Decimal("0.5917")
    # latest answered is s2 (02-12), though s4 was recorded last
    assert p["last_satisfaction"] == Decimal("0.7000")


def test_average_satisfaction_rounds_half_up_exactly(projected: Projected) -> None:
    con = projected(
        [
            survey("P-23", "2025-02-10T10:00:00Z", "s1", "ces", 2),  # (2-1)/6 = 0.1667
            survey("P-23", "2025-02-11T10:00:00Z", "s2", "csat", 1),  # 0
        ]
    )
    # (0.1667 + 0) / 2 = 0.08335 → 0.0834 (as a binary float, 0.08335 rounds down)
    assert profile(con, "P-23")["avg_satisfaction"] == Decimal("0.0834")


@pytest.mark.parametrize(
    ("kind", "score", "expected"),
    [
        ("csat", 1, "0"),
        ("csat", 3, "0.5"),  # (3-1)/4
        ("csat", 5, "1"),
        ("nps", 0, "0"),
        ("nps", 6, "0.6"),  # 6/10
        ("nps", 10, "1"),
        ("ces", 1, "0"),
        ("ces", 4, "0.5"),  # (4-1)/6
        ("ces", 6, "0.8333"),  # (6-1)/6 = 0.83333...
        ("ces", 7, "1"),
        ("callback", 1, "0"),
        ("callback", 4, "0.75"),  # (4-1)/4
        ("callback", 5, "1"),
    ],
)
def test_each_survey_scale(projected: Projected, kind: str, score: int, expected: str) -> None:
    con = projected([survey("P-10", "2025-01-01T10:00:00Z", "s", kind, score)])
    p = profile(con, "P-10")
    assert p["avg_satisfaction"] == Decimal(expected)
    assert p["last_satisfaction"] == Decimal(expected)


def test_marketing_consent_latest_wins(projected: Projected) -> None:
    con = projected(
        [
            consent("P-11", "2025-01-01T10:00:00Z", "marketing", True),
            consent("P-11", "2025-03-01T10:00:00Z", "marketing", False),
            # recorded last but given before the withdrawal: must not win
            consent("P-11", "2025-02-01T10:00:00Z", "marketing", True),
            # another purpose, later still: irrelevant to marketing
            consent("P-11", "2025-04-01T10:00:00Z", "analytics", True),
            consent("P-12", "2025-01-01T10:00:00Z", "marketing", False),
            consent("P-12", "2025-01-05T10:00:00Z", "marketing", True),
            consent("P-13", "2025-01-01T10:00:00Z", "analytics", True),
        ]
    )
    assert profile(con, "P-11")["marketing_consent"] is False
    assert profile(con, "P-12")["marketing_consent"] is True
    assert profile(con, "P-13")["marketing_consent"] is None  # never asked about marketing


def test_consent_withdrawn_in_a_later_batch(projected: Projected) -> None:
    con = projected([consent("P-14", "2025-01-01T10:00:00Z", "marketing", True)])
    assert profile(con, "P-14")["marketing_consent"] is True
    con = projected([consent("P-14", "2025-01-02T10:00:00Z", "marketing", False)])
    assert profile(con, "P-14")["marketing_consent"] is False
    # a late-arriving grant from before the withdrawal changes nothing
    con = projected([consent("P-14", "2025-01-01T12:00:00Z", "marketing", True)])
    assert profile(con, "P-14")["marketing_consent"] is False


def test_region_and_city_latest_non_null_by_business_time(projected: Projected) -> None:
    c = "P-15"
    con = projected(
        [
            event(
                "CustomerRegistered",
                c,
                "2025-01-01T08:00:00Z",
                {"region": "East", "province": "Shanghai", "city": "Shanghai", "segment": "retail"},
            ),
            event(
                "CustomerProfileUpdated",
                c,
                "2025-03-10T08:00:00Z",
                {"region": "North", "city": "Beijing"},
            ),
            # recorded after the 03-10 update but effective before it
            event(
                "CustomerProfileUpdated",
                c,
                "2025-03-05T08:00:00Z",
                {"region": "South", "province": "Guangdong", "city": "Guangzhou"},
            ),
            # the latest update names no place: region and city keep their value
            event("CustomerProfileUpdated", c, "2025-03-20T08:00:00Z", {"segment": "vip"}),
        ]
    )
    p = profile(con, c)
    assert p["region"] == "North"  # 03-10 beats 03-05 and 01-01; 03-20 has none
    assert p["city"] == "Beijing"  # 03-10
    assert p["province"] == "Guangdong"  # 03-05 is the latest with a province
    assert p["segment"] == "vip"  # 03-20


def test_late_profile_update_in_a_later_batch_does_not_override(projected: Projected) -> None:
    c = "P-16"
    projected(
        [
            event("CustomerRegistered", c, "2025-01-01T08:00:00Z", {"region": "East"}),
            event("CustomerProfileUpdated", c, "2025-05-01T08:00:00Z", {"city": "Wuhan"}),
        ]
    )
    con = projected(
        [
            event(
                "CustomerProfileUpdated",
                c,
                "2025-02-01T08:00:00Z",
                {"region": "Central", "city": "Chengdu"},
            )
        ]
    )
    p = profile(con, c)
    assert p["region"] == "Central"  # 02-01 is later than the registration's East
    assert p["city"] == "Wuhan"  # 05-01 beats the late-arriving 02-01 Chengdu


# --- personal data ---------------------------------------------------------------------------

PERSONAL = {
    "name": "Ada Testperson",
    "email": "ada.testperson@example.com",
    "phone": "+86 10 5555 0100",
    "birthday": "1990-05-17",
    "address": "1 Test Road, Pudong",
}


def test_personal_fields_are_not_in_the_events_table(projected: Projected, ledger: Ledger) -> None:
    c = "P-17"
    con = projected(
        [
            event("CustomerRegistered", c, "2025-01-01T08:00:00Z", {**PERSONAL, "city": "Hefei"}),
            event(
                "CustomerProfileUpdated",
                c,
                "2025-02-01T08:00:00Z",
                {
                    "name": "Ada T. Person",
                    "email": "ada.new@example.com",
                    "phone": "+86 10 5555 0199",
                    "birthday": "1990-05-18",
                    "address": "2 Test Road",
                    "segment": "vip",
                },
            ),
        ]
    )
    # the store keeps them (so the filter below has something to remove)
    stored = {f["type"]: f["data"] for f in ledger.timeline(c)}
    assert stored["CustomerRegistered"]["email"] == PERSONAL["email"]
    assert stored["CustomerProfileUpdated"]["name"] == "Ada T. Person"

    rows = con.execute("SELECT type, data FROM events WHERE customer_id = ? ORDER BY type", [c])
    mirrored = {type_: orjson.loads(data) for type_, data in rows.fetchall()}
    assert mirrored == {
        "CustomerProfileUpdated": {"segment": "vip"},
        "CustomerRegistered": {"city": "Hefei"},
    }
    # and no personal value survives anywhere in the row
    row_text = con.execute(
        "SELECT string_agg(CAST(COLUMNS(*) AS VARCHAR), '|') FROM events WHERE customer_id = ?",
        [c],
    ).fetchall()
    flat = " ".join(str(v) for v in row_text[0])
    for value in [*PERSONAL.values(), "Ada T. Person", "ada.new@example.com", "2 Test Road"]:
        assert value not in flat
    assert profile(con, c)["city"] == "Hefei"


# --- ABC -------------------------------------------------------------------------------------


def test_abc_classes(projected: Projected) -> None:
    con = projected(
        [
            # recorded in no particular order
            purchase("abc-3", "2025-01-03T10:00:00Z", "o", "100"),
            purchase("abc-5", "2025-01-05T10:00:00Z", "o", "40"),
            purchase("abc-1", "2025-01-01T10:00:00Z", "o", "500"),
            purchase("abc-4", "2025-01-04T10:00:00Z", "o", "60"),
            purchase("abc-2", "2025-01-02T10:00:00Z", "o", "200"),
            purchase("abc-2", "2025-01-06T10:00:00Z", "o2", "100"),
            # no spend at all, and spend refunded in full: both C, outside the total
            contact("abc-0", "2025-01-01T10:00:00Z", "phone", "inbound"),
            purchase("abc-r", "2025-01-01T10:00:00Z", "o", "700"),
            refund("abc-r", "2025-01-02T10:00:00Z", "o", "700"),
        ]
    )
    # total of positive spend = 500 + 300 + 100 + 60 + 40 = 1000
    # spend ranked before:  abc-1: 0    < 800        → A
    #                       abc-2: 500  < 800        → A
    #                       abc-3: 800  ≥ 800, < 950 → B
    #                       abc-4: 900  < 950        → B
    #                       abc-5: 960  ≥ 950        → C
    assert abc_classes(con) == {
        "abc-1": "A",
        "abc-2": "A",
        "abc-3": "B",
        "abc-4": "B",
        "abc-5": "C",
        "abc-0": "C",
        "abc-r": "C",
    }
    assert profile(con, "abc-r")["total_spend"] == 0


def test_abc_ties_are_broken_by_customer_id(projected: Projected) -> None:
    con = projected(
        [
            # t-c is recorded (and projected) before t-b
            purchase("t-c", "2025-01-01T10:00:00Z", "o", "100"),
            purchase("t-d", "2025-01-01T10:00:00Z", "o", "100"),
            purchase("t-b", "2025-01-01T10:00:00Z", "o", "100"),
            purchase("t-a", "2025-01-01T10:00:00Z", "o", "700"),
        ]
    )
    # total 1000; order t-a, then the 100s by id: t-b, t-c, t-d
    # t-a: 0 → A;  t-b: 700 < 800 → A;  t-c: 800 → B;  t-d: 900 < 950 → B
    assert abc_classes(con) == {"t-a": "A", "t-b": "A", "t-c": "B", "t-d": "B"}


def test_abc_reclassifies_customers_the_batch_did_not_touch(projected: Projected) -> None:
    spends = {"abc-1": "500", "abc-2": "300", "abc-3": "100", "abc-4": "60", "abc-5": "40"}
    con = projected(
        [purchase(c, "2025-01-01T10:00:00Z", "o", amount) for c, amount in spends.items()]
    )
    assert abc_classes(con) == {
        "abc-1": "A",
        "abc-2": "A",
        "abc-3": "B",
        "abc-4": "B",
        "abc-5": "C",
    }
    # abc-5 spends 1000 more: total 2000, ranking abc-5 1040, abc-1 500, abc-2 300, ...
    con = projected([purchase("abc-5", "2025-02-01T10:00:00Z", "o2", "1000")])
    # abc-5: 0 → A; abc-1: 1040 < 1600 → A; abc-2: 1540 < 1600 → A;
    # abc-3: 1840 ≥ 1600, < 1900 → B; abc-4: 1940 ≥ 1900 → C
    assert abc_classes(con) == {
        "abc-5": "A",
        "abc-1": "A",
        "abc-2": "A",
        "abc-3": "B",
        "abc-4": "C",
    }
    # a full refund drops a customer to C and out of the total
    con = projected([refund("abc-5", "2025-02-02T10:00:00Z", "o2", "1000")])
    # back to 500/300/100/60/40 of 1000
    assert abc_classes(con) == {
        "abc-1": "A",
        "abc-2": "A",
        "abc-3": "B",
        "abc-4": "B",
        "abc-5": "C",
    }


def test_money_is_exact_at_the_catalogues_full_precision(projected: Projected) -> None:
    # The catalogue allows 18 digits, 4 after the point, and promises money is "never
    # rounded through binary floats" (domain/events.py); a double holds ~15.9 digits.
    big = "12345678901234.5678"
    con = projected(
        [
            purchase("P-18", "2025-01-01T10:00:00Z", "o1", big),
            purchase("P-19", "2025-01-01T10:00:00Z", "o1", big),
            refund("P-19", "2025-01-02T10:00:00Z", "o1", "0.0001"),
        ]
    )
    fields = ("gross_spend", "refunded", "total_spend", "avg_order_value")
    no_refund = profile(con, "P-18")
    refunded = profile(con, "P-19")
    # P-18: nothing refunded, so total = gross; one order, so the average is the order
    assert {f: no_refund[f] for f in fields} == {
        "gross_spend": Decimal(big),
        "refunded": 0,
        "total_spend": Decimal(big),
        "avg_order_value": Decimal(big),
    }
    # P-19: 12345678901234.5678 - 0.0001 = 12345678901234.5677
    assert {f: refunded[f] for f in fields} == {
        "gross_spend": Decimal(big),
        "refunded": Decimal("0.0001"),
        "total_spend": Decimal("12345678901234.5677"),
        "avg_order_value": Decimal(big),
    }

    # totals outgrow one amount's digits: the catalogue's largest amount, twice
    most = "99999999999999.9999"
    con = projected(
        [
            purchase("P-22", "2025-01-01T10:00:00Z", "o1", most),
            purchase("P-22", "2025-01-02T10:00:00Z", "o2", most),
        ]
    )
    assert {f: profile(con, "P-22")[f] for f in fields} == {
        "gross_spend": Decimal("199999999999999.9998"),
        "refunded": 0,
        "total_spend": Decimal("199999999999999.9998"),
        "avg_order_value": Decimal(most),
    }
