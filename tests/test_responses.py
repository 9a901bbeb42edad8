"""`response_waits` and the `ResponseOverdue` alarm against hand-computed cases
(domain.policy.ResponsePolicy defaults: inbound emails, alarm after 12 hours). Every
contact below is at F = 2025-03-03 09:00 UTC plus a number of hours."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import orjson
from conftest import accept, event, project

from bootstrap import Settings
from domain.events import Channel
from domain.ledger import Ledger
from domain.policy import ResponsePolicy
from projections.projector import Projector
from projections.reports import summary
from projections.schema import connect

F = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
C = "R-1"


def at(hours: float) -> datetime:
    return F + timedelta(hours=hours)


def contact(hours: float, channel: str, direction: str, **data: Any) -> dict[str, Any]:
    payload = {"channel": channel, "direction": direction, **data}
    return event("ContactLogged", C, at(hours).isoformat(), payload)


def email_in(hours: float, **data: Any) -> dict[str, Any]:
    return contact(hours, "email", "inbound", topic="question", **data)


def reply(hours: float, channel: str = "email") -> dict[str, Any]:
    return contact(hours, channel, "outbound", agent="agent-7")


def waits(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    cursor = con.execute(
        "SELECT started_at, channel, contacts, alarm_at, answered_at, status "
        "FROM response_waits WHERE customer_id = ? ORDER BY started_at",
        [C],
    )
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def alarms(con: duckdb.DuckDBPyConnection) -> list[tuple[datetime, dict[str, Any]]]:
    rows = con.execute(
        "SELECT occurred_at, data FROM derived_events WHERE type = 'ResponseOverdue' "
        "ORDER BY occurred_at"
    ).fetchall()
    return [(occurred_at, orjson.loads(data)) for occurred_at, data in rows]


def contact_ids(ledger: Ledger) -> list[str]:
    return [
        orjson.loads(document)["event_id"]
        for _, document in ledger.documents_after(0, 1_000)[1]
        if orjson.loads(document)["type"] == "ContactLogged"
    ]


def test_an_email_answered_within_twelve_hours_raises_no_alarm(
    ledger: Ledger, settings: Settings
) -> None:
    accept(ledger, [email_in(0), reply(3, "phone"), email_in(20), reply(32)])
    con = project(ledger, settings)
    assert waits(con) == [
        {
            "started_at": at(0),
            "channel": "email",
            "contacts": 1,
            "alarm_at": at(12),
            "answered_at": at(3),  # an answer on any channel
            "status": "answered",
        },
        {
            "started_at": at(20),
            "channel": "email",
            "contacts": 1,
            "alarm_at": at(32),
            "answered_at": at(32),  # exactly at the alarm time: in time
            "status": "answered",
        },
    ]
    assert alarms(con) == []


def test_an_email_answered_late_raised_its_alarm_at_twelve_hours(
    ledger: Ledger, settings: Settings
) -> None:
    accept(ledger, [email_in(0), reply(13)])
    con = project(ledger, settings)
    assert [(w["status"], w["answered_at"]) for w in waits(con)] == [("answered_late", at(13))]
    first_contact = contact_ids(ledger)[0]
    assert alarms(con) == [
        (
            at(12),
            {
                "channel": "email",
                "waiting_since": "2025-03-03T09:00:00.000000Z",
                "contact_event_id": first_contact,
                "alarm_after_hours": 12,
            },
        )
    ]
    (event_id,) = con.execute(
        "SELECT event_id FROM derived_events WHERE type = 'ResponseOverdue'"
    ).fetchone() or (None,)
    assert event_id == uuid.UUID(
        hashlib.md5(f"derived|response|{C}|{first_contact}".encode()).hexdigest()
    )


def test_an_unanswered_email_is_waiting_then_overdue_by_the_as_of_clock(
    ledger: Ledger, settings: Settings
) -> None:
    accept(ledger, [email_in(0)])
    con = project(ledger, settings)  # the clock is F itself
    assert [w["status"] for w in waits(con)] == ["waiting"]
    con.close()

    con = project(ledger, settings, as_of=at(11.99))
    assert [w["status"] for w in waits(con)] == ["waiting"]
    assert alarms(con) == []
    con.close()

    con = project(ledger, settings, as_of=at(12))  # reached, not passed: a reply now is in time
    assert [w["status"] for w in waits(con)] == ["waiting"]
    assert alarms(con) == []
    con.close()

    con = project(ledger, settings, as_of=at(12.01))  # passed: the alarm is due
    assert [(w["status"], w["answered_at"]) for w in waits(con)] == [("overdue", None)]
    assert [moment for moment, _ in alarms(con)] == [at(12)]
    con.close()

    accept(ledger, [reply(30)])  # a late answer keeps the alarm, once
    con = project(ledger, settings)
    assert [w["status"] for w in waits(con)] == ["answered_late"]
    assert [moment for moment, _ in alarms(con)] == [at(12)]


def test_emails_before_an_answer_join_one_wait(ledger: Ledger, settings: Settings) -> None:
    accept(
        ledger,
        [email_in(0), email_in(5), email_in(8), reply(20), email_in(30), email_in(31)],
    )
    con = project(ledger, settings, as_of=at(50))
    assert [(w["started_at"], w["contacts"], w["status"]) for w in waits(con)] == [
        (at(0), 3, "answered_late"),
        (at(30), 2, "overdue"),
    ]
    assert [moment for moment, _ in alarms(con)] == [at(12), at(42)]


def test_only_inbound_contacts_on_alarm_channels_that_concern_no_complaint_wait(
    ledger: Ledger, settings: Settings
) -> None:
    accept(
        ledger,
        [
            email_in(0, complaint_id="K-1"),  # the complaint's first-response clock covers it
            contact(1, "phone", "inbound", topic="question"),  # not an alarm channel
            email_in(2),
            contact(3, "chat", "inbound", topic="question"),  # neither starts nor joins
        ],
    )
    con = project(ledger, settings, as_of=at(40))
    assert [(w["started_at"], w["contacts"], w["status"]) for w in waits(con)] == [
        (at(2), 1, "overdue")
    ]
    assert [moment for moment, _ in alarms(con)] == [at(14)]


def test_an_outbound_contact_before_the_email_does_not_answer_it(
    ledger: Ledger, settings: Settings
) -> None:
    accept(ledger, [reply(0, "sms"), email_in(0), email_in(1)])  # the same instant: store order
    con = project(ledger, settings, as_of=at(20))
    assert [(w["started_at"], w["contacts"], w["status"]) for w in waits(con)] == [
        (at(0), 2, "overdue")
    ]


def test_the_policy_chooses_the_channels_and_the_alarm_time(
    ledger: Ledger, settings: Settings
) -> None:
    accept(ledger, [contact(0, "chat", "inbound", topic="question"), email_in(1)])
    policy = ResponsePolicy(alarm_after_hours=2, channels=(Channel.CHAT,))
    con = connect(settings.projections_path)
    projector = Projector(con, response_policy=policy)
    _, documents = ledger.documents_after(0, 1_000)
    projector.apply(documents, {}, as_of=at(5))
    assert con.execute("SELECT * FROM response_alarm_channels").fetchall() == [("chat", 2)]
    assert [(w["channel"], w["contacts"], w["alarm_at"], w["status"]) for w in waits(con)] == [
        ("chat", 1, at(2), "overdue")
    ]
    assert [data["alarm_after_hours"] for _, data in alarms(con)] == [2]


def test_the_demo_report_counts_the_waits_by_status(ledger: Ledger, settings: Settings) -> None:
    accept(ledger, [email_in(0), reply(3), email_in(10), reply(30), email_in(40)])
    con = project(ledger, settings, as_of=at(60))
    _, columns, rows = next(r for r in summary(con) if r[0].startswith("Response alarm"))
    assert dict(zip(columns, rows[0], strict=True)) == {
        "channel": "email",
        "waits": 3,
        "answered": 1,
        "answered_late": 1,
        "overdue": 1,
        "waiting": 0,
        "median_hours": 11.5,  # answered after 3 h and 20 h
    }


def test_an_answer_recorded_late_takes_the_alarm_back(ledger: Ledger, settings: Settings) -> None:
    """A backfilled reply dated before the alarm time: the wait was answered in time after
    all (a published alarm counts as withdrawn: `ledger status`)."""
    accept(ledger, [email_in(0), contact(20, "phone", "inbound", topic="question")])
    con = project(ledger, settings)
    assert [w["status"] for w in waits(con)] == ["overdue"]
    assert len(alarms(con)) == 1
    con.close()

    accept(ledger, [reply(5)])
    con = project(ledger, settings)
    assert [(w["status"], w["answered_at"]) for w in waits(con)] == [("answered", at(5))]
    assert alarms(con) == []
