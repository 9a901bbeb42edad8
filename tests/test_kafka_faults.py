"""Faults on the Kafka path: a broker that stops (and comes back empty: the dev broker keeps
nothing), a relay restarted on an intact topic, and ingest, relay and consumer processes
killed with SIGKILL at random instants. Whatever happens, once the relay and the consumer
have run to the end, the projections equal a clean embedded rebuild: no event lost, none
counted twice.

The kill campaign runs short in `make test` and long (50k events, 20+ kills of the relay
and the consumer) in `make test-faults`; FAULT_SEED changes its seeds.

Real brokers, real subprocesses (`python -m cli`), no mocks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from conftest import (
    PROJECT_ROOT,
    FollowingMember,
    accept,
    children_of,
    differences,
    embedded,
    fact_count,
    read_topic,
    running,
    tables,
    wait_until,
)
from kafka import KafkaAdminClient, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumberError,
    TopicAuthorizationFailedError,
    UnknownProducerIdError,
)

from bootstrap import Settings, open_ledger
from consumers import kafka_projection, relay
from consumers.derived_publishing import DerivedPublisher
from consumers.kafka import (
    EVENTS_TOPIC_CONFIGS,
    SAY_UNREACHABLE_AFTER_SECONDS,
    DevBroker,
    KafkaSettings,
    PartitionsDiffer,
    ReliableSender,
    TopicMissing,
    consumer,
    ensure_topics,
    free_port,
    short_retention,
    worth_retrying,
)
from consumers.kafka_decoding import Decoded, DecoderFailed, Decoders, list_dead_letters, stream
from domain.demo_history import generate_history
from domain.ledger import Ledger
from projections import derived
from projections.schema import connect
from projections.writer import ProjectionWriter

pytestmark = pytest.mark.kafka

# --- helpers ---------------------------------------------------------------------------------


def ids_in_topic(settings: KafkaSettings, topic: str | None = None) -> list[str]:
    """The event id (`ce_id`) of every record on a topic (the events topic by default),
    repeats included."""
    records = read_topic(settings, topic or settings.topic)
    return [dict(r.headers)["ce_id"].decode() for r in records]


def records_in_topic(settings: KafkaSettings) -> int:
    """How many records the events topic holds."""
    return len(ids_in_topic(settings))


def stop_child(child: subprocess.Popen[Any]) -> None:
    """After a failed assertion: no child of this test outlives it."""
    if child.poll() is None:
        child.kill()
        child.wait()


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


def test_a_relay_position_of_another_store_or_topic_is_refused(
    ledger: Ledger, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """A position file outliving its store (replaced, or LEDGER_EVENT_STORE changed) or
    read for another topic would skip that many events of the new one, silently."""
    history = generate_history(customers=30)
    state_path = tmp_path / "relay.json"
    accept(ledger, history)
    published = relay.run(ledger, kafka_settings, state_path)
    assert published.position == ledger.head()

    smaller = open_ledger(Settings(data_dir=tmp_path / "smaller"))
    accept(smaller, history[: len(history) // 3])
    with pytest.raises(relay.RelayStateMismatch, match="beyond the event store's head"):
        relay.run(smaller, kafka_settings, state_path)

    larger = open_ledger(Settings(data_dir=tmp_path / "larger"))
    accept(larger, generate_history(customers=45, seed=99))
    assert larger.head() > published.position
    with pytest.raises(relay.RelayStateMismatch, match="belongs to another store"):
        relay.run(larger, kafka_settings, state_path)

    renamed = dataclasses.replace(kafka_settings, topic=f"{kafka_settings.topic}-renamed")
    with pytest.raises(relay.RelayStateMismatch, match="is for topic"):
        relay.run(ledger, renamed, state_path)
    assert relay.RelayState.load(state_path) == published, "a refusal changes nothing"


def test_a_partition_that_lost_records_is_noticed_whatever_the_total(
    ledger: Ledger, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """Crash re-sends make the topic hold more records than the relay counted, so a loss
    in one partition can hide in the total: each partition's acknowledged end counts."""
    state_path = tmp_path / "relay.json"
    accept(ledger, generate_history(customers=30))
    state = relay.run(ledger, kafka_settings, state_path)
    assert state.ends and sum(state.ends.values()) == records_in_topic(kafka_settings)
    # as after re-sends: the total acknowledged counts fewer records than the topic holds,
    # while partition 0 holds one record fewer than the broker acknowledged
    first = min(state.ends)
    dataclasses.replace(
        state,
        published=state.published - 10,
        ends={**state.ends, first: state.ends[first] + 1},
    ).save(state_path)
    with pytest.raises(relay.TopicDataLost, match=f"partition {first} ends at"):
        relay.run(ledger, kafka_settings, state_path)


