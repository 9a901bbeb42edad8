"""Faults on the Kafka path: a broker that stops (and comes back empty: the dev broker keeps
nothing), a relay restarted on an intact topic, and relay and consumer processes killed
with SIGKILL at random instants. Whatever happens, once the relay and the consumer have
run to the end, the projections equal a clean embedded rebuild: no event lost, none
counted twice.

Real brokers, real subprocesses (`python -m cli`), no mocks.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import duckdb
import pytest
from conftest import Tables, differences, record, tables
from kafka import KafkaConsumer, TopicPartition

from bootstrap import Settings, open_ledger
from consumers import kafka_projection, relay
from consumers.kafka import DevBroker, KafkaSettings, ensure_topics, free_port
from consumers.store_follower import catch_up
from domain.demo_history import generate_history
from domain.ledger import Ledger
from projections.schema import connect

pytestmark = pytest.mark.kafka

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# --- helpers ---------------------------------------------------------------------------------


def accept(ledger: Ledger, events: list[dict[str, Any]]) -> None:
    outcomes = record(ledger, events)
    refused = [o for o in outcomes if o.status != "accepted"]
    assert not refused, refused[:3]


def fact_count(ledger: Ledger) -> int:
    return sum(1 for _ in ledger.all_facts())


def embedded(ledger: Ledger, tmp_path: Path) -> Tables:
    """The reference: a clean embedded projection (store follower) into its own file."""
    path = tmp_path / "embedded.duckdb"
    assert catch_up(ledger, path) == ledger.head()
    return tables(path)


def records_in_topic(settings: KafkaSettings) -> int:
    """How many records the events topic holds, read to the high watermark the fetches
    report (without a group, without ListOffsets)."""
    reader = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    try:
        topic = settings.topic
        tps = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]
        assert tps, f"topic {topic} has no partitions"
        reader.assign(tps)
        reader.seek_to_beginning(*tps)
        count = 0
        for _ in range(300):
            count += sum(len(r) for r in reader.poll(timeout_ms=200).values())
            ends = [reader.highwater(tp) for tp in tps]
            if all(
                e is not None and reader.position(tp) >= e for tp, e in zip(tps, ends, strict=True)
            ):
                return count
        pytest.fail(f"could not read {topic} to its end")
    finally:
        reader.close()


def stop_child(child: subprocess.Popen[Any]) -> None:
    """After a failed assertion: no child of this test outlives it."""
    if child.poll() is None:
        child.kill()
        child.wait()


def wait_for(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} (waited {seconds:.0f} s)"
        time.sleep(0.05)


# --- a relay restarted on an intact topic ----------------------------------------------------


def test_relay_restarted_on_an_intact_topic_continues(
    ledger: Ledger, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """Nothing was lost: a second `relay.run` must publish the new events, not report
    TopicDataLost (which would stop every relay restart, `ledger relay` included)."""
    history = generate_history(customers=40)
    half = len(history) // 2
    state_path = tmp_path / "relay.json"
    accept(ledger, history[:half])
    first = relay.run(ledger, kafka_settings, state_path)
    assert first.published == fact_count(ledger) == records_in_topic(kafka_settings)

    accept(ledger, history[half:])
    second = relay.run(ledger, kafka_settings, state_path)

    assert second.position == ledger.head()
    assert second.published == fact_count(ledger) == records_in_topic(kafka_settings)


# --- (a) the broker stops, and comes back empty ----------------------------------------------


def test_broker_restarted_empty_is_detected_then_republished(
    ledger: Ledger, settings: Settings, tmp_path: Path
) -> None:
    history = generate_history(customers=40)
    cuts = [0, len(history) // 3, 2 * len(history) // 3, len(history)]
    parts = [history[a:b] for a, b in pairwise(cuts)]
    state_path = tmp_path / "relay.json"
    broker = DevBroker(free_port())
    kafka = KafkaSettings(
        bootstrap=broker.bootstrap, topic=f"faults-{uuid.uuid4().hex[:10]}", partitions=3
    )
    stop = threading.Event()
    failure: list[BaseException] = []
    relay_ledger = open_ledger(settings)

    def follow() -> None:
        try:
            relay.run(relay_ledger, kafka, state_path, follow=True, poll_seconds=0.05,
                      max_backoff_seconds=0.5, should_stop=stop.is_set)  # fmt: skip
        except BaseException as error:  # handed to the test
            failure.append(error)

    thread = threading.Thread(target=follow, name="relay", daemon=True)
    try:
        accept(ledger, parts[0])  # the broker was never started: ingest does not need it
        broker.start()
        ensure_topics(kafka)
        thread.start()
        first_head = ledger.head()
        wait_for(
            lambda: failure or relay.RelayState.load(state_path).position >= first_head,
            60,
            "the relay did not publish the first part",
        )
        assert not failure, failure
        assert relay.RelayState.load(state_path).published == fact_count(ledger)

        broker.stop()
        accept(ledger, parts[1])  # recorded while the broker is down
        time.sleep(1.5)  # the relay tries and retries meanwhile
        assert thread.is_alive(), f"the relay gave up while the broker was down: {failure}"
        assert relay.RelayState.load(state_path).position == first_head, (
            "nothing can be acknowledged while the broker is down"
        )
        accept(ledger, parts[2][: len(parts[2]) // 2])

        broker.start()  # the same port; memory storage: the topics are gone
        thread.join(timeout=90)
        assert not thread.is_alive(), "the relay did not notice the broker came back empty"
        assert len(failure) == 1 and isinstance(failure[0], relay.TopicDataLost), failure

        accept(ledger, parts[2][len(parts[2]) // 2 :])
        ensure_topics(kafka)
        relay.republish_from(kafka, state_path, 0)
        state = relay.run(ledger, kafka, state_path)
        facts = fact_count(ledger)
        assert (state.position, state.published) == (ledger.head(), facts)
        assert records_in_topic(kafka) == facts

        path = settings.projections_path
        report = kafka_projection.consume(path, kafka, f"faults-{uuid.uuid4().hex[:10]}")
        assert (report.events, report.dead_letters) == (facts, 0)
        through_kafka = tables(path)
        assert len(through_kafka["events"]) == facts
        assert differences(through_kafka, embedded(ledger, tmp_path)) == {}
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=30)
        broker.stop()


# --- a one-shot consume right after group members were killed ---------------------------

MEMBER = """
import sys
from kafka import KafkaConsumer
member = KafkaConsumer(sys.argv[1], bootstrap_servers=sys.argv[2], group_id=sys.argv[3],
                       enable_auto_commit=False, session_timeout_ms=6000,
                       heartbeat_interval_ms=1000)
