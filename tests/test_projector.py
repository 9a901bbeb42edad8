"""The projector as a whole: batch boundaries, rebuilds, crashes and redelivery change nothing.

Every comparison covers every table of the projections file, rows ordered by all columns.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from conftest import PROJECT_ROOT, accept, duplicate_keys, event

from bootstrap import Settings
from consumers.store_follower import catch_up, rebuild
from domain.demo_history import generate_history
from domain.ledger import Ledger
from domain.policy import LadderPolicy
from projections import derived
from projections.projector import Projector
from projections.rebuild import RebuildBehind, rebuilding
from projections.schema import KEYS, ProjectionsOutdated, connect, create_schema, stored_clock

TABLES = {
    "events",
    "customer_profiles",
    "loyalty_stage_history",
    "complaint_sla",
    "response_waits",
    "projection_clock",
    "derived_events",
    "derived_published",
    "projection_checkpoints",
    "sla_targets",
    "response_alarm_channels",
    "survey_scales",
    "loyalty_stages",
    "projection_meta",
    "internal.profile_totals",
    "internal.orders",
    "internal.ladder_facts",
    "internal.ladder_positions",
    "internal.complaint_steps",
    "internal.contact_turns",
}
KAFKA = ("kafka:test-group", "ledger.facts:0")

Snapshot = dict[str, list[tuple[Any, ...]]]


# --- helpers ---------------------------------------------------------------------------------


def snapshot_of(con: duckdb.DuckDBPyConnection) -> Snapshot:
    """Every table, the carried state in schema `internal` included (each key checked
    unique first: `schema.KEYS`)."""
    assert duplicate_keys(con) == {}
    names = [
        name if schema == "main" else f"{schema}.{name}"
        for schema, name in con.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_catalog = current_database() AND table_type = 'BASE TABLE'"
        ).fetchall()
    ]
    return {name: con.execute(f"SELECT * FROM {name} ORDER BY ALL").fetchall() for name in names}


def snapshot(path: Path) -> Snapshot:
    con = connect(path, read_only=True)
    try:
        return snapshot_of(con)
    finally:
        con.close()


def differences(a: Snapshot, b: Snapshot) -> dict[str, Any]:
    """Per table, a few rows only in `a` and only in `b` (empty: identical)."""
    found: dict[str, Any] = {}
    if set(a) != set(b):
        found["<tables>"] = (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    for name in sorted(set(a) & set(b)):
        if a[name] != b[name]:
            only_a = [r for r in a[name] if r not in b[name]]
            only_b = [r for r in b[name] if r not in a[name]]
            found[name] = {
                "rows": (len(a[name]), len(b[name])),
                "only_first": only_a[:3],
                "only_second": only_b[:3],
            }
    return found


def without(snap: Snapshot, *names: str) -> Snapshot:
    return {k: v for k, v in snap.items() if k not in names}


def fact_positions(ledger: Ledger) -> list[int]:
    return [position for position, _ in ledger.all_facts()]


def extras() -> list[dict[str, Any]]:
    """Hand-made events the demo history may lack: holds still running, reopenings,
    foreign currency and refunds, personal data, and business times out of order."""
    x = "X-1"
    y = "X-2"
    return [
        event(
            "CustomerRegistered",
            x,
            "2025-06-01T09:00:00+08:00",
            {"name": "Test Person", "email": "tp@example.com", "region": "East", "city": "Hefei"},
        ),
        event("PurchaseRecorded", x, "2025-06-02T09:00:00Z",
              {"order_id": "o1", "amount": "300", "currency": "USD", "reporting_amount": "100"}),
        event("PurchaseRefunded", x, "2025-06-03T09:00:00Z", {"order_id": "o1", "amount": "100"}),
        event("ComplaintFiled", x, "2025-06-04T09:00:00Z",
              {"complaint_id": "h", "channel": "chat", "category": "billing", "priority": "high"}),
        event("ComplaintAcknowledged", x, "2025-06-04T10:00:00Z", {"complaint_id": "h"}),
        event("ComplaintOnHold", x, "2025-06-04T12:00:00Z", {"complaint_id": "h"}),
        event("ComplaintFiled", x, "2025-06-05T09:00:00Z",
              {"complaint_id": "r", "channel": "phone", "category": "repair"}),
        event("ComplaintResolved", x, "2025-06-05T11:00:00Z",
              {"complaint_id": "r", "resolution": "fixed", "compensation": "10"}),
        event("ComplaintReopened", x, "2025-06-06T09:00:00Z", {"complaint_id": "r"}),
        event("ComplaintFiled", x, "2025-06-07T09:00:00Z",
              {"complaint_id": "p", "channel": "email", "category": "delivery",
               "priority": "low"}),
        event("SurveyAnswered", x, "2025-06-08T09:00:00Z",
              {"survey_id": "s1", "kind": "ces", "score": 6}),
        # out of business-time order
        event("CustomerProfileUpdated", x, "2025-05-20T09:00:00Z", {"region": "South"}),
        event("SurveyAnswered", x, "2025-06-02T12:00:00Z",
              {"survey_id": "s0", "kind": "nps", "score": 2}),
        event("PurchaseRecorded", y, "2025-06-10T09:00:00Z",
              {"order_id": "o1", "amount": "50", "currency": "EUR"}),
        event("ConsentChanged", y, "2025-06-10T09:00:00Z",
              {"purpose": "marketing", "granted": True}),
        event("ConsentChanged", y, "2025-06-09T09:00:00Z",
              {"purpose": "marketing", "granted": False}),
    ]  # fmt: skip


def demo_by_customer(customers: int) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in generate_history(customers=customers):
        grouped[e["customer_id"]].append(e)
    return grouped


# --- (a) batch boundaries --------------------------------------------------------------------


def test_batch_size_does_not_change_the_projection(
    ledger: Ledger, settings: Settings, tmp_path: Path
) -> None:
    grouped = demo_by_customer(5)
    ids = sorted(grouped)
    # half the demo customers, the extras, then the other half: business time jumps back
    accept(ledger, [e for c in ids[::2] for e in grouped[c]])
    accept(ledger, extras())
    accept(ledger, [e for c in ids[1::2] for e in grouped[c]])
    # a late event for a customer projected long before
    accept(
        ledger,
        [event("ContactLogged", ids[0], "2023-06-01T09:00:00Z",
               {"channel": "phone", "direction": "inbound"})],
    )  # fmt: skip
    head = ledger.head()

    snaps: dict[int, Snapshot] = {}
    for batch_size in (1, 7, 10_000):
        path = tmp_path / f"batch-{batch_size}.duckdb"
        assert catch_up(ledger, path, batch_size=batch_size) == head
        snaps[batch_size] = snapshot(path)

    reference = snaps[10_000]
    assert set(reference) == TABLES
    assert len(reference["events"]) == len(fact_positions(ledger))
    assert len(reference["customer_profiles"]) == len(ids) + 2
    assert reference["complaint_sla"], "the data set should hold complaints"
    assert differences(snaps[1], reference) == {}
    assert differences(snaps[7], reference) == {}


# --- (b) rebuild equals the live projection --------------------------------------------------


def test_a_rebuild_lacking_events_of_the_live_file_leaves_it_unchanged(
    ledger: Ledger, settings: Settings
) -> None:
    """A source that lost data (a broker restarted empty) rebuilds into fewer events than
    the live file holds: the swap is refused, and the live file stays. A topic republished
    from the store holds every event at lower offsets (without the repeats the live file
    read): complete, so it is swapped in."""
    accept(ledger, generate_history(customers=8))
    _, documents = ledger.documents_after(0, 100_000)
    path = settings.projections_path
    source, stream = "kafka:ledger-projections", "customer-interactions:0"
    live = Projector(connect(path))
    live.apply(documents, {(source, stream): len(documents) + 5})  # 5 repeats from the relay
    live.con.close()
    before = path.read_bytes()

    lacking = r"lacks 3 of the live projections' events"
    with pytest.raises(RebuildBehind, match=lacking), rebuilding(path) as staging:
        rebuilt = Projector(connect(staging))
        rebuilt.apply(documents[:-3], {(source, stream): len(documents) + 7})
        rebuilt.con.close()
    assert path.read_bytes() == before
    assert not staging.exists()

    with rebuilding(path) as staging:  # every event, at lower offsets: swapped in
        rebuilt = Projector(connect(staging))
        rebuilt.apply(documents, {(source, stream): len(documents)})
        rebuilt.con.close()
    con = connect(path, read_only=True)
    assert con.execute("SELECT source, position FROM projection_checkpoints").fetchall() == [
        (source, len(documents))
    ]
    assert con.execute("SELECT count(*) FROM events").fetchall() == [(len(documents),)]
    con.close()


def test_rebuild_equals_the_live_projection(ledger: Ledger, settings: Settings) -> None:
    grouped = demo_by_customer(60)
    ids = sorted(grouped)
    path = settings.projections_path
    # live: several ingests, each projected at once, business time going back and forth
    for chunk in (ids[0::4], ids[1::4], ids[2::4]):
        accept(ledger, [e for c in chunk for e in grouped[c]])
        catch_up(ledger, path)
    accept(ledger, extras())
    catch_up(ledger, path, batch_size=5)
    accept(ledger, [e for c in ids[3::4] for e in grouped[c]])
    catch_up(ledger, path, batch_size=300)
    # move the clock beyond the latest business time: holds run on, clocks breach
    con = connect(path, read_only=True)
    latest = con.execute("SELECT max(occurred_at) FROM events").fetchone()
    con.close()
    assert latest is not None
    later = latest[0] + timedelta(days=3, hours=5)
    catch_up(ledger, path, as_of=later)

    live = snapshot(path)
    assert live["projection_clock"] == [(True, later)]
    assert len(live["events"]) == len(fact_positions(ledger))
    assert len(live["customer_profiles"]) == 62
    statuses = {row[5] for row in live["complaint_sla"]}
    assert "on_hold" in statuses  # X-1's hold, extended to the clock

    assert rebuild(ledger, path) == ledger.head()
    rebuilt = snapshot(path)
    assert differences(rebuilt, live) == {}
    con = connect(path, read_only=True)
    try:
        assert stored_clock(con) == later
    finally:
        con.close()


# --- (c) crashes -----------------------------------------------------------------------------

FOLLOWER = """
import sys
from pathlib import Path
from bootstrap import Settings, open_ledger
from consumers.store_follower import catch_up

