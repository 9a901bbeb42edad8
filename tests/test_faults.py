"""Fault injection: the `ledger` processes are killed with SIGKILL at random (seeded)
instants, PostgreSQL connections are cut mid-ingest, writers race on the same customers,
and the data directory is read-only or full. Whatever happens, no batch is stored in part,
a re-run completes the input exactly once, the projections equal a clean rebuild of the
same store, and a failing command says why instead of printing a traceback.

The short variants run in `make test`; the `long_faults` ones (20+ faults each, bigger
files) run in `make test-faults`. FAULT_SEED changes the seeds of every campaign.
Broker faults live in tests/test_kafka_faults.py.
"""

from __future__ import annotations

import os
import random
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from conftest import PG_DSN, PROJECT_ROOT

from bootstrap import Settings, open_ledger
from consumers import store_follower
from domain.demo_history import generate_history
from domain.ledger import Fact

SEED = int(os.environ.get("FAULT_SEED", "20250301"))
Json = dict[str, Any]


# --- running the command ---------------------------------------------------------------------


def environment(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LEDGER_") and k not in ("FORCE_COLOR", "PGAPPNAME")
    }
    env.update(NO_COLOR="1", COLUMNS="200", **extra)
    return env


def command(data_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cli", "--data-dir", str(data_dir), *args]


@dataclass(frozen=True)
class Finished:
    code: int
    out: str
    err: str

    @property
    def message(self) -> str:
        return " ".join(self.err.split())


def run_ledger(
    data_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Finished:
    done = subprocess.run(
        command(data_dir, *args),
        cwd=PROJECT_ROOT,
        env=env or environment(),
        capture_output=True,
        timeout=600,
        check=False,
        preexec_fn=preexec_fn,
    )
    return Finished(done.returncode, done.stdout.decode(), done.stderr.decode())


class Processes:
    """Background `ledger` processes; output goes to files (no pipe can fill up)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[subprocess.Popen[bytes], Path, Path]] = []

    def start(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        n = len(self.started)
        out, err = self.logs / f"{n}.out", self.logs / f"{n}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(
                command(data_dir, *args),
                cwd=PROJECT_ROOT,
                env=env or environment(),
                stdout=stdout,
                stderr=stderr,
            )
        self.started.append((process, out, err))
        return n

    def process(self, n: int) -> subprocess.Popen[bytes]:
        return self.started[n][0]

    def kill_after(self, n: int, delay: float) -> bool:
        """SIGKILL the process after `delay` seconds; False if it had ended by then."""
        process = self.process(n)
        try:
            process.wait(timeout=delay)
            return False
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
            return True

    def kill_when(self, n: int, ready: Callable[[], bool], delay: float) -> bool:
        """SIGKILL the process `delay` seconds after `ready()` first holds; False if it
        ended before that."""
        process = self.process(n)
        give_up = time.monotonic() + 300
        while not ready() and time.monotonic() < give_up:
            if process.poll() is not None:
                return False
            time.sleep(0.005)
        return self.kill_after(n, delay)

    def result(self, n: int, timeout: float = 600) -> Finished:
        process, out, err = self.started[n]
        code = process.wait(timeout=timeout)
        return Finished(code, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def stop_all(self) -> None:
        for process, _, _ in self.started:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=60)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path / "logs")
    yield started
    started.stop_all()


COUNTS = re.compile(r"accepted ([\d,]+), duplicates ([\d,]+), rejected ([\d,]+)")


def counts(finished: Finished) -> tuple[int, int, int]:
    found = COUNTS.search(finished.out)
    assert found, finished
    accepted, duplicates, rejected = (int(g.replace(",", "")) for g in found.groups())
    return accepted, duplicates, rejected


def assert_clean_failure(finished: Finished, *names: str) -> None:
    """Failed with the 'store or projections unusable' status (3) and a message naming one
    of `names`, not with a Python traceback."""
    assert "Traceback" not in finished.err, f"a traceback instead of a message:\n{finished.err}"
    assert finished.code == 3, finished
    assert "error:" in finished.err, finished
    assert any(name in finished.message for name in names), finished


# --- the input and the store -----------------------------------------------------------------


def history_file(path: Path, customers: int, seed: int = 7) -> list[Json]:
    events = generate_history(customers=customers, seed=seed)
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    return events


def rows_in(store: Path) -> int:
    """How many rows the SQLite event store holds (0 while it does not exist)."""
    try:
        con = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    except sqlite3.OperationalError:
        return 0
    try:
        row = con.execute("SELECT max(rowid) FROM stored_events").fetchone()
        return int(row[0] or 0)
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def grew(store: Path, rows: int) -> bool:
    return rows_in(store) > rows


def stored_facts(settings: Settings) -> list[tuple[int, Fact]]:
    """Every fact in the store, read in one statement (one consistent snapshot)."""
    if settings.event_store is None and not (settings.data_dir / "events.sqlite3").exists():
        return []
    ledger = open_ledger(settings)
    try:
        _, facts = ledger.facts_after(0, 10**9)
    finally:
        ledger.close()
    return facts


def sids(facts: list[tuple[int, Fact]]) -> list[str]:
    return [fact["source_event_id"] for _, fact in facts]


def assert_whole_batches(facts: list[tuple[int, Fact]], events: list[Json], batch: int) -> int:
    """A single writer recorded `events` in batches of `batch` lines: every batch is stored
    whole or not at all, no event twice, and the stored batches are the first ones.
    Returns how many batches are stored."""
    line_of = {e["source_event_id"]: i for i, e in enumerate(events)}
    stored = Counter(sids(facts))
    assert not [k for k, n in stored.items() if n > 1], "events stored twice"
    assert set(stored) <= set(line_of), "events that are not in the file"
    windows = Counter(line_of[k] // batch for k in stored)
    partial = {
        w: f"{n} of {min(batch, len(events) - w * batch)}"
        for w, n in windows.items()
        if n != min(batch, len(events) - w * batch)
    }
    assert not partial, f"batches stored in part: {partial}"
    assert sorted(windows) == list(range(len(windows))), "a later batch without an earlier one"
    return len(windows)


def assert_exactly_once_in_file_order(facts: list[tuple[int, Fact]], events: list[Json]) -> None:
    assert sids(facts) == [e["source_event_id"] for e in events]


def without_recorded_at(facts: list[tuple[int, Fact]]) -> list[Json]:
    return [{k: v for k, v in fact.items() if k != "recorded_at"} for _, fact in facts]


# --- the projections -------------------------------------------------------------------------


def projection_position(data_dir: Path, facts: list[tuple[int, Fact]], scratch: Path) -> int:
    """Opens a copy of the projections (as a crash left them: file and WAL) and checks that
    they hold exactly the store's facts up to their checkpoint, with profiles that agree.
    Returns the checkpoint (0 when there are no projections yet)."""
    live = data_dir / "projections.duckdb"
    if not live.exists():
        return 0
    scratch.mkdir(parents=True)
    copy = scratch / live.name
    for suffix in ("", ".wal"):
        if Path(f"{live}{suffix}").exists():
            shutil.copyfile(f"{live}{suffix}", f"{copy}{suffix}")
    con = duckdb.connect(str(copy))
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        position = 0
        if "projection_checkpoints" in tables:
            row = con.execute(
                "SELECT position FROM projection_checkpoints WHERE source = 'event-store'"
            ).fetchone()
            position = int(row[0]) if row else 0
        projected: set[str] = set()
        if "events" in tables:
            ids = [str(r[0]) for r in con.execute("SELECT event_id FROM events").fetchall()]
            projected = set(ids)
            assert len(ids) == len(projected), f"{len(ids) - len(projected)} events twice"
        expected = {fact["event_id"] for pos, fact in facts if pos <= position}
        assert projected == expected, (
            f"projections at checkpoint {position} hold {len(projected)} events, the store "
            f"{len(expected)} up to there ({len(projected - expected)} extra, "
            f"{len(expected - projected)} missing)"
        )
        if "customer_profiles" in tables and projected:
            row = con.execute("SELECT sum(event_count), count(*) FROM customer_profiles").fetchone()
            customers = con.execute("SELECT count(DISTINCT customer_id) FROM events").fetchone()
            assert row is not None and customers is not None
            assert (row[0], row[1]) == (len(projected), customers[0])
    finally:
        con.close()
    return position


def assert_projections_match_a_rebuild(settings: Settings, scratch: Path) -> None:
    """The live projections equal every table of a rebuild, from the same store, into
    another file."""
    rebuilt = scratch / "projections.duckdb"
    scratch.mkdir(parents=True)
    ledger = open_ledger(settings)
    try:
        head = ledger.head()
        store_follower.rebuild(ledger, rebuilt)
    finally:
        ledger.close()
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute("ATTACH ? AS live (READ_ONLY)", [str(settings.projections_path)])
        con.execute("ATTACH ? AS rebuilt (READ_ONLY)", [str(rebuilt)])

        def tables(db: str) -> list[str]:
            """Every table, the carried state in schema `internal` included."""
            return sorted(
                f"{schema}.{name}"
                for schema, name in con.execute(
                    "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = ?",
                    [db],
                ).fetchall()
            )

        assert tables("live") == tables("rebuilt")
        checkpoint = con.execute(
            "SELECT position FROM live.projection_checkpoints WHERE source = 'event-store'"
        ).fetchone()
        assert checkpoint == (head,), f"live projections at {checkpoint}, store head {head}"
        for table in tables("live"):
            live = con.execute(f"SELECT * FROM live.{table} ORDER BY ALL").fetchall()
            again = con.execute(f"SELECT * FROM rebuilt.{table} ORDER BY ALL").fetchall()
            if live != again:
                live_rows, rebuilt_rows = set(live), set(again)
                only_live = [r for r in live if r not in rebuilt_rows][:3]
                only_rebuilt = [r for r in again if r not in live_rows][:3]
                pytest.fail(
                    f"{table}: {len(live)} live rows, {len(again)} rebuilt; only live: "
                    f"{only_live}; only rebuilt: {only_rebuilt}"
                )
    finally:
        con.close()


# --- (a) kill -9 of `ledger ingest` ----------------------------------------------------------


def kill_ingest_campaign(
    tmp_path: Path, processes: Processes, *, customers: int, kills: int, batch: int, seed: int
) -> None:
    rng = random.Random(seed)
    source = tmp_path / "history.jsonl"
    events = history_file(source, customers)
    ingest = ("ingest", str(source), "--batch-size", str(batch))

    # An undisturbed run: the reference store, and how long a whole run takes.
    began = time.monotonic()
    clean = run_ledger(tmp_path / "clean", *ingest)
    span = time.monotonic() - began
    assert clean.code == 0, clean
    reference = without_recorded_at(stored_facts(Settings(data_dir=tmp_path / "clean")))

    total = -(-len(events) // batch)
    stores = 0
    settings = Settings(data_dir=tmp_path / "data")
    store = settings.data_dir / "events.sqlite3"
    landed = rounds = 0
    history: list[tuple[str, float, int, int]] = []  # (when, delay, batches, projected)
    while landed < kills:
        rounds += 1
        assert rounds <= 4 * kills, f"only {landed} of {rounds} kills hit a running ingest"
        # Half the kills strike while batches are being written (the ingest proper is a
        # small part of a run); the others anywhere from start-up to the projecting.
        writing = rounds == 1 or rng.random() < 0.5
        before = rows_in(store)
        n = processes.start(settings.data_dir, *ingest)
        if writing:
            delay = rng.uniform(0, 0.1)
            killed = processes.kill_when(n, partial(grew, store, before), delay)
        else:
            delay = rng.uniform(0.3, span * 1.1)
            killed = processes.kill_after(n, delay)
        if killed:
            landed += 1
        else:
            assert processes.result(n).code == 0, processes.result(n)
        facts = stored_facts(settings)
        context = f"seed {seed}, round {rounds}, after {history}"
        try:
            batches = assert_whole_batches(facts, events, batch)
            position = projection_position(settings.data_dir, facts, tmp_path / f"copy-{rounds}")
        except AssertionError as error:
            raise AssertionError(f"{context}: {error}") from error
        history.append(("writing" if writing else "any", round(delay, 2), batches, position))
        if batches == total and landed < kills:
            # All stored: a rerun only finds duplicates and ends before most kills land.
            # The store is checked whole, and the campaign goes on with a new one.
            assert_exactly_once_in_file_order(facts, events)
            stores += 1
            settings = Settings(data_dir=tmp_path / f"data-{stores}")
            store = settings.data_dir / "events.sqlite3"

    assert any(0 < batches < total for _, _, batches, _ in history), (
        f"no kill interrupted the ingest part-way: {history}"
    )
    final = run_ledger(settings.data_dir, *ingest)
    assert final.code == 0, final
    accepted, duplicates, rejected = counts(final)
    assert (accepted + duplicates, rejected) == (len(events), 0)
    facts = stored_facts(settings)
    assert_exactly_once_in_file_order(facts, events)
    assert without_recorded_at(facts) == reference  # the same facts as the undisturbed run
    assert_projections_match_a_rebuild(settings, tmp_path / "rebuilt")


def test_ingest_killed_at_random_instants_stores_whole_batches_and_completes_once(
    tmp_path: Path, processes: Processes
) -> None:
    kill_ingest_campaign(tmp_path, processes, customers=80, kills=4, batch=50, seed=SEED)


@pytest.mark.long_faults
def test_long_ingest_killed_at_random_instants(tmp_path: Path, processes: Processes) -> None:
    kill_ingest_campaign(tmp_path, processes, customers=1800, kills=24, batch=500, seed=SEED + 1)


# --- (b) kill -9 of `ledger project` while an ingest runs ------------------------------------


def kill_projector_campaign(
    tmp_path: Path, processes: Processes, *, customers: int, kills: int, batch: int, seed: int
) -> None:
    rng = random.Random(seed)
    source = tmp_path / "history.jsonl"
    events = history_file(source, customers)
    settings = Settings(data_dir=tmp_path / "data")
    writer = processes.start(
        settings.data_dir, "ingest", str(source), "--no-project", "--batch-size", str(batch)
    )
    landed, position, kills_during_ingest = 0, 0, 0
    deadline = time.monotonic() + 120 + 5 * kills
    while landed < kills or processes.process(writer).poll() is None:
        assert time.monotonic() < deadline, "the ingest does not end"
        follower = processes.start(settings.data_dir, "project", "--follow")
        writing = processes.process(writer).poll() is None
        if not processes.kill_after(follower, rng.uniform(0.4, 3.5)):
            pytest.fail(f"`ledger project --follow` ended by itself: {processes.result(follower)}")
        landed += 1
        kills_during_ingest += writing
        facts = stored_facts(settings)
        reached = projection_position(settings.data_dir, facts, tmp_path / f"copy-{landed}")
        assert reached >= position, f"the checkpoint went back from {position} to {reached}"
        position = reached

    written = processes.result(writer)
    assert written.code == 0, written
    assert counts(written) == (len(events), 0, 0)
    assert kills_during_ingest >= 1
    final = run_ledger(settings.data_dir, "project")
    assert final.code == 0, final
    facts = stored_facts(settings)
    assert_exactly_once_in_file_order(facts, events)
    assert_projections_match_a_rebuild(settings, tmp_path / "rebuilt")


def test_projector_killed_at_random_instants_equals_a_clean_rebuild(
    tmp_path: Path, processes: Processes
) -> None:
    kill_projector_campaign(tmp_path, processes, customers=150, kills=4, batch=2, seed=SEED)


@pytest.mark.long_faults
def test_long_projector_killed_at_random_instants(tmp_path: Path, processes: Processes) -> None:
    kill_projector_campaign(tmp_path, processes, customers=1000, kills=24, batch=20, seed=SEED + 2)


# --- (c) PostgreSQL connections cut mid-ingest -----------------------------------------------


def terminate(admin: Any, application: str) -> int:
    """Ends every server backend of the ingest (found by its application_name)."""
    rows = admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = %s AND pid <> pg_backend_pid()",
        [application],
    ).fetchall()
    return sum(1 for (ended,) in rows if ended)


def drop_connections_campaign(
    tmp_path: Path,
    processes: Processes,
    settings: Settings,
    *,
    customers: int,
    drops: int,
    batch: int,
    seed: int,
) -> None:
    import psycopg

    rng = random.Random(seed)
    source = tmp_path / "history.jsonl"
    events = history_file(source, customers)
    assert settings.event_store
    application = f"ledger-faults-{uuid.uuid4().hex[:8]}"
    env = environment(LEDGER_EVENT_STORE=settings.event_store, PGAPPNAME=application)
    ingest = ("ingest", str(source), "--no-project", "--batch-size", str(batch))
    reader = open_ledger(settings)  # creates the tables before the ingest starts
    dropped, stored_at_drop = 0, -1
    try:
        with psycopg.connect(PG_DSN, autocommit=True) as admin:
            run = processes.start(settings.data_dir, *ingest, env=env)
            deadline = time.monotonic() + 60 + 10 * drops
            while dropped < drops:
                assert time.monotonic() < deadline, f"only {dropped} connection drops placed"
                if processes.process(run).poll() is not None:  # done, or gave up: again
                    run = processes.start(settings.data_dir, *ingest, env=env)
                time.sleep(rng.uniform(0.05, 0.5))
                _, facts = reader.facts_after(0, 10**9)  # one snapshot, while it writes
                assert_whole_batches(facts, events, batch)
                # Drop again only once the ingest has recovered and stored another batch.
                recovered = len(facts) > stored_at_drop or len(facts) == len(events)
                if recovered and terminate(admin, application):
                    dropped += 1
                    stored_at_drop = len(facts)
            processes.result(run)
        _, facts = reader.facts_after(0, 10**9)
        assert_whole_batches(facts, events, batch)

        env = environment(LEDGER_EVENT_STORE=settings.event_store)
        again = run_ledger(settings.data_dir, *ingest, env=env)
        assert again.code == 0, again
        accepted, duplicates, rejected = counts(again)
        assert (accepted + duplicates, rejected) == (len(events), 0)
        _, facts = reader.facts_after(0, 10**9)
        assert_exactly_once_in_file_order(facts, events)
    finally:
        reader.close()


@pytest.mark.postgres
def test_dropped_postgres_connections_mid_ingest_leave_only_whole_batches(
    tmp_path: Path, processes: Processes, postgres_settings: Settings
) -> None:
    drop_connections_campaign(
        tmp_path, processes, postgres_settings, customers=80, drops=3, batch=5, seed=SEED
    )


@pytest.mark.postgres
@pytest.mark.long_faults
def test_long_dropped_postgres_connections_mid_ingest(
    tmp_path: Path, processes: Processes, postgres_settings: Settings
) -> None:
    drop_connections_campaign(
        tmp_path, processes, postgres_settings, customers=600, drops=24, batch=10, seed=SEED + 3
    )


@pytest.mark.postgres
def test_a_postgres_outage_mid_ingest_ends_with_a_clear_error_and_whole_batches(
    tmp_path: Path, processes: Processes, postgres_settings: Settings
) -> None:
    """Every connection of the ingest is cut, again and again, for longer than any retry:
    the command must stop with a message (exit 3), having stored whole batches only."""
    import psycopg

    source = tmp_path / "history.jsonl"
    events = history_file(source, 200)
    assert postgres_settings.event_store
    application = f"ledger-outage-{uuid.uuid4().hex[:8]}"
    env = environment(LEDGER_EVENT_STORE=postgres_settings.event_store, PGAPPNAME=application)
    ingest = ("ingest", str(source), "--no-project", "--batch-size", "5")
    stored_facts(postgres_settings)
    run = processes.start(postgres_settings.data_dir, *ingest, env=env)
    began = time.monotonic()
    while not stored_facts(postgres_settings):
        assert time.monotonic() - began < 60, "the ingest never stored its first batch"
        time.sleep(0.05)
    with psycopg.connect(PG_DSN, autocommit=True) as admin:
        outage_ends = time.monotonic() + 30
        while processes.process(run).poll() is None and time.monotonic() < outage_ends:
            terminate(admin, application)
            time.sleep(0.02)
    finished = processes.result(run)
    facts = stored_facts(postgres_settings)
    assert_whole_batches(facts, events, 5)

    again = run_ledger(postgres_settings.data_dir, *ingest, env=env)
    assert again.code == 0, again
    assert_exactly_once_in_file_order(stored_facts(postgres_settings), events)
    if finished.code != 0:  # it gave up during the outage (it could also have waited)
        assert_clean_failure(finished, "event store", "PostgreSQL", "postgresql")


# --- (d) concurrent ingests into the same customers ------------------------------------------

TZ = timezone(timedelta(hours=8))
BASE = datetime(2025, 1, 1, 9, tzinfo=TZ)  # + up to 500,000 min: ~Dec 2025, before any run


def order_free_event(rng: random.Random, tag: str, customer: str, minute: int) -> Json:
    """A valid event that no other event's order can invalidate, identified by `tag`."""
    kind = rng.choice(["ContactLogged", "PurchaseRecorded", "SurveyAnswered", "ConsentChanged"])
    data: Json = {  # type: ignore[assignment]
        "ContactLogged": {"channel": "chat", "direction": "inbound", "topic": tag},
        "PurchaseRecorded": {
            "order_id": tag,
            "amount": f"{rng.randint(1, 99_999)}.{rng.randint(0, 99):02d}",
            "currency": "EUR",
        },
        "SurveyAnswered": {"survey_id": tag, "kind": "csat", "score": rng.randint(1, 5)},
        "ConsentChanged": {"purpose": tag, "granted": rng.random() < 0.5},
    }[kind]
    event: Json = {
        "type": kind,
        "customer_id": customer,
        "occurred_at": (BASE + timedelta(minutes=minute)).isoformat(),
        "data": data,
    }
    if rng.random() < 0.7:  # the rest are recognised by their content
        event |= {"source_event_id": tag, "source": "faults"}
    return event


def tag_of(fact: Fact) -> str:
    data = fact["data"]
    return str(
        data.get("topic") or data.get("order_id") or data.get("survey_id") or data["purpose"]
    )


def concurrent_ingest(
    tmp_path: Path,
    processes: Processes,
    *,
    writers: int,
    customers: int,
    per_file: int,
    shared: int,
    seed: int,
) -> None:
    rng = random.Random(seed)
    people = [f"C{n:03d}" for n in range(customers)]
    common = [
        order_free_event(rng, f"shared-{i}", rng.choice(people), rng.randint(0, 500_000))
        for i in range(shared)
    ]
    files: list[list[Json]] = []
    for w in range(writers):
        own = [
            order_free_event(rng, f"w{w}-{i}", rng.choice(people), rng.randint(0, 500_000))
            for i in range(per_file)
        ]
        for event in common:  # the same lines, at other places in each file
            own.insert(rng.randint(0, len(own)), event)
        files.append(own)
    settings = Settings(data_dir=tmp_path / "data")
    runs = []
    for w, lines in enumerate(files):
        path = tmp_path / f"writer-{w}.jsonl"
        path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in lines))
        runs.append(
            processes.start(
                settings.data_dir, "ingest", str(path), "--batch-size", str(rng.randint(3, 40))
            )
        )
    results = [processes.result(n) for n in runs]
    for finished in results:
        assert finished.code == 0, finished
    totals = [counts(finished) for finished in results]
    distinct = writers * per_file + shared
    assert sum(t[0] for t in totals) == distinct  # each event accepted by one writer
    assert sum(t[1] for t in totals) == shared * (writers - 1)  # and a duplicate for the rest
    assert all(t[2] == 0 for t in totals)

    facts = stored_facts(settings)
    tags = Counter(tag_of(fact) for _, fact in facts)
    assert len(facts) == distinct and len(tags) == distinct, "an event lost or stored twice"
    expected = {f"shared-{i}" for i in range(shared)}
    expected |= {f"w{w}-{i}" for w in range(writers) for i in range(per_file)}
    assert set(tags) == expected
    # Each writer's own events were recorded in the order of its file.
    recorded = [tag_of(fact) for _, fact in facts]
    for w, lines in enumerate(files):
        mine = [tag for tag in recorded if tag.startswith(f"w{w}-")]
        assert mine == [tag_of(e) for e in lines if not tag_of(e).startswith("shared-")], w
    assert_projections_match_a_rebuild(settings, tmp_path / "rebuilt")


