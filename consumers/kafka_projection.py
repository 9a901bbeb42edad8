"""Consumer groups that project the Kafka topic into DuckDB, with exactly-once effect.

The projector is the one the embedded path uses; only the source differs. Two threads
share the work: the calling thread polls Kafka and decodes (validates) the records, and a
projector thread applies them to DuckDB, which releases the GIL while it works, so the
next records are polled and decoded while a batch is applied. Decoded records wait,
merged into one batch, until `max_records` wait (polling pauses then), the consumer has
caught up with the topic, or they have waited `BATCH_WAIT_SECONDS`: a batch costs the
projector a fixed part whatever its size, so a catch-up goes in few large batches while
records arriving at the head of the topic are applied at once.

For each batch the projection writes and the next offset of every partition in it commit
in one DuckDB transaction (`projection_checkpoints`, source `kafka:<group>`), so the
stored offsets only ever cover applied records; records decoded but not applied yet are
simply read again after a crash. On assignment (or, for a one-shot catch-up, on start)
the consumer seeks to those stored offsets, so a consumer killed at any instant resumes
exactly after the last committed batch. Group members also commit offsets to the group
afterwards, for lag tooling only. Repeats from the relay are ignored by event id (the
mirror skips known ids). Records that cannot be decoded go to the dead-letter topic with
headers naming where they came from and why (acknowledged before they are handed to the
projector thread, so no stored offset passes an unacknowledged dead letter), and the
consumer moves on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener

from consumers import cloudevents
from consumers.kafka import KafkaSettings, consumer, high_watermarks, producer
from projections import derived
from projections.projector import BatchResult, Projector
from projections.rebuild import rebuilding
from projections.writer import ProjectionWriter

log = logging.getLogger(__name__)

T = TypeVar("T")

DLQ_HEADERS = (
    "dlq_original_topic",
    "dlq_original_partition",
    "dlq_original_offset",
    "dlq_error_class",
    "dlq_error_message",
)

POLL_RECORDS = 5_000
"""Records per poll: decoded records reach the projector thread soon after they arrive,
and few undecoded ones are alive at once (what waits for the projector merges anyway)."""

BATCH_WAIT_SECONDS = 5.0
"""How long decoded records wait for more to fill their batch while the consumer is behind
the topic's end: longer than it takes to decode `max_records` (about 1.5 s per 50k here),
so a catch-up goes in full batches; records at the topic's head do not wait."""


def source_name(group: str) -> str:
    return f"kafka:{group}"


def _stream(tp: TopicPartition) -> str:
    return f"{tp.topic}:{tp.partition}"


@dataclass
class ConsumeReport:
    events: int = 0
    dead_letters: int = 0
    batches: int = 0
    derived: int = 0


BatchCallback = Callable[[BatchResult, ConsumeReport], None]


# --- the Kafka side: polling and decoding ----------------------------------------------------


@dataclass
class _Decoded:
    """Decoded records on their way to the projector: per partition, the facts in offset
    order and the next offset to read (past its dead letters too)."""

    facts: dict[TopicPartition, list[tuple[int, bytes]]] = field(default_factory=dict)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    records: int = 0  # polled records, dead letters included

    def merge(self, later: _Decoded) -> None:
        for tp, facts in later.facts.items():
            self.facts.setdefault(tp, []).extend(facts)
        self.offsets.update(later.offsets)
        self.records += later.records

    def without(self, partitions: Collection[TopicPartition]) -> _Decoded:
        kept = _Decoded()
        for tp, offset in self.offsets.items():
            if tp not in partitions:
                kept.facts[tp] = self.facts.get(tp, [])
                kept.offsets[tp] = offset
                kept.records += len(kept.facts[tp])  # near enough for the hand-over limit
        return kept

    def batch(self) -> list[tuple[int, bytes]]:
        return [fact for facts in self.facts.values() for fact in facts]


