"""The ledger on the real PostgreSQL event store: the same behaviour as on SQLite.

Every test runs against a fresh schema of the machine's PostgreSQL server (the
`postgres_settings` fixture), with no mocks: records go through `eventsourcing.postgres`,
are read back by fresh `Ledger` instances (so nothing comes from a process cache) and are
projected into real DuckDB files.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import duckdb
import orjson
import psycopg
import pytest
from conftest import PG_DSN, event, fact_count, project, record

from bootstrap import Settings, open_ledger
from consumers import relay
from consumers.kafka import KafkaSettings
from domain import audit
from domain.demo_history import generate_history
from domain.ledger import Ledger, Outcome, StoreLockLost

pytestmark = pytest.mark.postgres

OpenLedger = Callable[..., Ledger]
EVENTS_TABLE = "customerledger_events"


@pytest.fixture
def open_pg(postgres_settings: Settings) -> Iterator[OpenLedger]:
    """Opens ledgers on the test schema (each with its own connection pool); closes them all
    before the schema is dropped."""
    opened: list[Ledger] = []
    # The PostgreSQL store does not create DATA_DIR (SQLite's does); the projections live
    # there. The CLI test covers a fresh DATA_DIR with PostgreSQL end to end.
    postgres_settings.data_dir.mkdir(parents=True, exist_ok=True)

    def opener(settings: Settings | None = None) -> Ledger:
        ledger = open_ledger(settings or postgres_settings)
        opened.append(ledger)
        return ledger

    yield opener
    for ledger in opened:
        ledger.close()


def schema_of(settings: Settings) -> str:
    assert settings.event_store is not None
    return parse_qs(urlparse(settings.event_store).query)["schema"][0]


def raw_rows(settings: Settings) -> list[tuple[str, bytes]]:
    """(topic, state) of every row of the schema's stored-events table, read with psycopg."""
    schema = schema_of(settings)
    with psycopg.connect(PG_DSN, autocommit=True) as con:
        tables = [
            row[0]
            for row in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (schema,),
            )
        ]
        assert EVENTS_TABLE in tables, tables
        rows = con.execute(
            f'SELECT topic, state FROM "{schema}"."{EVENTS_TABLE}" ORDER BY notification_id'
        ).fetchall()
    return [(topic, bytes(state)) for topic, state in rows]


def statuses(outcomes: Sequence[Outcome]) -> list[str]:
    return [o.status for o in outcomes]


REGISTRATION = event(
    "CustomerRegistered",
    "C1",
    "2025-01-01T09:00:00+08:00",
    {"name": "Philomena Quackenbush", "email": "philomena@example.org", "region": "North"},
    source_event_id="crm-1",
    source="crm",
)
TIMELINE = [
    REGISTRATION,
    event(
        "PurchaseRecorded",
        "C1",
        "2025-01-02T10:00:00Z",
        {"order_id": "O1", "amount": "10.50", "currency": "EUR"},
        source_event_id="pos-1",
        source="pos",
    ),
    event(
        "ContactLogged",
        "C1",
        "2025-01-03T11:00:00Z",
        {"channel": "phone", "direction": "inbound", "topic": "delivery"},
    ),
    event(
        "ComplaintFiled",
        "C2",
        "2025-01-04T08:00:00Z",
        {"complaint_id": "K1", "channel": "email", "category": "billing", "priority": "high"},
    ),
]


# --- recording and reading back --------------------------------------------------------


