"""`complaint_sla` against hand-computed clocks (domain.policy.SlaPolicy defaults).

Targets (first response / resolution, hours): urgent 1/24, high 4/72, normal 12/120,
low 24/240; a warning is due at 75 % of a target. Every complaint below is filed at
F = 2025-03-03 09:00 UTC and times are written as hours after F.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from conftest import duplicate_keys, event, project, record

from bootstrap import Settings
from consumers.store_follower import rebuild
from domain.events import DerivedEventWithdrawn
from domain.ledger import Ledger
from projections import derived as derived_events
from projections.derived import Word
from projections.projector import Projector
from projections.schema import connect

F = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
BEIJING = timezone(timedelta(hours=8))
C = "S-1"


def at(hours: float) -> datetime:
    return F + timedelta(hours=hours)


def step(type_: str, hours: float, complaint_id: str, **data: Any) -> dict[str, Any]:
    """A complaint event `hours` after F (written with a +08:00 offset, as a producer might)."""
    local = at(hours).astimezone(BEIJING)
    payload: dict[str, Any] = {"complaint_id": complaint_id, **data}
    if type_ == "ComplaintResolved":
        payload.setdefault("resolution", "done")
    return event(type_, C, local.isoformat(), payload)


def filed(complaint_id: str, priority: str, hours: float = 0) -> dict[str, Any]:
    return step(
        "ComplaintFiled",
        hours,
        complaint_id,
        channel="phone",
        category="delivery",
        priority=priority,
    )


def accept(ledger: Ledger, events: list[dict[str, Any]]) -> None:
    outcomes = record(ledger, events)
    assert [o.status for o in outcomes] == ["accepted"] * len(events), outcomes


def sla(con: duckdb.DuckDBPyConnection, complaint_id: str) -> dict[str, Any]:
    cursor = con.execute(
        "SELECT * FROM complaint_sla WHERE customer_id = ? AND complaint_id = ?",
        [C, complaint_id],
    )
    columns = [d[0] for d in cursor.description]
    rows = cursor.fetchall()
    assert len(rows) == 1, f"{complaint_id}: {len(rows)} rows"
    return dict(zip(columns, rows[0], strict=True))


def pick(row: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: row[name] for name in names}


def clock(con: duckdb.DuckDBPyConnection) -> datetime:
    row = con.execute("SELECT as_of FROM projection_clock").fetchone()
    assert row is not None
    value: datetime = row[0]
    return value


CLOCKS = (
    "first_response_due",
    "first_response_warning_at",
    "first_response_at",
    "first_response_status",
    "paused_hours",
    "resolution_due",
    "resolution_warning_at",
    "resolved_at",
    "resolution_status",
)


def test_met(ledger: Ledger, settings: Settings) -> None:
    accept(
        ledger,
        [
            filed("k", "normal"),
            step("ComplaintAcknowledged", 2, "k"),
            step("ComplaintEscalated", 3, "k", to_team="tier-2"),
            step("ComplaintResolved", 100, "k", compensation="25.50", root_cause="billing"),
        ],
    )
    row = sla(project(ledger, settings), "k")
    assert pick(row, "priority", "category", "channel", "status", "filed_at") == {
        "priority": "normal",
        "category": "delivery",
        "channel": "phone",
        "status": "resolved",
        "filed_at": F,
    }
    assert pick(row, *CLOCKS) == {
        "first_response_due": at(12),  # normal: 12 h
        "first_response_warning_at": at(9),  # 0.75 * 12
        "first_response_at": at(2),
        "first_response_status": "met",  # 2 ≤ 12
        "paused_hours": Decimal(0),
        "resolution_due": at(120),  # normal: 120 h
        "resolution_warning_at": at(90),  # 0.75 * 120
        "resolved_at": at(100),
        "resolution_status": "met",  # 100 ≤ 120
    }
    assert pick(row, "escalations", "reopened", "closed_at", "root_cause", "compensation") == {
        "escalations": 1,
        "reopened": 0,
        "closed_at": None,
        "root_cause": "billing",
        "compensation": Decimal("25.50"),
    }


def test_breached_by_late_response_and_late_resolution(ledger: Ledger, settings: Settings) -> None:
    accept(
        ledger,
        [
            filed("k", "high"),
            step("ComplaintAcknowledged", 5, "k"),
            step("ComplaintResolved", 80, "k"),
        ],
    )
    row = sla(project(ledger, settings), "k")
    assert pick(row, *CLOCKS) == {
        "first_response_due": at(4),  # high: 4 h
        "first_response_warning_at": at(3),  # 0.75 * 4
        "first_response_at": at(5),
        "first_response_status": "breached",  # 5 > 4
        "paused_hours": Decimal(0),
        "resolution_due": at(72),  # high: 72 h
        "resolution_warning_at": at(54),  # 0.75 * 72
        "resolved_at": at(80),
        "resolution_status": "breached",  # 80 > 72
    }


def test_stopping_exactly_at_the_due_time_is_met(ledger: Ledger, settings: Settings) -> None:
    accept(
        ledger,
        [
            filed("k", "low"),
            step("ComplaintAcknowledged", 24, "k"),  # low: due at 24 h exactly
            step("ComplaintResolved", 240, "k"),  # low: due at 240 h exactly
        ],
    )
    row = sla(project(ledger, settings), "k")
    assert pick(row, "first_response_status", "resolution_status") == {
        "first_response_status": "met",
        "resolution_status": "met",
    }


def test_breached_and_pending_by_the_as_of_clock(ledger: Ledger, settings: Settings) -> None:
    accept(ledger, [filed("k", "urgent")])
    con = project(ledger, settings)
    # the clock is the latest business time: F itself
    assert clock(con) == F
    assert pick(sla(con, "k"), "status", "first_response_status", "resolution_status") == {
        "status": "open",
        "first_response_status": "pending",
        "resolution_status": "pending",
    }
    con.close()

    # exactly at the due time the clock has not passed it yet
    con = project(ledger, settings, as_of=at(1))
    assert sla(con, "k")["first_response_status"] == "pending"
    con.close()

    events_before = ledger.head()
    con = project(ledger, settings, as_of=at(2))  # urgent first response due at 1 h
    row = sla(con, "k")
    assert clock(con) == at(2)
    assert pick(row, *CLOCKS) == {
        "first_response_due": at(1),
        "first_response_warning_at": at(0.75),  # 45 min
        "first_response_at": None,
        "first_response_status": "breached",  # 2 > 1, no response
        "paused_hours": Decimal(0),
        "resolution_due": at(24),
        "resolution_warning_at": at(18),  # 0.75 * 24
        "resolved_at": None,
        "resolution_status": "pending",  # 2 ≤ 24
    }
    con.close()

    con = project(ledger, settings, as_of=at(25))
    assert sla(con, "k")["resolution_status"] == "breached"  # 25 > 24
    # no event was added to move it
    assert ledger.head() == events_before
    assert con.execute("SELECT count(*) FROM events").fetchone() == (1,)


def test_the_latest_business_time_is_the_default_clock(ledger: Ledger, settings: Settings) -> None:
    accept(
        ledger,
        [
            filed("a", "normal"),  # first response due at 12 h
            filed("b", "low"),  # first response due at 24 h
            event(
                "ContactLogged",
                "S-2",
                at(13).isoformat(),
                {"channel": "sms", "direction": "inbound"},
            ),
        ],
    )
    con = project(ledger, settings)
    assert clock(con) == at(13)
    assert sla(con, "a")["first_response_status"] == "breached"  # 13 > 12
    assert sla(con, "b")["first_response_status"] == "pending"  # 13 ≤ 24


@pytest.mark.parametrize(
    ("priority", "first_response", "resolution"),
    [("urgent", 1, 24), ("high", 4, 72), ("normal", 12, 120), ("low", 24, 240)],
)
def test_targets_and_warnings(
    ledger: Ledger, settings: Settings, priority: str, first_response: int, resolution: int
) -> None:
    accept(ledger, [filed("k", priority)])
    row = sla(project(ledger, settings), "k")
    assert pick(
        row,
        "first_response_due",
        "first_response_warning_at",
        "resolution_due",
        "resolution_warning_at",
    ) == {
        "first_response_due": at(first_response),
        "first_response_warning_at": at(0.75 * first_response),
        "resolution_due": at(resolution),
        "resolution_warning_at": at(0.75 * resolution),
    }


def test_time_on_hold_extends_the_resolution_due_time(ledger: Ledger, settings: Settings) -> None:
    accept(
        ledger,
        [
            filed("k", "normal"),
            step("ComplaintAcknowledged", 1, "k"),
            step("ComplaintOnHold", 10, "k", reason="waiting for photos"),
            step("ComplaintResumed", 34, "k"),  # 24 h on hold
            step("ComplaintOnHold", 40, "k"),
            step("ComplaintResumed", 46, "k"),  # 6 h more: 30 h
            step("ComplaintResolved", 130, "k"),
            # a hold ended by the resolution itself
            filed("r", "normal"),
            step("ComplaintOnHold", 2, "r"),
            step("ComplaintResolved", 12, "r"),  # 10 h on hold; also the first response
        ],
    )
    con = project(ledger, settings)
    assert pick(sla(con, "k"), *CLOCKS) == {
        "first_response_due": at(12),  # holds never move the first response
        "first_response_warning_at": at(9),
        "first_response_at": at(1),
        "first_response_status": "met",
        "paused_hours": Decimal(30),  # (34 - 10) + (46 - 40)
        "resolution_due": at(150),  # 120 + 30
        "resolution_warning_at": at(120),  # 90 + 30
        "resolved_at": at(130),
        "resolution_status": "met",  # 130 ≤ 150 (it would be breached at 120)
    }
    r = sla(con, "r")
    assert pick(r, "paused_hours", "resolution_due", "first_response_at", "status") == {
        "paused_hours": Decimal(10),  # 12 - 2
        "resolution_due": at(130),  # 120 + 10
        "first_response_at": at(12),
        "status": "resolved",
    }
    assert r["first_response_status"] == "met"  # 12 ≤ 12


def test_an_ongoing_hold_extends_to_the_as_of_clock(ledger: Ledger, settings: Settings) -> None:
    accept(
        ledger,
        [
            filed("k", "normal"),
            step("ComplaintAcknowledged", 1, "k"),
            step("ComplaintOnHold", 10, "k"),
        ],
    )
    con = project(ledger, settings, as_of=at(50))
    row = sla(con, "k")
    assert pick(row, "status", "paused_hours", "resolution_due", "resolution_warning_at") == {
        "status": "on_hold",
        "paused_hours": Decimal(40),  # 50 - 10
        "resolution_due": at(160),  # 120 + 40
        "resolution_warning_at": at(130),  # 90 + 40
    }
    assert row["resolution_status"] == "pending"
    con.close()

    con = project(ledger, settings, as_of=at(70))
    row = sla(con, "k")
    assert pick(row, "paused_hours", "resolution_due") == {
        "paused_hours": Decimal(60),  # 70 - 10
        "resolution_due": at(180),
    }
    con.close()

    accept(ledger, [step("ComplaintResumed", 80, "k")])
    con = project(ledger, settings)  # the clock moves to the resume, 80 h
    row = sla(con, "k")
    assert pick(row, "status", "paused_hours", "resolution_due") == {
        "status": "open",
        "paused_hours": Decimal(70),  # 80 - 10
        "resolution_due": at(190),
    }
    con.close()

    con = project(ledger, settings, as_of=at(300))
    row = sla(con, "k")
    assert pick(row, "paused_hours", "resolution_due", "resolution_status") == {
        "paused_hours": Decimal(70),  # the hold ended at 80: the clock no longer adds
        "resolution_due": at(190),
        "resolution_status": "breached",  # 300 > 190, unresolved
    }


def test_reopened_complaints_are_measured_from_the_last_reopening(
    ledger: Ledger, settings: Settings
) -> None:
    accept(
        ledger,
        [
            # a: resolved, reopened, resolved again, then closed
            filed("a", "normal"),
            step("ComplaintAcknowledged", 1, "a"),
            step("ComplaintResolved", 20, "a"),
            step("ComplaintReopened", 30, "a"),
            step("ComplaintResolved", 40, "a"),
            step("ComplaintClosed", 45, "a"),
            # b: resolved on time, reopened, resolved again too late
            filed("b", "normal"),
            step("ComplaintAcknowledged", 1, "b"),
            step("ComplaintResolved", 20, "b"),
            step("ComplaintReopened", 110, "b"),
            step("ComplaintResolved", 215, "b"),
            # c: resolved on time, reopened, still open when the clock passes the due time
            filed("c", "normal"),
            step("ComplaintAcknowledged", 1, "c"),
            step("ComplaintResolved", 20, "c"),
            step("ComplaintReopened", 30, "c"),
            # d: reopened twice (once after a close)
            filed("d", "normal"),
            step("ComplaintAcknowledged", 1, "d"),
            step("ComplaintResolved", 5, "d"),
            step("ComplaintReopened", 6, "d"),
            step("ComplaintClosed", 7, "d"),
            step("ComplaintReopened", 8, "d"),
            step("ComplaintResolved", 9, "d"),
        ],
    )
    con = project(ledger, settings)
    assert clock(con) == at(215)  # the latest business time, b's second resolution

    fields = ("status", "resolved_at", "resolution_status", "reopened", "closed_at")
    # a: the resolution after the (last) reopening at 30 is the one at 40, not 20 nor the
    # close at 45
    assert pick(sla(con, "a"), *fields) == {
        "status": "closed",
        "resolved_at": at(40),
        "resolution_status": "met",  # 40 ≤ 120
        "reopened": 1,
        "closed_at": at(45),
    }
    # b: the on-time resolution at 20 no longer counts; the 90 h it sat resolved do not
    # count against it either (due 120 + 90 = 210); 215 > 210
    assert pick(sla(con, "b"), *fields) == {
        "status": "resolved",
        "resolved_at": at(215),
        "resolution_status": "breached",
        "reopened": 1,
        "closed_at": None,
    }
    assert pick(sla(con, "b"), "paused_hours", "resolution_due") == {
        "paused_hours": Decimal(90),
        "resolution_due": at(210),
    }
    # c: open again; the clock (215) is past its due time (120 + 10 resolved)
    assert pick(sla(con, "c"), *fields) == {
        "status": "open",
        "resolved_at": None,
        "resolution_status": "breached",
        "reopened": 1,
        "closed_at": None,
    }
    # d: the last reopening is at 8, the resolution after it at 9
    assert pick(sla(con, "d"), *fields) == {
        "status": "resolved",
        "resolved_at": at(9),
        "resolution_status": "met",
        "reopened": 2,
        "closed_at": None,
    }
    # the first response stays the first one, whatever happened later
    assert sla(con, "b")["first_response_at"] == at(1)


def test_first_response_by_resolution_or_close(ledger: Ledger, settings: Settings) -> None:
    accept(
        ledger,
        [
            filed("res", "high"),
            step("ComplaintResolved", 3, "res"),  # no acknowledgement: the resolution is it
            filed("close", "normal"),
            step("ComplaintClosed", 13, "close", outcome="withdrawn"),
            filed("late-ack", "normal"),
            step("ComplaintResolved", 5, "late-ack"),
            step("ComplaintAcknowledged", 6, "late-ack"),  # after the resolution: not first
        ],
    )
    con = project(ledger, settings)
    assert pick(sla(con, "res"), "first_response_at", "first_response_status") == {
        "first_response_at": at(3),
        "first_response_status": "met",  # 3 ≤ 4
    }
    assert pick(sla(con, "res"), "resolved_at", "resolution_status", "status") == {
        "resolved_at": at(3),
        "resolution_status": "met",
        "status": "resolved",
    }
    assert pick(
        sla(con, "close"),
        "first_response_at",
        "first_response_status",
        "resolved_at",
        "resolution_status",
        "status",
        "closed_at",
    ) == {
        "first_response_at": at(13),
        "first_response_status": "breached",  # 13 > 12
        "resolved_at": at(13),  # a close stops the resolution clock too
        "resolution_status": "met",  # 13 ≤ 120
        "status": "closed",
        "closed_at": at(13),
    }
    assert sla(con, "late-ack")["first_response_at"] == at(5)


def test_resolved_then_closed_keeps_the_resolution_time(ledger: Ledger, settings: Settings) -> None:
    accept(
        ledger,
        [
            filed("k", "normal"),
            step("ComplaintAcknowledged", 1, "k"),
            step("ComplaintResolved", 100, "k"),
            step("ComplaintClosed", 130, "k"),  # closed after the due time: still met
        ],
    )
    row = sla(project(ledger, settings), "k")
    assert pick(row, "status", "resolved_at", "resolution_status", "closed_at") == {
        "status": "closed",
        "resolved_at": at(100),
        "resolution_status": "met",
        "closed_at": at(130),
    }


def test_the_clock_never_goes_backwards(ledger: Ledger, settings: Settings) -> None:
    accept(ledger, [filed("a", "normal"), step("ComplaintAcknowledged", 10, "a")])
    con = project(ledger, settings)
    assert clock(con) == at(10)
    assert sla(con, "a")["resolution_status"] == "pending"
    con.close()

    con = project(ledger, settings, as_of=at(200))
    assert clock(con) == at(200)
    assert sla(con, "a")["resolution_status"] == "breached"  # 200 > 120
    before = con.execute("SELECT * FROM complaint_sla ORDER BY ALL").fetchall()
    con.close()

    # an earlier as-of is ignored
    con = project(ledger, settings, as_of=at(50))
    assert clock(con) == at(200)
    assert con.execute("SELECT * FROM complaint_sla ORDER BY ALL").fetchall() == before
    con.close()

    # so is an event from before the clock; it is judged at the clock (200)
    accept(ledger, [filed("b", "normal", hours=20)])
    con = project(ledger, settings)
    assert clock(con) == at(200)
    row = sla(con, "b")
    assert pick(row, "first_response_due", "first_response_status", "resolution_status") == {
        "first_response_due": at(32),  # 20 + 12
        "first_response_status": "breached",  # 200 > 32
        "resolution_status": "breached",  # 200 > 140
    }
    assert sla(con, "a")["resolution_status"] == "breached"


def test_a_repeated_filing_is_a_step_without_effect(
    ledger: Ledger, settings: Settings, tmp_path: Path
) -> None:
    """The ledger refuses to file one complaint twice, but a foreign producer on the topic
    can publish a second `ComplaintFiled` (a new event id, another time and priority). The
    first filing (in business time) defines the complaint; the repeat changes nothing, in
    the batch with the first or in a later one, and does not fail the batch."""
    accept(
        ledger,
        [
            filed("k", "high"),
            step("ComplaintAcknowledged", 2, "k"),
            step("ComplaintResolved", 30, "k"),
        ],
    )
    _, documents = ledger.documents_after(0, 100)
    original = next(orjson.loads(d) for _, d in documents if b'"ComplaintFiled"' in d)
    later = step("ComplaintFiled", 40, "k", channel="email", category="billing", priority="low")
    repeat = {**original, "event_id": str(uuid.uuid4()), "occurred_at": later["occurred_at"],
              "data": later["data"]}  # fmt: skip
    repeated = (ledger.head() + 1, orjson.dumps(repeat))

    def complaint_after(*batches: list[tuple[int, bytes]]) -> dict[str, Any]:
        con = connect(tmp_path / f"{uuid.uuid4().hex}.duckdb")
        projector = Projector(con)
        for n, batch in enumerate(batches):
            projector.apply(batch, {("test", ""): n})
        return sla(con, "k")

    alone = complaint_after(documents)
    assert pick(alone, "priority", "channel", "filed_at", "status", "resolved_at") == {
        "priority": "high",
        "channel": "phone",
        "filed_at": F,
        "status": "resolved",
        "resolved_at": at(30),
    }
    assert complaint_after([*documents, repeated]) == alone
    assert complaint_after(documents, [repeated]) == alone


def derived(con: duckdb.DuckDBPyConnection, complaint_id: str) -> list[tuple[str, str, datetime]]:
    """The SLA transitions derived for one of C's complaints: (type, clock, business time)."""
    return con.execute(
        """
        SELECT type, data->>'clock', occurred_at FROM derived_events
        WHERE customer_id = ? AND data->>'complaint_id' = ? ORDER BY occurred_at, type
        """,
        [C, complaint_id],
    ).fetchall()