def _decode(polled: Mapping[TopicPartition, list[Any]], dead_letters: _DeadLetters) -> _Decoded:
    """Validate polled records; those that cannot be decoded go to the dead letters, which
    the broker has acknowledged when this returns."""
    decoded = _Decoded()
    decode = cloudevents.decode
    for tp, records in polled.items():
        facts: list[tuple[int, bytes]] = []
        for record in records:
            try:
                facts.append(decode(record.headers, record.value))
            except cloudevents.UndecodableRecord as error:
                dead_letters.send(record, error)
        decoded.facts[tp] = facts
        decoded.offsets[tp] = records[-1].offset + 1
        decoded.records += len(records)
    dead_letters.flush()
    return decoded


# --- the DuckDB side: the projector thread ---------------------------------------------------


@dataclass(frozen=True)
class _Applied:
    """One batch committed to DuckDB."""

    offsets: dict[TopicPartition, int]
    result: BatchResult
    events: int
    derived: int


class _ProjectorThread:
    """The thread that owns the projections file: applies the decoded records handed to it,
    in order, one batch per DuckDB transaction with the next offsets of its partitions.

    What is handed over waits, merged, and is taken whole as the next batch once
    `max_waiting` records wait (`hand_over` blocks then), once the Kafka side has nothing
    more to come for now, or after `max_wait_seconds`. Other work on the file (reading the
    stored offsets, releasing it) runs on this thread too, between batches (`call`). A
    failure stops the thread and is raised to the Kafka side by its next call; records not
    applied then were never acknowledged anywhere.
    """

    def __init__(
        self,
        projections: ProjectionWriter,
        source: str,
        *,
        max_waiting: int,
        max_wait_seconds: float = BATCH_WAIT_SECONDS,
        publisher: _DerivedPublisher | None = None,
    ) -> None:
        self._projections = projections
        self._source = source
        self._max_waiting = max_waiting
        self._max_wait_seconds = max_wait_seconds
        self._publisher = publisher
        self._changed = threading.Condition()
        self._waiting: _Decoded | None = None
        self._waiting_since = 0.0
        self._more_to_come = True
        self._busy = False
        self._calls: deque[tuple[Callable[[ProjectionWriter], Any], Future[Any]]] = deque()
        self._applied: list[_Applied] = []
        self._failure: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kafka-projector", daemon=True)

    # --- called from the Kafka side

    def start(self) -> None:
        self._thread.start()

    def hand_over(self, decoded: _Decoded, *, more_to_come: bool) -> None:
        """Add `decoded` to the next batch; `more_to_come` when the Kafka side is behind the
        topic's end (it reads on at once, and a larger batch costs less per record)."""
        with self._changed:
            while (
                self._waiting is not None
                and self._waiting.records >= self._max_waiting
                and self._failure is None
            ):
                self._changed.wait()
            self._raise_failure()
            if self._waiting is None:
                self._waiting, self._waiting_since = decoded, time.monotonic()
            else:
                self._waiting.merge(decoded)
            self._more_to_come = more_to_come
            self._changed.notify_all()

    def nothing_more_to_come(self) -> None:
        """The Kafka side found nothing new: what waits is a batch now."""
        with self._changed:
            self._more_to_come = False
            self._changed.notify_all()

    def applied(self) -> list[_Applied]:
        """The batches committed since the last call, oldest first."""
        with self._changed:
            self._raise_failure()
            done, self._applied = self._applied, []
            return done

    def idle(self) -> bool:
        with self._changed:
            return self._waiting is None and not self._busy and not self._calls

    def drain(self) -> list[_Applied]:
        """Wait until everything handed over is applied; the batches committed since the
        last call to `applied`."""
        with self._changed:
            self._more_to_come = False
            self._changed.notify_all()
            while (self._waiting is not None or self._busy) and self._failure is None:
                self._changed.wait()
        return self.applied()

    def discard(self, partitions: Collection[TopicPartition]) -> None:
        """Forget the waiting records of `partitions`, and wait until the batch being applied
        is committed: whoever gets those partitions next starts from the stored offsets."""
        with self._changed:
            if self._waiting is not None:
                kept = self._waiting.without(partitions)
                self._waiting = kept if kept.offsets else None
                self._changed.notify_all()
            while self._busy and self._failure is None:
                self._changed.wait()

    def submit(self, function: Callable[[ProjectionWriter], T]) -> Future[T]:
        """Run `function` on this thread (DuckDB connections stay on one thread) before the
        next batch; its result, or its exception, comes in the future returned."""
        done: Future[T] = Future()
        with self._changed:
            self._raise_failure()
            if self._stopping:
                raise RuntimeError("the projector thread has stopped")
            self._calls.append((function, done))
            self._changed.notify_all()
        return done

    def call(self, function: Callable[[ProjectionWriter], T]) -> T:
        """`submit`, and wait for the result."""
        return self.submit(function).result()

    def stop(self) -> None:
        """Finish the batch being applied, drop what waits (never acknowledged), release
        the projections file and end the thread."""
        with self._changed:
            self._stopping = True
            self._waiting = None
            self._changed.notify_all()
        self._thread.join()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    # --- on the projector thread

    def _run(self) -> None:
        try:
            while True:
                with self._changed:
                    while not (self._calls or self._stopping or self._batch_due()):
                        self._changed.wait(self._seconds_to_wait())
                    call = self._calls.popleft() if self._calls else None
                    batch, self._waiting = (None, self._waiting) if call else (self._waiting, None)
                    if call is None and batch is None:
                        return  # stopping, and nothing left to call
                    self._busy = batch is not None
                    self._changed.notify_all()  # room for more to wait
                if call is not None:
                    function, done = call
                    try:
                        done.set_result(function(self._projections))
                    except BaseException as error:  # handed to the caller
                        done.set_exception(error)
                elif batch is not None:
                    applied = self._apply(batch)
                    with self._changed:
                        self._busy = False
                        self._applied.append(applied)
                        self._changed.notify_all()
        except BaseException as error:  # raised on the Kafka side
            with self._changed:
                self._failure = error
                self._busy = False
                self._changed.notify_all()
        finally:
            with self._changed:
                self._stopping = True
                calls, self._calls = list(self._calls), deque()
                self._changed.notify_all()
            for _, done in calls:
                done.set_exception(RuntimeError("the projector thread has stopped"))
            self._projections.release()

    def _batch_due(self) -> bool:
        return self._waiting is not None and (
            not self._more_to_come
            or self._waiting.records >= self._max_waiting
            or time.monotonic() >= self._waiting_since + self._max_wait_seconds
        )

    def _seconds_to_wait(self) -> float | None:
        if self._waiting is None:
            return None
        return max(0.0, self._waiting_since + self._max_wait_seconds - time.monotonic())

    def _apply(self, decoded: _Decoded) -> _Applied:
        projector = self._projections.projector()
        batch = decoded.batch()
        checkpoints = {(self._source, _stream(tp)): o for tp, o in decoded.offsets.items()}
        result = projector.apply(batch, checkpoints)
        published = 0
        if self._publisher is not None:
            published = self._publisher.publish(projector)
            with self._changed:
                idle_next = self._waiting is None
            if idle_next:  # nothing else to do meanwhile
                published += self._publisher.settle(projector)
        self._projections.after_batch()
        return _Applied(decoded.offsets, result, len(batch), published)