def test_one_relay_per_data_dir(
    ledger: Ledger, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    state_path = tmp_path / "relay.json"
    accept(ledger, generate_history(customers=5))
    with relay.sole_relay(state_path), pytest.raises(relay.RelayBusy):
        relay.run(ledger, kafka_settings, state_path)
    assert not state_path.exists(), "the refused relay published nothing"
    assert relay.run(ledger, kafka_settings, state_path).position == ledger.head()


def test_kafka_init_refuses_an_events_topic_of_another_partition_count(
    kafka_settings: KafkaSettings,
) -> None:
    """One created elsewhere, or auto-created with the broker's default count by a send
    after the broker restarted empty (the producers ask not to, but Tansu creates it
    anyway), would move customers to other partitions without a word."""
    other_count = dataclasses.replace(kafka_settings, partitions=kafka_settings.partitions + 2)
    with pytest.raises(PartitionsDiffer, match=f"exists with {kafka_settings.partitions} part"):
        ensure_topics(other_count)
    assert ensure_topics(kafka_settings) == []


def test_the_relay_refuses_a_topic_of_another_partition_count(
    ledger: Ledger, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """A broker that restarted empty re-creates the topic with its own default count on
    the next send (Tansu does); a republish into it put every customer in another
    partition than before, with exit 0 (an operator's review)."""
    accept(ledger, generate_history(customers=5))
    other_count = dataclasses.replace(kafka_settings, partitions=kafka_settings.partitions + 1)
    state_path = tmp_path / "relay.json"
    for republish in (None, 0):
        with pytest.raises(PartitionsDiffer, match=f"has {kafka_settings.partitions} partitions"):
            relay.run(ledger, other_count, state_path, republish_from_position=republish)
    assert ids_in_topic(kafka_settings) == [], "nothing was published"
    assert relay.run(ledger, kafka_settings, state_path).position == ledger.head()


def test_kafka_init_asks_the_events_topic_to_keep_every_record(
    kafka_settings: KafkaSettings,
) -> None:
    """A rebuild reads the events topic from offset 0: with a broker's default retention
    (7 days on Apache Kafka) it would lack the older events and be refused for good. An
    events topic created elsewhere with a finite retention is named in a warning."""
    fresh = dataclasses.replace(kafka_settings, topic=f"{kafka_settings.topic}-kept")
    assert fresh.topic in ensure_topics(fresh)

    def reported(topic: str) -> dict[str, str]:
        admin = KafkaAdminClient(bootstrap_servers=fresh.bootstrap)
        try:
            found = admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all"
            )
        finally:
            admin.close()
        return {name: c["value"] for name, c in found["topic"][topic].items()}

    assert {k: reported(fresh.topic).get(k) for k in EVENTS_TOPIC_CONFIGS} == EVENTS_TOPIC_CONFIGS
    assert reported(fresh.dlq_topic).get("retention.ms") != "-1"  # the broker's default
    assert short_retention(fresh) is None

    elsewhere = dataclasses.replace(kafka_settings, topic=f"{kafka_settings.topic}-week")
    admin = KafkaAdminClient(bootstrap_servers=fresh.bootstrap)
    try:
        week = {"retention.ms": str(7 * 24 * 3600 * 1000)}
        admin.create_topics([NewTopic(elsewhere.topic, 3, 1, topic_configs=week)])
    finally:
        admin.close()
    warning = short_retention(elsewhere)
    assert warning is not None and "retention.ms=604800000" in warning, warning
    assert f"--entity-name {elsewhere.topic}" in warning
    # compacted, a topic keyed by customer keeps one record per customer
    compacted = dataclasses.replace(kafka_settings, topic=f"{kafka_settings.topic}-compact")
    admin = KafkaAdminClient(bootstrap_servers=fresh.bootstrap)
    try:
        compact = {"cleanup.policy": "compact"}
        admin.create_topics([NewTopic(compacted.topic, 3, 1, topic_configs=compact)])
    finally:
        admin.close()
    warning = short_retention(compacted)
    assert warning is not None and "(cleanup.policy=compact)" in warning, warning


def test_a_partition_ending_before_the_stored_offset_is_read_again(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """After a data loss and `relay --republish`, the topic holds its events at lower
    offsets than the projections stored (the relay's crash repeats are gone): a one-shot
    consume must not wait for the offsets to pass the old ones, skipping what comes."""
    history = generate_history(customers=30)
    half = len(history) // 2
    path = settings.projections_path
    accept(ledger, history[:half])
    relay.run(ledger, kafka_settings, tmp_path / "relay.json")
    kafka_projection.consume(path, kafka_settings)
    # what such a republish leaves: every stored offset beyond its partition's end
    con = duckdb.connect(str(path))
    con.execute(
        "UPDATE projection_checkpoints SET position = position + 1000 WHERE source LIKE 'kafka:%'"
    )
    con.close()

    accept(ledger, history[half:])
    relay.run(ledger, kafka_settings, tmp_path / "relay.json")
    report = kafka_projection.consume(path, kafka_settings)
    assert report.events == fact_count(ledger), "read again from the beginning"
    assert differences(tables(path), embedded(ledger, tmp_path)) == {}

    # a partition with nothing to read yet (not republished so far): the next consume
    # must read it from its beginning too, not from the old offset
    emptied = dataclasses.replace(kafka_settings, topic=f"{kafka_settings.topic}-emptied")
    ensure_topics(emptied)
    stream = f"{emptied.topic}:0"
    con = duckdb.connect(str(path))
    con.execute(
        "INSERT INTO projection_checkpoints SELECT DISTINCT source, ?, 5 "
        "FROM projection_checkpoints WHERE source LIKE 'kafka:%'",
        [stream],
    )
    con.close()
    assert kafka_projection.consume(path, emptied).events == 0
    con = duckdb.connect(str(path), read_only=True)
    stored = con.execute(
        "SELECT position FROM projection_checkpoints WHERE stream = ?", [stream]
    ).fetchall()
    con.close()
    assert stored == [(0,)]


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
        wait_until(
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
        state = relay.run(ledger, kafka, state_path, republish_from_position=0)
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


def derived_publication(path: Path) -> tuple[set[str], int]:
    """The derived events' ids in the projections file, and how many were acknowledged
    (read beside a member of this process: one configuration per file and process)."""
    con = connect(path)
    try:
        ids = {str(row[0]) for row in con.execute("SELECT event_id FROM derived_events").fetchall()}
        return ids, derived.publication(con)[1]
    finally:
        con.close()


def test_a_following_member_outlasts_a_broker_restart_and_publishes_on(
    ledger: Ledger, settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a broker restart, the member's derived-events producer is refused
    (OutOfOrderSequenceNumber: the broker no longer knows its sequence numbers), and the
    member ended with exit 3 (an operator's review). It sends them again with a new
    producer and follows on; it says when it lost the broker and when it had it back."""
    history = generate_history(customers=40)
    half = len(history) // 2
    state_path, path = tmp_path / "relay.json", settings.projections_path
    broker = DevBroker(free_port())
    kafka = KafkaSettings(
        bootstrap=broker.bootstrap, topic=f"faults-{uuid.uuid4().hex[:10]}", partitions=3
    )
    broker.start()
    try:
        ensure_topics(kafka)
        accept(ledger, history[:half])
        relay.run(ledger, kafka, state_path)
        with (
            caplog.at_level(logging.INFO, logger="consumers"),
            FollowingMember(path, kafka, kafka.group) as member,
        ):

            def all_published() -> bool:
                if not member.has_projected(fact_count(ledger)):
                    return False
                ids, published = derived_publication(path)
                return published == len(ids) > 0

            wait_until(all_published, 90, "the member did not publish the first half")
            before = set(ids_in_topic(kafka, kafka.derived_topic))
            broker.stop()
            time.sleep(SAY_UNREACHABLE_AFTER_SECONDS)
            # said after that many seconds without the broker; on a loaded machine later
            wait_until(
                lambda: "no connection to the broker" in caplog.text,
                60,
                "the member did not say it lost the broker",
            )
            broker.start()  # memory storage: the topics are gone
            ensure_topics(kafka)
            relay.run(ledger, kafka, state_path, republish_from_position=0)
            accept(ledger, history[half:])
            relay.run(ledger, kafka, state_path)
            wait_until(all_published, 120, "the member did not publish after the restart")
        ids, _ = derived_publication(path)
        assert set(ids_in_topic(kafka, kafka.derived_topic)) == ids - before
        assert ids - before, "the second half derived nothing: the test proves nothing"
    finally:
        broker.stop()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("no connection to the broker" in m for m in said), said
    assert any("the broker answers again" in m for m in said), said
    assert differences(tables(path), embedded(ledger, tmp_path)) == {}


def test_a_following_member_sends_dead_letters_again_after_a_broker_restart(
    settings: Settings, tmp_path: Path
) -> None:
    """The dead-letter producer of a member that sent before a broker restart is refused
    after it (OutOfOrderSequenceNumber), as the derived events' was: the member sends the
    dead letters again with a new producer instead of ending."""
    broker = DevBroker(free_port())
    kafka = KafkaSettings(
        bootstrap=broker.bootstrap, topic=f"faults-{uuid.uuid4().hex[:10]}", partitions=1
    )

    def poison(text: bytes) -> None:
        with KafkaProducer(bootstrap_servers=kafka.bootstrap) as sender:
            sender.send(kafka.topic, key=b"c-1", value=text, partition=0).get(10)

    def dead_letters() -> list[str]:
        with suppress(TopicMissing):
            return [letter["value"] for letter in list_dead_letters(kafka)]
        return []

    broker.start()
    try:
        ensure_topics(kafka)
        with FollowingMember(settings.projections_path, kafka, kafka.group) as member:
            poison(b"{first")
            wait_until(lambda: dead_letters() == ["{first"], 60, "no first dead letter")
            broker.restart_empty()
            # The member's own metadata refresh may re-create the events topic first, with
            # the broker's default partition count (Tansu ignores the client's "do not
            # create"): `kafka init` then creates the others and refuses that one. The
            # poison goes to partition 0 either way.
            with suppress(PartitionsDiffer):
                ensure_topics(kafka)
            poison(b"{second")  # offset 0: where the member stood before the restart
            poison(b"{third")  # offset 1: the member reads it (both, if it read again)
            wait_until(  # has_projected(0) raises what ended the member
                lambda: member.has_projected(0) and "{third" in dead_letters(),
                90,
                "no dead letter after the restart",
            )
            assert set(dead_letters()) <= {"{second", "{third"}
    finally:
        broker.stop()


def test_a_publisher_retrying_for_a_broker_that_is_down_lets_the_run_end(
    ledger: Ledger, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A follower's publisher sends again until the broker takes its derived events, but
    a stop (Ctrl-C, SIGTERM) must not wait for a broker that stays down: what was not
    acknowledged stays unmarked, and goes out with the next run."""
    accept(ledger, generate_history(customers=20))
    _, documents = ledger.documents_after(0, 100_000)
    tp = TopicPartition("never-reached", 0)
    decoded = Decoded(facts={tp: documents}, offsets={tp: len(documents)}, records=len(documents))
    projector = ProjectionWriter(settings.projections_path).projector()
    projector.apply(decoded.batch(), {("kafka:test", stream(tp)): len(documents)})
    kafka = KafkaSettings(bootstrap=f"127.0.0.1:{free_port()}", topic=tp.topic)
    publisher = DerivedPublisher(kafka, retry=True)
    settled: list[int] = []
    with caplog.at_level(logging.WARNING, logger="consumers"):
        publisher.publish(projector, None)
        wait_until(lambda: "again in" in caplog.text, 60, "the publisher did not retry")
        publisher.finishing()
        settling = threading.Thread(target=lambda: settled.append(publisher.settle(projector)))
        settling.start()
        settling.join(timeout=60)
        assert not settling.is_alive(), "the stop waits for a broker that is down"
        publisher.close()
    assert settled == [0]
    derived_events, published, _, _ = derived.publication(projector.con)
    assert derived_events > 0 and published == 0
    assert "stopping: the next run sends them" in caplog.text


def test_an_outage_is_worth_retrying_and_a_refusal_that_stays_is_not() -> None:
    """The rule the relay and the followers' senders share before they send again."""
    assert worth_retrying(KafkaTimeoutError("unable to bootstrap"))
    assert worth_retrying(KafkaConnectionError("connection reset"))
    assert worth_retrying(OutOfOrderSequenceNumberError())  # a broker that restarted
    assert worth_retrying(UnknownProducerIdError())
    assert not worth_retrying(MessageSizeTooLargeError("2,000,000 bytes"))
    assert not worth_retrying(TopicAuthorizationFailedError())


def test_a_follower_does_not_retry_a_refusal_that_stays(kafka_settings: KafkaSettings) -> None:
    """A record the producer refuses (too large) is raised at once, even by a sender that
    retries an outage for ever, so a follower does not hold its group's file retrying."""
    sender = ReliableSender(kafka_settings, kafka_settings.dlq_topic, "dead letters", retry=True)
    outcome: list[BaseException] = []

    def send() -> None:
        try:
            sender.send([{"key": b"c-1", "value": b"x" * 2_000_000}])
        except MessageSizeTooLargeError as error:
            outcome.append(error)

    sending = threading.Thread(target=send, daemon=True)
    sending.start()
    sending.join(timeout=60)
    sender.close()
    assert not sending.is_alive(), "the sender retried a refusal that stays"
    assert len(outcome) == 1


def test_a_consumer_that_cannot_reach_the_broker_leaves_no_thread_running() -> None:
    """kafka-python 3.0 starts a consumer's IO thread before its bootstrap and left it
    running when the bootstrap failed (see `consumers.kafka._Consumer`)."""
    before = set(threading.enumerate())
    with pytest.raises(KafkaTimeoutError):
        consumer(KafkaSettings(bootstrap=f"127.0.0.1:{free_port()}"), bootstrap_timeout_ms=500)
    deadline = time.monotonic() + 5
    while (left := [t.name for t in set(threading.enumerate()) - before if t.is_alive()]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert left == []


def test_the_relay_says_soon_that_the_broker_is_unreachable_and_keeps_trying(
    ledger: Ledger, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone watching `ledger relay --follow` learns within seconds that the broker is
    down (kafka-python alone waits 30 s before its first error), and where it resumes."""
    accept(ledger, generate_history(customers=5))
    kafka = KafkaSettings(bootstrap=f"127.0.0.1:{free_port()}", topic="never-reached")
    started = time.monotonic()
    reported: list[float] = []

    def reported_twice() -> bool:
        messages = [r.getMessage() for r in caplog.records if r.name == "consumers.relay"]
        reported.extend(time.monotonic() - started for _ in messages[len(reported) :])
        return len(messages) >= 2

    with caplog.at_level(logging.WARNING, logger="consumers.relay"):
        state = relay.run(ledger, kafka, tmp_path / "relay.json", follow=True,
                          max_backoff_seconds=0.1, should_stop=reported_twice)  # fmt: skip
    assert state.position == 0
    first = next(r.getMessage() for r in caplog.records if r.name == "consumers.relay")
    assert "broker unavailable" in first and "from store position 0" in first, first
    assert reported[0] < 3 * SAY_UNREACHABLE_AFTER_SECONDS, reported


def test_a_following_member_outlasts_a_broker_unreachable_at_its_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`consume --follow` started while the broker is down says so and keeps trying, as
    `relay --follow` does (it exited after kafka-python's 30 s)."""
    kafka = KafkaSettings(bootstrap=f"127.0.0.1:{free_port()}", topic="never-reached")

    def reported_twice() -> bool:
        said = [r for r in caplog.records if r.name == "consumers.kafka_projection"]
        return len(said) >= 2

    with caplog.at_level(logging.WARNING, logger="consumers.kafka_projection"):
        report = kafka_projection.consume(
            tmp_path / "projections.duckdb", kafka, follow=True, should_stop=reported_twice
        )
    assert report.events == 0
    said = [r.getMessage() for r in caplog.records if r.name == "consumers.kafka_projection"]
    assert len(said) == 2 and all("broker unavailable" in m for m in said), said


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


def test_a_killed_decoder_fails_the_catch_up_with_a_message_and_a_rerun_completes(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """A one-shot `consume` reads the topic in decoder processes. One killed with SIGKILL
    ends the catch-up with exit status 3 and says what failed; what was committed stands,
    and the same command run again projects everything, once."""
    accept(ledger, generate_history(customers=40))
    relay.run(ledger, kafka_settings, tmp_path / "relay.json")
    command = [sys.executable, "-m", "cli", "--data-dir", str(settings.data_dir), "consume"]
    env = child_env(kafka_settings)
    consumer = subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_until(lambda: bool(children_of(consumer.pid)), 30, "no decoder process started")
        for decoder in children_of(consumer.pid):
            os.kill(decoder, signal.SIGKILL)
        _, err = consumer.communicate(timeout=60)
    finally:
        stop_child(consumer)
    message = " ".join(err.decode().split())
    assert consumer.returncode == 3, message
    assert "reading the Kafka topic failed" in message and "decoder process" in message, message

    rerun = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert differences(tables(settings.projections_path), embedded(ledger, tmp_path)) == {}


def test_decoders_that_cannot_start_fail_the_catch_up_and_leave_no_process(
    ledger: Ledger,
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decoder processes that end at once (here: an interpreter that exits before reading
    anything) fail the catch-up with `DecoderFailed`, whether it notices when sending them
    their settings or later; no decoder is left behind and nothing is committed."""
    accept(ledger, generate_history(customers=5))
    relay.run(ledger, kafka_settings, tmp_path / "relay.json")
    path = tmp_path / "projections.duckdb"
    monkeypatch.setattr(sys, "executable", "/bin/false")
    before = set(children_of(os.getpid()))

    with pytest.raises(DecoderFailed, match=r"decoder process \d+ ended unexpectedly"):
        kafka_projection.consume(path, kafka_settings, group="never-started", decoders=2)

    assert set(children_of(os.getpid())) <= before
    assert progress(path, "never-started") == (0, 0)


def test_decoders_stop_when_the_broker_goes_away_or_their_parent_dies() -> None:
    """A broker that dies in the middle of a catch-up fails it (`DecoderFailed`, exit
    status 3 from the CLI) instead of leaving it polling for ever; a decoder whose parent
    was killed (no clean-up ran) ends on its own instead of polling for ever."""
    broker = DevBroker(free_port())
    kafka = KafkaSettings(bootstrap=broker.bootstrap, topic=f"gone-{uuid.uuid4().hex[:10]}")
    empty = {TopicPartition(kafka.topic, 0): (None, 10)}  # nothing to read there: it waits
    broker.start()
    try:
        ensure_topics(kafka)
        decoders = Decoders(kafka, 1, 100, stalled_seconds=1.0)
        decoders.assign(empty)
        assert decoders.read(1500) == []
        broker.stop()
        deadline = time.monotonic() + 60
        with pytest.raises(DecoderFailed, match="KafkaTimeoutError"):
            while time.monotonic() < deadline:
                decoders.read(500)
        decoders.close()

        broker.start()
        ensure_topics(kafka)
        orphaning = (  # a parent that starts a decoder, then is killed before closing it
            "import time\n"
            "from kafka import TopicPartition\n"
            "from consumers.kafka import KafkaSettings\n"
            "from consumers.kafka_decoding import Decoders\n"
            f"kafka = KafkaSettings(bootstrap={kafka.bootstrap!r}, topic={kafka.topic!r})\n"
            "decoders = Decoders(kafka, 1, 100, stalled_seconds=600)\n"
            "decoders.assign({TopicPartition(kafka.topic, 0): (None, 10)})\n"
            "print(decoders._processes[0].pid, flush=True)\n"
            "time.sleep(600)\n"
        )
        parent = subprocess.Popen([sys.executable, "-c", orphaning], cwd=PROJECT_ROOT,
                                  stdout=subprocess.PIPE)  # fmt: skip
        decoder = 0
        try:
            assert parent.stdout is not None
            decoder = int(parent.stdout.readline())
            time.sleep(2)  # reading, polling its empty partition
            assert running(decoder)
            parent.kill()
            parent.wait()
            wait_until(lambda: not running(decoder), 20, "the orphaned decoder kept running")
        finally:
            stop_child(parent)
            if decoder:
                with suppress(ProcessLookupError):
                    os.kill(decoder, signal.SIGKILL)
    finally:
        broker.stop()


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
    group join, while seeking, projecting or committing). The processes it started (a
    catch-up's decoders) must end by themselves soon after."""
    try:
        child.wait(timeout=max(0.0, instant - time.monotonic()))
        return "ended"
    except subprocess.TimeoutExpired:
        holding = path is not None and holds_file(child.pid, path)
        orphans = children_of(child.pid)
        child.send_signal(signal.SIGKILL)
        child.wait()
        wait_until(
            lambda: not any(running(pid) for pid in orphans),
            30,
            f"processes {sorted(orphans)} outlived their killed parent",
        )
        return "killed holding the file" if holding else "killed"


def kill_following(
    child: subprocess.Popen[bytes], path: Path, group: str, since: int, pending: bool, delay: float
) -> str:
    """SIGKILL a `consume --follow` `delay` seconds after it projected something (its
    stored offsets moved past `since`: it joined the group, got partitions and committed a
    batch); at once-plus-`delay` when no record waits for it (`pending` false)."""
    deadline = time.monotonic() + 180  # a hang guard: a rejoin takes seconds, not minutes
    while pending and progress(path, group)[1] <= since:
        assert child.poll() is None, f"`consume --follow` ended by itself ({child.returncode})"
        assert time.monotonic() < deadline, "`consume --follow` projected nothing of the topic"
        time.sleep(0.2)
    what = kill_at(child, time.monotonic() + delay, path)
    assert what != "ended", f"`consume --follow` ended by itself ({child.returncode})"
    return f"{what}, following"


@dataclass(frozen=True)
class KillCampaign:
    customers: int  # the demo history, about 28 events a customer
    parts: int  # ingested part after part by `ledger ingest`, one part a round
    batch: int  # the ingest's --batch-size
    kills: int  # at least this many SIGKILLs landed on the relay and the consumer, half each
    follow_every: int  # every n-th round's consumer is `consume --follow` (0: none)
    seed: int


SEED = int(os.environ.get("FAULT_SEED", "20250607"))
SHORT = KillCampaign(customers=150, parts=3, batch=100, kills=6, follow_every=3, seed=SEED)
LONG = KillCampaign(customers=1800, parts=12, batch=500, kills=24, follow_every=4, seed=SEED + 1)


@pytest.mark.parametrize(
    "campaign",
    [pytest.param(SHORT, id="short"), pytest.param(LONG, id="long", marks=pytest.mark.long_faults)],
)
def test_killed_ingest_relay_and_consumer_lose_nothing_and_count_nothing_twice(
    campaign: KillCampaign,
    ledger: Ledger,
    settings: Settings,
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """`ledger ingest`, `ledger relay` and `ledger consume` (one-shot, or `--follow` every
    few rounds) run side by side, round after round, each SIGKILLed at a seeded random
    instant and started again in the next round. The seed fixes the rounds and the kill
    instants as fractions of how long each command took undisturbed; where those instants
    fall in the work is up to timing. Then, once all three have run to the end: the store
    holds the history once, the topic every event id, and the projections every event once
    and equal a clean embedded rebuild, table by table."""
    rng = random.Random(campaign.seed)
    history = generate_history(customers=campaign.customers)
    size = -(-len(history) // campaign.parts)
    parts = []
    for n in range(campaign.parts):
        part = tmp_path / f"part-{n}.jsonl"
        part.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in history[n * size :][:size]))
        parts.append(part)
    expected = [e["source_event_id"] for e in history]
    cli = [sys.executable, "-m", "cli", "--data-dir", str(settings.data_dir)]
    env = child_env(kafka_settings)
    # this test's own group: the session's broker has other tests' groups and members
    group = f"faults-{kafka_settings.topic}"
    env["LEDGER_KAFKA_GROUP"] = group
    path = settings.projections_path
    logs = tmp_path / "logs"
    logs.mkdir()
    seen = f"seed {campaign.seed}"

    def start(round_: int, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (logs / f"{round_}-{name}.err").open("w") as err:
            child = subprocess.Popen(
                [*cli, *args], cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err
            )
        request.addfinalizer(partial(stop_child, child))
        return child

    failures: list[str] = []

    def exited(round_: int, children: dict[str, subprocess.Popen[bytes]]) -> None:
        for name, child in children.items():
            if child.returncode not in (0, -signal.SIGKILL):
                message = " ".join((logs / f"{round_}-{name}.err").read_text().split())
                failures.append(f"round {round_} {name} exited {child.returncode}: {message}")

    last, last_relayed = (0, 0), 0

    def check(round_: int) -> None:
        """Whatever the instants of the kills, nothing committed goes back, and the store
        holds a prefix of the history, each event once, in order."""
        nonlocal last, last_relayed
        stored = [fact["source_event_id"] for _, fact in ledger.all_facts()]
        assert stored == expected[: len(stored)], f"{seen}, round {round_}: store != history"
        now = progress(path, group)
        assert now[0] >= last[0] and now[1] >= last[1], (seen, round_, last, now)
        assert now[0] <= len(stored), (seen, round_, now, len(stored))
        relayed = relay.RelayState.load(settings.relay_state_path).position
        assert relayed >= last_relayed, (seen, round_, last_relayed, relayed)
        last, last_relayed = now, relayed

    # Round 0, undisturbed and one after the other: how long each command takes, with one
    # part's work and with none (starting up, finding nothing to do, stopping).
    took: dict[str, float] = {}
    children = {}
    for name, args in (
        ("ingest", ("ingest", str(parts[0]), "--batch-size", str(campaign.batch))),
        ("relay", ("relay",)),
        ("idle relay", ("relay",)),
        ("consume", ("consume",)),
        ("idle consume", ("consume",)),
    ):
        began = time.monotonic()
        children[name] = start(0, name, *args)
        children[name].wait(timeout=600)
        took[name] = time.monotonic() - began
    exited(0, children)
    assert not failures, "\n".join(failures)
    check(0)
    ingested = 1  # parts whose ingest ran to its end
    # one part's work: store positions for the relay, records for the consumer
    unit = {"relay": last_relayed, "consume": last[1]}
    assert unit["relay"] > 0 and unit["consume"] > 0, (seen, unit)

    def span(name: str, parts_of_work: float) -> float:
        """How long `name` takes undisturbed for that much work (in parts)."""
        idle = took[f"idle {name}"]
        return idle + max(0.0, took[name] - idle) * parts_of_work

    kills: list[tuple[int, str, str]] = []  # (round, command, what happened)

    def landed(name: str) -> int:
        return sum(1 for _, n, what in kills if n == name and what != "ended")

    round_ = 0
    while (
        ingested < len(parts)
        or landed("relay") < campaign.kills // 2
        or landed("consume") < campaign.kills - campaign.kills // 2
    ):
        round_ += 1
        assert round_ <= 3 * (campaign.kills + campaign.parts), (
            f"{seen}: no end after {round_} rounds: {ingested} of {len(parts)} parts "
            f"ingested, kills {kills}"
        )
        following = campaign.follow_every > 0 and round_ % campaign.follow_every == 0
        fractions = {  # drawn every round, whatever runs: the seed fixes the sequence
            # half of the ingests are left to finish: each part gets in in the end
            "ingest": rng.uniform(0.3, 1.5) if rng.random() < 0.5 else None,
            "relay": rng.uniform(0.3, 1.5),
            "consume": rng.uniform(0.3, 1.5),
        }
        before = progress(path, group)[1]
        # The kill windows span start-up and the work waiting (for a relay, the ingest's
        # too), so that commands that fell behind are still killed anywhere in it.
        ingesting = ingested < len(parts)
        spans = {
            "ingest": took["ingest"],
            "relay": span("relay", (ledger.head() - last_relayed) / unit["relay"] + ingesting),
            "consume": span(
                "consume", (relay.topic_size(kafka_settings) - before) / unit["consume"]
            ),
        }
        windows = {n: spans[n] * f for n, f in fractions.items() if f is not None}
        children, instants = {}, {}
        if ingesting:  # a killed ingest runs its part again from the start
            children["ingest"] = start(
                round_,
                "ingest",
                "ingest",
                str(parts[ingested]),
                "--batch-size",
                str(campaign.batch),
            )
            if fractions["ingest"] is not None:
                instants["ingest"] = time.monotonic() + windows["ingest"]
        children["relay"] = start(round_, "relay", "relay")
        instants["relay"] = time.monotonic() + windows["relay"]
        children["consume"] = start(
            round_, "consume", "consume", *(["--follow"] if following else [])
        )
        if not following:
            instants["consume"] = time.monotonic() + windows["consume"]
        for name in sorted(instants, key=instants.__getitem__):
            held = path if name == "consume" else None
            kills.append((round_, name, kill_at(children[name], instants[name], held)))
        if following:  # after the relay ended: whether records wait for it is known
            pending = relay.topic_size(kafka_settings) > before
            delay = windows["consume"]
            what = kill_following(children["consume"], path, group, before, pending, delay)
            kills.append((round_, "consume", what))
        for child in children.values():  # an ingest left to finish
            child.wait(timeout=600)
        exited(round_, children)
        if "ingest" in children and children["ingest"].returncode == 0:
            ingested += 1
        check(round_)

    summary = Counter(f"{name} {what}" for _, name, what in kills)
    total = landed("relay") + landed("consume")
    print(f"{seen}: {round_} rounds; {total} kills of relay and consumer; {dict(summary)}")
    seen = f"{seen}, kills {kills}"
    assert total >= campaign.kills, seen
    # the restarted commands did work between the kills (not only the final ones)
    assert last_relayed > unit["relay"] and last[1] > unit["consume"], (seen, last_relayed, last)
    if campaign.follow_every:
        assert any("following" in what for _, _, what in kills), seen
    # Whether a kill lands inside a batch's transaction is up to timing here; the
    # projector's mid-batch kills are pinned by tests/test_projector.py.

    finals = {}
    for name in ("relay", "consume"):
        finals[name] = subprocess.run(
            [*cli, name], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600
        )
    for name, done in finals.items():
        if done.returncode != 0:
            failures.append(
                f"final {name} exited {done.returncode}: {' '.join(done.stderr.split())}"
            )
    assert not failures, "\n".join(failures)

    facts = [fact for _, fact in ledger.all_facts()]
    assert [fact["source_event_id"] for fact in facts] == expected, seen  # each once
    event_ids = {fact["event_id"] for fact in facts}
    state = relay.RelayState.load(settings.relay_state_path)
    assert state.position == ledger.head(), seen
    in_topic = ids_in_topic(kafka_settings)
    assert set(in_topic) == event_ids, seen  # none missing (repeats allowed in the topic) ...
    print(f"{len(facts)} events; {len(in_topic)} records on the topic (repeats from kills)")
    through_kafka = tables(path)
    projected = [str(row[1]) for row in through_kafka["events"]]  # (position, event_id, ...)
    con = connect(path, read_only=True)
    try:
        stored = con.execute("SELECT stream, position FROM projection_checkpoints").fetchall()
        unpublished = con.execute(
            "SELECT event_id::VARCHAR FROM derived_events "
            "EXCEPT SELECT event_id::VARCHAR FROM derived_published"
        ).fetchall()
    finally:
        con.close()
    seen = f"{seen}; final consume: {finals['consume'].stdout.strip()!r}; offsets {stored}"
    assert len(projected) == len(facts), seen  # ... none counted twice in the projections
    assert set(projected) == event_ids, seen
    assert progress(path, group)[1] == len(in_topic), seen  # offsets at the topic's end
    reference = embedded(ledger, tmp_path)
    assert differences(through_kafka, reference) == {}, seen
    # the derived events the projections found were all published, and are on their topic
    assert unpublished == [], seen
    derived = {str(row[0]) for row in through_kafka["derived_events"]}
    assert derived <= set(ids_in_topic(kafka_settings, kafka_settings.derived_topic)), seen