def test_a_pause_after_a_target_was_reached_does_not_move_it(
    ledger: Ledger, settings: Settings
) -> None:
    accept(
        ledger,
        [
            # w: warned at 90 h, then on hold 100-150 h: the due time moves (it was not
            # reached yet), the warning stays where it was
            filed("w", "normal"),
            step("ComplaintAcknowledged", 1, "w"),
            step("ComplaintOnHold", 100, "w"),
            step("ComplaintResumed", 150, "w"),
            step("ComplaintResolved", 160, "w"),
            # b: breached at 120 h, then on hold: the breach stands
            filed("b", "normal"),
            step("ComplaintAcknowledged", 1, "b"),
            step("ComplaintOnHold", 130, "b"),
            step("ComplaintResumed", 180, "b"),
            step("ComplaintResolved", 185, "b"),
        ],
    )
    con = project(ledger, settings)
    assert pick(sla(con, "w"), "paused_hours", "resolution_warning_at", "resolution_due") == {
        "paused_hours": Decimal(50),
        "resolution_warning_at": at(90),
        "resolution_due": at(170),  # 120 + 50
    }
    assert sla(con, "w")["resolution_status"] == "met"  # 160 ≤ 170
    assert derived(con, "w") == [("SlaWarning", "resolution", at(90))]

    assert pick(sla(con, "b"), "paused_hours", "resolution_due", "resolution_status") == {
        "paused_hours": Decimal(50),
        "resolution_due": at(120),
        "resolution_status": "breached",  # 185 > 120: the hold at 130 came too late
    }
    assert derived(con, "b") == [
        ("SlaWarning", "resolution", at(90)),
        ("SlaBreached", "resolution", at(120)),
    ]