class _SeekToStoredOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(
        self,
        kafka_consumer: KafkaConsumer,
        projector: _ProjectorThread,
        source: str,
        handed: dict[str, int],
    ):
        self.consumer = kafka_consumer
        self.projector = projector
        self.source = source
        self.handed = handed  # where the Kafka side stands, per partition

    def on_partitions_revoked(self, revoked: Any) -> None:
        # Before the partitions move on: the batch being applied commits, the records of
        # theirs still waiting are dropped (their next owner reads them again).
        self.projector.discard(revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        source = self.source
        stored = self.projector.call(lambda writer: writer.projector().checkpoints(source))
        _seek(self.consumer, assigned, stored)
        self.handed.update({_stream(tp): stored.get(_stream(tp), 0) for tp in assigned})


def _seek(
    kafka_consumer: KafkaConsumer, partitions: Collection[TopicPartition], stored: dict[str, int]
) -> None:
    for tp in partitions:
        offset = stored.get(_stream(tp))
        if offset is None:
            kafka_consumer.seek_to_beginning(tp)
        else:
            kafka_consumer.seek(tp, offset)


class _DerivedPublisher:
    """Publishes the derived events each batch reveals, on a thread of its own, so that the
    projector thread goes on with the next batch while they are sent.

    Called by the projector thread (which owns the file) after each batch: it marks as
    published (`derived_published`) what the broker acknowledged since, and hands the new
    unpublished events to the sending thread; events sent and not marked yet are not sent
    again. `settle` waits for every acknowledgement and marks them all. A crash between an
    acknowledgement and its marking re-sends those events (same event ids) on restart:
    nothing is skipped.
    """

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._changed = threading.Condition()
        self._to_send: deque[list[dict[str, Any]]] = deque()
        self._sending = False
        self._acknowledged: list[str] = []
        self._failure: BaseException | None = None
        self._closing = False
        self._in_flight: set[str] = set()  # sent, not marked yet (the projector thread's)
        self._producer: KafkaProducer | None = None
        self._thread: threading.Thread | None = None

    # --- on the projector thread

    def publish(self, projector: Projector) -> int:
        """Mark what was acknowledged, send what is new; returns how many were marked."""
        marked = self._mark_acknowledged(projector)
        pending = [
            fact
            for fact in derived.unpublished(projector.con)
            if fact["event_id"] not in self._in_flight
        ]
        if pending:
            self._in_flight.update(fact["event_id"] for fact in pending)
            with self._changed:
                self._to_send.append(pending)
                self._changed.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="derived", daemon=True)
                self._thread.start()
        return marked

    def settle(self, projector: Projector) -> int:
        """Wait until the broker acknowledged everything sent, and mark it published."""
        with self._changed:
            while (self._to_send or self._sending) and self._failure is None:
                self._changed.wait()
        return self._mark_acknowledged(projector)

    def _mark_acknowledged(self, projector: Projector) -> int:
        with self._changed:
            if self._failure is not None:
                raise self._failure
            acknowledged, self._acknowledged = self._acknowledged, []
        if acknowledged:
            derived.mark_published(projector.con, acknowledged)
            self._in_flight.difference_update(acknowledged)
        return len(acknowledged)

    def close(self) -> None:
        """Stop sending (what was sent and not marked is sent again next time)."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self._producer is not None:
            self._producer.close()

    # --- on the sending thread

    def _run(self) -> None:
        while True:
            with self._changed:
                while not (self._to_send or self._closing):
                    self._changed.wait()
                if self._closing:
                    return
                facts = self._to_send.popleft()
                self._sending = True
            try:
                if self._producer is None:
                    self._producer = producer(self.settings)
                sent = _send_derived(self._producer, self.settings, facts)
            except BaseException as error:  # raised on the projector thread
                with self._changed:
                    self._failure = error
                    self._sending = False
                    self._changed.notify_all()
                return
            with self._changed:
                self._acknowledged.extend(sent)
                self._sending = False
                self._changed.notify_all()


def _send_derived(
    kafka_producer: KafkaProducer, settings: KafkaSettings, facts: list[dict[str, Any]]
) -> list[str]:
    """Send derived events (their recorded shape) and wait until the broker acknowledged
    every one; returns their ids."""
    futures = []
    for fact in facts:
        record = cloudevents.encode(fact, orjson.dumps(fact), None)
        futures.append(
            kafka_producer.send(
                settings.derived_topic, key=record.key, value=record.value, headers=record.headers
            )
        )
    kafka_producer.flush()
    for future in futures:
        future.get(timeout=0)
    return [fact["event_id"] for fact in facts]


# --- consuming -------------------------------------------------------------------------------


def consume(
    projections_path: Path,
    settings: KafkaSettings,
    group: str | None = None,
    *,
    follow: bool = False,
    poll_ms: int = 500,
    max_records: int = 50_000,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: BatchCallback | None = None,
) -> ConsumeReport:
    """Project the events topic into DuckDB; offsets live in DuckDB under `group`.

    With `follow` it joins the consumer group `group`, so several consumers can share the
    partitions, and keeps going. Without it, it is a one-shot catch-up: it reads every
    partition directly (no group join, so no waiting for members that died without
    leaving) from the stored offsets up to the high watermarks at the start, then stops.
    A batch holds at most about `max_records` records.
    """
    group = group or settings.group
    source = source_name(group)
    publisher = _DerivedPublisher(settings)
    projector = _ProjectorThread(
        ProjectionWriter(projections_path), source, max_waiting=max_records, publisher=publisher
    )
    dead_letters = _DeadLetters(settings)
    report = ConsumeReport()
    kafka_consumer: KafkaConsumer | None = None
    projector.start()
    try:
        # The file and its tables are created, and the stored offsets read, while the
        # consumer connects.
        stored_soon = projector.submit(lambda writer: writer.projector().checkpoints(source))
        targets = None if follow else high_watermarks(settings, settings.topic)
        kafka_consumer = consumer(
            settings,
            group_id=group if follow else None,
            max_poll_records=min(max_records, POLL_RECORDS),
        )
        stored = stored_soon.result()
        handed = dict(stored)
        if targets is None:
            projector.call(ProjectionWriter.release)  # not held through the group join
            listener = _SeekToStoredOffsets(kafka_consumer, projector, source, handed)
            kafka_consumer.subscribe([settings.topic], listener=listener)
        else:
            kafka_consumer.assign(list(targets))
            _seek(kafka_consumer, list(targets), stored)
        _project(
            kafka_consumer,
            projector,
            dead_letters,
            report,
            handed=handed,
            targets=targets,
            poll_ms=poll_ms,
            release_when_idle=True,
            should_stop=should_stop,
            on_batch=on_batch,
        )
    finally:
        projector.stop()
        publisher.close()
        dead_letters.close()
        if kafka_consumer is not None:
            kafka_consumer.close(autocommit=False)
    return report


def _project(
    kafka_consumer: KafkaConsumer,
    projector: _ProjectorThread,
    dead_letters: _DeadLetters,
    report: ConsumeReport,
    *,
    handed: dict[str, int],
    targets: dict[TopicPartition, int] | None,
    poll_ms: int,
    release_when_idle: bool,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: BatchCallback | None = None,
) -> None:
    """Poll and decode, hand the records to the projector thread, and report the batches
    it committed, until `should_stop` or (with `targets`) every partition was read to its
    target; returns when everything read is applied. `handed` holds, per stream, the next
    offset to hand over (kept up to date here, and by the listener on assignments).
    Without targets (a group member) the committed offsets also go to the group."""

    def report_applied(applied: list[_Applied]) -> None:
        for batch in applied:
            report.events += batch.events
            report.batches += 1
            report.derived += batch.derived
            if on_batch:
                on_batch(batch.result, report)
        if targets is None and applied:  # for the group's lag tooling
            assigned = kafka_consumer.assignment()
            offsets = {tp: o for batch in applied for tp, o in batch.offsets.items()}
            kafka_consumer.commit(
                {tp: OffsetAndMetadata(o, None, -1) for tp, o in offsets.items() if tp in assigned}
            )

    while not should_stop():
        report_applied(projector.applied())
        if targets is not None and _reached(targets, handed):
            break
        polled = kafka_consumer.poll(timeout_ms=poll_ms)
        if not polled:
            if targets is not None:  # a partition may end in offsets that hold no record
                for tp in targets:
                    position = kafka_consumer.position(tp)
                    if position is not None and position > handed.get(_stream(tp), 0):
                        handed[_stream(tp)] = position
            projector.nothing_more_to_come()
            if release_when_idle and projector.idle():
                projector.call(ProjectionWriter.release)
            continue
        decoded = _decode(polled, dead_letters)
        report.dead_letters = dead_letters.count
        handed.update({_stream(tp): o for tp, o in decoded.offsets.items()})
        projector.hand_over(decoded, more_to_come=not _caught_up(kafka_consumer, handed))
    report_applied(projector.drain())


def _caught_up(kafka_consumer: KafkaConsumer, handed: dict[str, int]) -> bool:
    """Whether everything the broker had when it last answered a fetch was handed over."""
    for tp in kafka_consumer.assignment():
        end = kafka_consumer.highwater(tp)
        if end is None or handed.get(_stream(tp), 0) < end:
            return False
    return True


def _reached(targets: dict[TopicPartition, int], reached: dict[str, int]) -> bool:
    return all(reached.get(_stream(tp), 0) >= end for tp, end in targets.items())


class _DeadLetters:
    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self.count = 0
        self._producer: KafkaProducer | None = None
        self._pending: list[Any] = []

    def producer(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = producer(self.settings)
        return self._producer

    def send(self, record: Any, error: Exception) -> None:
        log.warning(
            "dead letter %s:%s@%s: %s", record.topic, record.partition, record.offset, error
        )
        headers = [
            *(record.headers or []),
            ("dlq_original_topic", record.topic.encode()),
            ("dlq_original_partition", str(record.partition).encode()),
            ("dlq_original_offset", str(record.offset).encode()),
            ("dlq_error_class", type(error).__name__.encode()),
            ("dlq_error_message", str(error)[:2000].encode()),
        ]
        self._pending.append(
            self.producer().send(
                self.settings.dlq_topic, key=record.key, value=record.value, headers=headers
            )
        )
        self.count += 1

    def flush(self) -> None:
        """Wait until the broker has every dead letter; raises if one was not delivered."""
        if not self._pending:
            return
        self.producer().flush()
        pending, self._pending = self._pending, []
        for future in pending:
            future.get(timeout=0)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()


def list_dead_letters(settings: KafkaSettings, limit: int = 100) -> list[dict[str, Any]]:
    """The dead-letter topic's records, oldest first, with their provenance headers."""
    reader: KafkaConsumer = consumer(settings, group_id=None, consumer_timeout_ms=2000)
    try:
        ends = high_watermarks(settings, settings.dlq_topic)
        tps = list(ends)
        reader.assign(tps)
        reader.seek_to_beginning(*tps)
        found: list[dict[str, Any]] = []
        while any(reader.position(tp) < ends[tp] for tp in tps) and len(found) < limit:
            for tp, records in reader.poll(timeout_ms=1000).items():
                for record in records:
                    headers = {k: v.decode(errors="replace") for k, v in record.headers or []}
                    found.append(
                        {
                            "dlq_partition": tp.partition,
                            "dlq_offset": record.offset,
                            **{h.removeprefix("dlq_"): headers.get(h) for h in DLQ_HEADERS},
                            "key": (record.key or b"").decode(errors="replace"),
                            "value": (record.value or b"")[:500].decode(errors="replace"),
                        }
                    )
        return found[:limit]
    finally:
        reader.close()


