"""Shared fixtures: a real SQLite ledger, a real PostgreSQL schema, real DuckDB projections.

Nothing here is a mock. The PostgreSQL fixture fails (never skips) when the server is
unreachable: CI must not pass without having tested the PostgreSQL event store.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import duckdb
import pytest
from kafka import KafkaConsumer, TopicPartition

from bootstrap import Settings, open_ledger
from consumers import kafka_projection
from consumers.kafka import KafkaSettings, dev_broker, ensure_topics
from consumers.store_follower import catch_up
from domain.events import INCOMING
from domain.ledger import Ledger, Outcome
from projections.projector import AsOf, BatchResult
from projections.schema import KEYS, connect

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The repository: tests run its code in child processes from here."""

PG_DSN = os.environ.get("LEDGER_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")

EventFactory = Callable[..., dict[str, Any]]


def event(
    type_: str, customer: str, at: str, data: dict[str, Any] | None = None, **envelope: Any
) -> dict[str, Any]:
    """One event in the ingest format; `at` must carry an offset, e.g. '2025-01-01T09:00:00Z'."""
    return {
        "type": type_,
        "customer_id": customer,
        "occurred_at": at,
        "data": data or {},
        **envelope,
    }


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def ledger(settings: Settings) -> Ledger:
    return open_ledger(settings)


def record(ledger: Ledger, events: Sequence[dict[str, Any]]) -> list[Outcome]:
    """Validate and record events as one batch."""
    return ledger.record([INCOMING.validate_python(e) for e in events])


def accept(ledger: Ledger, events: Sequence[dict[str, Any]]) -> None:
    """Record events that must all be accepted."""
    outcomes = record(ledger, events)
    refused = [o for o in outcomes if o.status != "accepted"]
    assert not refused, refused[:3]


def fact_count(ledger: Ledger) -> int:
    return sum(1 for _ in ledger.all_facts())


def project(ledger: Ledger, settings: Settings, **kwargs: Any) -> duckdb.DuckDBPyConnection:
    """Bring the projections up to date and open them read-only for assertions."""
    catch_up(ledger, settings.projections_path, **kwargs)
    return connect(settings.projections_path, read_only=True)


@pytest.fixture
def projected(
    ledger: Ledger, settings: Settings
) -> Iterator[Callable[[Sequence[dict[str, Any]]], duckdb.DuckDBPyConnection]]:
    """Record events, project them, and hand back a read-only DuckDB connection."""
    opened: list[duckdb.DuckDBPyConnection] = []

    def run(events: Sequence[dict[str, Any]]) -> duckdb.DuckDBPyConnection:
        for con in opened:
            con.close()
        outcomes = record(ledger, events)
        rejected = [o.reason for o in outcomes if o.status == "rejected"]
        assert not rejected, rejected
        con = project(ledger, settings)
        opened.append(con)
        return con

    yield run
    for con in opened:
        con.close()


@pytest.fixture
def postgres_settings(tmp_path: Path) -> Iterator[Settings]:
    """A fresh PostgreSQL schema per test; dropped afterwards."""
    import psycopg

    schema = f"ledger_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        pytest.fail(
            f"PostgreSQL is unreachable at {PG_DSN} ({error}); the PostgreSQL event store "
            "must be tested. Start it or set LEDGER_TEST_POSTGRES_DSN."
        )
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield Settings(data_dir=tmp_path / "data", event_store=f"{PG_DSN}?schema={schema}")
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


# --- processes -----------------------------------------------------------------------------


def children_of(pid: int) -> set[int]:
    """The processes `pid` started and that still run (from /proc)."""
    found: set[int] = set()
    with suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with suppress(FileNotFoundError):
                found.update(int(c) for c in (task / "children").read_text().split())
    return found


def running(pid: int) -> bool:
    """Whether `pid` runs (an orphan that ended may stay a zombie: that counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


# --- Kafka ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A real Kafka-protocol broker: LEDGER_TEST_KAFKA_BOOTSTRAP when set (e.g. Apache
    Kafka), else the bundled Tansu broker on a free 127.0.0.1 port for the session."""
    external = os.environ.get("LEDGER_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    with dev_broker() as broker:
        yield broker.bootstrap


@pytest.fixture
def kafka_settings(kafka_bootstrap: str) -> KafkaSettings:
    """Fresh topics and consumer group per test (unique names), topics with 3 partitions."""
    topic = f"ledger-test-{uuid.uuid4().hex[:10]}"
    # a group of its own too: members of one group on a shared broker rebalance together
    settings = KafkaSettings(
        bootstrap=kafka_bootstrap, topic=topic, partitions=3, group=f"group-{topic}"
    )
    ensure_topics(settings)
    return settings


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} in {seconds:.0f} s"
        time.sleep(0.1)