def test_a_reopening_reveals_nothing_dated_while_the_complaint_was_resolved(
    ledger: Ledger, settings: Settings
) -> None:
    accept(
        ledger,
        [
            filed("k", "normal"),
            step("ComplaintAcknowledged", 1, "k"),
            step("ComplaintResolved", 2, "k"),
            step("ComplaintReopened", 200, "k"),  # resolved for 198 h
        ],
    )
    con = project(ledger, settings)
    assert pick(sla(con, "k"), "resolution_warning_at", "resolution_due") == {
        "resolution_warning_at": at(288),  # 90 + 198
        "resolution_due": at(318),  # 120 + 198
    }
    assert derived(con, "k") == []  # the clock (200) reached neither
    con.close()

    con = project(ledger, settings, as_of=at(320))
    assert derived(con, "k") == [
        ("SlaWarning", "resolution", at(288)),
        ("SlaBreached", "resolution", at(318)),
    ]


def test_sla_event_ids_are_distinct_whatever_the_ids_hold(
    ledger: Ledger, settings: Settings
) -> None:
    def complaint(customer_id: str, complaint_id: str) -> dict[str, Any]:
        return event(
            "ComplaintFiled",
            customer_id,
            F.isoformat(),
            {"complaint_id": complaint_id, "channel": "email", "category": "x"},
        )

    # joined with "|" both would read "a|b|c"
    accept(ledger, [complaint("a|b", "c"), complaint("a", "b|c"), complaint("S-1", "k")])
    con = project(ledger, settings, as_of=at(500))
    rows = con.execute(
        "SELECT customer_id, event_id FROM derived_events WHERE type LIKE 'Sla%'"
    ).fetchall()
    assert len(rows) == 3 * 4  # two clocks each, warned and breached
    assert len({event_id for _, event_id in rows}) == len(rows)
    # ids without "|" keep the formula of the events published before
    assert (
        "S-1",
        uuid.UUID(hashlib.md5(b"derived|sla|S-1|k|resolution|SlaBreached").hexdigest()),
    ) in rows