def test_two_concurrent_ingests_into_the_same_customers_lose_no_event(
    tmp_path: Path, processes: Processes
) -> None:
    concurrent_ingest(
        tmp_path, processes, writers=2, customers=25, per_file=400, shared=80, seed=SEED
    )


@pytest.mark.long_faults
def test_long_four_concurrent_ingests_into_the_same_customers(
    tmp_path: Path, processes: Processes
) -> None:
    concurrent_ingest(
        tmp_path, processes, writers=4, customers=40, per_file=3000, shared=400, seed=SEED + 4
    )


# --- (e) a read-only or full data directory --------------------------------------------------


def snapshot(data_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(data_dir)): p.read_bytes()
        for p in sorted(data_dir.rglob("*"))
        if p.is_file()
    }


@contextmanager
def read_only(paths: list[Path]) -> Iterator[None]:
    """Makes `paths` unwritable: modes for a normal user; root ignores modes, so there the
    immutable attribute (`chattr +i`). Skips when neither takes effect."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(0o555 if p.is_dir() else 0o444)

        def undo() -> None:
            for p, mode in modes.items():
                p.chmod(mode)

    else:
        chattr = shutil.which("chattr")
        if chattr is None:
            pytest.skip("running as root, where modes do not stop writes, and no chattr")
        made = subprocess.run([chattr, "+i", *map(str, paths)], capture_output=True, check=False)
        if made.returncode != 0:
            subprocess.run([chattr, "-i", *map(str, paths)], capture_output=True, check=False)
            pytest.skip(f"running as root and chattr +i fails: {made.stderr.decode()}")

        def undo() -> None:
            subprocess.run([chattr, "-i", *map(str, paths)], capture_output=True, check=True)

    try:
        for p in paths:
            probe = p / ".probe" if p.is_dir() else p
            try:
                with probe.open("ab"):
                    pass
            except PermissionError:
                continue
            if p.is_dir():
                probe.unlink()
            pytest.skip(f"cannot make {p} read-only here")
        yield
    finally:
        undo()


def test_ingest_below_a_regular_file_fails_with_a_message(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"a regular file\n")
    source = tmp_path / "history.jsonl"
    history_file(source, 3)
    failed = run_ledger(blocker / "data", "ingest", str(source))
    assert_clean_failure(failed, "Not a directory", "not a directory")
    assert blocker.read_bytes() == b"a regular file\n"


@pytest.mark.parametrize("what", ["data directory", "event store", "projections"])
def test_ingest_into_a_read_only_data_dir_fails_with_a_message_and_changes_nothing(
    tmp_path: Path, what: str
) -> None:
    events = generate_history(customers=30)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events[:400]))
    second.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events[400:]))
    settings = Settings(data_dir=tmp_path / "data")
    assert run_ledger(settings.data_dir, "ingest", str(first)).code == 0
    facts, files = stored_facts(settings), snapshot(settings.data_dir)
    store, projections = settings.data_dir / "events.sqlite3", settings.projections_path
    locked = {
        "data directory": [settings.data_dir, *(settings.data_dir / name for name in files)],
        "event store": [store],
        "projections": [projections],
    }[what]

    with read_only(locked):
        failed = run_ledger(settings.data_dir, "ingest", str(second))

    assert snapshot(settings.data_dir)[projections.name] == files[projections.name]
    if what != "projections":  # then the store itself could not change
        assert stored_facts(settings) == facts
        assert snapshot(settings.data_dir)[store.name] == files[store.name]
    assert_clean_failure(failed, projections.name if what == "projections" else store.name)


def limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec: writes past `limit` fail (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return apply


@pytest.mark.parametrize("batch", [5_000, 50])
def test_ingest_on_a_full_disk_fails_with_a_message_and_stores_whole_batches(
    tmp_path: Path, batch: int
) -> None:
    """No unprivileged way mounts a small filesystem, so the file-size limit of the process
    (RLIMIT_FSIZE) plays the full disk: every write past it fails, as on a full disk."""
    source = tmp_path / "history.jsonl"
    events = history_file(source, 80)
    first = tmp_path / "first.jsonl"
    first.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events[:300]))
    settings = Settings(data_dir=tmp_path / "data")
    assert run_ledger(settings.data_dir, "ingest", str(first), "--batch-size", str(batch)).code == 0
    facts, files = stored_facts(settings), snapshot(settings.data_dir)
    store = settings.data_dir / "events.sqlite3"

    limit = store.stat().st_size + 64 * 1024
    full = run_ledger(
        settings.data_dir,
        "ingest",
        str(source),
        "--batch-size",
        str(batch),
        preexec_fn=limit_file_size(limit),
    )

    assert full.code != 0, full
    assert snapshot(settings.data_dir)["projections.duckdb"] == files["projections.duckdb"]
    after = stored_facts(settings)
    assert after[: len(facts)] == facts
    if batch >= len(events):  # one batch: it did not fit, so nothing of it was stored
        assert after == facts
    else:
        assert_whole_batches(after, events, batch)

    again = run_ledger(settings.data_dir, "ingest", str(source), "--batch-size", str(batch))
    assert again.code == 0, again
    assert_exactly_once_in_file_order(stored_facts(settings), events)
    assert_clean_failure(full, "events.sqlite3", "event store", "disk")