def test_records_and_reads_back_a_timeline_from_postgres(
    postgres_settings: Settings, open_pg: OpenLedger
) -> None:
    writer = open_pg()
    outcomes = record(writer, TIMELINE)
    assert statuses(outcomes) == ["accepted"] * 4

    reader = open_pg()  # a fresh instance: nothing cached, everything read from PostgreSQL
    c1 = reader.timeline("C1")
    assert [f["type"] for f in c1] == ["CustomerRegistered", "PurchaseRecorded", "ContactLogged"]
    assert [f["event_id"] for f in c1] == [o.event_id for o in outcomes[:3]]
    assert c1[0]["data"]["name"] == "Philomena Quackenbush"
    assert c1[0]["occurred_at"] == "2025-01-01T09:00:00+08:00"
    assert (c1[0]["source"], c1[0]["source_event_id"]) == ("crm", "crm-1")
    assert c1[1]["data"]["amount"] == "10.50"
    assert {f["customer_id"] for f in c1} == {"C1"}
    assert [f["type"] for f in reader.timeline("C2")] == ["ComplaintFiled"]
    assert reader.timeline("nobody") == []

    # It really is PostgreSQL: no SQLite file, and the rows are in the schema's table
    # (unencrypted here, so the personal name is visible in the raw state).
    assert not (postgres_settings.data_dir / "events.sqlite3").exists()
    rows = raw_rows(postgres_settings)
    assert sum(topic.endswith("Customer.Recorded") for topic, _ in rows) == 4
    assert any(b"Philomena Quackenbush" in state for _, state in rows)


def test_duplicates_are_recognised_across_ledger_instances(open_pg: OpenLedger) -> None:
    first = record(open_pg(), TIMELINE)
    head = open_pg().head()

    again = record(open_pg(), TIMELINE)
    assert statuses(again) == ["duplicate"] * 4
    assert [o.event_id for o in again] == [o.event_id for o in first]

    # The same idempotency key with changed content is still the same event.
    changed_key = dict(TIMELINE[1], data={"order_id": "O1", "amount": "99", "currency": "EUR"})
    (outcome,) = record(open_pg(), [changed_key])
    assert (outcome.status, outcome.event_id) == ("duplicate", first[1].event_id)

    reader = open_pg()
    assert reader.head() == head
    assert len(reader.timeline("C1")) == 3
    assert reader.timeline("C1")[1]["data"]["amount"] == "10.50"


def test_invariants_hold_after_reloading_from_postgres(open_pg: OpenLedger) -> None:
    setup = [
        event("CustomerRegistered", "C1", "2025-01-01T09:00:00Z"),
        event(
            "PurchaseRecorded",
            "C1",
            "2025-01-02T09:00:00Z",
            {"order_id": "O1", "amount": "10.00", "currency": "EUR"},
        ),
        event(
            "ComplaintFiled",
            "C1",
            "2025-01-03T09:00:00Z",
            {"complaint_id": "K1", "channel": "phone", "category": "billing"},
        ),
        event("ComplaintClosed", "C1", "2025-01-04T09:00:00Z", {"complaint_id": "K1"}),
    ]
    assert statuses(record(open_pg(), setup)) == ["accepted"] * 4

    second = open_pg()
    outcomes = record(
        second,
        [
            event(
                "PurchaseRefunded", "C1", "2025-02-01T09:00:00Z", {"order_id": "O1", "amount": "11"}
            ),
            event(
                "PurchaseRefunded", "C1", "2025-02-02T09:00:00Z", {"order_id": "O1", "amount": "4"}
            ),
            event("CustomerRegistered", "C1", "2025-02-03T09:00:00Z", {"region": "South"}),
            event(
                "PurchaseRecorded",
                "C1",
                "2025-02-04T09:00:00Z",
                {"order_id": "O1", "amount": "5", "currency": "EUR"},
            ),
            event("ComplaintAcknowledged", "C1", "2025-02-05T09:00:00Z", {"complaint_id": "K1"}),
            event(
                "ComplaintResolved",
                "C1",
                "2025-02-05T09:00:00Z",
                {"complaint_id": "K9", "resolution": "refund"},
            ),
        ],
    )
    assert statuses(outcomes) == [
        "rejected",
        "accepted",
        "rejected",
        "rejected",
        "rejected",
        "rejected",
    ]
    reasons = [o.reason or "" for o in outcomes]
    assert "exceeds what remains refundable" in reasons[0]
    assert "already registered" in reasons[2]
    assert "order O1 is already recorded" in reasons[3]
    assert "complaint K1 is closed" in reasons[4]
    assert "complaint K9 was never filed" in reasons[5]

    # A third instance sees the partial refund made by the second one.
    third = open_pg()
    outcomes = record(
        third,
        [
            event(
                "PurchaseRefunded",
                "C1",
                "2025-03-01T09:00:00Z",
                {"order_id": "O1", "amount": "6.01"},
            ),
            event(
                "PurchaseRefunded", "C1", "2025-03-02T09:00:00Z", {"order_id": "O1", "amount": "6"}
            ),
            event("ComplaintReopened", "C1", "2025-03-03T09:00:00Z", {"complaint_id": "K1"}),
        ],
    )
    assert statuses(outcomes) == ["rejected", "accepted", "accepted"]
    assert "(6.00)" in (outcomes[0].reason or "")
    types = [f["type"] for f in open_pg().timeline("C1")]
    assert types.count("PurchaseRefunded") == 2
    assert types[-1] == "ComplaintReopened"


