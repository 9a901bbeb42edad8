"""Where each stage of the pipeline stands: the event store's head, the projections'
positions and as-of clock, the relay's acknowledged position, the consumer group's lag per
partition (from fetched high watermarks) and the derived events the broker acknowledged.
`ledger status` prints it as tables, or as JSON for monitoring.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError

from consumers import kafka_projection, watermarks
from consumers.kafka import KafkaSettings, TopicMissing, high_watermarks, watched
from consumers.relay import RelayState, RelayStateMismatch, check_position
from domain.ledger import Ledger
from projections import derived
from projections.schema import (
    ProjectionsOutdated,
    check_version,
    connect,
    relayed_until,
    stored_checkpoints,
    stored_clock,
)


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


def partition_lag(
    settings: KafkaSettings, stored: dict[str, int], **overrides: Any
) -> list[PartitionLag]:
    """Lag per partition of the events topic: fetched high watermark minus the offset
    the projections stored (`overrides`: options of the consumer that asks)."""
    ends = high_watermarks(settings, settings.topic, **overrides)
    return [
        PartitionLag(tp.partition, stored.get(f"{tp.topic}:{tp.partition}"), highwater)
        for tp, highwater in ends.items()
    ]


@dataclass(frozen=True)
class DerivedPublication:
    topic: str
    derived: int  # in the projections file
    published: int  # of those, acknowledged by the broker
    withdrawn: int = 0  # withdrawals acknowledged (of published ones a late event took back)
    withdrawals_waiting: int = 0  # taken back or moved by a late event, not acknowledged yet

    @property
    def waiting(self) -> int:
        return self.derived - self.published


@dataclass(frozen=True)
class DeadLetterCount:
    topic: str
    records: int  # every record on it (`ledger dlq list` shows them)


@dataclass
class PipelineStatus:
    event_store: str
    store_head: int
    # positions of the sources fed from the event store (the embedded path)
    projections: dict[str, int] = field(default_factory=dict)
    clock: datetime | None = None
    # how far the events topic is known complete, as the projections learned it: a group
    # member idle on quiet partitions publishes its customers' derived events up to there
    topic_complete_until: datetime | None = None
    relay_topic: str | None = None
    relay_position: int | None = None
    relay_behind: int | None = None  # store positions not published yet (events: at most)
    # what the relay's latest watermark vouches for (None: none; `consume --as-of`)
    relay_watermark: datetime | None = None
    derived: DerivedPublication | None = None
    group: str | None = None
    partitions: list[PartitionLag] = field(default_factory=list)
    dead_letters: DeadLetterCount | None = None  # None: unknown, or no dead-letter topic
    broker_error: str | None = None  # why the lag is unknown
    problems: list[str] = field(default_factory=list)  # what needs someone's attention


def pipeline_status(
    ledger: Ledger | None,
    *,
    event_store: str,
    projections_path: Path,
    relay_state_path: Path,
    kafka: KafkaSettings | None,
    group: str | None = None,
) -> PipelineStatus:
    """Read every stage's position (`ledger` None: no store here, a consumer's data dir,
    whose head reads as 0); with a broker configured, the lag of `group` (default:
    the configured group). An unreachable broker or a missing topic leaves the lag out,
    with the reason: the rest still tells where ingest and the relay stand. `problems`
    names what needs attention: a relay position of another store or topic, a partition
    that ends before the projected offset (the topic lost data). `dead_letters` counts
    the dead-letter topic's records (`ledger dlq list` shows them)."""
    status = PipelineStatus(event_store, 0 if ledger is None else ledger.head())
    stored: dict[str, int] = {}
    if kafka is not None:
        status.group = group or kafka.group
    if projections_path.exists():
        con = connect(projections_path, read_only=True)
        try:
            for source, stream, position in stored_checkpoints(con):
                if source == kafka_projection.source_name(status.group or ""):
                    stored[stream] = position
                elif not source.startswith("kafka"):  # 'kafka:<group>', RELAYED
                    status.projections[source] = position
            status.clock = stored_clock(con)
            try:
                check_version(con)
            except ProjectionsOutdated as outdated:  # read what every version holds only
                status.problems.append(str(outdated))
            else:
                if kafka is not None:
                    status.topic_complete_until = relayed_until(con, kafka.topic)
                    status.derived = DerivedPublication(
                        kafka.derived_topic, *derived.publication(con)
                    )
        finally:
            con.close()
    if kafka is not None:
        status.relay_topic = kafka.topic
        relay = RelayState.load(relay_state_path)
        status.relay_position = relay.position
        status.relay_behind = max(status.store_head - relay.position, 0)
        try:
            check_position(ledger, kafka, relay)
        except RelayStateMismatch as mismatch:
            status.problems.append(str(mismatch))
        try:
            status.partitions = partition_lag(kafka, stored, **watched())
            records = _records_on(kafka, kafka.dlq_topic)
            if records is not None:
                status.dead_letters = DeadLetterCount(kafka.dlq_topic, records)
        except KafkaError as error:
            status.broker_error = f"cannot reach the broker at {kafka.bootstrap}: {error}"
        except TopicMissing as missing:
            status.broker_error = str(missing)
        # not a reason to call the broker unreachable: a topic created before watermarks,
        # or a last record not read in time, leaves it unknown (and so does a topic that
        # lost what it vouches for)
        if status.broker_error is None:
            with suppress(TopicMissing, KafkaError):
                mark = watermarks.latest(kafka, **watched())
                ends = {TopicPartition(kafka.topic, lag.partition): lag.highwater or 0
                        for lag in status.partitions}  # fmt: skip
                if mark is not None and watermarks.held(mark, ends):  # vouches for something
                    status.relay_watermark = mark.complete_until
        status.problems.extend(
            f"partition {lag.partition} ends at {lag.highwater:,}, before the projected "
            f"offset {lag.projected:,}: the topic lost data (`ledger relay --republish "
            "--from 0`, then `ledger rebuild --from-kafka`: it checks that no event is "
            "missing; a consume reads such a partition again, but not a republished one that "
            "grew past the old offset)"
            for lag in status.partitions
            if lag.lag is not None and lag.lag < 0
        )
    return status


def _records_on(settings: KafkaSettings, topic: str) -> int | None:
    """How many records `topic` holds (None: it does not exist)."""
    try:
        return sum(high_watermarks(settings, topic, **watched()).values())
    except TopicMissing:
        return None
