"""For auditors (`domain.audit`): a customer's history and projections as they stood at a
past moment (`ledger history --as-of/--known-at/--state`), and the hash chain that
proves the recorded history unaltered (`ledger verify`): its definition as the README
gives it, and what tampering with a real SQLite or PostgreSQL store does to it."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from conftest import accept, event, project, record
from eventsourcing.cryptography import AESCipher
from test_cli import run

from bootstrap import Settings, open_ledger
from domain import audit
from domain.demo_history import generate_history
from domain.ledger import Ledger
from projections import snapshot
from projections.schema import stored_clock


def chained(rows: list[tuple[int, str, int, bytes]]) -> str:
    """The chain as the README defines it: start from SHA-256("customer-ledger event chain
    v1"); for each event in store order, SHA-256 of the previous digest, the position (8
    bytes, big-endian), the stream's id (16 bytes), the version (8 bytes) and the event's
    JSON. `rows`: (position, stream id, version, JSON)."""
    digest = CHAIN_START
    for position, stream, version, document in rows:
        digest = hashlib.sha256(
            digest + position.to_bytes(8, "big") + uuid.UUID(stream).bytes
            + version.to_bytes(8, "big") + document
        ).digest()  # fmt: skip
    return digest.hex()


def digest_of_the_file(store: Path) -> str:
    """The chain recomputed as the README tells an auditor to, from the SQLite file alone
    with Python's standard library: no code of this project involved."""
    con = sqlite3.connect(store)
    try:
        rows = [
            (position, stream, version,
             json.dumps(json.loads(state)["fact"], separators=(",", ":"), ensure_ascii=False)
             .encode())
            for position, stream, version, state in con.execute(FACT_ROWS_IN_FULL)
        ]  # fmt: skip
    finally:
        con.close()
    return chained(rows)


def readme_digest(ledger: Ledger, store: Path) -> str:
    """The chain from the events the ledger reads back (decrypted), each in the stream and
    at the version the file says."""
    con = sqlite3.connect(store)
    try:
        placed = {row[0]: row[1:3] for row in con.execute(FACT_ROWS_IN_FULL)}
    finally:
        con.close()
    _, documents = ledger.documents_after(0, 1_000_000)
    return chained([(p, *placed[p], document) for p, document in documents])


FACT_ROWS_IN_FULL = (
    "SELECT rowid, originator_id, originator_version, state FROM stored_events "
    "WHERE topic LIKE '%.Recorded' ORDER BY rowid"
)
CHAIN_START = hashlib.sha256(b"customer-ledger event chain v1").digest()


def tamper(settings: Settings, sql: str, *params: object) -> int:
    """Change the SQLite store behind the ledger's back, as someone with the file could;
    how many rows changed."""
    con = sqlite3.connect(settings.data_dir / "events.sqlite3")
    try:
        changed = con.execute(sql, params).rowcount
        con.commit()
    finally:
        con.close()
    return changed


FACT_ROWS = "SELECT rowid FROM stored_events WHERE topic LIKE '%Recorded' ORDER BY rowid"