# --- the notification log ----------------------------------------------------------------


def test_notification_positions_increase_and_documents_after_pages(open_pg: OpenLedger) -> None:
    writer = open_pg()
    accepted: list[str] = []
    for batch in range(4):
        events = [
            event(
                "ContactLogged",
                f"C{customer}",
                f"2025-01-0{batch + 1}T09:00:00Z",
                {"channel": "email", "direction": "outbound", "topic": f"batch {batch}"},
            )
            for customer in range(batch + 2)
        ]
        outcomes = record(writer, events)
        assert statuses(outcomes) == ["accepted"] * len(events)
        accepted += [o.event_id for o in outcomes]

    reader = open_pg()
    head = reader.head()
    # Every customer stream opens with one non-fact notification, then one per fact.
    assert head >= len(accepted) + 5

    last, everything = reader.documents_after(0, head + 100)
    positions = [position for position, _ in everything]
    assert last == head
    assert positions == sorted(set(positions)), "positions must be strictly increasing"
    assert positions[-1] == head
    facts = [orjson.loads(document) for _, document in everything]
    assert [f["event_id"] for f in facts] == accepted
    assert {f["type"] for f in facts} == {"ContactLogged"}

    paged: list[tuple[int, bytes]] = []
    position, pages = 0, 0
    while True:
        last, page = reader.documents_after(position, 3)
        if last == position:
            break
        assert last > position
        assert all(position < p <= last for p, _ in page)
        paged += page
        position, pages = last, pages + 1
    assert paged == everything
    assert position == head
    assert pages >= head // 3

    assert reader.documents_after(head, 10) == (head, [])
    middle = positions[len(positions) // 2]
    _, rest = reader.documents_after(middle, head)
    assert rest == [d for d in everything if d[0] > middle]
    assert reader.facts_after(middle, head)[1] == [(p, orjson.loads(d)) for p, d in rest]


# --- projections -------------------------------------------------------------------------


def _tables(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[Any, ...]]]:
    """Every base table's rows, ordered by all columns, without the columns that
    legitimately differ between two stores (`recorded_at`, `position`)."""
    names = [
        row[0]
        for row in con.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'main' AND table_type = 'BASE TABLE' ORDER BY table_name"
        ).fetchall()
    ]
    tables: dict[str, list[tuple[Any, ...]]] = {}
    for name in names:
        columns = [
            row[0]
            for row in con.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = 'main' AND table_name = ? ORDER BY ordinal_position",
                [name],
            ).fetchall()
            if row[0] not in ("recorded_at", "position")
        ]
        select = ", ".join(f'"{c}"' for c in columns)
        tables[name] = con.execute(f'SELECT {select} FROM "{name}" ORDER BY ALL').fetchall()
    return tables