def hand_over(settings: Settings, *, acknowledged: bool = True) -> list[Word]:
    """What a consumer group's publisher does: write down what the derived topic lacks
    (again once more is due: a withdrawn event at its new time), send it, and mark what
    the broker acknowledged (here all of it, or with `acknowledged=False` nothing: the
    member was killed before it knew)."""
    con = connect(settings.projections_path)
    try:
        words: list[Word] = []
        while due := [w for w in derived_events.unpublished(con) if w not in words]:
            derived_events.mark_sending(con, due)
            words += due
        if acknowledged:
            derived_events.mark_acknowledged(con, words)
            derived_events.mark_acknowledged(con, words)  # twice: it changes nothing
            assert derived_events.unpublished(con) == []
        return words
    finally:
        con.close()


def facts(words: list[Word]) -> list[dict[str, Any]]:
    return [word.fact for word in words]


def publication(settings: Settings) -> tuple[int, int, int, int]:
    con = connect(settings.projections_path, read_only=True)
    try:
        return derived_events.publication(con)
    finally:
        con.close()


def withdrawal_id(event_id: str, ordinal: int) -> str:
    return str(
        uuid.UUID(hashlib.md5(f"derived|withdrawn|{event_id}|{ordinal}".encode()).hexdigest())
    )


def test_a_transition_taken_back_after_publication_is_withdrawn(
    ledger: Ledger, settings: Settings
) -> None:
    """A breach went out; a resolution recorded late (its business time before the due
    time) takes it back: a `DerivedEventWithdrawn` naming it goes out once. A later late
    event makes the breach hold again: it goes out again under its own id, and when it
    is taken back once more, so is a second withdrawal, under a new id."""
    accept(ledger, [
        filed("x", "urgent"),
        step("ComplaintAcknowledged", 0.25, "x"),
        filed("later", "low", hours=30),  # the clock: past x's due time (24 h)
    ])  # fmt: skip
    con = project(ledger, settings)
    assert derived(con, "x") == [
        ("SlaWarning", "resolution", at(18)),
        ("SlaBreached", "resolution", at(24)),
    ]
    con.close()
    sent = facts(hand_over(settings))
    (breach,) = [f for f in sent if f["type"] == "SlaBreached" and f["data"]["complaint_id"] == "x"]

    accept(ledger, [step("ComplaintResolved", 20, "x")])  # recorded late
    con = project(ledger, settings)
    assert derived(con, "x") == [("SlaWarning", "resolution", at(18))]
    held, published, withdrawn, waiting = derived_events.publication(con)
    assert (held, withdrawn, waiting) == (published, 0, 1)
    con.close()
    (withdrawal,) = facts(hand_over(settings))
    assert withdrawal == {
        "event_id": withdrawal_id(breach["event_id"], 1),
        "type": "DerivedEventWithdrawn",
        "schema_version": 1,
        "customer_id": C,
        "occurred_at": breach["occurred_at"],  # dated as what it withdraws
        "source": "customer-ledger",
        "data": {"withdrawn_event_id": breach["event_id"], "withdrawn_type": "SlaBreached"},
    }
    assert DerivedEventWithdrawn.model_validate(withdrawal).data.withdrawn_type == "SlaBreached"
    con = connect(settings.projections_path, read_only=True)
    assert derived_events.publication(con)[2:] == (1, 0)  # withdrawn once, not twice
    con.close()

    # reopened at 21 (recorded late): unresolved at the clock, the breach holds again
    accept(ledger, [step("ComplaintReopened", 21, "x")])
    con = project(ledger, settings)
    assert ("SlaBreached", "resolution", at(25)) in derived(con, "x")  # 24 + 1 h resolved
    con.close()
    (again,) = facts(hand_over(settings))
    assert (again["event_id"], again["type"]) == (breach["event_id"], "SlaBreached")
    assert again["occurred_at"] != breach["occurred_at"]

    accept(ledger, [step("ComplaintResolved", 22, "x")])  # recorded late, before 25
    con = project(ledger, settings)
    assert "SlaBreached" not in {kind for kind, _, _ in derived(con, "x")}
    con.close()
    (second,) = facts(hand_over(settings))
    assert second["event_id"] == withdrawal_id(breach["event_id"], 2)
    assert second["occurred_at"] == again["occurred_at"]
    con = connect(settings.projections_path, read_only=True)
    held, published, withdrawn, waiting = derived_events.publication(con)
    assert (held, withdrawn, waiting) == (published, 2, 0)
    con.close()