settings = Settings(data_dir=Path(sys.argv[1]))

def on_batch(result, position, head):
    print(position, flush=True)

catch_up(open_ledger(settings), settings.projections_path, batch_size=50, on_batch=on_batch)
"""


def child_env() -> dict[str, str]:
    """The environment without ledger settings: the child must use the test's SQLite store."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}


def committed_state(path: Path) -> tuple[int, int, int]:
    """(checkpoint, events mirrored, highest mirrored position) of a projections file,
    zeros when the killed process left no file or no schema yet."""
    if not path.exists():
        return 0, 0, 0
    con = connect(path, read_only=True)
    try:
        checkpoint = con.execute(
            "SELECT position FROM projection_checkpoints WHERE source = 'event-store'"
        ).fetchone()
        count, highest = con.execute("SELECT count(*), max(position) FROM events").fetchone() or (
            0,
            None,
        )
    except duckdb.CatalogException:
        return 0, 0, 0
    finally:
        con.close()
    return (int(checkpoint[0]) if checkpoint else 0), int(count), int(highest or 0)


def assert_atomic(path: Path, positions: list[int]) -> int:
    """The file holds exactly the facts up to its checkpoint; returns the checkpoint."""
    checkpoint, count, highest = committed_state(path)
    assert count == sum(1 for p in positions if p <= checkpoint), (checkpoint, count)
    assert highest <= checkpoint
    return checkpoint


