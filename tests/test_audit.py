"""The hash chain that proves the recorded history unaltered (`domain.audit`, `ledger
verify`): its definition as the README gives it, and what tampering with a real SQLite
store does to it."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from conftest import accept, event
from eventsourcing.cryptography import AESCipher
from test_cli import run

from bootstrap import Settings, open_ledger
from domain import audit
from domain.demo_history import generate_history
from domain.ledger import Ledger


def readme_digest(ledger: Ledger) -> str:
    """The chain as the README defines it, from the events the ledger reads back: start
    from SHA-256("customer-ledger event chain v1"); for each event in store order,
    SHA-256(previous digest + position as 8 bytes big-endian + the event's JSON)."""
    digest = CHAIN_START
    _, documents = ledger.documents_after(0, 1_000_000)
    for position, document in documents:
        digest = hashlib.sha256(digest + position.to_bytes(8, "big") + document).digest()
    return digest.hex()


def digest_of_the_file(store: Path) -> str:
    """The chain recomputed as the README tells an auditor to, from the SQLite file alone
    with Python's standard library: no code of this project involved."""
    digest = CHAIN_START
    con = sqlite3.connect(store)
    try:
        for position, state in con.execute(FACT_STATES):
            fact = json.loads(state)["fact"]
            document = json.dumps(fact, separators=(",", ":"), ensure_ascii=False).encode()
            digest = hashlib.sha256(digest + position.to_bytes(8, "big") + document).digest()
    finally:
        con.close()
    return digest.hex()


CHAIN_START = hashlib.sha256(b"customer-ledger event chain v1").digest()
FACT_STATES = "SELECT rowid, state FROM stored_events WHERE topic LIKE '%.Recorded' ORDER BY rowid"


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
    assert audit.chain(ledger) == audit.ChainPoint(0, 0, readme_digest(ledger))


@pytest.mark.parametrize(
    "change",
    ["altered amount", "removed event", "swapped events", "removed last events"],
)
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
    assert kept.events > 0 and kept.digest == readme_digest(ledger)
    assert audit.verify(open_ledger(encrypted), (kept.position, kept.digest)).unaltered


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
    assert shown.code == 0 and kept in shown.out, shown

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

    malformed = run("verify", "--expect", "12:beef", data_dir=data, cwd=tmp_path)
    assert malformed.code == 2 and "POSITION:DIGEST" in malformed.message, malformed
    missing = run("verify", data_dir=tmp_path / "nowhere", cwd=tmp_path)
    assert missing.code == 3 and "no ledger" in missing.message, missing