def breach_of_x(ledger: Ledger, settings: Settings, *, acknowledged: bool) -> dict[str, Any]:
    """x's resolution breach (24 h), handed over with the rest (acknowledged or not)."""
    accept(ledger, [
        filed("x", "urgent"),
        step("ComplaintAcknowledged", 0.25, "x"),
        filed("later", "low", hours=30),  # the clock: past x's due time (24 h)
    ])  # fmt: skip
    project(ledger, settings).close()
    sent = facts(hand_over(settings, acknowledged=acknowledged))
    (breach,) = [f for f in sent if f["type"] == "SlaBreached" and f["data"]["complaint_id"] == "x"]
    return breach


def take_back(ledger: Ledger, settings: Settings, type_: str, hours: float) -> None:
    """A step of x recorded late."""
    accept(ledger, [step(type_, hours, "x")])
    project(ledger, settings).close()


def test_a_member_killed_before_the_acknowledgement_leaves_subscribers_the_right_word(
    ledger: Ledger, settings: Settings
) -> None:
    """What was handed to the producer is written down first, so a member killed before
    it knew of the broker's acknowledgement still knows what subscribers may hold: a
    breach handed over, then taken back, is withdrawn (a review: nothing went out); a
    withdrawal handed over, then made void by another late event, is followed by the
    breach again (nothing went out either)."""
    breach = breach_of_x(ledger, settings, acknowledged=False)
    take_back(ledger, settings, "ComplaintResolved", 20)
    con = connect(settings.projections_path)
    try:
        due = facts(derived_events.unpublished(con))
    finally:
        con.close()
    of_x = [
        (f["type"], f["event_id"])
        for f in due
        if f["data"].get("complaint_id") == "x" or f["type"] == WITHDRAWN
    ]
    assert [kind for kind, _ in of_x] == ["SlaWarning", WITHDRAWN]  # the warning again
    assert of_x[1][1] == withdrawal_id(breach["event_id"], 1)

    (withdrawal,) = [
        w for w in hand_over(settings, acknowledged=False) if w.fact["type"] == WITHDRAWN
    ]
    con = connect(settings.projections_path)
    try:  # a member killed again: the same word is due again, not another withdrawal
        assert withdrawal in derived_events.unpublished(con)
    finally:
        con.close()
    assert publication(settings)[2:] == (0, 1)

    take_back(ledger, settings, "ComplaintReopened", 21)  # the breach holds again (at 25)
    con = connect(settings.projections_path)
    try:
        due = derived_events.unpublished(con)
    finally:
        con.close()
    assert WITHDRAWN not in {w.fact["type"] for w in due}
    (reinstated,) = [w for w in due if w.fact["event_id"] == breach["event_id"]]
    assert reinstated.fact["occurred_at"] == "2025-03-04T10:00:00.000000Z"  # 25 h after F
    # a new word under the same id: the first send's acknowledgement, still on its way,
    # must not be taken for this one's (nor keep the publisher from handing it over)
    assert reinstated.key == (breach["event_id"], 1)


