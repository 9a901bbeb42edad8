"""Projections built through Kafka (relay → topic → consumer group → DuckDB) against a real
broker: they equal the embedded path row for row, ignore relay repeats, dead-letter poison
records and move on, rebuild atomically, resume from the offsets kept in DuckDB, and
report their lag per partition.

Nothing is mocked: the broker is the session's (Tansu, or LEDGER_TEST_KAFKA_BOOTSTRAP),
every test has its own topics (the `kafka_settings` fixture) and its own consumer group.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import orjson
import pytest
from conftest import (
    COMPARED,
    PROJECT_ROOT,
    FollowingMember,
    accept,
    differences,
    embedded,
    event,
    fact_count,
    read_topic,
    reader_holding,
    tables,
    wait_until,
)
from kafka import KafkaProducer, TopicPartition

from bootstrap import Settings, open_ledger
from consumers import cloudevents, kafka_projection, relay
from consumers.cloudevents import Watermark
from consumers.derived_publishing import NOTHING_YET, DerivedPublisher, publish_until
from consumers.kafka import KafkaSettings, high_watermarks, partition_of
from consumers.kafka_decoding import Decoded, Decoders, list_dead_letters, stream
from consumers.status import partition_lag
from domain.demo_history import generate_history
from domain.ledger import Ledger
from projections.schema import connect
from projections.writer import ProjectionWriter

pytestmark = pytest.mark.kafka


# --- helpers ---------------------------------------------------------------------------------


def checkpoints(path: Path, group: str) -> dict[str, int]:
    con = connect(path, read_only=True)
    try:
        rows = con.execute(
            "SELECT stream, position FROM projection_checkpoints WHERE source = ?",
            [kafka_projection.source_name(group)],
        ).fetchall()
    finally:
        con.close()
    return {stream: int(position) for stream, position in rows}


def published_ids(settings: KafkaSettings) -> list[str]:
    """The ids of the derived events on the derived topic, in the topic's order."""
    return [
        orjson.loads(record.value)["event_id"]
        for record in read_topic(settings, settings.derived_topic)
    ]


def records_per_partition(settings: KafkaSettings) -> Counter[int]:
    return Counter(r.partition for r in read_topic(settings, settings.topic))


@contextmanager
def following_relay(
    settings: Settings, kafka: KafkaSettings, state_path: Path
) -> Iterator[Callable[[], None]]:
    """One relay in follow mode (its own ledger handle) for the whole block; yields a
    function that waits until everything recorded so far has been acknowledged."""
    ledger = open_ledger(settings)
    stop = threading.Event()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            relay.run(ledger, kafka, state_path, follow=True, poll_seconds=0.05,
                      should_stop=stop.is_set)  # fmt: skip
        except BaseException as error:  # handed to the test
            failure.append(error)

    thread = threading.Thread(target=work, name="relay", daemon=True)
    thread.start()

    def wait() -> None:
        deadline = time.monotonic() + 60
        while relay.RelayState.load(state_path).position < ledger.head():
            if failure:
                raise failure[0]
            assert time.monotonic() < deadline, "the relay did not catch up in 60 s"
            time.sleep(0.05)

    try:
        yield wait
    finally:
        stop.set()
        thread.join(timeout=30)
    if failure:
        raise failure[0]


# --- (a) the Kafka path equals the embedded path ---------------------------------------------