def assert_equals_a_clean_rebuild(ledger: Ledger, path: Path, clean_dir: Path) -> None:
    clean = clean_dir / "projections.duckdb"
    clean_dir.mkdir()
    rebuild(ledger, clean)
    crashed = snapshot(path)
    assert differences(crashed, snapshot(clean)) == {}
    assert len(crashed["events"]) == len(fact_positions(ledger))
    assert crashed["projection_checkpoints"] == [("event-store", "", ledger.head())]


def test_killed_follower_loses_nothing_and_counts_nothing_twice(
    ledger: Ledger, settings: Settings, tmp_path: Path
) -> None:
    accept(ledger, generate_history(customers=60))
    accept(ledger, extras())
    head = ledger.head()
    positions = fact_positions(ledger)
    path = settings.projections_path
    rng = random.Random(20240229)
    stderr_path = tmp_path / "follower.stderr"

    kills_while_running = 0
    checkpoints: list[int] = []
    for round_ in range(8):
        with stderr_path.open("w") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-c", FOLLOWER, str(settings.data_dir)],
                cwd=PROJECT_ROOT,
                env=child_env(),
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
            assert child.stdout is not None
            if round_ % 4 == 3:
                # anywhere from start-up to the first batches
                delay = rng.uniform(0.05, 1.0)
            else:
                # after a few committed batches, at a random instant of the next one or two
                # (the delay scales with how long a batch takes on this machine)
                started = time.monotonic()
                lines = 0
                for _ in range(rng.randint(2, 3)):
                    if not child.stdout.readline():
                        break
                    if lines == 0:
                        started = time.monotonic()
                    lines += 1
                per_batch = (time.monotonic() - started) / max(lines - 1, 1)
                delay = rng.uniform(0.0, 1.5) * per_batch
            try:
                child.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                kills_while_running += 1
                child.send_signal(signal.SIGKILL)
            printed = child.stdout.read().split()
            child.wait()
            child.stdout.close()
        if child.returncode not in (0, -signal.SIGKILL):
            pytest.fail(f"follower failed ({child.returncode}): {stderr_path.read_text()}")
        checkpoint = assert_atomic(path, positions)
        if printed:  # a batch reported as applied is durable
            assert checkpoint >= int(printed[-1])
        checkpoints.append(checkpoint)

    assert kills_while_running >= 4, "the kills should land while the follower runs"
    assert 0 < checkpoints[0] < head, checkpoints
    assert checkpoints == sorted(checkpoints), "a restart never loses committed batches"

    assert catch_up(ledger, path) == head
    assert_equals_a_clean_rebuild(ledger, path, tmp_path / "clean")