def test_projecting_from_postgres_equals_projecting_from_sqlite(
    postgres_settings: Settings, open_pg: OpenLedger, tmp_path: Path
) -> None:
    history = generate_history(customers=12, seed=11)
    sqlite_settings = Settings(data_dir=tmp_path / "sqlite")
    on_sqlite = open_ledger(sqlite_settings)
    on_postgres = open_pg()
    for start in range(0, len(history), 150):
        batch = history[start : start + 150]
        from_sqlite, from_postgres = record(on_sqlite, batch), record(on_postgres, batch)
        assert from_postgres == from_sqlite
        assert set(statuses(from_postgres)) == {"accepted"}

    sqlite_con = project(on_sqlite, sqlite_settings)
    postgres_con = project(open_pg(), postgres_settings)
    try:
        from_sqlite_tables, from_postgres_tables = _tables(sqlite_con), _tables(postgres_con)
    finally:
        sqlite_con.close()
        postgres_con.close()

    assert from_postgres_tables.keys() == from_sqlite_tables.keys()
    for table in ("events", "customer_profiles", "loyalty_stage_history", "complaint_sla"):
        assert from_postgres_tables[table], f"{table} is empty: the comparison proves nothing"
    assert len(from_postgres_tables["events"]) == len(history)
    for name, rows in from_sqlite_tables.items():
        assert from_postgres_tables[name] == rows, f"table {name} differs"


# --- concurrency -------------------------------------------------------------------------


def test_a_stale_writer_retries_and_decides_again(open_pg: OpenLedger) -> None:
    """Deterministic optimistic concurrency: writer A's cached customer goes stale when
    writer B saves to the same stream; A's next write conflicts, re-reads and re-decides."""
    a, b = open_pg(), open_pg()
    assert statuses(record(a, [event("CustomerRegistered", "C1", "2025-01-01T00:00:00Z")])) == [
        "accepted"
    ]
    purchase = {"order_id": "O7", "amount": "20", "currency": "EUR"}
    bought = record(b, [event("PurchaseRecorded", "C1", "2025-01-02T00:00:00Z", purchase)])
    assert statuses(bought) == ["accepted"]
    # A still holds C1 as it saved it; B's purchase must be seen after A's retry.
    outcomes = record(
        a,
        [
            event(
                "PurchaseRecorded",
                "C1",
                "2025-01-03T00:00:00Z",
                {"order_id": "O7", "amount": "35", "currency": "EUR"},
            ),
            event(
                "PurchaseRefunded", "C1", "2025-01-04T00:00:00Z", {"order_id": "O7", "amount": "5"}
            ),
        ],
    )
    assert statuses(outcomes) == ["rejected", "accepted"]
    assert "order O7 is already recorded" in (outcomes[0].reason or "")
    types = [f["type"] for f in open_pg().timeline("C1")]
    assert types == ["CustomerRegistered", "PurchaseRecorded", "PurchaseRefunded"]


def test_concurrent_writers_on_the_same_customers_lose_no_event(
    postgres_settings: Settings, open_pg: OpenLedger
) -> None:
    customers = [f"C{n}" for n in range(4)]
    batches = 20
    registrations = [event("CustomerRegistered", c, "2025-01-01T00:00:00Z") for c in customers]
    assert statuses(record(open_pg(), registrations)) == ["accepted"] * len(customers)

    writers = {name: open_pg() for name in ("left", "right")}
    start = threading.Barrier(len(writers))
    outcomes: dict[str, list[Outcome]] = {name: [] for name in writers}
    errors: list[BaseException] = []

    def write(name: str) -> None:
        try:
            start.wait(timeout=30)
            for n in range(batches):
                batch = [
                    event(
                        "ContactLogged",
                        customer,
                        f"2025-02-01T{n:02d}:00:00Z",
                        {"channel": "chat", "direction": "inbound", "topic": f"{name} {n}"},
                        source_event_id=f"{name}-{n}-{customer}",
                    )
                    for customer in customers
                ]
                outcomes[name] += record(writers[name], batch)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(name,)) for name in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    for name in writers:
        assert statuses(outcomes[name]) == ["accepted"] * (batches * len(customers))

    reader = open_pg()
    for customer in customers:
        timeline = reader.timeline(customer)
        keys = [f["source_event_id"] for f in timeline if f["type"] == "ContactLogged"]
        expected = {f"{name}-{n}-{customer}" for name in writers for n in range(batches)}
        assert len(keys) == len(expected)
        assert set(keys) == expected
    # Every notification is a stream opening, a registration or one of the contacts.
    # (Positions may have gaps: a PostgreSQL sequence value taken by a write that lost the
    # race is not given back.)
    expected_facts = len(customers) * (1 + len(writers) * batches)
    last, documents = reader.documents_after(0, 10_000)
    assert len(documents) == expected_facts
    assert last == reader.head()
    notifications = reader.recorder.select_notifications(start=1, limit=10_000)
    assert len(notifications) == expected_facts + len(customers)


