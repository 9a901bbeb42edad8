"""The relay (transactional outbox): every stored event, in store order, onto Kafka.

The event store is the outbox. The relay reads its notification log after a durable
position, publishes each event (key: customer id; CloudEvents headers), waits until the
broker acknowledges all of them (acks=all, idempotent producer), and only then advances
the position. A crash may therefore re-send a tail of events, never skip one; consumers
ignore the repeats by event id.

It also notices a topic that lost data (a broker that came back empty: the topic ends
before what the relay has published) and refuses to continue until told where to
republish from (`ledger relay --republish --from POSITION`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError

from consumers import cloudevents
from consumers.kafka import KafkaSettings, TopicMissing, high_watermarks, producer, watched
from domain.ledger import Ledger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelayState:
    """What the broker has acknowledged: the last store position and how many records."""

    position: int = 0
    published: int = 0

    @classmethod
    def load(cls, path: Path) -> RelayState:
        if not path.exists():
            return cls()
        raw = orjson.loads(path.read_bytes())
        return cls(int(raw["position"]), int(raw["published"]))

    def save(self, path: Path) -> None:
        """Atomically and durably: write a temporary file, fsync, rename over."""
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name)
        with os.fdopen(handle, "wb") as out:
            out.write(orjson.dumps({"position": self.position, "published": self.published}))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)


class TopicDataLost(RuntimeError):
    """The topic holds fewer records than the relay has had acknowledged."""


def topic_size(settings: KafkaSettings) -> int:
    """Records on the events topic now: the sum of its partitions' high watermarks."""
    return sum(high_watermarks(settings, settings.topic).values())


def check_topic(settings: KafkaSettings, state: RelayState) -> None:
    try:
        size = topic_size(settings)
    except TopicMissing as missing:
        if not state.published:
            raise  # never created: `ledger kafka init`
        raise TopicDataLost(
            f"{missing}. The relay has had {state.published:,} records acknowledged (up to "
            f"store position {state.position:,}): if the broker lost the topic, create it and "
            "republish with `ledger relay --republish --from 0`"
        ) from None
    if size < state.published:
        raise TopicDataLost(
            f"topic {settings.topic} holds {size:,} records but the relay has had "
            f"{state.published:,} acknowledged (up to store position {state.position:,}): "
            "the broker lost data (restarted empty?). Republish from the store with "
            "`ledger relay --republish --from 0` (or from the first position it lacks)."
        )


def republish_from(settings: KafkaSettings, path: Path, position: int, head: int) -> RelayState:
    """Rewind the relay to `position` (at most the store's `head`); the topic's current
    size becomes the baseline."""
    if position > head:
        raise ValueError(
            f"--from {position:,} is beyond the event store's head ({head:,}): "
            "nothing after it would ever be published"
        )
    state = RelayState(position=position, published=topic_size(settings))
    state.save(path)
    return state


BatchCallback = Callable[[RelayState, int], None]
"""Called after each acknowledged batch with (state, store head)."""


def run(
    ledger: Ledger,
    settings: KafkaSettings,
    state_path: Path,
    *,
    follow: bool = False,
    batch_size: int = 5_000,
    poll_seconds: float = 0.5,
    max_backoff_seconds: float = 30.0,
    check_every_seconds: float = 5.0,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: BatchCallback | None = None,
) -> RelayState:
    """Publish what the broker has not acknowledged yet; with `follow`, keep going.

    Following, it outlasts an unreachable broker: it retries with exponential backoff
    (from the last acknowledged position) and catches up when the broker returns. A
    one-shot run raises the broker's error instead (run it again later).
    """
    state = RelayState.load(state_path)
    backoff = 0.5
    kafka_producer: KafkaProducer | None = None
    checked_at: float | None = None  # a broker can restart empty between two batches
    while not should_stop():
        try:
            if kafka_producer is None:  # a broker that is down is reported, then retried
                kafka_producer = producer(settings, **watched())
            if checked_at is None or time.monotonic() - checked_at > check_every_seconds:
                check_topic(settings, state)
                checked_at = time.monotonic()
            last, documents = ledger.documents_after(state.position, batch_size)
            if last == state.position:
                if not follow:
                    break
                time.sleep(poll_seconds)
                continue
            _publish(kafka_producer, settings.topic, documents)
            state = RelayState(last, state.published + len(documents))
            state.save(state_path)
            backoff = 0.5
            if on_batch:
                on_batch(state, ledger.head())
        except KafkaError as error:
            if kafka_producer is not None:
                kafka_producer.close(timeout=1)
                kafka_producer = None
            if not follow:
                raise
            log.warning(
                "broker unavailable (%s); retrying in %.1fs from store position %s",
                error, backoff, f"{state.position:,}",
            )  # fmt: skip
            checked_at = None  # the broker may come back empty: look again
            time.sleep(backoff)
            backoff = min(backoff * 2, max_backoff_seconds)
    if kafka_producer is not None:
        kafka_producer.close()
    return state


def _publish(kafka_producer: KafkaProducer, topic: str, documents: list[tuple[int, bytes]]) -> None:
    """Send a batch and wait until the broker has acknowledged every record."""
    futures = []
    for position, document in documents:
        record = cloudevents.encode(orjson.loads(document), document, position)
        futures.append(
            kafka_producer.send(topic, key=record.key, value=record.value, headers=record.headers)
        )
    kafka_producer.flush()
    for future in futures:
        future.get(timeout=0)  # raises the delivery error, if any