def rebuild_from_kafka(
    projections_path: Path,
    settings: KafkaSettings,
    group: str | None = None,
    *,
    realert: bool = False,
    max_records: int = 50_000,
) -> int:
    """Project the whole topic from offset 0 into a new file, then swap it in atomically
    (see `projections.rebuild`). The new file holds the group's offsets at the topic's
    end, so `consume` continues from there."""
    source = source_name(group or settings.group)
    report = ConsumeReport()
    with rebuilding(projections_path, realert=realert) as staging:
        projections = ProjectionWriter(staging, bulk=True)
        ends = high_watermarks(settings, settings.topic)
        projections.projector().apply([], {(source, _stream(tp)): 0 for tp in ends})
        reader: KafkaConsumer = consumer(
            settings, group_id=None, max_poll_records=min(max_records, POLL_RECORDS)
        )
        dead_letters = _DeadLetters(settings)
        projector = _ProjectorThread(projections, source, max_waiting=max_records)
        try:
            projector.start()
            reader.assign(list(ends))
            reader.seek_to_beginning(*ends)
            _project(reader, projector, dead_letters, report, handed={}, targets=ends,
                     poll_ms=1000, release_when_idle=False)  # fmt: skip
        finally:
            projector.stop()
            dead_letters.close()
            reader.close()
    return report.events


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    projected: int | None  # next offset the projections will read (None: nothing yet)
    highwater: int | None  # as the broker's last fetch response reported it

    @property
    def lag(self) -> int | None:
        if self.highwater is None:
            return None
        return self.highwater - (self.projected or 0)


def partition_lag(settings: KafkaSettings, stored: dict[str, int]) -> list[PartitionLag]:
    """Lag per partition of the events topic: fetched high watermark minus the offset
    the projections stored."""
    return [
        PartitionLag(tp.partition, stored.get(f"{tp.topic}:{tp.partition}"), highwater)
        for tp, highwater in high_watermarks(settings, settings.topic).items()
    ]