# --- encryption --------------------------------------------------------------------------


def test_cipher_key_encrypts_the_stored_state_yet_reads_and_projects(
    postgres_settings: Settings, open_pg: OpenLedger
) -> None:
    # What `AESCipher.create_key(16)` returns: 16 random bytes, base64-encoded.
    key = base64.b64encode(os.urandom(16)).decode()
    encrypted = dataclasses.replace(postgres_settings, cipher_key=key)
    outcomes = record(open_pg(encrypted), TIMELINE)
    assert statuses(outcomes) == ["accepted"] * 4

    rows = raw_rows(postgres_settings)
    assert len(rows) == 6  # two stream openings and four facts
    for _, state in rows:
        assert b"Quackenbush" not in state
        assert b"philomena@example.org" not in state
        assert b"event_id" not in state
        assert b"Quackenbush".hex().encode() not in state

    reader = open_pg(encrypted)
    c1 = reader.timeline("C1")
    assert c1[0]["data"]["name"] == "Philomena Quackenbush"
    _, documents = reader.documents_after(0, 100)
    assert [orjson.loads(d)["event_id"] for _, d in documents] == [o.event_id for o in outcomes]

    con = project(reader, encrypted)
    try:
        profiles = con.execute(
            "SELECT customer_id, region, purchase_count, total_spend, complaint_count "
            "FROM customer_profiles ORDER BY customer_id"
        ).fetchall()
        mirrored = con.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
        leaked = con.execute(
            "SELECT count(*) FROM events WHERE CAST(data AS VARCHAR) LIKE '%Quackenbush%'"
        ).fetchone()
    finally:
        con.close()
    assert [(p[0], p[1], p[2], str(p[3]), p[4]) for p in profiles] == [
        ("C1", "North", 1, "10.5000", 0),
        ("C2", None, 0, "0.0000", 1),
    ]
    assert mirrored == (4, 4)
    assert leaked == (0,)


