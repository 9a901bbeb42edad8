"""The relay's watermarks: how the projections' as-of clock moves while no event comes.

With a broker configured, the projections learn the time from the events' business times
only: a complaint nobody touches would stay `pending` past its deadline until some other
event moved the clock. The relay knows more. When it reads the store and finds nothing
new, every event recorded before that read is on the topic: it says so on the watermarks
topic (`KafkaSettings.watermark_topic`) every `LEDGER_RELAY_WATERMARK_SECONDS` while it
has nothing new, and once at the end of a one-shot run. The moment it vouches for is
`RECORDING_MARGIN` before its read: the events of an intake batch carry the time the
batch was recorded, and reach the store a little later.

A consumer asked to follow the clock (`ledger consume --as-of now`) reads the latest
watermark, then its partitions' ends; once it has read its partitions exactly to those
ends (not below the watermark's own: else the topic lost data since), it holds every
event of its customers recorded up to the watermark, and moves the clock there, less
the live clock's lag (`LiveClock`: events recorded later than that after they happened
are late, and what they take back is withdrawn).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from kafka import KafkaProducer, TopicPartition

from consumers.cloudevents import UndecodableRecord, Watermark, decode_watermark, encode_watermark
from consumers.kafka import KafkaSettings, last_records
from projections.projector import AsOf, LiveClock

log = logging.getLogger(__name__)

RECORDING_MARGIN = timedelta(seconds=60)
"""How far before its read of the store a watermark vouches for: longer than an intake
batch takes from its `recorded_at` to its commit."""


def mark(read_at: datetime, position: int, ends: dict[int, int]) -> Watermark:
    """The watermark of a read of the store at `read_at` that found nothing after
    `position`, every event up to which the broker acknowledged below `ends`."""
    return Watermark(read_at - RECORDING_MARGIN, position, dict(ends))


def send(kafka_producer: KafkaProducer, settings: KafkaSettings, watermark: Watermark) -> None:
    """Send `watermark` and wait for the broker's acknowledgement (raises its error)."""
    record = encode_watermark(watermark, settings.topic)
    future = kafka_producer.send(
        settings.watermark_topic, key=record.key, value=record.value, headers=record.headers
    )
    kafka_producer.flush()
    future.get(timeout=0)


def latest(settings: KafkaSettings, **overrides: Any) -> Watermark | None:
    """The latest watermark on the broker (None: none yet). Raises `TopicMissing` when the
    watermarks topic is not there, and the broker's errors."""
    marks = []
    for record in last_records(settings, settings.watermark_topic, wait_seconds=5.0, **overrides):
        if record.key != settings.topic.encode():
            continue  # another events topic's (the topic names are the keys)
        try:
            marks.append(decode_watermark(record.headers, record.value))
        except UndecodableRecord as error:
            log.warning(
                "record %s:%s at offset %s is no watermark (%s): ignored",
                record.topic, record.partition, record.offset, error,
            )  # fmt: skip
    return max(marks, key=lambda m: m.complete_until, default=None)


def held(watermark: Watermark, ends: Mapping[TopicPartition, int]) -> bool:
    """Whether the events topic, ending at `ends` (asked after the watermark was read),
    still holds what `watermark` vouches for: a topic that lost data since (re-created
    before its republish) ends before it, and vouches for nothing; so does a watermark
    that names not every partition."""
    by_partition = {tp.partition: end for tp, end in ends.items()}
    return set(by_partition) <= set(watermark.ends) and all(
        by_partition.get(partition, 0) >= end for partition, end in watermark.ends.items()
    )


def vouched_until(watermark: Watermark) -> datetime:
    """What `watermark` vouches for, never past this host's own time: a relay host whose
    clock runs fast would leave the as-of clock (which never goes back) in the future.
    Said once per such watermark."""
    now = datetime.now(UTC)
    ahead = watermark.complete_until > now + AHEAD_SAID_AFTER
    if ahead and _said_ahead.get("last") != watermark.complete_until:
        _said_ahead["last"] = watermark.complete_until
        log.warning(
            "the relay's watermark vouches for %s, later than this host's time (%s): the "
            "relay's host clock runs ahead? Trusted no further than now",
            watermark.complete_until.isoformat(), now.isoformat(),
        )  # fmt: skip
    return min(watermark.complete_until, now)


_said_ahead: dict[str, datetime] = {}


def clock_for(vouched: datetime, as_of: AsOf) -> datetime:
    """Where the clock may move for `as_of` when the topic is complete up to `vouched`:
    there less a live clock's lag, or no further than a moment asked for."""
    if isinstance(as_of, LiveClock):
        return vouched - as_of.lag
    return min(vouched, as_of)


def clock_target(watermark: Watermark | None, as_of: AsOf) -> datetime | None:
    """`clock_for` what the latest watermark read vouches for (`vouched_until`)."""
    return None if watermark is None else clock_for(vouched_until(watermark), as_of)


AHEAD_SAID_AFTER = timedelta(minutes=1)
"""How far a watermark may lie ahead of this host's time before it says so (hosts whose
clocks disagree by more eat into `RECORDING_MARGIN`)."""
