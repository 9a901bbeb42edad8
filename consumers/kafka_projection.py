"""Consumer groups that project the Kafka topic into DuckDB, with exactly-once effect.

The projector is the one the embedded path uses; only the source differs. For each
polled batch the projection writes and the next offset of every partition in it commit
in one DuckDB transaction (`projection_checkpoints`, source `kafka:<group>`). On
assignment (or, for a one-shot catch-up, on start) the consumer seeks to those stored
offsets, so a consumer killed at any instant resumes exactly after the last committed
batch. Group members also commit offsets to the group afterwards, for lag tooling
only. Repeats from the relay are ignored by event id (the mirror skips known ids).
Records that cannot be decoded go to the dead-letter topic with headers naming where
they came from and why, and the consumer moves on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener

from consumers import cloudevents
from consumers.kafka import KafkaSettings, consumer, high_watermarks, producer
from projections import derived
from projections.projector import BatchResult, Checkpoint, Projector
from projections.rebuild import rebuilding
from projections.writer import ProjectionWriter

log = logging.getLogger(__name__)

DLQ_HEADERS = (
    "dlq_original_topic",
    "dlq_original_partition",
    "dlq_original_offset",
    "dlq_error_class",
    "dlq_error_message",
)


def source_name(group: str) -> str:
    return f"kafka:{group}"


class _SeekToStoredOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, kafka_consumer: KafkaConsumer, projections: ProjectionWriter, source: str):
        self.consumer = kafka_consumer
        self.projections = projections
        self.source = source

    def on_partitions_revoked(self, revoked: Any) -> None:
        pass  # nothing pending: every batch is committed before the next poll

    def on_partitions_assigned(self, assigned: Any) -> None:
        stored = self.projections.projector().checkpoints(self.source)
        for tp in assigned:
            offset = stored.get(f"{tp.topic}:{tp.partition}")
            if offset is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, offset)


@dataclass
class ConsumeReport:
    events: int = 0
    dead_letters: int = 0
    batches: int = 0
    derived: int = 0


BatchCallback = Callable[[BatchResult, ConsumeReport], None]


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
    """
    group = group or settings.group
    source = source_name(group)
    projections = ProjectionWriter(projections_path)
    dead_letters = _DeadLetters(settings)
    report = ConsumeReport()
    # Creates the file and its tables before reading; and where the projections stand.
    reached = projections.projector().checkpoints(source)
    projections.release()
    targets = {} if follow else high_watermarks(settings, settings.topic)
    kafka_consumer = consumer(
        settings, group_id=group if follow else None, max_poll_records=max_records
    )
    try:
        if follow:
            kafka_consumer.subscribe(
                [settings.topic],
                listener=_SeekToStoredOffsets(kafka_consumer, projections, source),
            )
        else:
            kafka_consumer.assign(list(targets))
            for tp in targets:
                offset = reached.get(f"{tp.topic}:{tp.partition}")
                if offset is None:
                    kafka_consumer.seek_to_beginning(tp)
                else:
                    kafka_consumer.seek(tp, offset)
        while not should_stop():
            polled = kafka_consumer.poll(timeout_ms=poll_ms)
            if not polled:
                projections.release()
                if not follow and _reached(targets, reached):
                    break
                continue
            result = _project_batch(projections, source, polled, dead_letters, report)
            report.derived += publish_derived(
                projections.projector(), dead_letters.producer(), settings
            )
            projections.after_batch()
            offsets = {tp: records[-1].offset + 1 for tp, records in polled.items()}
            reached.update({f"{tp.topic}:{tp.partition}": o for tp, o in offsets.items()})
            if follow:  # for the group's lag tooling; the projections keep their own
                kafka_consumer.commit(
                    {tp: OffsetAndMetadata(o, None, -1) for tp, o in offsets.items()}
                )
            if on_batch:
                on_batch(result, report)
    finally:
        projections.release()
        dead_letters.close()
        kafka_consumer.close(autocommit=False)
    return report


def _project_batch(
    projections: ProjectionWriter,
    source: str,
    polled: dict[TopicPartition, list[Any]],
    dead_letters: _DeadLetters,
    report: ConsumeReport,
) -> BatchResult:
    batch: list[tuple[int, bytes]] = []
    checkpoints: dict[Checkpoint, int] = {}
    for tp, records in polled.items():
        for record in records:
            try:
                batch.append(cloudevents.decode(record.headers, record.value))
            except cloudevents.UndecodableRecord as error:
                dead_letters.send(record, error)
        checkpoints[(source, f"{tp.topic}:{tp.partition}")] = records[-1].offset + 1
    dead_letters.flush()  # acknowledged before the offsets move past the poison records
    result = projections.projector().apply(batch, checkpoints)
    report.events += len(batch)
    report.dead_letters = dead_letters.count
    report.batches += 1
    return result


def publish_derived(
    projector: Projector, kafka_producer: KafkaProducer, settings: KafkaSettings
) -> int:
    """Publish the derived events not yet acknowledged, then remember them as published.

    A crash between the acknowledgement and the remembering re-sends them (same event
    ids); nothing is skipped.
    """
    pending = derived.unpublished(projector.con)
    futures = []
    for fact in pending:
        document = orjson.dumps(fact)
        record = cloudevents.encode(fact, document, None)
        futures.append(
            kafka_producer.send(
                settings.derived_topic, key=record.key, value=record.value, headers=record.headers
            )
        )
    kafka_producer.flush()
    for future in futures:
        future.get(timeout=0)
    derived.mark_published(projector.con, [fact["event_id"] for fact in pending])
    return len(pending)


def _reached(targets: dict[TopicPartition, int], reached: dict[str, int]) -> bool:
    return all(reached.get(f"{tp.topic}:{tp.partition}", 0) >= end for tp, end in targets.items())


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
        if self._producer is not None:
            self._producer.flush()
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
) -> int:
    """Project the whole topic from offset 0 into a new file, then swap it in atomically
    (see `projections.rebuild`). The new file holds the group's offsets at the topic's
    end, so `consume` continues from there."""
    source = source_name(group or settings.group)
    report = ConsumeReport()
    with rebuilding(projections_path, realert=realert) as staging:
        reader: KafkaConsumer = consumer(settings, group_id=None)
        projections = ProjectionWriter(staging, bulk=True)
        dead_letters = _DeadLetters(settings)
        try:
            ends = high_watermarks(settings, settings.topic)
            tps = list(ends)
            reader.assign(tps)
            reader.seek_to_beginning(*tps)
            projections.projector().apply(
                [], {(source, f"{tp.topic}:{tp.partition}"): 0 for tp in tps}
            )
            while any(reader.position(tp) < ends[tp] for tp in tps):
                polled = reader.poll(timeout_ms=1000)
                if polled:
                    _project_batch(projections, source, polled, dead_letters, report)
        finally:
            projections.release()
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