WITHDRAWN = "DerivedEventWithdrawn"


def test_an_old_acknowledgement_does_not_vouch_for_a_later_word(
    ledger: Ledger, settings: Settings
) -> None:
    """Withdrawn, announced again, withdrawn again, each handed over before the broker
    acknowledged the one before: the first withdrawal's acknowledgement arriving last
    must not mark the second as acknowledged (a kill then would lose it)."""
    breach = breach_of_x(ledger, settings, acknowledged=True)
    take_back(ledger, settings, "ComplaintResolved", 20)
    (first,) = hand_over(settings, acknowledged=False)
    take_back(ledger, settings, "ComplaintReopened", 21)
    (announced,) = hand_over(settings, acknowledged=False)
    take_back(ledger, settings, "ComplaintResolved", 22)
    (second,) = hand_over(settings, acknowledged=False)
    assert [first.fact["event_id"], announced.fact["event_id"], second.fact["event_id"]] == [
        withdrawal_id(breach["event_id"], 1),
        breach["event_id"],
        withdrawal_id(breach["event_id"], 2),
    ]
    con = connect(settings.projections_path)
    try:
        derived_events.mark_acknowledged(con, [first, announced])  # late acknowledgements
        assert derived_events.unpublished(con) == [second]
        derived_events.mark_acknowledged(con, [second])
        assert derived_events.unpublished(con) == []
        held, published, withdrawn, waiting = derived_events.publication(con)
        assert (held, withdrawn, waiting) == (published, 2, 0)
    finally:
        con.close()