def read_topic(settings: KafkaSettings, topic: str) -> list[Any]:
    """Every record of a topic, repeats included, read from the beginning without a group
    to the high watermark the fetches report (not a ListOffsets answer); fails after 100
    polls in a row that bring nothing short of it."""
    reader = KafkaConsumer(
        bootstrap_servers=settings.bootstrap, enable_auto_commit=False, max_poll_records=10_000
    )
    try:
        tps = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]
        assert tps, f"topic {topic} has no partitions"
        reader.assign(tps)
        reader.seek_to_beginning(*tps)
        found: list[Any] = []
        idle = 0
        while idle < 100:
            polled = reader.poll(timeout_ms=200)
            idle = 0 if polled else idle + 1
            for records in polled.values():
                found.extend(records)
            ends = [reader.highwater(tp) for tp in tps]
            if all(
                e is not None and reader.position(tp) >= e for tp, e in zip(tps, ends, strict=True)
            ):
                return found
        pytest.fail(f"could not read {topic} to its end ({len(found)} records read)")
    finally:
        reader.close()


# --- comparing projections ----------------------------------------------------------------

# Every projection and the state carried between batches; projection_checkpoints differ
# by design (event-store position vs Kafka offsets).
COMPARED = ("events", "customer_profiles", "loyalty_stage_history", "complaint_sla",
            "response_waits", "derived_events", "projection_clock",
            "internal.profile_totals", "internal.orders", "internal.ladder_facts",
            "internal.ladder_positions", "internal.complaint_steps",
            "internal.contact_turns")  # fmt: skip

Tables = dict[str, list[tuple[Any, ...]]]


def tables(path: Path, names: tuple[str, ...] = COMPARED) -> Tables:
    """The rows of each table, after checking every table's key unique (`schema.KEYS`:
    not declared to DuckDB, so nothing else would notice a duplicate)."""
    con = connect(path, read_only=True)
    try:
        assert duplicate_keys(con) == {}
        return {n: con.execute(f"SELECT * FROM {n} ORDER BY ALL").fetchall() for n in names}
    finally:
        con.close()


def duplicate_keys(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[Any, ...]]]:
    """Per table of `schema.KEYS`, a few keys held by more than one row (none: left out)."""
    found = {}
    for table, key in KEYS.items():
        columns = ", ".join(key)
        repeated = con.execute(
            f"SELECT {columns}, count(*) FROM {table} GROUP BY ALL HAVING count(*) > 1 LIMIT 3"
        ).fetchall()
        if repeated:
            found[table] = repeated
    return found


def embedded(ledger: Ledger, tmp_path: Path) -> Tables:
    """The reference for the Kafka path: a clean embedded projection (store follower) of
    the whole ledger into a file of its own."""
    path = tmp_path / "embedded.duckdb"
    assert catch_up(ledger, path) == ledger.head()
    return tables(path)


def differences(a: Tables, b: Tables) -> dict[str, Any]:
    """Per table: row counts and a few rows found only on one side (empty: identical)."""
    found: dict[str, Any] = {}
    for name in a:
        if a[name] != b[name]:
            found[name] = {
                "rows": (len(a[name]), len(b[name])),
                "only_first": [r for r in a[name] if r not in b[name]][:3],
                "only_second": [r for r in b[name] if r not in a[name]][:3],
            }
    return found


HOLDING = """
import duckdb, sys, time
while True:
    try:
        con = duckdb.connect(sys.argv[1], read_only=True)
        break
    except duckdb.IOException:
        time.sleep(0.01)
print("open", flush=True)
time.sleep(float(sys.argv[2]))
"""


@contextmanager
def reader_holding(path: Path, seconds: float) -> Iterator[subprocess.Popen[bytes]]:
    """A process holding the projections file open read-only (an analyst's session) for
    `seconds` from the start of the block (once it can open it); killed at its end."""
    reader = subprocess.Popen(
        [sys.executable, "-c", HOLDING, str(path), str(seconds)], stdout=subprocess.PIPE
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline() == b"open\n"
        yield reader
    finally:
        reader.kill()
        reader.wait()


class FollowingMember:
    """A group member following the topic (`consume --follow`) on a thread of this
    process. The file is its own while it runs, so progress is counted from its batches:
    `new_events`, the events they added."""

    def __init__(
        self,
        path: Path,
        settings: KafkaSettings,
        group: str,
        name: str = "member",
        as_of: AsOf | None = None,
    ) -> None:
        self.as_of = as_of
        self.new_events = 0
        self.reports: list[kafka_projection.ConsumeReport] = []
        self._stop = threading.Event()
        self._failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._follow, args=(path, settings, group), name=name, daemon=True
        )

    def _follow(self, path: Path, settings: KafkaSettings, group: str) -> None:
        try:
            report = kafka_projection.consume(
                path,
                settings,
                group,
                follow=True,
                poll_ms=100,
                max_records=500,
                should_stop=self._stop.is_set,
                on_batch=self._counted,
                as_of=self.as_of,
            )
            self.reports.append(report)
        except BaseException as error:  # handed to the test
            self._failure.append(error)

    def _counted(self, result: BatchResult, _report: kafka_projection.ConsumeReport) -> None:
        self.new_events += result.new_events

    def has_projected(self, events: int) -> bool:
        """Whether its batches added `events` (raising what ended it early)."""
        if self._failure:
            raise self._failure[0]
        return self.new_events >= events

    def __enter__(self) -> FollowingMember:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop it as Ctrl-C does (again: nothing more), and raise what ended it early."""
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the member did not stop"
        assert not self._failure, self._failure