def test_processes_opening_a_new_store_at_once_all_get_a_ledger(
    postgres_settings: Settings,
) -> None:
    """Each open creates the store's tables and functions; simultaneous opens race in the
    catalog ('tuple concurrently updated'), and the losers must retry, not fail."""
    openers = 6
    start = threading.Barrier(openers)
    opened: list[Ledger] = []
    failures: list[BaseException] = []

    def open_at_once() -> None:
        start.wait()
        try:
            opened.append(open_ledger(postgres_settings))
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=open_at_once) for _ in range(openers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert failures == []
        assert len(opened) == openers
        contact = event(
            "ContactLogged",
            "C1",
            "2025-01-01T09:00:00Z",
            {"channel": "phone", "direction": "inbound"},
        )
        outcomes = record(opened[0], [contact])
        assert [o.status for o in outcomes] == ["accepted"]
    finally:
        for ledger in opened:
            ledger.close()


@pytest.mark.kafka
def test_one_relay_per_postgres_store_and_topic_whatever_the_data_dir(
    open_pg: OpenLedger,
    postgres_settings: Settings,
    kafka_settings: KafkaSettings,
    tmp_path: Path,
) -> None:
    """Two data dirs (or hosts) over one PostgreSQL store: each relay's data-dir lock is
    its own, and both published every event. The store's advisory lock lets one relay
    per topic run; another topic, or the same one after the first stopped, is free."""
    first = open_pg()
    second = open_pg(dataclasses.replace(postgres_settings, data_dir=tmp_path / "b"))
    record(first, generate_history(customers=5))
    with relay.sole_relay(tmp_path / "a" / "relay.json", first, kafka_settings.topic):
        with pytest.raises(relay.RelayBusy, match="another data dir or host"):
            relay.run(second, kafka_settings, tmp_path / "b" / "relay.json")
        with relay.sole_relay(tmp_path / "b" / "other.json", second, "another-topic"):
            pass
    state = relay.run(second, kafka_settings, tmp_path / "b" / "relay.json")
    assert (state.position, state.published) == (second.head(), fact_count(second))


@pytest.mark.kafka
def test_a_following_relay_stops_when_its_store_lock_goes_with_its_session(
    open_pg: OpenLedger, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """The advisory lock lasts as long as its database session: after a PostgreSQL
    restart (or a session ended by an administrator) a second relay could start, so the
    first stops instead of publishing beside it."""
    ledger = open_pg()
    record(ledger, generate_history(customers=3))
    ended: list[BaseException] = []

    def follow() -> None:
        try:
            relay.run(ledger, kafka_settings, tmp_path / "relay.json", follow=True,
                      poll_seconds=0.05, check_every_seconds=0.1)  # fmt: skip
        except BaseException as error:
            ended.append(error)

    advisory = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
    with psycopg.connect(PG_DSN, autocommit=True) as admin:
        others = set(admin.execute(advisory).fetchall())  # not the relay's
        following = threading.Thread(target=follow, daemon=True)
        following.start()
        lock_sessions: set[Any] = set()
        deadline = time.monotonic() + 30
        while not lock_sessions and time.monotonic() < deadline:
            lock_sessions = set(admin.execute(advisory).fetchall()) - others
            time.sleep(0.05)
        assert lock_sessions, "the relay took no advisory lock"
        time.sleep(0.5)  # the relay publishes and follows
        assert following.is_alive() and not ended
        for (pid,) in lock_sessions:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    following.join(timeout=30)
    assert not following.is_alive(), "the relay went on without its lock"
    assert len(ended) == 1 and isinstance(ended[0], StoreLockLost), ended


def test_verify_finds_an_event_altered_in_postgres(
    open_pg: OpenLedger, postgres_settings: Settings
) -> None:
    """`ledger verify`'s chain on PostgreSQL: positions are the notification ids; an amount
    changed in one stored row, behind the ledger's back, gives another digest."""
    ledger = open_pg()
    assert all(o.status == "accepted" for o in record(ledger, generate_history(customers=6)))
    kept = audit.chain(ledger)
    assert kept.position == ledger.head() and kept.events == fact_count(ledger)
    assert audit.verify(open_pg(), (kept.position, kept.digest)).unaltered

    table = f'"{schema_of(postgres_settings)}".{EVENTS_TABLE}'
    text = "convert_from(state, 'UTF8')"
    with psycopg.connect(PG_DSN, autocommit=True) as con:
        changed = con.execute(
            f"UPDATE {table} SET state = convert_to(replace({text}, "
            f"'\"amount\":\"', '\"amount\":\"1'), 'UTF8') WHERE notification_id = "
            f'(SELECT min(notification_id) FROM {table} WHERE {text} LIKE \'%"amount":"%\')'
        ).rowcount
    assert changed == 1
    assert not audit.verify(open_pg(), (kept.position, kept.digest)).unaltered