def test_the_digest_is_the_readme_chain_and_stays_while_events_are_added(
    ledger: Ledger, settings: Settings
) -> None:
    history = generate_history(customers=12)
    accept(ledger, history[: len(history) // 2])
    kept = audit.chain(ledger)
    assert kept.position == ledger.head()
    assert kept.events == len(history) // 2
    assert kept.digest == digest_of_the_file(settings.data_dir / "events.sqlite3")

    accept(ledger, history[len(history) // 2 :])
    now = audit.chain(ledger)
    assert now.digest == digest_of_the_file(settings.data_dir / "events.sqlite3") != kept.digest
    verdict = audit.verify(ledger, audit.parse_point(str(kept)))
    assert verdict.unaltered and verdict.found == kept


def test_an_empty_store_has_a_digest_too(ledger: Ledger) -> None:
    assert audit.chain(ledger) == audit.ChainPoint(0, 0, chained([]))


@pytest.mark.parametrize(
    "change",
    ["altered amount", "removed event", "swapped events", "moved to another stream",
     "removed last events"],
)  # fmt: skip
def test_any_change_to_the_events_covered_is_found(
    ledger: Ledger, settings: Settings, change: str
) -> None:
    accept(ledger, generate_history(customers=12))
    kept = audit.chain(ledger)
    con = sqlite3.connect(settings.data_dir / "events.sqlite3")
    facts = [row[0] for row in con.execute(FACT_ROWS)]
    con.close()
    middle = facts[len(facts) // 2]
    if change == "altered amount":
        assert tamper(settings, "UPDATE stored_events SET state = "
                      "replace(CAST(state AS TEXT), '\"amount\":\"', '\"amount\":\"1') "
                      "WHERE rowid = (SELECT min(rowid) FROM stored_events "
                      "WHERE CAST(state AS TEXT) LIKE '%\"amount\":\"%')") == 1  # fmt: skip
    elif change == "removed event":
        assert tamper(settings, "DELETE FROM stored_events WHERE rowid = ?", middle) == 1
    elif change == "swapped events":
        first, second = facts[1], facts[2]
        con = sqlite3.connect(settings.data_dir / "events.sqlite3")
        states = dict(con.execute(
            "SELECT rowid, state FROM stored_events WHERE rowid IN (?, ?)", (first, second)
        ).fetchall())  # fmt: skip
        con.close()
        assert states[first] != states[second]
        put = "UPDATE stored_events SET state = ? WHERE rowid = ?"
        assert tamper(settings, put, states[second], first) == 1
        assert tamper(settings, put, states[first], second) == 1
    elif change == "moved to another stream":  # the event leaves its customer's history
        moved = "UPDATE stored_events SET originator_id = ? WHERE rowid = ?"
        assert tamper(settings, moved, uuid.uuid4().hex, middle) == 1
    else:
        assert tamper(settings, "DELETE FROM stored_events WHERE rowid >= ?", facts[-3]) >= 3

    reopened = open_ledger(settings)
    verdict = audit.verify(reopened, (kept.position, kept.digest))
    assert not verdict.unaltered
    assert verdict.store_ends_before == (change == "removed last events")


def test_an_encrypted_store_is_chained_over_its_events(tmp_path: Path) -> None:
    """With the cipher key the stored bytes are ciphertext; the chain is over the events
    they hold, as the README defines it."""
    encrypted = Settings(data_dir=tmp_path / "encrypted", cipher_key=AESCipher.create_key(16))
    ledger = open_ledger(encrypted)
    accept(ledger, generate_history(customers=8))
    stored = sqlite3.connect(encrypted.data_dir / "events.sqlite3")
    assert b"CustomerRegistered" not in b"".join(
        row[0] for row in stored.execute("SELECT state FROM stored_events")
    )
    stored.close()
    kept = audit.chain(ledger)
    assert kept.events > 0
    assert kept.digest == readme_digest(ledger, encrypted.data_dir / "events.sqlite3")
    assert audit.verify(open_ledger(encrypted), (kept.position, kept.digest)).unaltered


def test_a_writer_that_found_the_store_empty_checks_its_key_again(tmp_path: Path) -> None:
    """A process that met an empty store (its first batch wrote nothing) is not taken to
    hold the store's key for good: another process may write first, under a key (review:
    helper-39)."""
    from eventsourcing.persistence import MapperDeserialisationError

    key = AESCipher.create_key(16)
    plain = open_ledger(Settings(data_dir=tmp_path))
    keyed = open_ledger(Settings(data_dir=tmp_path, cipher_key=key))
    refund = event("PurchaseRefunded", "C-1", "2025-01-06T09:00:00Z",
                   {"order_id": "O-404", "amount": "5.00"})  # fmt: skip
    assert [o.status for o in record(plain, [refund])] == ["rejected"]
    accept(keyed, [event("CustomerRegistered", "C-1", "2025-01-06T08:00:00Z", {})])
    newcomer = event("CustomerRegistered", "C-2", "2025-01-06T10:00:00Z", {})
    with pytest.raises(MapperDeserialisationError):
        record(plain, [newcomer])
    assert audit.chain(open_ledger(Settings(data_dir=tmp_path, cipher_key=key))).events == 1


def test_a_digest_is_read_as_printed() -> None:
    digest = "ab" * 32
    assert audit.parse_point(f"1,234:{digest.upper()}") == (1234, digest)
    for wrong in ["1234", f"x:{digest}", f"12:{digest[:-1]}", f"12:{digest}0", ""]:
        with pytest.raises(audit.MalformedChainPoint):
            audit.parse_point(wrong)


def test_verify_on_the_command_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    events = [
        event("CustomerRegistered", "A1", "2025-01-06T08:00:00Z"),
        event("PurchaseRecorded", "A1", "2025-01-06T09:00:00Z",
              {"order_id": "o1", "amount": "20.00", "currency": "EUR"}),
    ]  # fmt: skip
    accept(open_ledger(Settings(data_dir=data)), events)

    printed = run("verify", "--json", data_dir=data, cwd=tmp_path)
    assert printed.code == 0, printed
    point = printed.json()
    assert point["events"] == 2
    kept = f"{point['position']}:{point['digest']}"
    shown = run("verify", data_dir=data, cwd=tmp_path)
    assert shown.code == 0 and shown.out == kept + "\n", shown  # stdout: the line to keep
    assert "Keep it" in shown.message

    accept(open_ledger(Settings(data_dir=data)), [
        event("ContactLogged", "A1", "2025-01-07T09:00:00Z",
              {"channel": "phone", "direction": "inbound"}),
    ])  # fmt: skip
    checked = run("verify", "--expect", kept, data_dir=data, cwd=tmp_path)
    assert checked.code == 0 and "unaltered" in checked.out, checked

    lowered = (
        "UPDATE stored_events SET state = replace(CAST(state AS TEXT), '20.00', '2.00') "
        "WHERE CAST(state AS TEXT) LIKE '%20.00%'"
    )
    assert tamper(Settings(data_dir=data), lowered) == 1
    altered = run("verify", "--expect", kept, data_dir=data, cwd=tmp_path)
    assert altered.code == 1 and "ALTERED" in altered.message, altered
    scripted = run("verify", "--expect", kept, "--json", data_dir=data, cwd=tmp_path)
    assert scripted.code == 1, scripted
    found = scripted.json()
    assert found["outcome"] == "altered" and found["expected_digest"] != found["digest"]
    assert found["expected_position"] == found["position"] == point["position"]

    malformed = run("verify", "--expect", "12:beef", data_dir=data, cwd=tmp_path)
    assert malformed.code == 2 and "POSITION:DIGEST" in malformed.message, malformed
    missing = run("verify", data_dir=tmp_path / "nowhere", cwd=tmp_path)
    assert missing.code == 3 and "no ledger" in missing.message, missing


# --- the history as it stood ------------------------------------------------------------------


def live_rows(con: duckdb.DuckDBPyConnection, customer_id: str) -> dict[str, list[Any]]:
    """The live projections' rows about one customer, as `snapshot.CUSTOMER_TABLES` selects
    them."""
    found = {}
    for name, sql in snapshot.CUSTOMER_TABLES.items():
        table = sql.split("FROM")[1].split()[0]
        columns = sql.split("SELECT")[1].split("FROM")[0]
        order = sql.split("ORDER BY")[1] if "ORDER BY" in sql else "1"
        found[name] = con.execute(
            f"SELECT {columns} FROM {table} WHERE customer_id = ? ORDER BY {order}",
            [customer_id],
        ).fetchall()
    # a derived event's data as published: an object, not JSON text
    derived = found["derived_events"]
    found["derived_events"] = [(*row[:-1], orjson.loads(row[-1])) for row in derived]
    return found


def test_a_customers_state_is_what_the_live_projections_hold_at_their_clock(
    ledger: Ledger, settings: Settings
) -> None:
    """Run over one customer's events alone, with the clock of the live projections, the
    projector gives that customer's rows of the live tables, every one (the ABC class
    aside: it ranks all customers)."""
    accept(ledger, generate_history(customers=40))
    con = project(ledger, settings)
    try:
        clock = stored_clock(con)
        customers = [row[0] for row in con.execute(
            "SELECT customer_id FROM customer_profiles ORDER BY complaint_count DESC, "
            "customer_id LIMIT 12"
        ).fetchall()]  # fmt: skip
        assert customers
        compared = 0
        for customer in customers:
            state = snapshot.customer_state(ledger.recorded(customer), clock)
            assert state["as_of"] == clock
            live = live_rows(con, customer)
            for name in snapshot.CUSTOMER_TABLES:
                mine = [tuple(row.values()) for row in state[name]]
                assert mine == live[name], (customer, name)
                compared += len(mine)
    finally:
        con.close()
    assert compared > 100


def test_what_had_happened_and_what_was_known_by_a_moment(ledger: Ledger) -> None:
    """An urgent complaint filed at 09:00 and acknowledged at 09:30, the acknowledgement
    recorded only later. As of 10:30 the first response was met; as of 10:30 with only what
    the ledger knew before the acknowledgement was recorded, it was breached."""
    accept(ledger, [
        event("CustomerRegistered", "A1", "2025-01-06T08:00:00Z"),
        event("ComplaintFiled", "A1", "2025-01-06T09:00:00Z", {"complaint_id": "k1",
              "channel": "phone", "category": "billing", "priority": "urgent"}),
    ])  # fmt: skip
    before_the_acknowledgement = datetime.now(UTC)
    time.sleep(0.01)
    accept(ledger, [event("ComplaintAcknowledged", "A1", "2025-01-06T09:30:00Z",
                          {"complaint_id": "k1"})])  # fmt: skip
    recorded = ledger.recorded("A1")
    half_past_ten = datetime(2025, 1, 6, 10, 30, tzinfo=UTC)

    def first_response(**bounds: datetime) -> str:
        kept = audit.as_it_stood(recorded, **bounds)
        status: str = snapshot.customer_state(kept, half_past_ten)["complaints"][0][
            "first_response_status"
        ]
        return status

    assert first_response(happened_by=half_past_ten) == "met"
    assert first_response(happened_by=half_past_ten, known_by=before_the_acknowledgement) == (
        "breached"
    )
    assert [f["type"] for _, f in audit.as_it_stood(recorded, happened_by=half_past_ten.replace(
        hour=9, minute=0))] == ["CustomerRegistered", "ComplaintFiled"]  # fmt: skip


def test_the_state_known_at_a_moment_is_what_the_live_projections_held_then(
    ledger: Ledger, settings: Settings
) -> None:
    """An urgent complaint filed at 09:00 (first response due 10:00, warned at 09:45); another
    customer's contact at 09:50 moves the projections' clock. What the live projections
    held then, the warning included, is what `--state --known-at` shows of that moment
    after more was recorded: the clock is the live one as the events recorded by then set
    it, not the customer's own latest event (09:00, no warning)."""
    accept(ledger, [
        event("CustomerRegistered", "A1", "2025-01-06T08:00:00Z"),
        event("ComplaintFiled", "A1", "2025-01-06T09:00:00Z", {"complaint_id": "k1",
              "channel": "phone", "category": "billing", "priority": "urgent"}),
        event("ContactLogged", "B2", "2025-01-06T09:50:00Z",
              {"channel": "phone", "direction": "inbound"}),
    ])  # fmt: skip
    con = project(ledger, settings)
    try:
        then = live_rows(con, "A1")
    finally:
        con.close()
    assert [row[1] for row in then["derived_events"]] == [
        "LoyaltyStageChanged", "SlaWarning"
    ], "the test proves nothing"  # fmt: skip
    known = datetime.now(UTC)
    time.sleep(0.01)
    accept(ledger, [
        event("ComplaintAcknowledged", "A1", "2025-01-06T09:55:00Z", {"complaint_id": "k1"}),
        event("ContactLogged", "B2", "2025-01-06T11:00:00Z",
              {"channel": "phone", "direction": "inbound"}),
    ])  # fmt: skip
    project(ledger, settings).close()

    clock = snapshot.live_clock(settings.projections_path, known)
    assert clock == datetime(2025, 1, 6, 9, 50, tzinfo=UTC)
    kept = audit.as_it_stood(ledger.recorded("A1"), known_by=known)
    state = snapshot.customer_state(kept, clock)
    for name, rows in then.items():
        assert [tuple(row.values()) for row in state[name]] == rows, name
    now = snapshot.live_clock(settings.projections_path)
    assert now == datetime(2025, 1, 6, 11, tzinfo=UTC)


def test_history_as_of_on_the_command_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    accept(open_ledger(Settings(data_dir=data)), [
        event("CustomerRegistered", "A1", "2025-01-06T08:00:00Z"),
        event("PurchaseRecorded", "A1", "2025-01-06T09:00:00Z",
              {"order_id": "o1", "amount": "20.00", "currency": "EUR"}),
        event("PurchaseRecorded", "A1", "2025-01-20T09:00:00Z",
              {"order_id": "o2", "amount": "30.00", "currency": "EUR"}),
    ])  # fmt: skip

    timeline = run("history", "A1", "--as-of", "2025-01-10T00:00:00+00:00", "--json",
                   data_dir=data, cwd=tmp_path)  # fmt: skip
    assert timeline.code == 0, timeline
    assert [json.loads(line)["type"] for line in timeline.out.splitlines()] == [
        "CustomerRegistered", "PurchaseRecorded"
    ]  # fmt: skip
    state = run("history", "A1", "--state", "--as-of", "2025-01-10T00:00:00+00:00", "--json",
                data_dir=data, cwd=tmp_path)  # fmt: skip
    assert state.code == 0, state
    found = state.json()
    assert found["profile"][0]["purchase_count"] == 1
    assert found["profile"][0]["total_spend"] == "20.0000"
    assert found["profile"][0]["loyalty_stage"] == "new"
    assert "abc_class" not in found["profile"][0]
    now = run("history", "A1", "--state", data_dir=data, cwd=tmp_path)
    assert now.code == 0 and "retained" in now.out, now

    early = run("history", "A1", "--as-of", "2024-12-31T00:00:00+00:00",
                data_dir=data, cwd=tmp_path)  # fmt: skip
    assert early.code == 1 and "no events that had happened by" in early.message, early
    no_offset = run("history", "A1", "--known-at", "2025-01-10", data_dir=data, cwd=tmp_path)
    assert no_offset.code == 2 and "UTC offset" in no_offset.message, no_offset