def test_words_handed_over_twice_are_written_down_once(ledger: Ledger, settings: Settings) -> None:
    """`derived_published` declares no key (projections.schema.KEYS): marking the same
    words twice in one call still leaves one row per event, and each is due once."""
    accept(ledger, [
        filed("x", "urgent"),
        step("ComplaintAcknowledged", 0.25, "x"),
        filed("later", "low", hours=30),
    ])  # fmt: skip
    project(ledger, settings).close()
    con = connect(settings.projections_path)
    try:
        due = derived_events.unpublished(con)
        assert due
        derived_events.mark_sending(con, due + due)
        assert duplicate_keys(con) == {}
        assert len(derived_events.unpublished(con)) == len(due)  # sent, unacknowledged
    finally:
        con.close()


def test_a_realert_sends_everything_again_and_withdrawals_count_on(
    ledger: Ledger, settings: Settings
) -> None:
    """`rebuild --realert` sends every derived event again, but keeps how often each was
    withdrawn: a later withdrawal gets a new id, not the first one's again (which
    subscribers that deduplicate by id would drop: a review)."""
    breach = breach_of_x(ledger, settings, acknowledged=True)
    take_back(ledger, settings, "ComplaintResolved", 20)
    (first,) = facts(hand_over(settings))
    take_back(ledger, settings, "ComplaintReopened", 21)

    rebuild(ledger, settings.projections_path, realert=True)
    con = connect(settings.projections_path)
    try:
        resent = {w.fact["event_id"] for w in derived_events.unpublished(con)}
        everything = {
            str(r[0]) for r in con.execute("SELECT event_id FROM derived_events").fetchall()
        }
    finally:
        con.close()
    assert resent == everything and breach["event_id"] in resent
    hand_over(settings)

    take_back(ledger, settings, "ComplaintResolved", 22)
    (second,) = facts(hand_over(settings))
    assert second["event_id"] == withdrawal_id(breach["event_id"], 2) != first["event_id"]