def test_killed_ledger_project_command(ledger: Ledger, settings: Settings, tmp_path: Path) -> None:
    grouped = demo_by_customer(200)
    ids = sorted(grouped)
    chunks = [[e for c in ids[i::2] for e in grouped[c]] for i in range(2)]
    path = settings.projections_path
    cli = [sys.executable, "-m", "cli", "--data-dir", str(settings.data_dir)]
    # how long the command takes to start on this machine, to place kills around its batch
    started = time.monotonic()
    subprocess.run([*cli, "schema", "ContactLogged"], cwd=PROJECT_ROOT, env=child_env(),
                   capture_output=True, check=True, timeout=120)  # fmt: skip
    start_up = time.monotonic() - started
    rng = random.Random(7)
    for round_ in range(8):
        if round_ % 4 == 0:  # new work arrives after earlier work was (half) projected
            accept(ledger, chunks[round_ // 4])
        child = subprocess.Popen(
            [*cli, "project"],
            cwd=PROJECT_ROOT,
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            child.wait(timeout=start_up * rng.uniform(0.9, 2.0))
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert_atomic(path, fact_positions(ledger))

    finished = subprocess.run(
        [*cli, "project"],
        cwd=PROJECT_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr
    assert_equals_a_clean_rebuild(ledger, path, tmp_path / "clean")


# --- (d) redelivery --------------------------------------------------------------------------


def test_a_file_of_another_schema_version_is_refused_until_rebuilt(
    ledger: Ledger, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Carried state from another version would be merged into wrongly: refuse, and say
    how to fix it; `rebuild` does."""
    question = {"channel": "email", "direction": "inbound", "topic": "question"}
    unanswered = event("ContactLogged", "C-WAITS", "2024-06-03T09:00:00Z", question)
    accept(ledger, [e for events in demo_by_customer(3).values() for e in events] + [unanswered])
    path = settings.projections_path
    catch_up(ledger, path)
    current = snapshot(path)
    con = connect(path)
    con.execute("UPDATE projection_meta SET schema_version = 1")
    con.close()

    con = connect(path)
    with pytest.raises(ProjectionsOutdated, match="run `ledger rebuild`"):
        Projector(con)
    con.close()
    with pytest.raises(ProjectionsOutdated):
        catch_up(ledger, path)

    assert rebuild(ledger, path) == ledger.head()
    # the upgrade counts the history of the derived types new since version 1 as sent
    alarms = {row for row in current["derived_events"] if row[1] == "ResponseOverdue"}
    assert alarms, "an email unanswered for 12 hours"
    rebuilt = snapshot(path)
    assert (
        differences(without(rebuilt, "derived_published"), without(current, "derived_published"))
        == {}
    )
    assert current["derived_published"] == []
    assert sorted(rebuilt["derived_published"]) == sorted(
        (*row[:4], True, True, 0) for row in alarms
    )
    assert f"{len(alarms):,} ResponseOverdue events at or before" in caplog.text


def test_every_table_has_a_key_declared_or_listed() -> None:
    """`KEYS` covers what DuckDB is not told: a table added without a key in either place
    would escape the uniqueness checks."""
    con = duckdb.connect()
    create_schema(con)

    def names(sql: str, *params: str) -> set[str]:
        return {str(name) for (name,) in con.execute(sql, list(params)).fetchall()}

    tables = names("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'")
    declared = names(
        "SELECT table_name FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY'"
    )
    assert tables - declared == set(KEYS)
    for table, key in KEYS.items():
        columns = names("SELECT column_name FROM duckdb_columns() WHERE table_name = ?", table)
        assert set(key) <= columns, table


def test_a_key_held_twice_is_found(ledger: Ledger, settings: Settings) -> None:
    """The uniqueness check every comparison runs (`duplicate_keys`) notices a duplicate."""
    accept(ledger, [e for events in demo_by_customer(3).values() for e in events])
    path = settings.projections_path
    catch_up(ledger, path)
    con = connect(path)
    try:
        assert duplicate_keys(con) == {}
        con.execute("INSERT INTO customer_profiles SELECT * FROM customer_profiles LIMIT 1")
        con.execute(
            "INSERT INTO derived_events SELECT * REPLACE ('x' AS customer_id) "
            "FROM derived_events LIMIT 1"
        )
        found = duplicate_keys(con)
    finally:
        con.close()
    assert set(found) == {"customer_profiles", "derived_events"}
    assert found["customer_profiles"][0][-1] == 2


def test_an_upgrade_keeps_what_was_published_and_whom_it_concerned(
    ledger: Ledger, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Files before schema version 5 kept only the ids published. The rebuild takes each
    one's type, customer and time from the old file's derived events, so a late event
    that takes it back later is withdrawn; one taken back already has none (it cannot be
    addressed): it is never announced, with a warning."""
    accept(ledger, [e for events in demo_by_customer(4).values() for e in events])
    path = settings.projections_path
    catch_up(ledger, path)
    con = connect(path)
    standing = [word.fact for word in derived.unpublished(con)]
    assert len(standing) > 2
    taken_back = "00000000-1111-2222-3333-444444444444"  # published, no longer derived
    con.execute("DROP TABLE derived_published")
    con.execute("CREATE TABLE derived_published (event_id UUID PRIMARY KEY)")  # version 4's
    con.execute(
        "INSERT INTO derived_published SELECT unnest($ids)::UUID",
        {"ids": [fact["event_id"] for fact in standing] + [taken_back]},
    )
    con.execute("UPDATE projection_meta SET schema_version = 4")
    con.close()

    with caplog.at_level(logging.WARNING):
        assert rebuild(ledger, path) == ledger.head()
    assert "1 published derived events were taken back by late events before" in caplog.text
    con = connect(path)
    try:
        assert derived.unpublished(con) == []  # nothing sent again, nothing to withdraw
        rows = con.execute(
            "SELECT event_id::VARCHAR, type, customer_id, iso(occurred_at), standing, "
            "acknowledged, withdrawals FROM derived_published"
        ).fetchall()
        assert sorted(rows) == sorted(
            [
                (f["event_id"], f["type"], f["customer_id"], f["occurred_at"], True, True, 0)
                for f in standing
            ]
            + [(taken_back, None, None, None, False, True, 0)]
        )
        # a late event taking one of them back now is withdrawn, addressed to its customer
        gone = standing[0]
        con.execute("DELETE FROM derived_events WHERE event_id = ?", [gone["event_id"]])
        ((withdrawal, _),) = derived.unpublished(con)
        assert withdrawal["type"] == "DerivedEventWithdrawn"
        assert withdrawal["customer_id"] == gone["customer_id"]
        assert withdrawal["data"] == {
            "withdrawn_event_id": gone["event_id"],
            "withdrawn_type": gone["type"],
        }
    finally:
        con.close()


def test_redelivered_batch_changes_nothing(ledger: Ledger, tmp_path: Path) -> None:
    accept(ledger, [e for events in demo_by_customer(5).values() for e in events])
    accept(ledger, extras())
    _, documents = ledger.documents_after(0, 100_000)
    assert len(documents) > 80

    con = connect(tmp_path / "redelivered.duckdb")
    projector = Projector(con)
    first = documents[:60]
    assert projector.apply(first, {KAFKA: 60}).new_events == 60
    before = snapshot_of(con)

    # the same batch again, as a consumer group redelivers it after a lost commit
    result = projector.apply(first, {KAFKA: 61})
    assert (result.events, result.new_events) == (60, 0)
    again = snapshot_of(con)
    unchanged = differences(
        without(again, "projection_checkpoints"), without(before, "projection_checkpoints")
    )
    assert unchanged == {}
    assert projector.checkpoints(KAFKA[0]) == {KAFKA[1]: 61}

    # duplicates inside one batch, and a batch overlapping the ones applied
    assert projector.apply(documents[10:20] * 2, {KAFKA: 62}).new_events == 0
    overlap = projector.apply(documents[30:], {KAFKA: 63})
    assert overlap.new_events == len(documents) - 60
    assert projector.apply(documents, {KAFKA: 64}).new_events == 0
    redelivered = snapshot_of(con)
    con.close()

    reference_con = connect(tmp_path / "once.duckdb")
    Projector(reference_con).apply(documents, {KAFKA: 64})
    once = snapshot_of(reference_con)
    reference_con.close()
    assert differences(redelivered, once) == {}
    assert len(once["events"]) == len(documents)


def test_reference_tables_follow_the_policy_the_file_is_opened_with(tmp_path: Path) -> None:
    path = tmp_path / "policies.duckdb"

    def retained_rule(ladder: LadderPolicy) -> str:
        con = connect(path)
        try:
            Projector(con, ladder=ladder)
            row = con.execute("SELECT rule FROM loyalty_stages WHERE stage = 'retained'").fetchone()
        finally:
            con.close()
        assert row is not None
        return str(row[0])

    assert "a purchase 30+ days after the first" in retained_rule(
        LadderPolicy(repeat_after_days=30)
    )
    default = LadderPolicy()
    assert f"a purchase {default.repeat_after_days}+ days" in retained_rule(default)