def test_kafka_projection_equals_the_embedded_path(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    accept(ledger, generate_history(customers=40))
    facts = fact_count(ledger)
    state = relay.run(ledger, kafka_settings, tmp_path / "relay.json")
    assert (state.position, state.published) == (ledger.head(), facts)

    path = settings.projections_path
    report = kafka_projection.consume(path, kafka_settings)

    assert (report.events, report.dead_letters) == (facts, 0)
    through_kafka = tables(path)
    reference = embedded(ledger, tmp_path)
    assert len(through_kafka["events"]) == facts
    assert len(through_kafka["customer_profiles"]) == 40
    assert through_kafka["loyalty_stage_history"] and through_kafka["complaint_sla"]
    assert differences(through_kafka, reference) == {}


# --- (b) relay repeats are ignored -----------------------------------------------------------


def test_relay_duplicates_are_ignored(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    accept(ledger, generate_history(customers=40))
    facts = fact_count(ledger)
    state_path = tmp_path / "relay.json"
    relay.run(ledger, kafka_settings, state_path)
    state_path.unlink()  # the relay forgets what it published: it re-sends everything
    again = relay.run(ledger, kafka_settings, state_path)
    assert again.published == facts
    assert sum(records_per_partition(kafka_settings).values()) == 2 * facts

    path = settings.projections_path
    report = kafka_projection.consume(path, kafka_settings)

    assert report.events == 2 * facts  # every record decoded ...
    through_kafka = tables(path)
    assert len(through_kafka["events"]) == facts  # ... each event projected once
    assert differences(through_kafka, embedded(ledger, tmp_path)) == {}


# --- (c) poison records go to the dead letters -----------------------------------------------


def ce_headers(fact: dict[str, Any], position: int) -> list[tuple[str, bytes]]:
    """CloudEvents binary-mode headers, written by hand from the documented contract."""
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", fact["event_id"].encode()),
        ("ce_source", b"urn:customer-ledger:test"),
        ("ce_type", f"customer_ledger.{fact['type']}".encode()),
        ("ce_time", fact["occurred_at"].encode()),
        ("ce_subject", fact["customer_id"].encode()),
        ("content-type", b"application/json"),
        ("ce_ledgerposition", str(position).encode()),
    ]


def test_poison_records_go_to_the_dead_letter_topic(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    history = generate_history(customers=40)
    half = len(history) // 2
    with following_relay(settings, kafka_settings, tmp_path / "relay.json") as relayed:
        accept(ledger, history[:half])
        relayed()

        # a real fact, re-identified: projected by mistake, it would show in the tables
        _, documents = ledger.documents_after(0, 10)
        position, document = documents[0]
        fake = {**orjson.loads(document), "event_id": str(uuid.uuid4())}
        customer = fake["customer_id"]
        lacking_event_fields = {
            k: fake[k] for k in ("event_id", "recorded_at", "schema_version", "type", "customer_id")
        }
        lacking_ledger_fields = {
            k: v for k, v in fake.items() if k not in ("event_id", "recorded_at")
        }
        other_id = [(k, str(uuid.uuid4()).encode() if k == "ce_id" else v)
                    for k, v in ce_headers(fake, position)]  # fmt: skip
        valid = ce_headers(fake, position)
        # (what the error message must name, headers, value)
        poison: list[tuple[str, list[tuple[str, bytes]], bytes]] = [
            ("json", valid, b'{"event_id": "broken'),  # not JSON
            ("event_id", valid, orjson.dumps(lacking_ledger_fields)),  # JSON, not recorded
            ("occurred_at", valid, orjson.dumps(lacking_event_fields)),  # lacks event fields
            ("ce_id", other_id, orjson.dumps(fake)),  # ce_id is another event's
            ("ce_specversion", [], orjson.dumps(fake)),  # no CloudEvents headers at all
        ]  # fmt: skip
        raw = KafkaProducer(bootstrap_servers=kafka_settings.bootstrap)
        try:
            sent: dict[tuple[int, int], tuple[str, bytes]] = {}
            for reason, headers, value in poison:
                meta = raw.send(kafka_settings.topic, key=customer.encode(), value=value,
                                headers=headers).get(timeout=30)  # fmt: skip
                sent[(meta.partition, meta.offset)] = (reason, value)
        finally:
            raw.close()

        accept(ledger, history[half:])  # valid events after the poison, in the same partitions
        relayed()
    facts = fact_count(ledger)
    poisoned_partition = {p for p, _ in sent}
    assert len(poisoned_partition) == 1
    assert (
        max(o for _, o in sent)
        < records_per_partition(kafka_settings)[poisoned_partition.pop()] - 1
    ), "valid events should follow the poison in its partition"

    group = kafka_settings.group
    path = settings.projections_path
    report = kafka_projection.consume(path, kafka_settings, group)

    assert (report.events, report.dead_letters) == (facts, len(poison))
    assert report.records == report.to_read == facts + len(poison)  # progress: dead letters too
    assert differences(tables(path), embedded(ledger, tmp_path)) == {}
    # moved on: the stored offsets are past every record, poison included
    assert sum(checkpoints(path, group).values()) == facts + len(poison)

    # the dead-letter topic itself, read with a plain client
    letters = read_topic(kafka_settings, kafka_settings.dlq_topic)
    assert len(letters) == len(poison)
    seen = set()
    for letter in letters:
        provenance = {k: v.decode() for k, v in letter.headers}
        where = (
            int(provenance["dlq_original_partition"]),
            int(provenance["dlq_original_offset"]),
        )
        assert where in sent, (where, sorted(sent))
        reason, value = sent[where]
        seen.add(where)
        assert provenance["dlq_original_topic"] == kafka_settings.topic
        assert provenance["dlq_error_class"] == "UndecodableRecord"
        message = provenance["dlq_error_message"]
        assert reason in message.lower(), (reason, message)
        assert letter.key == customer.encode()
        assert letter.value == value
    assert seen == set(sent)

    listed = list_dead_letters(kafka_settings)
    assert len(listed) == len(poison)
    by_origin = {(int(x["original_partition"]), int(x["original_offset"])): x for x in listed}
    assert set(by_origin) == set(sent)
    for where, (reason, _) in sent.items():
        shown = by_origin[where]
        assert shown["original_topic"] == kafka_settings.topic
        assert shown["error_class"] == "UndecodableRecord"
        assert reason in shown["error_message"].lower(), (reason, shown)
        assert shown["key"] == customer

    # A rebuild reads them again and sends none of them again, unless asked (--realert).
    assert kafka_projection.rebuild_from_kafka(path, kafka_settings, group) == facts
    assert len(read_topic(kafka_settings, kafka_settings.dlq_topic)) == len(poison)
    kafka_projection.rebuild_from_kafka(path, kafka_settings, group, realert=True)
    again = read_topic(kafka_settings, kafka_settings.dlq_topic)[len(poison) :]
    assert sorted((int(dict(r.headers)["dlq_original_offset"]), r.value) for r in again) == sorted(
        (offset, value) for (_, offset), (_, value) in sent.items()
    )


# --- (d) rebuild from Kafka --------------------------------------------------------------------


def test_rebuild_from_kafka_equals_consume_and_swaps_the_file(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    accept(ledger, generate_history(customers=40))
    facts = fact_count(ledger)
    relay.run(ledger, kafka_settings, tmp_path / "relay.json")
    group = kafka_settings.group
    path = settings.projections_path
    kafka_projection.consume(path, kafka_settings, group)
    consumed = tables(path, (*COMPARED, "projection_checkpoints"))
    before = path.stat().st_ino
    staging = path.with_name(path.name + ".rebuild")
    staging.write_bytes(b"a half-built file from an earlier crash")

    seen: list[tuple[int, int | None]] = []
    rebuilt_events = kafka_projection.rebuild_from_kafka(
        path, kafka_settings, group, max_records=300,
        on_batch=lambda _result, report: seen.append((report.records, report.to_read)),
    )  # fmt: skip
    assert rebuilt_events == facts

    assert len(seen) > 1 and seen == sorted(seen), seen  # progress, batch by batch
    assert seen[-1] == (facts, facts)

    assert path.stat().st_ino != before, "the rebuild should replace the file, not edit it"
    assert not staging.exists()
    assert not Path(f"{staging}.wal").exists()
    rebuilt = tables(path, (*COMPARED, "projection_checkpoints"))
    # the same tables, and the group's offsets at the topic's end, as after `consume`
    assert differences(rebuilt, consumed) == {}
    assert differences(tables(path), embedded(ledger, tmp_path)) == {}


# --- (e) a restarted consumer resumes from the offsets in DuckDB -----------------------------


def test_restarted_consumer_continues_from_its_stored_offsets(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    history = generate_history(customers=40)
    cut = len(history) * 3 // 5
    group = kafka_settings.group
    path = settings.projections_path

    with following_relay(settings, kafka_settings, tmp_path / "relay.json") as relayed:
        accept(ledger, history[:cut])
        first_facts = fact_count(ledger)
        relayed()
        first = kafka_projection.consume(path, kafka_settings, group)
        assert first.events == first_facts
        assert sum(checkpoints(path, group).values()) == first_facts

        accept(ledger, history[cut:])
        facts = fact_count(ledger)
        relayed()
    second = kafka_projection.consume(path, kafka_settings, group)

    assert second.events == facts - first_facts, "the restart should read only new records"
    # its progress counts what it had to read, not what was read before
    assert (first.records, first.to_read) == (first_facts, first_facts)
    assert (second.records, second.to_read) == (facts - first_facts, facts - first_facts)
    assert sum(checkpoints(path, group).values()) == facts
    through_kafka = tables(path)
    assert len(through_kafka["events"]) == facts
    assert differences(through_kafka, embedded(ledger, tmp_path)) == {}


# --- (f) lag per partition -------------------------------------------------------------------


def test_partition_lag_follows_the_topic(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    history = generate_history(customers=40)
    cut = len(history) // 2
    group = kafka_settings.group
    path = settings.projections_path

    with following_relay(settings, kafka_settings, tmp_path / "relay.json") as relayed:
        accept(ledger, history[:cut])
        relayed()
        kafka_projection.consume(path, kafka_settings, group)
        counts = records_per_partition(kafka_settings)
        assert sum(counts.values()) == fact_count(ledger)
        stored = checkpoints(path, group)

        lags = partition_lag(kafka_settings, stored)
        assert [lag.partition for lag in lags] == [0, 1, 2]
        for lag in lags:
            assert lag.highwater == counts[lag.partition], (lag, counts)
            assert lag.projected == counts[lag.partition]
            assert lag.lag == 0

        accept(ledger, history[cut:])
        relayed()  # relayed, not consumed
    grown = records_per_partition(kafka_settings)
    assert sum(grown.values()) == fact_count(ledger)

    lags = partition_lag(kafka_settings, stored)
    for lag in lags:
        assert lag.highwater == grown[lag.partition], (lag, grown)
        assert lag.lag == grown[lag.partition] - counts[lag.partition]
    assert any(lag.lag and lag.lag > 0 for lag in lags)
    assert sum(lag.lag or 0 for lag in lags) == fact_count(ledger) - sum(counts.values())


def test_decoders_read_on_when_one_has_finished_its_share(
    ledger: Ledger, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """A decoder reporting its share read is no reason for `read` to come back empty:
    that means nothing more for now, and what waits would go to the projector as a batch
    of its own."""
    accept(ledger, generate_history(customers=40))
    relay.run(ledger, kafka_settings, tmp_path / "relay.json")
    ends = high_watermarks(kafka_settings, kafka_settings.topic)
    first, second, third = sorted(ends)
    decoders = Decoders(kafka_settings, 2, 1000)
    try:  # shared round robin: the first decoder gets the first and third, here empty
        decoders.assign({first: (None, 0), second: (None, ends[second]), third: (None, 0)})
        found = decoders.read(timeout_ms=60_000)
    finally:
        decoders.close()
    assert ends[second] > 0
    assert found and found[0].offsets[second] > 0


# --- (g) derived events are published once ---------------------------------------------------


def event_ids(path: Path, table: str) -> set[str]:
    con = connect(path, read_only=True)
    try:
        rows = con.execute(f"SELECT event_id::VARCHAR FROM {table}").fetchall()
    finally:
        con.close()
    return {row[0] for row in rows}


def test_derived_events_are_published_once_and_remembered(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    history = generate_history(customers=40)
    cut = len(history) // 2
    group = kafka_settings.group
    path = settings.projections_path

    with following_relay(settings, kafka_settings, tmp_path / "relay.json") as relayed:
        accept(ledger, history[:cut])
        relayed()
        first = kafka_projection.consume(path, kafka_settings, group, max_records=300)
        accept(ledger, history[cut:])
        relayed()
    second = kafka_projection.consume(path, kafka_settings, group, max_records=300)
    third = kafka_projection.consume(path, kafka_settings, group)

    letters = read_topic(kafka_settings, kafka_settings.derived_topic)
    ids = [orjson.loads(letter.value)["event_id"] for letter in letters]
    assert first.derived > 0 and second.derived > 0 and third.derived == 0
    assert len(ids) == len(set(ids)) == first.derived + second.derived, "published once"
    published, derived = event_ids(path, "derived_published"), event_ids(path, "derived_events")
    assert set(ids) == published, "every acknowledged one is remembered"
    assert derived <= set(ids), "everything the projections derive went out"
    for letter in letters:
        headers = dict(letter.headers)
        assert headers["ce_id"].decode() == orjson.loads(letter.value)["event_id"]
        assert letter.key == headers["ce_subject"]


def test_another_group_projects_but_only_the_ledgers_group_publishes(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """A second group (an analyst's copy of the projections, in a file of its own) derives
    the same events but does not publish them: downstream systems hear of each transition
    once, whichever group runs first. Nor does it send dead letters (a review found each
    copy sent them again): it counts them, and the ledger's group sends them."""
    accept(ledger, generate_history(customers=40))
    relay.run(ledger, kafka_settings, tmp_path / "relay.json")
    with KafkaProducer(bootstrap_servers=kafka_settings.bootstrap) as producer:
        producer.send(kafka_settings.topic, key=b"c-poison", value=b"{not json").get(10)
    copy = tmp_path / "copy.duckdb"

    other = kafka_projection.consume(copy, kafka_settings, "analysts-copy")
    assert (other.publishing, other.derived, other.dead_letters) == (False, 0, 1)
    assert read_topic(kafka_settings, kafka_settings.dlq_topic) == [], "sent by a one-shot copy"
    following_copy = tmp_path / "following-copy.duckdb"
    records = fact_count(ledger) + 1  # the poison too

    def read_through() -> bool:
        if not following_copy.exists():  # the member makes it
            return False
        # read-write, as the member in this process opens it (DuckDB shares the instance)
        con = connect(following_copy)
        try:
            row = con.execute("SELECT sum(position) FROM projection_checkpoints").fetchone()
        except duckdb.Error:  # no tables yet
            return False
        finally:
            con.close()
        return bool(row and row[0] is not None and int(row[0]) >= records)

    with FollowingMember(following_copy, kafka_settings, "following-copy"):
        wait_until(read_through, 60, "the following copy did not read the topic through")
    assert read_topic(kafka_settings, kafka_settings.dlq_topic) == [], "sent by a follower"
    kafka_projection.rebuild_from_kafka(copy, kafka_settings, "analysts-copy", realert=True)
    assert read_topic(kafka_settings, kafka_settings.derived_topic) == []
    assert read_topic(kafka_settings, kafka_settings.dlq_topic) == []
    own = kafka_projection.consume(settings.projections_path, kafka_settings)
    assert own.publishing and own.derived > 0
    assert len(read_topic(kafka_settings, kafka_settings.dlq_topic)) == own.dead_letters == 1

    ids = published_ids(kafka_settings)
    assert len(ids) == len(set(ids)) == own.derived
    assert event_ids(copy, "derived_events") == set(ids), "the copy derives the same events"
    assert event_ids(copy, "derived_published") == set()


def overlapping_complaints(customers: int) -> list[dict[str, Any]]:
    """One complaint per customer, filed an hour after the previous customer's, answered
    after 8 h and resolved after 80 h: both clocks stopped before their warnings (normal
    priority: at 9 h and 90 h). In a partition, other records lie between a filing and
    its answers."""
    start = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
    events = []
    for n in range(customers):
        customer, complaint, filed = f"IL{n:03d}", f"K{n:03d}", start + timedelta(hours=n)
        for type_, hours, data in [
            ("CustomerRegistered", 0, {"name": f"Customer {n}"}),
            ("ComplaintFiled", 0.1, {"complaint_id": complaint, "channel": "email",
                                     "category": "billing", "priority": "normal"}),
            ("ComplaintAcknowledged", 8, {"complaint_id": complaint}),
            ("ComplaintResolved", 80, {"complaint_id": complaint, "resolution": "refunded"}),
        ]:  # fmt: skip
            at = (filed + timedelta(hours=hours)).isoformat()
            events.append(event(type_, customer, at, data))
    return sorted(events, key=lambda e: e["occurred_at"])


def test_derived_events_do_not_depend_on_how_partitions_interleave(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """Partitions are read at their own pace: one decoder drains one partition's fetched
    records before the next's, so the projections' clock runs ahead of the partitions read
    later. A transition goes out only once every partition with records still to read has
    passed its time: complaints resolved in time are never announced as late, and what
    goes out is exactly what the projections finally derive, each once."""
    accept(ledger, overlapping_complaints(60))
    relay.run(ledger, kafka_settings, tmp_path / "relay.json")
    assert len(records_per_partition(kafka_settings)) == kafka_settings.partitions
    path = settings.projections_path

    report = kafka_projection.consume(path, kafka_settings, max_records=20, decoders=1)

    assert report.batches > 5  # 240 records, at most 20 a poll: many batches, whatever the merges
    published = [
        orjson.loads(r.value) for r in read_topic(kafka_settings, kafka_settings.derived_topic)
    ]
    ids = [p["event_id"] for p in published]
    assert len(ids) == len(set(ids)) == report.derived, "published once"
    late = [
        (p["type"], p["data"]["complaint_id"]) for p in published if p["type"].startswith("Sla")
    ]
    assert late == [], "every complaint was answered and resolved in time"
    derived = event_ids(path, "derived_events")
    assert set(ids) == derived == event_ids(path, "derived_published")


@pytest.mark.parametrize("follow", [False, True], ids=["one-shot", "group-member"])
def test_derived_events_left_unacknowledged_go_out_with_nothing_new_to_read(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path,
    follow: bool,
) -> None:  # fmt: skip
    """A consumer that ended between committing a batch and the broker's acknowledgement
    of its derived events (here: their marks removed) sends them on its next run, even
    with no new record to read. A member of the group (`--follow`) publishes only for
    the partitions it was assigned: once they are, what waits for their customers goes
    out."""
    accept(ledger, overlapping_complaints(12))
    relay.run(ledger, kafka_settings, tmp_path / "relay.json")
    path, group = settings.projections_path, kafka_settings.group
    first = kafka_projection.consume(path, kafka_settings, group)
    assert first.derived > 0
    con = connect(path)
    con.execute("DELETE FROM derived_published")
    con.close()
    deadline, looked = time.monotonic() + 60, [0.0]

    def sent_again() -> bool:  # the topic holds them twice (the same ids)
        if time.monotonic() - looked[0] < 1:
            return False
        looked[0] = time.monotonic()
        return len(published_ids(kafka_settings)) >= 2 * first.derived

    again = kafka_projection.consume(
        path, kafka_settings, group, follow=follow, poll_ms=100,
        should_stop=lambda: sent_again() or time.monotonic() > deadline,
    )  # fmt: skip

    assert (again.events, again.derived) == (0, first.derived)
    assert event_ids(path, "derived_published") == event_ids(path, "derived_events")


def test_a_member_settles_its_derived_events_before_leaving_the_file_to_others(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings
) -> None:
    """Members of a group take turns on one file. One that releases it (held long enough)
    with another batch waiting first waits for the broker to acknowledge the derived
    events it sent, and marks them: whoever opens the file next would send them again."""
    accept(ledger, generate_history(customers=40))
    _, documents = ledger.documents_after(0, 100_000)
    half = len(documents) // 2
    tp = TopicPartition(kafka_settings.topic, 0)
    publisher = DerivedPublisher(kafka_settings)
    writer = ProjectionWriter(settings.projections_path, hold_seconds=0)  # due after a batch
    projector = kafka_projection._ProjectorThread(
        writer, "kafka:test", max_waiting=1, publisher=publisher
    )

    def next_holder_sees(writer: ProjectionWriter) -> tuple[set[str], set[str]]:
        rows = writer.projector().con.execute("SELECT event_id::VARCHAR FROM derived_published")
        marked = {row[0] for row in rows.fetchall()}
        return marked, set(published_ids(kafka_settings))

    projector.start()
    try:
        for part, end in [(documents[:half], half), (documents[half:], len(documents))]:
            # the second waits until the first is taken, then behind it
            decoded = Decoded(facts={tp: part}, offsets={tp: end}, records=len(part))
            projector.hand_over(decoded, more_to_come=True, publish_until=None)
        marked, sent = projector.call(next_holder_sees)  # calls go before the next batch
    finally:
        projector.stop()
        publisher.close()
    assert sent and marked == sent


def scripted(*parts: Any, relayed: int = 0) -> Decoded:
    """What a feed decoded: per partition (tp, facts, next offset, latest business time);
    `relayed`: the highest `ce_ledgerrelayed` among the records."""
    found = Decoded(relayed=relayed)
    for tp, facts, offset, latest in zip(*(iter(parts),) * 4, strict=True):
        found.facts[tp], found.offsets[tp], found.latest[tp] = facts, offset, latest
        found.records += len(facts)
    return found


class _ScriptedFeed:
    """A group member's feed that decodes what it is given, then nothing; `sharing`: the
    group has other members."""

    dead_letters = 0

    def __init__(
        self,
        script: list[Decoded],
        targets: dict[TopicPartition, int],
        sharing: bool = False,
        ends: dict[TopicPartition, int] | None = None,
        watermark: Watermark | None = None,
    ) -> None:
        """`targets`: each partition's end as its fetches reported it; `ends`: as the broker
        reports it when asked (by default the same); `watermark`: the relay's latest."""
        self.script, self.targets, self.sharing = script, targets, sharing
        self.broker_ends = targets if ends is None else ends
        self.latest_watermark = watermark
        self.asked = 0  # how often the broker's ends were asked for
        self.topic = next(iter(targets)).topic

    def read(self, timeout_ms: int) -> list[Decoded]:
        return [self.script.pop(0)] if self.script else []

    def behind(self, handed: dict[str, int]) -> list[TopicPartition]:
        return [tp for tp, end in self.targets.items() if handed.get(stream(tp), 0) < end]

    def ends(self) -> Future[dict[TopicPartition, int] | None]:
        self.asked += 1
        done: Future[dict[TopicPartition, int] | None] = Future()
        done.set_result(dict(self.broker_ends))
        return done

    def watermark(self) -> Future[Watermark | None]:
        done: Future[Watermark | None] = Future()
        done.set_result(self.latest_watermark)
        return done

    def read_to(self, ends: dict[TopicPartition, int], handed: dict[str, int]) -> bool:
        return all(handed.get(stream(tp)) == end for tp, end in ends.items())

    def shared(self) -> bool:
        return self.sharing

    def applied(self, offsets: dict[TopicPartition, int]) -> None:
        pass

    def close(self) -> None:
        pass


class _RebalancedFeed(_ScriptedFeed):
    """A group member's feed, scripted: partition P's next records wait for their batch
    when a rebalance takes P away and gives it back; P is then read again from its
    stored offset (what kafka-python does, calling the listener inside `poll`)."""

    def __init__(self, listener: Any, p: TopicPartition, q: TopicPartition,
                 documents: list[tuple[int, bytes]]) -> None:  # fmt: skip
        self.listener, self.p, self.q = listener, p, q
        registered_x, registered_y, filed, acknowledged, x_later, y_later = documents
        at = datetime.fromisoformat
        super().__init__([
            scripted(p, [registered_x, filed], 2, at("2025-01-06T09:00:00+00:00"),
                     q, [registered_y], 1, at("2025-01-06T08:00:00+00:00")),
            scripted(p, [acknowledged, x_later], 4, at("2025-01-06T10:30:00+00:00")),
            scripted(q, [y_later], 2, at("2025-01-06T11:00:00+00:00")),
            scripted(p, [acknowledged, x_later], 4, at("2025-01-06T10:30:00+00:00")),
        ], {p: 4, q: 2})  # fmt: skip

    def read(self, timeout_ms: int) -> list[Decoded]:
        step = super().read(timeout_ms)
        if len(self.script) == 2:
            time.sleep(0.5)  # the first batch is applied meanwhile; P's next records wait
        if len(self.script) == 1:  # P's wait for a batch when the rebalance comes
            self.listener.on_partitions_revoked({self.p, self.q})
            self.listener.on_partitions_assigned({self.p, self.q})
            wait_until(self.listener.seek_assigned, 10, "the stored offsets were not read")
        if step and not self.script:
            time.sleep(1.0)  # Q's record was applied on its own meanwhile
        return step


class _NoSeeking:
    """The consumer as the rebalance listener sees it: its assignment, no seeking nor
    pausing."""

    def __init__(self, assigned: Collection[TopicPartition] = (), partitions: int = 3) -> None:
        self.assigned, self.partitions = set(assigned), partitions

    def seek(self, tp: TopicPartition, offset: int) -> None:
        pass

    def seek_to_beginning(self, tp: TopicPartition) -> None:
        pass

    def pause(self, *tps: TopicPartition) -> None:
        pass

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(self.partitions))


def test_a_rebalance_does_not_let_out_transitions_the_records_read_again_take_back(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings
) -> None:
    """A complaint filed at 09:00 (urgent) and acknowledged at 09:30 never warns nor
    breaches. A rebalance drops the acknowledgement while it waits for its batch; until
    it is read again, another partition moving the clock to 11:00 must not publish the
    warning and the breach it reveals meanwhile."""
    accept(ledger, [
        event("CustomerRegistered", "X", "2025-01-06T08:00:00Z"),
        event("CustomerRegistered", "Y", "2025-01-06T08:00:00Z"),
        event("ComplaintFiled", "X", "2025-01-06T09:00:00Z", {"complaint_id": "c1",
              "channel": "phone", "category": "billing", "priority": "urgent"}),
        event("ComplaintAcknowledged", "X", "2025-01-06T09:30:00Z", {"complaint_id": "c1"}),
        event("ContactLogged", "X", "2025-01-06T10:30:00Z",
              {"channel": "phone", "direction": "inbound"}),
        event("ContactLogged", "Y", "2025-01-06T11:00:00Z",
              {"channel": "phone", "direction": "inbound"}),
    ])  # fmt: skip
    _, documents = ledger.documents_after(0, 100)
    p, q = (TopicPartition(kafka_settings.topic, n) for n in (0, 1))
    publisher = DerivedPublisher(kafka_settings)
    projector = kafka_projection._ProjectorThread(
        ProjectionWriter(settings.projections_path), "kafka:test",
        max_waiting=3, max_wait_seconds=0.3, publisher=publisher,
    )  # fmt: skip
    handed: dict[str, int] = {}
    latest: dict[TopicPartition, datetime] = {}
    listener = kafka_projection._SeekToStoredOffsets(
        _NoSeeking(), projector, "kafka:test", handed, latest
    )
    feed = _RebalancedFeed(listener, p, q, documents)
    projector.start()
    try:
        kafka_projection._project(
            feed, projector, kafka_projection.ConsumeReport(), handed=handed, latest=latest,
            targets=None, poll_ms=100, release_when_idle=False,
            should_stop=lambda: not feed.script,
        )  # fmt: skip
    finally:
        projector.stop()
        publisher.close()
    sent = [orjson.loads(r.value) for r in read_topic(kafka_settings, kafka_settings.derived_topic)]
    assert [f for f in sent if f["type"].startswith("Sla")] == []
    con = connect(settings.projections_path, read_only=True)
    try:
        assert con.execute(
            "SELECT count(*) FROM derived_events WHERE type LIKE 'Sla%'"
        ).fetchall() == [(0,)]
        assert con.execute("SELECT count(*) FROM events").fetchall() == [(6,)]
    finally:
        con.close()


F = TypeVar("F", bound=_ScriptedFeed)


def run_member(
    path: Path,
    kafka: KafkaSettings,
    owns: TopicPartition,
    feed_for: Callable[[Any, _NoSeeking], F],
    done: Callable[[F], bool],
) -> F:
    """A member of a group of several, first owning partition `owns`, projecting into the
    group's file at `path` what its feed (`feed_for(listener, consumer)`) decodes and
    checking every 0.1 s while idle for what it may publish, until `done(feed)`. Its feed,
    afterwards."""
    publisher = DerivedPublisher(kafka)
    projector = kafka_projection._ProjectorThread(
        ProjectionWriter(path), "kafka:test", max_waiting=1, publisher=publisher
    )
    handed: dict[str, int] = {}
    latest: dict[TopicPartition, datetime] = {}
    consumer = _NoSeeking({owns})
    listener = kafka_projection._SeekToStoredOffsets(
        consumer, projector, "kafka:test", handed, latest, publisher, "t"
    )
    feed = feed_for(listener, consumer)
    projector.start()
    try:
        listener.on_partitions_assigned({owns})
        wait_until(listener.seek_assigned, 10, "the stored offsets were not read")
        kafka_projection._project(
            feed, projector, kafka_projection.ConsumeReport(), handed=handed, latest=latest,
            targets=None, poll_ms=100, release_when_idle=True, should_stop=lambda: done(feed),
            idle_publish_seconds=0.1,
        )  # fmt: skip
    finally:
        projector.stop()
        publisher.close()
    return feed


def sharing_member(
    path: Path,
    kafka: KafkaSettings,
    owns: TopicPartition,
    end: int,
    script: list[Decoded],
    *,
    broker_end: int | None = None,
    idle_for: float = 0.0,
    watermark: Watermark | None = None,
) -> _ScriptedFeed:
    """`run_member` owning `owns` (whose end its fetches report at `end`, and the broker,
    when asked, at `broker_end`: by default the same): projects what `script` decodes,
    stays idle for `idle_for` seconds, then stops."""
    idle_until: list[float] = []

    def done(feed: _ScriptedFeed) -> bool:
        if feed.script:
            return False
        idle_until[:] = idle_until or [time.monotonic() + idle_for]
        return time.monotonic() >= idle_until[0]

    ends = None if broker_end is None else {owns: broker_end}
    return run_member(
        path, kafka, owns,
        lambda _listener, _consumer: _ScriptedFeed(
            script, {owns: end}, sharing=True, ends=ends, watermark=watermark
        ),
        done,
    )  # fmt: skip


def urgent_complaint_story(
    ledger: Ledger, topic: str, contacts_after: list[tuple[str, str]], acknowledged: bool = True
) -> tuple[dict[str, tuple[int, bytes]], TopicPartition, TopicPartition]:
    """Customer X files an urgent complaint at 09:00 and has it acknowledged at 09:30 (it
    never warns nor breaches; unless not `acknowledged`); Y, in another of 3 partitions,
    is registered at 08:00; then inbound contacts `contacts_after` ("x" or "y", ISO time),
    in that order. The stored documents by name (registered_x, registered_y, filed,
    acknowledged, x_later, y_later, y_later_2, ...), X's partition and Y's."""
    x, y = "X-0", next(f"Y-{n}" for n in range(100)
                       if partition_of(f"Y-{n}", 3) != partition_of("X-0", 3))  # fmt: skip
    accept(ledger, [
        event("CustomerRegistered", x, "2025-01-06T08:00:00Z"),
        event("CustomerRegistered", y, "2025-01-06T08:00:00Z"),
        event("ComplaintFiled", x, "2025-01-06T09:00:00Z", {"complaint_id": "c1",
              "channel": "phone", "category": "billing", "priority": "urgent"}),
        *([event("ComplaintAcknowledged", x, "2025-01-06T09:30:00Z", {"complaint_id": "c1"})]
          if acknowledged else []),
        *(event("ContactLogged", {"x": x, "y": y}[who], when,
                {"channel": "phone", "direction": "inbound"}) for who, when in contacts_after),
    ])  # fmt: skip
    _, documents = ledger.documents_after(0, 100)
    names = ["registered_x", "registered_y", "filed", *(["acknowledged"] if acknowledged else [])]
    seen: Counter[str] = Counter()
    for who, _ in contacts_after:  # x_later, y_later, y_later_2, ...
        seen[who] += 1
        names.append(f"{who}_later" if seen[who] == 1 else f"{who}_later_{seen[who]}")
    p, q = (TopicPartition(topic, partition_of(c, 3)) for c in (x, y))
    return dict(zip(names, documents, strict=True)), p, q


def no_sla_transition_went_out(settings: Settings, kafka_settings: KafkaSettings) -> None:
    """All six events projected, no SLA transition derived, none on the derived topic."""
    sent = [orjson.loads(r.value) for r in read_topic(kafka_settings, kafka_settings.derived_topic)]
    assert [(f["type"], f["customer_id"]) for f in sent if f["type"].startswith("Sla")] == []
    con = connect(settings.projections_path, read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM events").fetchall() == [(6,)]
        assert con.execute(SLA_DERIVED).fetchall() == [(0,)]
    finally:
        con.close()


SLA_DERIVED = "SELECT count(*) FROM derived_events WHERE type LIKE 'Sla%'"


def test_members_sharing_a_file_publish_only_their_own_customers_transitions(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings
) -> None:
    """Member B owns X's partition and has read X's complaint, not yet its acknowledgement;
    member A owns Y's and reads it to the end, moving the file's clock past X's deadlines.
    A must not publish X's warning and breach (B's records take them back): each member
    publishes its own partitions' customers' transitions, up to where it has read."""
    d, p, q = urgent_complaint_story(
        ledger, kafka_settings.topic, [("x", "2025-01-06T10:30:00Z"), ("y", "2025-01-06T11:00:00Z")]
    )
    at = datetime.fromisoformat
    member = partial(sharing_member, settings.projections_path, kafka_settings)

    member(p, 4, [scripted(p, [d["registered_x"], d["filed"]], 2, at("2025-01-06T09:00Z"))])
    member(q, 2, [scripted(q, [d["registered_y"], d["y_later"]], 2, at("2025-01-06T11:00Z"))])
    member(p, 4, [scripted(p, [d["acknowledged"], d["x_later"]], 4, at("2025-01-06T10:30Z"))])
    no_sla_transition_went_out(settings, kafka_settings)


def test_a_member_read_to_its_end_publishes_no_further_than_its_own_partitions_reached(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings
) -> None:
    """Member B's last fetch found X's partition read to its end, at X's complaint (09:00);
    the relay has appended X's acknowledgement (09:30) since. Member A, sharing the file,
    reads Y's partition to 11:00 and moves the clock past X's deadlines. B's next batch
    must not publish X's warning and breach up to that clock (they went out, and B's next
    fetch took them back: a review of a group of two), only up to where B has read."""
    d, p, q = urgent_complaint_story(
        ledger, kafka_settings.topic, [("y", "2025-01-06T11:00:00Z"), ("x", "2025-01-06T11:30:00Z")]
    )
    at = datetime.fromisoformat
    member = partial(sharing_member, settings.projections_path, kafka_settings)

    member(q, 2, [scripted(q, [d["registered_y"], d["y_later"]], 2, at("2025-01-06T11:00Z"))])
    member(p, 2, [scripted(p, [d["registered_x"], d["filed"]], 2, at("2025-01-06T09:00Z"))])
    con = connect(settings.projections_path, read_only=True)
    try:  # what B's batch derived, against A's clock: B read only to 09:00
        assert con.execute(SLA_DERIVED).fetchall()[0][0] > 0, "the test proves nothing"
    finally:
        con.close()
    member(p, 4, [scripted(p, [d["acknowledged"], d["x_later"]], 4, at("2025-01-06T11:30Z"))])
    no_sla_transition_went_out(settings, kafka_settings)
    con = connect(settings.projections_path, read_only=True)
    try:  # the stage changes went out, each member its own customers'
        stages = "SELECT count(*) FROM derived_events WHERE type = 'LoyaltyStageChanged'"
        published = "SELECT count(*) FROM derived_published"
        assert con.execute(published).fetchall() == con.execute(stages).fetchall()
    finally:
        con.close()


def sla_transitions_sent(kafka: KafkaSettings) -> list[tuple[str, str]]:
    sent = [orjson.loads(r.value) for r in read_topic(kafka, kafka.derived_topic)]
    return [(f["type"], f["customer_id"]) for f in sent if f["type"].startswith("Sla")]


def position_of(document: tuple[int, bytes]) -> int:
    return document[0]


def quiet_member_story(
    ledger: Ledger, settings: Settings, kafka: KafkaSettings, *, acknowledged: bool
) -> tuple[dict[str, tuple[int, bytes]], TopicPartition]:
    """X's urgent complaint at 09:00 (acknowledged at 09:30, or not), Y's contacts at 11:00
    and 11:05, the later one sent in the relay's next batch (`ce_ledgerrelayed`: everything
    up to the 11:00 contact is on the topic). Member B reads X's partition up to the
    complaint, member A reads Y's three records. The documents by name, X's partition."""
    d, p, q = urgent_complaint_story(
        ledger, kafka.topic, [("y", "2025-01-06T11:00:00Z"), ("y", "2025-01-06T11:05:00Z")],
        acknowledged=acknowledged,
    )  # fmt: skip
    at = datetime.fromisoformat
    member = partial(sharing_member, settings.projections_path, kafka)
    member(p, 2, [scripted(p, [d["registered_x"], d["filed"]], 2, at("2025-01-06T09:00Z"))])
    y_facts = [d["registered_y"], d["y_later"], d["y_later_2"]]
    last_batch = position_of(d["y_later"])
    member(q, 3, [scripted(q, y_facts, 3, at("2025-01-06T11:05Z"), relayed=last_batch)])
    return d, p


def sla_transitions_derived(path: Path) -> int:
    con = connect(path, read_only=True)
    try:
        return int(con.execute(SLA_DERIVED).fetchall()[0][0])
    finally:
        con.close()


def test_a_quiet_member_publishes_its_customers_transitions_the_others_records_reveal(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings
) -> None:
    """X's complaint not answered: its warning and breach, against Y's 11:00, are member
    B's to publish, but B's own partition stays quiet. While idle, B finds the topic
    complete up to 11:00 and its partition read to its end as the broker reports it now:
    it publishes them."""
    d, p = quiet_member_story(ledger, settings, kafka_settings, acknowledged=False)
    assert sla_transitions_sent(kafka_settings) == []
    quiet = sharing_member(settings.projections_path, kafka_settings, p, 2, [], idle_for=2.0)
    x = orjson.loads(d["filed"][1])["customer_id"]
    assert sla_transitions_sent(kafka_settings) == [("SlaWarning", x), ("SlaBreached", x)]
    assert quiet.asked >= 1


def test_a_quiet_member_does_not_publish_while_the_broker_holds_more_of_its_partition(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings
) -> None:
    """As above, but X's acknowledgement (09:30) is on the topic too, appended since B's
    last fetch found its partition read to the end: the broker, asked, reports more. B
    must not publish the warning and breach that record takes back."""
    _, p = quiet_member_story(ledger, settings, kafka_settings, acknowledged=True)
    # what A's batch derived for X, against its clock
    assert sla_transitions_derived(settings.projections_path) == 2, "the test proves nothing"
    quiet = sharing_member(
        settings.projections_path, kafka_settings, p, 2, [], broker_end=3, idle_for=1.5
    )
    assert quiet.asked >= 1, "B did not ask the broker"
    assert sla_transitions_sent(kafka_settings) == []


def test_a_quiet_member_does_not_trust_the_order_records_of_one_batch_arrive_in(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings
) -> None:
    """X's acknowledgement (09:30) and Y's contact at 11:00 go out in the same relay batch;
    the broker shows Y's first, and member A applies it, moving the file's clock past X's
    deadlines. B, quiet, finds its partition read to its end as the broker reports it now:
    the acknowledgement is still on its way. The topic is known complete only up to the
    batch before (09:00), so B publishes nothing (publishing up to the file's clock, it
    sent a warning and a breach the acknowledgement took back: a review's finding)."""
    d, p, q = urgent_complaint_story(ledger, kafka_settings.topic, [("y", "2025-01-06T11:00:00Z")])
    at = datetime.fromisoformat
    member = partial(sharing_member, settings.projections_path, kafka_settings)

    member(p, 2, [scripted(p, [d["registered_x"], d["filed"]], 2, at("2025-01-06T09:00Z"))])
    member(q, 2, [scripted(q, [d["registered_y"], d["y_later"]], 2, at("2025-01-06T11:00Z"),
                           relayed=position_of(d["filed"]))])  # fmt: skip
    assert sla_transitions_derived(settings.projections_path) == 2, "the test proves nothing"
    member(p, 2, [], idle_for=1.5)
    assert sla_transitions_sent(kafka_settings) == []


def test_a_quiet_member_publishes_what_the_relays_last_batch_before_a_lull_reveals(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings
) -> None:
    """X's complaint unanswered; Y's contacts, in the relay's last batch before a lull,
    move the file's clock past X's deadlines. No record says that batch is on the topic
    (`ce_ledgerrelayed` comes with the next batch), so quiet member B published nothing
    of X's. The relay's watermark, sent when it found nothing new, vouches for it: B,
    read to its partition's end as the broker reports it after the watermark, publishes
    X's warning and breach."""
    d, p, q = urgent_complaint_story(
        ledger, kafka_settings.topic, [("y", "2025-01-06T11:00:00Z")], acknowledged=False
    )
    at = datetime.fromisoformat
    member = partial(sharing_member, settings.projections_path, kafka_settings)
    member(p, 2, [scripted(p, [d["registered_x"], d["filed"]], 2, at("2025-01-06T09:00Z"))])
    member(q, 2, [scripted(q, [d["registered_y"], d["y_later"]], 2, at("2025-01-06T11:00Z"))])
    assert sla_transitions_derived(settings.projections_path) == 2, "the test proves nothing"
    member(p, 2, [], idle_for=1.5)
    assert sla_transitions_sent(kafka_settings) == [], "published with no word from the relay"

    lull = Watermark(at("2025-01-06T11:00:30Z"), position_of(d["y_later"]), {p.partition: 2})
    member(p, 2, [], idle_for=1.5, watermark=lull)
    x = orjson.loads(d["filed"][1])["customer_id"]
    assert sla_transitions_sent(kafka_settings) == [("SlaWarning", x), ("SlaBreached", x)]


class _GivenAnotherPartition(_ScriptedFeed):
    """A quiet member owning P that, once it has asked the broker and published, is given
    R as well (its member left: R's records were all read, its customers' transitions
    were never published)."""

    def __init__(self, listener: Any, consumer: _NoSeeking, p: TopicPartition,
                 r: TopicPartition) -> None:  # fmt: skip
        super().__init__([], {p: 2}, sharing=True)
        self.listener, self.consumer, self.p, self.r = listener, consumer, p, r
        self.given_at: float | None = None
        self.polls_since_asked = 0

    def read(self, timeout_ms: int) -> list[Decoded]:
        time.sleep(timeout_ms / 1000)
        self.polls_since_asked += self.asked >= 1
        if self.given_at is None and self.polls_since_asked >= 15:  # it has published
            self.listener.on_partitions_revoked({self.p})
            self.consumer.assigned = {self.p, self.r}
            self.targets = self.broker_ends = {self.p: 2, self.r: 2}
            self.listener.on_partitions_assigned({self.p, self.r})
            wait_until(self.listener.seek_assigned, 10, "the stored offsets were not read")
            self.given_at = time.monotonic()
        return []


def test_a_quiet_member_given_a_partition_publishes_its_customers_transitions_too(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings
) -> None:
    """Urgent complaints of X (partition P) and Z (R) at 09:00, Y's contacts at 11:00 and
    11:05 (Q, the later in the relay's next batch). Member B, quiet on P, publishes X's
    warning and breach; then the group gives it R, whose member left before publishing
    Z's. Nothing new is known complete, yet Z's are as safe to publish as X's were: B
    publishes them too (it went on skipping the check: a review's finding)."""
    x = "X-0"
    z = next(f"Z-{n}" for n in range(100) if partition_of(f"Z-{n}", 3) != partition_of(x, 3))
    taken = {partition_of(x, 3), partition_of(z, 3)}
    y = next(f"Y-{n}" for n in range(100) if partition_of(f"Y-{n}", 3) not in taken)
    urgent = {"channel": "phone", "category": "billing", "priority": "urgent"}
    inbound = {"channel": "phone", "direction": "inbound"}
    accept(ledger, [
        *(event("CustomerRegistered", c, "2025-01-06T08:00:00Z") for c in (x, z, y)),
        event("ComplaintFiled", x, "2025-01-06T09:00:00Z", {"complaint_id": "cx", **urgent}),
        event("ComplaintFiled", z, "2025-01-06T09:00:00Z", {"complaint_id": "cz", **urgent}),
        event("ContactLogged", y, "2025-01-06T11:00:00Z", inbound),
        event("ContactLogged", y, "2025-01-06T11:05:00Z", inbound),
    ])  # fmt: skip
    _, d = ledger.documents_after(0, 100)
    p, r, q = (TopicPartition(kafka_settings.topic, partition_of(c, 3)) for c in (x, z, y))
    at = datetime.fromisoformat
    member = partial(sharing_member, settings.projections_path, kafka_settings)
    member(p, 2, [scripted(p, [d[0], d[3]], 2, at("2025-01-06T09:00Z"))])
    member(r, 2, [scripted(r, [d[1], d[4]], 2, at("2025-01-06T09:00Z"))])  # then leaves
    member(q, 3, [scripted(q, [d[2], d[5], d[6]], 3, at("2025-01-06T11:05Z"), relayed=d[5][0])])
    assert sla_transitions_sent(kafka_settings) == []

    run_member(
        settings.projections_path, kafka_settings, p,
        lambda listener, consumer: _GivenAnotherPartition(listener, consumer, p, r),
        lambda feed: feed.given_at is not None and time.monotonic() > feed.given_at + 3,
    )  # fmt: skip
    assert sorted(sla_transitions_sent(kafka_settings)) == sorted(
        [("SlaWarning", x), ("SlaBreached", x), ("SlaWarning", z), ("SlaBreached", z)]
    )


def test_a_relayed_mark_is_believed_only_below_its_records_position() -> None:
    """`ce_ledgerrelayed` is the relay's claim that everything before its batch is on the
    topic: always below the record's own position. A foreign producer's otherwise is
    ignored (it would hold for good: the mark only rises)."""
    fact = {"event_id": str(uuid.uuid4()), "type": "CustomerRegistered", "schema_version": 1,
            "customer_id": "A1", "occurred_at": "2025-01-06T08:00:00+00:00",
            "recorded_at": "2025-01-06T08:00:01+00:00", "data": {}}  # fmt: skip
    for claim, believed in [(None, None), (0, 0), (6, 6), (7, None), (99, None), (-1, None)]:
        record = cloudevents.encode(fact, orjson.dumps(fact), 7, claim)
        assert cloudevents.decode(record.headers, record.value).relayed == believed, claim
    garbled = [*cloudevents.encode(fact, orjson.dumps(fact), 7).headers,
               ("ce_ledgerrelayed", b"x")]  # fmt: skip
    assert cloudevents.decode(garbled, orjson.dumps(fact)).relayed is None


def test_a_republish_from_a_position_publishes_that_position_again(
    ledger: Ledger, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """`relay --republish --from POSITION` publishes from POSITION on, that one included (as
    the relay's hint to republish "from the first position it lacks" means); its first
    record says everything before POSITION is on the topic (it skipped the position, and
    claimed it was there: a review's finding)."""
    accept(ledger, [event("CustomerRegistered", f"C-{n}", "2025-01-06T08:00:00Z")
                    for n in range(4)])  # fmt: skip
    _, documents = ledger.documents_after(0, 100)
    lacking = documents[2][0]
    relay.run(ledger, kafka_settings, tmp_path / "relay.json", republish_from_position=lacking)
    headers = [dict(r.headers) for r in read_topic(kafka_settings, kafka_settings.topic)]
    assert sorted(int(h["ce_ledgerposition"]) for h in headers) == [
        position for position, _ in documents[2:]
    ]
    assert [int(h["ce_ledgerrelayed"]) for h in headers if "ce_ledgerrelayed" in h] == [lacking - 1]


def test_derived_events_wait_for_the_partitions_behind() -> None:
    """`publish_until`: the earliest business time among the partitions behind; one not
    read from yet holds everything back; one read to its end holds nothing back, except
    for a member sharing the topic with others."""
    a, b, c = (TopicPartition("t", n) for n in range(3))
    noon, evening = datetime(2025, 3, 3, 12, tzinfo=UTC), datetime(2025, 3, 3, 20, tzinfo=UTC)
    latest = {a: evening, b: noon}
    until = publish_until

    assert until(latest, []) is None
    assert until(latest, [a]) == evening
    assert until(latest, [a, b]) == noon  # c, caught up, does not count
    assert until(latest, [a, c]) == NOTHING_YET
    # a member of a group of several: no further than its own partitions were read
    assert until(latest, [], shared=True) == evening
    assert until(latest, [b], shared=True) == noon
    assert until({}, [], shared=True) == NOTHING_YET


# --- (h) following the topic as a group member -------------------------------------------------


def test_following_member_projects_what_arrives_and_stops_cleanly(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    history = generate_history(customers=40)
    cut = len(history) // 3
    group = kafka_settings.group
    path = settings.projections_path
    with following_relay(settings, kafka_settings, tmp_path / "relay.json") as relayed:
        accept(ledger, history[:cut])
        relayed()
        with FollowingMember(path, kafka_settings, group) as member:

            def caught_up() -> bool:
                return member.has_projected(fact_count(ledger))

            for part in (history[cut : 2 * cut], history[2 * cut :]):
                wait_until(caught_up, 90, "the member did not catch up")
                accept(ledger, part)
                relayed()
            wait_until(caught_up, 90, "the member did not catch up")
    facts = fact_count(ledger)
    assert member.reports[0].events == facts
    assert sum(checkpoints(path, group).values()) == facts
    assert differences(tables(path), embedded(ledger, tmp_path)) == {}


def test_a_following_member_reads_again_a_partition_that_lost_data(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """After a data loss and `relay --republish`, the topic holds its events at lower
    offsets than the member stored: Tansu answers a fetch there with no records (Apache
    Kafka with OFFSET_OUT_OF_RANGE), and the member waited there for good, skipping every
    new event (an operator's review). It reads such a partition again from its beginning."""
    history = generate_history(customers=30)
    half = len(history) // 2
    group, path = kafka_settings.group, settings.projections_path
    accept(ledger, history[:half])
    relay.run(ledger, kafka_settings, tmp_path / "relay.json")
    kafka_projection.consume(path, kafka_settings, group)
    # what a republish leaves: every stored offset beyond its partition's end
    con = connect(path)
    con.execute("UPDATE projection_checkpoints SET position = position + 1000")
    con.close()
    before = fact_count(ledger)
    with FollowingMember(path, kafka_settings, group) as member:
        accept(ledger, history[half:])
        relay.run(ledger, kafka_settings, tmp_path / "relay.json")
        wait_until(
            lambda: member.has_projected(fact_count(ledger) - before),
            90,
            "the member skipped the events after the loss",
        )
    assert differences(tables(path), embedded(ledger, tmp_path)) == {}
    assert sum(checkpoints(path, group).values()) == fact_count(ledger), "offsets read again"


def test_a_lasting_state_of_a_member_is_said_once_due_again_later_and_when_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """How a member reports no connection, or no partitions (a dev broker whose group all
    left at once assigns nothing again): said once it has lasted, again after a while,
    and when it ends; nothing when it ended before it was said."""
    lasting = kafka_projection._Lasting(
        "waiting {seconds} s", "over after {seconds} s", say_after=0.2, say_again_every=0.6
    )

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records]

    with caplog.at_level(logging.WARNING, logger="consumers"):
        lasting.observe(True)
        lasting.observe(False)  # over before it was due: nothing said
        assert said() == []
        deadline = time.monotonic() + 1.1
        while time.monotonic() < deadline:
            lasting.observe(True)
            time.sleep(0.02)
        assert [m.split()[0] for m in said()] == ["waiting", "waiting"]  # at 0.2 s, 0.8 s
        lasting.observe(False)
        assert len(said()) == 3 and said()[-1].startswith("over after ")


MEMBER = """
import sys
from pathlib import Path
from consumers import kafka_projection
from consumers.kafka import KafkaSettings

listener = kafka_projection._SeekToStoredOffsets
seek = listener.on_partitions_assigned
def announce(self, partitions):
    seek(self, partitions)
    print("assigned", ",".join(str(tp.partition) for tp in sorted(partitions)), flush=True)
listener.on_partitions_assigned = announce

path, bootstrap, topic, group, max_poll_interval_ms = sys.argv[1:6]
if max_poll_interval_ms:  # how long the group waits for a member's next poll
    consumer = kafka_projection.consumer
    kafka_projection.consumer = lambda settings, **options: consumer(
        settings, **{**options, "max_poll_interval_ms": int(max_poll_interval_ms)}
    )
settings = KafkaSettings(bootstrap=bootstrap, topic=topic, group=group)
try:
    kafka_projection.consume(Path(path), settings, follow=True, max_records=500)
except KeyboardInterrupt:
    pass
"""


class Member:
    """`consume --follow` in a process of its own, announcing each assignment (when its
    listener is called)."""

    def __init__(
        self,
        settings: Settings,
        kafka: KafkaSettings,
        group: str,
        max_poll_interval_ms: int | None = None,
    ) -> None:
        arguments = [str(settings.projections_path), kafka.bootstrap, kafka.topic, group,
                     str(max_poll_interval_ms or "")]  # fmt: skip
        self.process = subprocess.Popen(
            [sys.executable, "-c", MEMBER, *arguments],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.assignments: list[str] = []
        self.assigned_at: list[float] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("assigned "):
                self.assignments.append(line.split()[1] if len(line.split()) > 1 else "")
                self.assigned_at.append(time.monotonic())

    def stop(self) -> str:
        """Interrupt it (as Ctrl-C would); its stderr when it did not end cleanly."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        _, err = self.process.communicate(timeout=60)
        return "" if self.process.returncode == 0 else err[-2000:]


def relay_and_wait(
    ledger: Ledger,
    events: list[dict[str, Any]],
    relayed: Callable[[], None],
    path: Path,
    group: str,
) -> None:
    """Record `events`, wait for the relay, then for the group to project them."""
    accept(ledger, events)
    relayed()
    wait_for_the_group(ledger, path, group)


def partitions_shared(members: list[Member]) -> bool:
    """Whether each member's latest assignment is non-empty and each of the 3 partitions is
    in exactly one (a revoke may not have reached a member yet)."""
    latest = [m.assignments[-1] if m.assignments else "" for m in members]
    return all(latest) and sorted(",".join(latest).split(",")) == ["0", "1", "2"]


def wait_for_the_group(ledger: Ledger, path: Path, group: str) -> None:
    """Wait until the group's stored offsets cover every fact recorded (reading them waits
    while a member holds the file for a batch)."""

    def projected() -> bool:
        try:
            return sum(checkpoints(path, group).values()) >= fact_count(ledger)
        except duckdb.Error:  # the file or its tables do not exist yet
            return False

    wait_until(projected, 60, "the group fell behind")


def test_two_members_share_the_partitions_and_together_project_everything(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """A second member joins while the first one projects: the group rebalances (records
    the first had polled but not applied are read again by whoever gets their partition),
    each member projects its share, and together they project every event once."""
    history = generate_history(customers=150)
    cuts = [0, len(history) // 3, 2 * len(history) // 3, len(history)]
    group = kafka_settings.group
    path = settings.projections_path
    members: list[Member] = []

    try:
        with following_relay(settings, kafka_settings, tmp_path / "relay.json") as relayed:
            members.append(Member(settings, kafka_settings, group))
            wait_until(lambda: members[0].assignments == ["0,1,2"], 60, "the first did not join")
            relay_and_wait(ledger, history[cuts[0] : cuts[1]], relayed, path, group)
            accept(ledger, history[cuts[1] : cuts[2]])
            relayed()
            members.append(Member(settings, kafka_settings, group))  # while the first projects

            shared = "the members did not share the partitions"
            wait_until(lambda: partitions_shared(members), 90, shared)
            relay_and_wait(ledger, history[cuts[2] : cuts[3]], relayed, path, group)
    finally:
        failures = [member.stop() for member in members]
    assert not any(failures), failures
    facts = fact_count(ledger)
    assert sum(checkpoints(path, group).values()) == facts
    through_kafka = tables(path)
    assert len(through_kafka["events"]) == facts
    assert differences(through_kafka, embedded(ledger, tmp_path)) == {}
    # a member does not leave the file to the other with derived events in flight, which
    # the other would send again
    ids = published_ids(kafka_settings)
    assert ids and len(ids) == len(set(ids)), "each derived event is published once"
    assert event_ids(path, "derived_published") <= set(ids)


def test_a_member_whose_partitions_stay_quiet_publishes_what_the_others_reveal(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """Two members, real broker. X files an urgent complaint at 09:00 and nothing more
    happens in X's partition; a contact of Y at 11:00, in a partition the other member
    reads, moves the file's clock past the complaint's first-response deadlines. Once the
    relay's next batch (Y again, at 11:05) says the topic holds everything up to that
    contact, X's member publishes the warning and the breach without waiting for a record
    of its own."""
    group, path = kafka_settings.group, settings.projections_path
    members: list[Member] = []
    x = "X-quiet"
    try:
        with following_relay(settings, kafka_settings, tmp_path / "relay.json") as relayed:
            members.append(Member(settings, kafka_settings, group))
            wait_until(lambda: members[0].assignments == ["0,1,2"], 60, "the first did not join")
            members.append(Member(settings, kafka_settings, group))

            def owner_of(partition: int) -> Member | None:
                return next((m for m in members if m.assignments and str(partition)
                             in m.assignments[-1].split(",")), None)  # fmt: skip

            shared = "the members did not share the partitions"
            wait_until(lambda: partitions_shared(members), 90, shared)
            partitions = kafka_settings.partitions
            x_owner = owner_of(partition_of(x, partitions))
            y = next(
                f"Y-{n}" for n in range(1000)
                if owner_of(partition_of(f"Y-{n}", partitions)) not in (x_owner, None)
            )  # fmt: skip
            relay_and_wait(ledger, [
                event("CustomerRegistered", x, "2025-01-06T08:00:00Z"),
                event("CustomerRegistered", y, "2025-01-06T08:00:00Z"),
                event("ComplaintFiled", x, "2025-01-06T09:00:00Z", {"complaint_id": "c1",
                      "channel": "phone", "category": "billing", "priority": "urgent"}),
            ], relayed, path, group)  # fmt: skip
            for at in ("2025-01-06T11:00:00Z", "2025-01-06T11:05:00Z"):  # two relay batches
                contact = {"channel": "phone", "direction": "inbound"}
                relay_and_wait(
                    ledger, [event("ContactLogged", y, at, contact)], relayed, path, group
                )
            wait_until(
                lambda: ("SlaBreached", x) in sla_transitions_sent(kafka_settings),
                kafka_projection.IDLE_PUBLISH_SECONDS + 30, "X's breach was not published",
            )  # fmt: skip
    finally:
        failures = [member.stop() for member in members]
    assert not any(failures), failures
    assert sla_transitions_sent(kafka_settings) == [("SlaWarning", x), ("SlaBreached", x)]


def test_members_stay_in_the_group_while_a_reader_holds_the_file(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """An analyst's session holds the file for longer than the group waits for a member's
    next poll, while records arrive (more than a batch holds) and a second member joins.
    Handing records over, dropping the revoked partitions' records and reading the stored
    offsets of those assigned all wait for the file; had the members stopped polling
    meanwhile, the group would have dropped them (and rebalanced again, and again). They
    stay in the group, and project everything once the file is free."""
    history = generate_history(customers=90)
    cuts = [0, len(history) // 3, 2 * len(history) // 3, len(history)]
    group = kafka_settings.group
    path = settings.projections_path
    interval_ms, hold = 4000, 12.0
    members: list[Member] = []

    try:
        with following_relay(settings, kafka_settings, tmp_path / "relay.json") as relayed:
            accept(ledger, history[cuts[0] : cuts[1]])
            relayed()
            members.append(Member(settings, kafka_settings, group, interval_ms))
            wait_for_the_group(ledger, path, group)
            with reader_holding(path, hold) as reader:
                opened = time.monotonic()
                accept(ledger, history[cuts[1] : cuts[2]])  # more than the 500 a batch holds
                relayed()
                members.append(Member(settings, kafka_settings, group, interval_ms))
                reader.wait(timeout=hold + 30)
                released = time.monotonic()
            time.sleep(3 * interval_ms / 1000)  # time for the group to drop a member
            first, second = members
            assert len(first.assignments) == 2 and len(second.assignments) == 1, (
                first.assignments, second.assignments,
            )  # fmt: skip
            assert opened < second.assigned_at[0] < released, "the rebalance came too late"
            parts = sorted(",".join([first.assignments[1], second.assignments[0]]).split(","))
            assert parts == ["0", "1", "2"]

            relay_and_wait(ledger, history[cuts[2] : cuts[3]], relayed, path, group)
    finally:
        failures = [member.stop() for member in members]
    assert not any(failures), failures
    assert differences(tables(path), embedded(ledger, tmp_path)) == {}


def test_a_read_of_stored_offsets_outrun_by_a_revoke_gives_no_partition_back(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """Partitions are assigned while a reader holds the file, so reading their stored
    offsets waits; the group rebalances again meanwhile, and kafka-python keeps the
    revoked partitions in the assignment until the join ends. The read finishing then
    must not make this member publish for those partitions' customers, nor position it
    in them: only the next assignment does."""
    path = tmp_path / "projections.duckdb"
    connect(path).close()
    tps = {TopicPartition(kafka_settings.topic, n) for n in range(3)}
    publisher = DerivedPublisher(kafka_settings)
    projector = kafka_projection._ProjectorThread(
        ProjectionWriter(path), "kafka:test", max_waiting=10
    )
    handed: dict[str, int] = {}
    consumer = _NoSeeking(tps)  # the revoked partitions stay in the assignment
    listener = kafka_projection._SeekToStoredOffsets(
        consumer, projector, "kafka:test", handed, {}, publisher, kafka_settings.topic
    )
    projector.start()
    try:
        with reader_holding(path, 2) as reader:
            listener.on_partitions_assigned(tps)
            assert not listener.seek_assigned(), (
                "the stored offsets were read while the file was held"
            )
            listener.on_partitions_revoked(tps)
            assert reader.wait(timeout=30) == 0
            wait_until(projector.idle, 30, "the stored offsets were not read")
            assert listener.seek_assigned()
            assert not publisher.newly_owned() and handed == {}

            first = TopicPartition(kafka_settings.topic, 0)
            consumer.assigned = {first}
            listener.on_partitions_assigned({first})
            wait_until(listener.seek_assigned, 30, "the stored offsets were not read")
            assert publisher.newly_owned() and handed == {stream(first): 0}
    finally:
        projector.stop()
        publisher.close()


class _SlowToSettle(DerivedPublisher):
    """A publisher whose broker takes its time to acknowledge: `settle` waits for `go`."""

    def __init__(self, settings: KafkaSettings) -> None:
        super().__init__(settings)
        self.settling, self.go = threading.Event(), threading.Event()

    def settle(self, projector: Any) -> int:
        self.settling.set()
        self.go.wait(60)
        return super().settle(projector)


def test_a_revoke_does_not_wait_for_the_batch_being_applied(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings
) -> None:
    """A revoke runs inside the group's rebalance: waiting there for a batch that settles
    its derived events with a slow broker would get the member dropped from the group. The
    batch has the file, so it commits before anyone else can read the stored offsets: the
    revoke need not wait, and the batch's offsets still land."""
    accept(ledger, [event("CustomerRegistered", "X", "2025-01-06T08:00:00Z")])
    _, documents = ledger.documents_after(0, 10)
    p = TopicPartition(kafka_settings.topic, 0)
    publisher = _SlowToSettle(kafka_settings)
    projector = kafka_projection._ProjectorThread(
        ProjectionWriter(settings.projections_path), "kafka:test", max_waiting=10,
        publisher=publisher,
    )  # fmt: skip
    projector.start()
    try:
        batch = scripted(p, documents, 1, datetime(2025, 1, 6, 8, tzinfo=UTC))
        projector.hand_over(batch, more_to_come=False, publish_until=None)
        assert publisher.settling.wait(30), "the batch was not applied"
        revoking = threading.Thread(target=projector.discard, args=({p},), daemon=True)
        revoking.start()
        revoking.join(timeout=10)
        assert not revoking.is_alive(), "the revoke waited for the batch to settle"
        publisher.go.set()
        assert [a.offsets for a in projector.drain()] == [{p: 1}]
    finally:
        publisher.go.set()
        projector.stop()
        publisher.close()
    assert checkpoints(settings.projections_path, "test") == {stream(p): 1}