def test_a_transition_a_late_event_moves_is_withdrawn_and_sent_at_its_new_time(
    ledger: Ledger, settings: Settings
) -> None:
    """A hold recorded late moves a published warning and breach to later times, under the
    same ids: subscribers held the old times (a review). Each is withdrawn, then sent
    again at its new time, in that order, in one hand-over."""
    breach = breach_of_x(ledger, settings, acknowledged=True)
    accept(ledger, [step("ComplaintOnHold", 5, "x", reason="customer"),
                    step("ComplaintResumed", 7, "x")])  # fmt: skip
    project(ledger, settings).close()
    held, published, withdrawn, waiting = publication(settings)
    # subscribers hold the old times: two withdrawals due, two events to send again
    assert (held - published, withdrawn, waiting) == (2, 0, 2)
    words = hand_over(settings)
    of_breach = [
        (w.fact["type"], w.fact["occurred_at"], w.ordinal)
        for w in words
        if breach["event_id"] in (w.fact["event_id"], w.fact["data"].get("withdrawn_event_id"))
    ]
    assert of_breach == [
        (WITHDRAWN, breach["occurred_at"], 1),
        ("SlaBreached", "2025-03-04T11:00:00.000000Z", 1),  # 24 + 2 h on hold
    ]
    assert publication(settings)[2:] == (2, 0)  # the warning's and the breach's