print("joining", flush=True)
while True:
    member.poll(timeout_ms=200)
"""


def test_consume_after_killed_group_members_projects_every_partition(
    ledger: Ledger,
    settings: Settings,
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Members killed with SIGKILL never leave the group: it counts them until their
    session times out. A `consume` without follow started meanwhile must still project
    every partition before it returns, not only those the group handed to it."""
    accept(ledger, generate_history(customers=40))
    facts = fact_count(ledger)
    relay.run(ledger, kafka_settings, tmp_path / "relay.json")
    group = f"faults-{uuid.uuid4().hex[:10]}"
    for _ in range(3):
        member = subprocess.Popen(
            [sys.executable, "-c", MEMBER, kafka_settings.topic, kafka_settings.bootstrap, group],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        request.addfinalizer(partial(stop_child, member))
        assert member.stdout is not None
        assert member.stdout.readline().strip() == "joining"
        time.sleep(2.0)  # inside the group join (the dev broker holds joins for ~3 s)
        member.send_signal(signal.SIGKILL)
        member.wait()
        member.stdout.close()

    path = settings.projections_path
    report = kafka_projection.consume(path, kafka_settings, group)

    assert report.events == facts, f"projected {report.events} of {facts} events"
    assert differences(tables(path), embedded(ledger, tmp_path)) == {}


# --- (b) relay and consumer killed at random instants ----------------------------------------


def child_env(kafka: KafkaSettings) -> dict[str, str]:
    """The environment without the test runner's ledger settings, plus this test's broker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env.update(
        LEDGER_KAFKA_BOOTSTRAP=kafka.bootstrap,
        LEDGER_KAFKA_TOPIC=kafka.topic,
        LEDGER_KAFKA_PARTITIONS=str(kafka.partitions),
    )
    return env


def progress(path: Path, group: str) -> tuple[int, int]:
    """(events projected, sum of the group's stored offsets); zeros before the first commit."""
    if not path.exists():
        return 0, 0
    con = connect(path, read_only=True)
    try:
        events = con.execute("SELECT count(*) FROM events").fetchone()
        offsets = con.execute(
            "SELECT coalesce(sum(position), 0) FROM projection_checkpoints WHERE source = ?",
            [kafka_projection.source_name(group)],
        ).fetchone()
    except duckdb.CatalogException:
        return 0, 0
    finally:
        con.close()
    return int(events[0] if events else 0), int(offsets[0] if offsets else 0)


_LOCK = re.compile(r"\s(\d+)\s+[0-9a-f]+:[0-9a-f]+:(\d+)\s")


def holds_file(pid: int, path: Path) -> bool:
    """Whether process `pid` holds DuckDB's write lock on `path` (from /proc/locks)."""
    try:
        inode = path.stat().st_ino
    except FileNotFoundError:
        return False
    with open("/proc/locks") as locks:
        for line in locks:
            found = _LOCK.search(line)
            if found and int(found[1]) == pid and int(found[2]) == inode:
                return True
    return False


def kill_at(child: subprocess.Popen[bytes], instant: float, path: Path | None = None) -> str:
    """SIGKILL the child at `instant` (monotonic) unless it ended first; returns what
    happened: 'ended', 'killed', or 'killed holding the file' (for a consumer: after its
    group join, while seeking, projecting or committing)."""
    try:
        child.wait(timeout=max(0.0, instant - time.monotonic()))
        return "ended"
    except subprocess.TimeoutExpired:
        holding = path is not None and holds_file(child.pid, path)
        child.send_signal(signal.SIGKILL)
        child.wait()
        return "killed holding the file" if holding else "killed"


def test_killed_relay_and_consumer_lose_nothing_and_count_nothing_twice(
    ledger: Ledger,
    settings: Settings,
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    history = generate_history(customers=150)
    assert len(history) > 3_000
    cuts = [0, len(history) // 3, 2 * len(history) // 3, len(history)]
    chunks = [history[a:b] for a, b in pairwise(cuts)]
    cli = [sys.executable, "-m", "cli", "--data-dir", str(settings.data_dir)]
    env = child_env(kafka_settings)
    # this test's own group: the session's broker has other tests' groups and members
    group = f"faults-{kafka_settings.topic}"
    env["LEDGER_KAFKA_GROUP"] = group
    path = settings.projections_path
    logs = tmp_path / "logs"
    logs.mkdir()

    rng = random.Random(20250607)
    relay_time = consume_time = 0.0
    kills: list[tuple[str, str]] = []
    failures: list[str] = []
    last = (0, 0)
    last_relayed = 0
    for round_ in range(6):
        if round_ % 2 == 0:  # new work for the relay
            accept(ledger, chunks[round_ // 2])
        children: dict[str, subprocess.Popen[bytes]] = {}

        def start(
            name: str,
            round_: int = round_,
            children: dict[str, subprocess.Popen[bytes]] = children,
        ) -> float:
            with (logs / f"{round_}-{name}.err").open("w") as err:
                children[name] = subprocess.Popen(
                    [*cli, name], cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err
                )
            request.addfinalizer(partial(stop_child, children[name]))
            return time.monotonic()

        if round_ == 0:
            # timed, one after the other, so later rounds can place kills inside the work
            begun = start("relay")
            children["relay"].wait(timeout=120)
            relay_time = time.monotonic() - begun
            begun = start("consume")
            children["consume"].wait(timeout=120)
            consume_time = time.monotonic() - begun
        else:
            # both at once, each killed anywhere from its start-up to the end of its work
            relay_begun, consume_begun = start("relay"), start("consume")
            instants = {
                "relay": relay_begun + relay_time * rng.uniform(0.3, 1.3),
                "consume": consume_begun + consume_time * rng.uniform(0.3, 1.0),
            }
            for name in sorted(instants, key=instants.__getitem__):
                kills.append((name, kill_at(children[name], instants[name], path)))

        for name, child in children.items():
            if child.returncode not in (0, -signal.SIGKILL):
                message = " ".join((logs / f"{round_}-{name}.err").read_text().split())
                failures.append(f"round {round_} {name} exited {child.returncode}: {message}")
        # whatever the instant of the kill, committed progress is never lost
        now = progress(path, group)
        assert now[0] >= last[0] and now[1] >= last[1], (round_, last, now)
        assert now[0] <= fact_count(ledger)
        last = now
        relayed = relay.RelayState.load(settings.relay_state_path).position
        assert relayed >= last_relayed, (round_, last_relayed, relayed)
        last_relayed = relayed

    assert kills.count(("relay", "killed")) >= 2, kills
    assert sum(1 for name, what in kills if name == "consume" and what != "ended") >= 2, kills
    # Whether a kill lands inside a batch's transaction is up to timing here; the
    # projector's mid-batch kills are pinned by tests/test_projector.py.

    finals = {}
    for name in ("relay", "consume"):
        finals[name] = subprocess.run(
            [*cli, name], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=180
        )
    for name, done in finals.items():
        if done.returncode != 0:
            failures.append(
                f"final {name} exited {done.returncode}: {' '.join(done.stderr.split())}"
            )
    assert not failures, "\n".join(failures)

    facts = fact_count(ledger)
    state = relay.RelayState.load(settings.relay_state_path)
    assert state.position == ledger.head()
    in_topic = records_in_topic(kafka_settings)
    assert in_topic >= facts  # repeats are allowed in the topic ...
    through_kafka = tables(path)
    con = connect(path, read_only=True)
    try:
        stored = con.execute("SELECT stream, position FROM projection_checkpoints").fetchall()
    finally:
        con.close()
    seen = f"final consume: {finals['consume'].stdout.strip()!r}; stored offsets {stored}"
    assert len(through_kafka["events"]) == facts, seen  # ... not in the projections
    assert progress(path, group)[1] == in_topic, seen  # the group's offsets at the topic's end
    assert differences(through_kafka, embedded(ledger, tmp_path)) == {}
