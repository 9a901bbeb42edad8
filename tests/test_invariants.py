"""The Customer aggregate's invariants, exercised through Ledger.record on a real SQLite
store: each violation is rejected with its reason while the rest of the batch lands."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import event, record

from bootstrap import Settings, open_ledger
from domain.ledger import Ledger, Outcome

C = "C-1001"
T0 = "2025-03-01T09:00:00Z"


def at(minute: int, day: int = 1) -> str:
    """A UTC instant on 2025-03-<day>, `minute` minutes after 09:00."""
    hour, minute = divmod(minute, 60)
    return f"2025-03-{day:02d}T{9 + hour:02d}:{minute:02d}:00Z"


def note(n: int, customer: str = C) -> dict[str, Any]:
    """A valid event that no invariant concerns."""
    return event(
        "ContactLogged",
        customer,
        at(n),
        {"channel": "phone", "direction": "inbound", "topic": f"call {n}"},
    )


def purchase(order: str, amount: str, currency: str = "EUR", **data: Any) -> dict[str, Any]:
    return event(
        "PurchaseRecorded",
        C,
        at(5),
        {"order_id": order, "amount": amount, "currency": currency, **data},
    )


def refund(order: str, amount: str, when: int = 30) -> dict[str, Any]:
    return event("PurchaseRefunded", C, at(when), {"order_id": order, "amount": amount})


def step(type_: str, complaint: str = "K-1", when: str = T0, **data: Any) -> dict[str, Any]:
    return event(type_, C, when, {"complaint_id": complaint, **data})


def filed(complaint: str = "K-1", when: str = T0) -> dict[str, Any]:
    return step("ComplaintFiled", complaint, when, channel="phone", category="delivery")


def resolved(complaint: str = "K-1", when: str = T0) -> dict[str, Any]:
    return step("ComplaintResolved", complaint, when, resolution="replaced")


def statuses(outcomes: Sequence[Outcome]) -> list[str]:
    return [o.status for o in outcomes]


def stored_ids(ledger: Ledger, customer: str = C) -> list[str]:
    return [fact["event_id"] for fact in ledger.timeline(customer)]


def assert_only_rejected(
    ledger: Ledger, outcomes: Sequence[Outcome], rejected_index: int, reason: str
) -> None:
    """Exactly one event of the batch was rejected, for `reason`; the rest are stored."""
    expected = ["accepted"] * len(outcomes)
    expected[rejected_index] = "rejected"
    assert statuses(outcomes) == expected, [o.reason for o in outcomes]
    assert outcomes[rejected_index].reason == reason
    accepted = [o.event_id for o in outcomes if o.status == "accepted"]
    stored = stored_ids(ledger)
    assert outcomes[rejected_index].event_id not in stored
    assert set(accepted) <= set(stored)


# --- business time ---------------------------------------------------------------------------


def test_an_event_dated_after_its_recording_is_rejected(ledger: Ledger) -> None:
    """A year typed wrong would move the projections' clock (the latest business time,
    which never goes back) into the future, and breach every complaint for good."""
    now = datetime.now(UTC)

    def contact(moment: datetime) -> dict[str, Any]:
        return event(
            "ContactLogged", C, moment.isoformat(), {"channel": "phone", "direction": "inbound"}
        )

    outcomes = record(
        ledger,
        [
            note(1),
            contact(datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=14)))),
            contact(now + timedelta(minutes=50)),  # a producer's clock a little ahead
            contact(now + timedelta(hours=2)),
        ],
    )
    assert statuses(outcomes) == ["accepted", "rejected", "accepted", "rejected"], outcomes
    reason = outcomes[1].reason or ""
    assert reason.startswith("occurred_at 9999-12-31T23:59:59+14:00 lies after the time of")
    assert "by more than 1:00:00" in reason and "check the year and the UTC offset" in reason
    assert outcomes[1].event_id not in stored_ids(ledger)
    assert outcomes[3].event_id not in stored_ids(ledger)


# --- registration --------------------------------------------------------------------------


def test_a_customer_is_registered_once(ledger: Ledger) -> None:
    outcomes = record(
        ledger,
        [
            note(1),
            event("CustomerRegistered", C, at(2), {"name": "Li Wei"}),
            event("CustomerRegistered", C, at(3), {"name": "Wei Li"}),
            note(4),
        ],
    )
    assert_only_rejected(
        ledger,
        outcomes,
        2,
        f"customer {C} is already registered; send CustomerProfileUpdated to change the profile",
    )
    # In a later batch too, and another customer is unaffected.
    later = record(
        ledger,
        [
            event("CustomerRegistered", C, at(9), {"segment": "vip"}),
            event("CustomerRegistered", "C-2", at(9), {"segment": "vip"}),
            event("CustomerProfileUpdated", C, at(10), {"name": "Wei Li"}),
        ],
    )
    assert statuses(later) == ["rejected", "accepted", "accepted"]
    assert [f["type"] for f in ledger.timeline(C)] == [
        "ContactLogged",
        "CustomerRegistered",
        "ContactLogged",
        "CustomerProfileUpdated",
    ]


def test_the_same_registration_twice_is_a_duplicate_not_a_violation(ledger: Ledger) -> None:
    registration = event("CustomerRegistered", C, T0, {"name": "Li Wei"})
    assert statuses(record(ledger, [registration, registration])) == ["accepted", "duplicate"]
    assert statuses(record(ledger, [registration])) == ["duplicate"]
    assert len(ledger.timeline(C)) == 1


# --- purchases -----------------------------------------------------------------------------


def test_an_order_id_is_unique_per_customer(ledger: Ledger) -> None:
    outcomes = record(
        ledger,
        [
            purchase("SO-1", "10.00"),
            note(6),
            purchase("SO-1", "12.00"),
            purchase("SO-2", "12.00"),
        ],
    )
    assert_only_rejected(ledger, outcomes, 2, f"order SO-1 is already recorded for customer {C}")
    other = event(
        "PurchaseRecorded", "C-2", at(5), {"order_id": "SO-1", "amount": "1", "currency": "EUR"}
    )
    again = record(ledger, [purchase("SO-2", "99.00"), other])
    assert statuses(again) == ["rejected", "accepted"]
    assert again[0].reason == f"order SO-2 is already recorded for customer {C}"


def test_a_foreign_currency_purchase_needs_a_reporting_amount(ledger: Ledger) -> None:
    outcomes = record(
        ledger,
        [
            purchase("SO-1", "100.00", "EUR"),
            purchase("SO-2", "100.00", "USD"),
            purchase("SO-3", "100.00", "USD", reporting_amount="92.10"),
        ],
    )
    assert_only_rejected(
        ledger,
        outcomes,
        1,
        "data.amount is in USD but this ledger reports in EUR: add data.reporting_amount "
        "(the amount in EUR)",
    )
    # The order id of the rejected purchase is still free.
    fixed = record(ledger, [purchase("SO-2", "100.00", "USD", reporting_amount="92.10")])
    assert statuses(fixed) == ["accepted"]


def test_the_reporting_currency_comes_from_the_settings(tmp_path: Path) -> None:
    ledger = open_ledger(Settings(data_dir=tmp_path / "usd", reporting_currency="USD"))
    outcomes = record(ledger, [purchase("SO-1", "100.00", "USD"), purchase("SO-2", "5", "EUR")])
    assert statuses(outcomes) == ["accepted", "rejected"]
    assert outcomes[1].reason == (
        "data.amount is in EUR but this ledger reports in USD: add data.reporting_amount "
        "(the amount in USD)"
    )


# --- refunds -------------------------------------------------------------------------------


def test_a_refund_must_name_a_recorded_order(ledger: Ledger) -> None:
    other_customers_order = event(
        "PurchaseRecorded", "C-2", at(1), {"order_id": "SO-9", "amount": "50", "currency": "EUR"}
    )
    outcomes = record(
        ledger,
        [
            other_customers_order,
            purchase("SO-1", "20.00"),
            refund("SO-9", "5.00"),
            refund("SO-1", "5.00"),
        ],
    )
    assert statuses(outcomes) == ["accepted", "accepted", "rejected", "accepted"]
    assert outcomes[2].reason == (
        f"order SO-9 was never recorded for customer {C}; a refund must name a recorded order"
    )
    assert outcomes[2].event_id not in stored_ids(ledger)


def test_a_refund_before_its_purchase_in_the_same_batch_is_rejected(ledger: Ledger) -> None:
    outcomes = record(ledger, [refund("SO-1", "5.00"), purchase("SO-1", "20.00")])
    assert statuses(outcomes) == ["rejected", "accepted"]
    assert outcomes[0].reason is not None
    assert outcomes[0].reason.startswith("order SO-1 was never recorded")


def test_refunds_up_to_the_order_amount_are_accepted_in_parts(ledger: Ledger) -> None:
    first = record(ledger, [purchase("SO-1", "100.00"), refund("SO-1", "30.00", 31)])
    assert statuses(first) == ["accepted", "accepted"]
    second = record(ledger, [refund("SO-1", "45.50", 32), note(33), refund("SO-1", "24.51", 34)])
    assert_only_rejected(
        ledger, second, 2, "refund 24.51 exceeds what remains refundable on order SO-1 (24.50)"
    )
    third = record(ledger, [refund("SO-1", "24.50", 35), refund("SO-1", "0.0001", 36)])
    assert statuses(third) == ["accepted", "rejected"]
    assert third[1].reason == ("refund 0.0001 exceeds what remains refundable on order SO-1 (0.00)")
    refunds = [f for f in ledger.timeline(C) if f["type"] == "PurchaseRefunded"]
    assert [f["data"]["amount"] for f in refunds] == ["30.00", "45.50", "24.50"]


def test_a_single_refund_larger_than_the_order_is_rejected(ledger: Ledger) -> None:
    outcomes = record(ledger, [purchase("SO-1", "100.00"), refund("SO-1", "100.01")])
    assert statuses(outcomes) == ["accepted", "rejected"]
    assert outcomes[1].reason == (
        "refund 100.01 exceeds what remains refundable on order SO-1 (100.00)"
    )
    assert statuses(record(ledger, [refund("SO-1", "100.00", 31)])) == ["accepted"]


def test_refund_arithmetic_is_exact_decimal(ledger: Ledger) -> None:
    # With binary floats 0.1 + 0.2 > 0.3 and the second refund would be refused.
    outcomes = record(
        ledger,
        [purchase("SO-1", "0.3"), refund("SO-1", "0.1", 31), refund("SO-1", "0.2", 32)],
    )
    assert statuses(outcomes) == ["accepted", "accepted", "accepted"]
    last = record(ledger, [refund("SO-1", "0.0001", 33)])
    assert statuses(last) == ["rejected"]
    assert last[0].reason == "refund 0.0001 exceeds what remains refundable on order SO-1 (0.0)"


def test_refunds_of_a_foreign_currency_order_are_in_its_currency(ledger: Ledger) -> None:
    outcomes = record(
        ledger,
        [
            purchase("SO-1", "1000", "CNY", reporting_amount="128.00"),
            refund("SO-1", "900", 31),
            refund("SO-1", "101", 32),
        ],
    )
    assert statuses(outcomes) == ["accepted", "accepted", "rejected"]
    assert outcomes[2].reason == "refund 101 exceeds what remains refundable on order SO-1 (100)"


# --- complaints ----------------------------------------------------------------------------


def test_a_complaint_id_is_filed_once(ledger: Ledger) -> None:
    outcomes = record(ledger, [filed("K-1", T0), note(2), filed("K-1", at(5)), filed("K-2", at(5))])
    assert_only_rejected(
        ledger,
        outcomes,
        2,
        "complaint K-1 was already filed (at 2025-03-01T09:00:00+00:00); "
        "a complaint id is filed once",
    )
    closed = record(ledger, [step("ComplaintClosed", "K-1", at(6)), filed("K-1", at(7))])
    assert statuses(closed) == ["accepted", "rejected"]
    assert closed[1].reason is not None
    assert "a complaint id is filed once" in closed[1].reason


def test_the_same_complaint_id_may_be_filed_for_another_customer(ledger: Ledger) -> None:
    other = event(
        "ComplaintFiled", "C-2", T0, {"complaint_id": "K-1", "channel": "web", "category": "x"}
    )
    assert statuses(record(ledger, [filed("K-1"), other])) == ["accepted", "accepted"]


def test_a_complaint_step_must_follow_a_filing(ledger: Ledger) -> None:
    outcomes = record(
        ledger,
        [note(1), step("ComplaintAcknowledged", "K-9", at(2)), filed("K-1", at(3))],
    )
    assert_only_rejected(
        ledger,
        outcomes,
        1,
        f"complaint K-9 was never filed for customer {C}; ComplaintAcknowledged must follow a "
        "ComplaintFiled",
    )
    # A complaint filed for another customer does not count.
    other = event(
        "ComplaintFiled", "C-2", T0, {"complaint_id": "K-7", "channel": "web", "category": "x"}
    )
    later = record(ledger, [other, resolved("K-7", at(4))])
    assert statuses(later) == ["accepted", "rejected"]
    assert later[1].reason == (
        f"complaint K-7 was never filed for customer {C}; ComplaintResolved must follow a "
        "ComplaintFiled"
    )


def test_a_complaint_step_before_the_filing_time_is_rejected(ledger: Ledger) -> None:
    outcomes = record(
        ledger,
        [
            filed("K-1", "2025-03-01T09:00:00Z"),
            step("ComplaintAcknowledged", "K-1", "2025-03-01T08:59:59Z"),
            step("ComplaintAcknowledged", "K-1", "2025-03-01T09:00:00Z"),
        ],
    )
    assert_only_rejected(
        ledger,
        outcomes,
        1,
        "ComplaintAcknowledged at 2025-03-01T08:59:59+00:00 is before complaint K-1 was filed "
        "(2025-03-01T09:00:00+00:00)",
    )


def test_filing_time_is_compared_as_an_instant_not_as_wall_clock(ledger: Ledger) -> None:
    # 16:30 in Shanghai is 08:30 UTC: earlier than the filing although its clock reads later.
    shanghai = "2025-03-01T16:30:00+08:00"
    # 05:00 in New York is 10:00 UTC: later than the filing although its clock reads earlier.
    new_york = "2025-03-01T05:00:00-05:00"
    outcomes = record(
        ledger,
        [
            filed("K-1", "2025-03-01T09:00:00Z"),
            step("ComplaintAcknowledged", "K-1", shanghai),
            step("ComplaintAcknowledged", "K-1", new_york),
        ],
    )
    assert statuses(outcomes) == ["accepted", "rejected", "accepted"]
    assert outcomes[1].reason == (
        f"ComplaintAcknowledged at {shanghai} is before complaint K-1 was filed "
        "(2025-03-01T09:00:00+00:00)"
    )


LIFECYCLE = [
    ("ComplaintFiled", {"channel": "phone", "category": "delivery", "priority": "high"}),
    ("ComplaintAcknowledged", {"agent": "agent-17"}),
    ("ComplaintEscalated", {"to_team": "logistics"}),
    ("ComplaintOnHold", {"reason": "waiting for photos"}),
    ("ComplaintResumed", {"note": "photos received"}),
    ("ComplaintResolved", {"resolution": "replacement shipped"}),
    ("ComplaintReopened", {"reason": "replacement damaged"}),
    ("ComplaintResolved", {"resolution": "refund issued"}),
    ("ComplaintClosed", {"outcome": "resolved"}),
    ("ComplaintReopened", {"reason": "refund never arrived"}),
]


def lifecycle_events(complaint: str = "K-1") -> list[dict[str, Any]]:
    return [step(type_, complaint, at(10 * i), **data) for i, (type_, data) in enumerate(LIFECYCLE)]


def test_the_full_complaint_lifecycle_is_accepted_in_one_batch(ledger: Ledger) -> None:
    outcomes = record(ledger, lifecycle_events())
    assert statuses(outcomes) == ["accepted"] * len(LIFECYCLE), [o.reason for o in outcomes]
    assert [f["type"] for f in ledger.timeline(C)] == [type_ for type_, _ in LIFECYCLE]
    # Reopened after the close: open again, so it can be resolved and closed again.
    more = record(ledger, [resolved("K-1", at(200)), step("ComplaintClosed", "K-1", at(201))])
    assert statuses(more) == ["accepted", "accepted"]


def test_the_full_complaint_lifecycle_is_accepted_one_event_at_a_time(ledger: Ledger) -> None:
    for e in lifecycle_events():
        outcomes = record(ledger, [e])
        assert statuses(outcomes) == ["accepted"], (e["type"], outcomes[0].reason)
    assert len(ledger.timeline(C)) == len(LIFECYCLE)


@pytest.mark.parametrize(
    "type_",
    [
        "ComplaintAcknowledged",
        "ComplaintEscalated",
        "ComplaintOnHold",
        "ComplaintResumed",
        "ComplaintResolved",
        "ComplaintClosed",
    ],
)
def test_after_a_close_only_a_reopening_is_accepted(ledger: Ledger, type_: str) -> None:
    setup = record(ledger, [filed(), resolved(when=at(1)), step("ComplaintClosed", when=at(2))])
    assert statuses(setup) == ["accepted"] * 3
    data = {"resolution": "again"} if type_ == "ComplaintResolved" else {}
    outcomes = record(
        ledger,
        [note(3), step(type_, when=at(4), **data), step("ComplaintReopened", when=at(5))],
    )
    assert statuses(outcomes) == ["accepted", "rejected", "accepted"]
    assert outcomes[1].event_id not in stored_ids(ledger)
    reason = outcomes[1].reason or ""
    assert reason.startswith(f"complaint K-1 is closed; {type_} is only allowed when it is ")
    assert reason.endswith("; only ComplaintReopened may follow a close")


#: The complaint state machine, written out: which steps each status accepts.
ALLOWED: dict[str, set[str]] = {
    "open": {
        "ComplaintAcknowledged",
        "ComplaintEscalated",
        "ComplaintOnHold",
        "ComplaintResolved",
        "ComplaintClosed",
    },
    "on_hold": {
        "ComplaintAcknowledged",
        "ComplaintEscalated",
        "ComplaintResumed",
        "ComplaintResolved",
        "ComplaintClosed",
    },
    "resolved": {"ComplaintAcknowledged", "ComplaintReopened", "ComplaintClosed"},
    "closed": {"ComplaintReopened"},
}
STEPS = [
    "ComplaintAcknowledged",
    "ComplaintEscalated",
    "ComplaintOnHold",
    "ComplaintResumed",
    "ComplaintResolved",
    "ComplaintReopened",
    "ComplaintClosed",
]
REACH: dict[str, list[str]] = {
    "open": [],
    "on_hold": ["ComplaintOnHold"],
    "resolved": ["ComplaintResolved"],
    "closed": ["ComplaintClosed"],
}


def _step_data(type_: str) -> dict[str, Any]:
    return {"resolution": "done"} if type_ == "ComplaintResolved" else {}


@pytest.mark.parametrize("status", list(ALLOWED))
def test_the_complaint_state_machine(ledger: Ledger, status: str) -> None:
    for i, type_ in enumerate(STEPS):
        complaint = f"K-{type_}"
        history = [filed(complaint)] + [
            step(s, complaint, at(1), **_step_data(s)) for s in REACH[status]
        ]
        assert statuses(record(ledger, history)) == ["accepted"] * len(history)
        outcomes = record(ledger, [step(type_, complaint, at(2 + i), **_step_data(type_))])
        if type_ in ALLOWED[status]:
            assert statuses(outcomes) == ["accepted"], (status, type_, outcomes[0].reason)
        else:
            assert statuses(outcomes) == ["rejected"], (status, type_)
            reason = outcomes[0].reason or ""
            human = status.replace("_", " ")
            assert reason.startswith(
                f"complaint {complaint} is {human}; {type_} is only allowed when it is "
            ), reason


# --- state comes from the store ------------------------------------------------------------


HISTORY = [
    event("CustomerRegistered", C, at(0), {"name": "Li Wei"}),
    purchase("SO-1", "100.00"),
    refund("SO-1", "60.00"),
    filed("K-1", at(40)),
    step("ComplaintClosed", "K-1", at(50)),
]
VIOLATIONS: list[tuple[dict[str, Any], str]] = [
    (
        event("CustomerRegistered", C, at(60), {"name": "Someone Else"}),
        f"customer {C} is already registered; send CustomerProfileUpdated to change the profile",
    ),
    (purchase("SO-1", "5.00"), f"order SO-1 is already recorded for customer {C}"),
    (
        refund("SO-1", "40.01", 61),
        "refund 40.01 exceeds what remains refundable on order SO-1 (40.00)",
    ),
    (
        filed("K-1", at(62)),
        "complaint K-1 was already filed (at 2025-03-01T09:40:00+00:00); "
        "a complaint id is filed once",
    ),
    (
        step("ComplaintAcknowledged", "K-1", at(39)),
        "ComplaintAcknowledged at 2025-03-01T09:39:00+00:00 is before complaint K-1 was filed "
        "(2025-03-01T09:40:00+00:00)",
    ),
]


def test_invariants_hold_for_a_fresh_ledger_on_the_same_store(settings: Settings) -> None:
    writer = open_ledger(settings)
    assert statuses(record(writer, HISTORY)) == ["accepted"] * len(HISTORY)
    head = writer.head()

    fresh = open_ledger(settings)
    outcomes = record(fresh, [e for e, _ in VIOLATIONS])
    assert [(o.status, o.reason) for o in outcomes] == [("rejected", r) for _, r in VIOLATIONS]
    closed = record(fresh, [step("ComplaintResolved", "K-1", at(70), resolution="again")])
    assert statuses(closed) == ["rejected"]
    assert (closed[0].reason or "").endswith("; only ComplaintReopened may follow a close")
    assert fresh.head() == head  # nothing was stored

    # What was stored is recognised, and what remains allowed is accepted.
    assert statuses(record(open_ledger(settings), HISTORY)) == ["duplicate"] * len(HISTORY)
    allowed = record(
        open_ledger(settings),
        [refund("SO-1", "40.00", 63), step("ComplaintReopened", "K-1", at(64))],
    )
    assert statuses(allowed) == ["accepted", "accepted"]
    assert len(open_ledger(settings).timeline(C)) == len(HISTORY) + 2


def test_a_ledger_sees_facts_another_writer_stored_after_it_last_looked(
    settings: Settings,
) -> None:
    first = open_ledger(settings)
    second = open_ledger(settings)
    assert statuses(record(first, [event("CustomerRegistered", C, T0)])) == ["accepted"]
    # Another writer (another process in production) records the purchase...
    assert statuses(record(second, [purchase("SO-1", "50.00")])) == ["accepted"]
    # ...so a refund for it is valid, whichever writer receives it.
    outcomes = record(first, [refund("SO-1", "20.00")])
    assert [(o.status, o.reason) for o in outcomes] == [("accepted", None)]
    assert [f["type"] for f in open_ledger(settings).timeline(C)] == [
        "CustomerRegistered",
        "PurchaseRecorded",
        "PurchaseRefunded",
    ]


def test_a_ledger_sees_a_complaint_step_another_writer_stored(settings: Settings) -> None:
    first = open_ledger(settings)
    second = open_ledger(settings)
    assert statuses(record(first, [filed("K-1"), resolved("K-1", at(1))])) == ["accepted"] * 2
    assert statuses(record(second, [step("ComplaintReopened", "K-1", at(2))])) == ["accepted"]
    # The complaint is open again, so it can be put on hold.
    outcomes = record(first, [step("ComplaintOnHold", "K-1", at(3))])
    assert [(o.status, o.reason) for o in outcomes] == [("accepted", None)]


def test_rejections_do_not_change_a_known_customers_stream(ledger: Ledger) -> None:
    assert statuses(record(ledger, [purchase("SO-1", "10.00")])) == ["accepted"]
    head = ledger.head()
    before = ledger.timeline(C)
    again = {**purchase("SO-1", "12.00"), "source_event_id": "pos-2"}
    outcomes = record(ledger, [again, refund("SO-9", "1")])
    assert statuses(outcomes) == ["rejected", "rejected"]
    assert ledger.head() == head
    assert ledger.timeline(C) == before
