"""The relay (transactional outbox): every stored event, in store order, onto Kafka.

The event store is the outbox. The relay reads its notification log after a durable
position, publishes each event (key: customer id; CloudEvents headers), waits until the
broker acknowledges all of them (acks=all, idempotent producer), and only then advances
the position. A crash may therefore re-send a tail of events, never skip one; consumers
ignore the repeats by event id.

It also notices a topic that lost data (a broker that came back empty: the topic ends
before what the relay has published) and refuses to continue until told where to
republish from (`ledger relay --republish --from POSITION`).

While it has nothing new to send, it sends watermarks (`consumers.watermarks`): how far
the topic is complete, so that consumers may move the projections' clock without events.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError

from consumers import cloudevents, watermarks
from consumers.kafka import (
    Backoff,
    KafkaSettings,
    PartitionsDiffer,
    TopicMissing,
    high_watermarks,
    producer,
    watched,
    worth_retrying,
)
from domain.events import without_personal_data
from domain.ledger import Ledger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelayState:
    """What the broker has acknowledged: the last store position and how many records;
    for which topic; the last event published (its position and id in the store it was
    read from); and per partition, the offset after the last record acknowledged.

    The last three tie the position to a store and a topic: a position file left in a
    data dir whose store was replaced, or read for another topic, would otherwise skip
    events silently. (Files written before they existed lack them: not checked.)"""

    position: int = 0
    published: int = 0
    topic: str | None = None
    last_event: tuple[int, str] | None = None
    ends: dict[int, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> RelayState:
        if not path.exists():
            return cls()
        raw = orjson.loads(path.read_bytes())
        last = raw.get("last_event")
        return cls(
            int(raw["position"]),
            int(raw["published"]),
            raw.get("topic"),
            (int(last[0]), str(last[1])) if last else None,
            {int(p): int(end) for p, end in raw.get("ends", {}).items()},
        )

    def save(self, path: Path) -> None:
        """Atomically and durably: write a temporary file, fsync, rename over."""
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name)
        document = {
            "position": self.position,
            "published": self.published,
            "topic": self.topic,
            "last_event": list(self.last_event) if self.last_event else None,
            "ends": {str(p): end for p, end in sorted(self.ends.items())},
        }
        with os.fdopen(handle, "wb") as out:
            out.write(orjson.dumps(document))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)


class TopicDataLost(RuntimeError):
    """The topic holds fewer records than the relay has had acknowledged."""


class RelayStateMismatch(RuntimeError):
    """The relay's position belongs to another event store or another topic."""


class RelayBusy(RuntimeError):
    """Another relay publishes from the same data dir."""


class InvalidRepublish(ValueError):
    """A republish position the store does not have."""


def topic_size(settings: KafkaSettings) -> int:
    """Records on the events topic now: the sum of its partitions' high watermarks."""
    return sum(topic_ends(settings).values())


def topic_ends(settings: KafkaSettings) -> dict[int, int]:
    """Each partition's high watermark (a broker that cannot be reached is said in ~5 s)."""
    return {
        tp.partition: end
        for tp, end in high_watermarks(settings, settings.topic, **watched()).items()
    }


REPUBLISH_HINT = (
    "republish with `ledger relay --republish --from 0` (or from the first position it "
    "lacks); the projections built from the topic then need `ledger rebuild --from-kafka`"
)
"""`--from` includes its position: the relay rewinds to the one before."""


def check_topic(settings: KafkaSettings, state: RelayState) -> dict[int, int]:
    """Raise `TopicDataLost` when the topic ends before what the broker acknowledged, and
    `PartitionsDiffer` when it has another partition count than configured; else return
    each partition's end."""
    try:
        ends = topic_ends(settings)
    except TopicMissing as missing:
        if not state.published:
            raise  # never created: `ledger kafka init`
        raise TopicDataLost(
            f"{missing}. The relay has had {state.published:,} records acknowledged (up to "
            f"store position {state.position:,}): if the broker lost the topic, create it "
            f"(`ledger kafka init`) and {REPUBLISH_HINT}"
        ) from None
    if len(ends) != settings.partitions:
        raise PartitionsDiffer(
            f"topic {settings.topic} has {len(ends)} partitions, not {settings.partitions} "
            "(LEDGER_KAFKA_PARTITIONS): publishing would put customers in other partitions "
            "than their earlier events. A broker that restarted empty re-creates a topic with "
            "its own default on the next send (Tansu does): delete the topic (kafka-topics.sh "
            "--delete, or the broker's admin tool), run `ledger kafka init`, then "
            f"{REPUBLISH_HINT}. If the topic is meant to have {len(ends)}, set "
            f"LEDGER_KAFKA_PARTITIONS={len(ends)}."
        )
    short = {p: (end, ends.get(p, 0)) for p, end in state.ends.items() if ends.get(p, 0) < end}
    if short:
        where = ", ".join(
            f"partition {p} ends at {now:,}, not {end:,}" for p, (end, now) in sorted(short.items())
        )
        raise TopicDataLost(
            f"topic {settings.topic} lost records the broker had acknowledged ({where}; up to "
            f"store position {state.position:,}): the broker lost data (restarted empty?). "
            f"Then {REPUBLISH_HINT}."
        )
    size = sum(ends.values())
    if size < state.published:
        raise TopicDataLost(
            f"topic {settings.topic} holds {size:,} records but the relay has had "
            f"{state.published:,} acknowledged (up to store position {state.position:,}): "
            f"the broker lost data (restarted empty?). Then {REPUBLISH_HINT}."
        )
    return ends


def check_position(ledger: Ledger | None, settings: KafkaSettings, state: RelayState) -> None:
    """Raise `RelayStateMismatch` unless the position is of this topic and this store
    (`ledger` None: a data dir without a store, whose head is 0)."""
    fresh_start = (
        "`ledger relay --republish --from 0` publishes this store to the topic from its beginning"
    )
    if state.topic is not None and state.topic != settings.topic:
        raise RelayStateMismatch(
            f"the relay's position ({state.position:,}) is for topic {state.topic}, not "
            f"{settings.topic}: if LEDGER_KAFKA_TOPIC is mistyped, set it back to "
            f"{state.topic}; if the events are to go to {settings.topic} from now on, "
            f"{fresh_start}"
        )
    head = 0 if ledger is None else ledger.head()
    if state.position > head:
        raise RelayStateMismatch(
            f"the relay's position ({state.position:,}) is beyond the event store's head "
            f"({head:,}): its position file belongs to another store (the store was "
            f"replaced, or LEDGER_EVENT_STORE changed?): {fresh_start}"
        )
    if state.last_event is not None and ledger is not None:  # else beyond the head, above
        position, event_id = state.last_event
        found = _event_at(ledger, position)
        if found != event_id:
            raise RelayStateMismatch(
                f"the event store holds {found or 'no event'} at position {position:,}, "
                f"where the relay published event {event_id}: its position file belongs "
                f"to another store (the store was replaced, or LEDGER_EVENT_STORE "
                f"changed?): {fresh_start}"
            )


def republish_from(
    ledger: Ledger, settings: KafkaSettings, path: Path, position: int
) -> RelayState:
    """Rewind the relay so that it publishes again from `position` on (at most the store's
    head), as if everything before it were on the topic; the topic's current ends become
    the baseline."""
    head = ledger.head()
    if position > head:
        raise InvalidRepublish(
            f"--from {position:,} is beyond the event store's head ({head:,}): "
            "nothing after it would ever be published"
        )
    ends = topic_ends(settings)
    before = max(position - 1, 0)
    event_id = _event_at(ledger, before) if before > 0 else None
    last_event = (before, event_id) if event_id else None
    state = RelayState(before, sum(ends.values()), settings.topic, last_event, ends)
    state.save(path)
    return state


def _event_at(ledger: Ledger, position: int) -> str | None:
    """The id of the event stored at `position` (None: no event there)."""
    _, documents = ledger.documents_after(position - 1, 1)
    if documents and documents[0][0] == position:
        return str(orjson.loads(documents[0][1])["event_id"])
    return None


@contextmanager
def sole_relay(
    state_path: Path, ledger: Ledger | None = None, topic: str = ""
) -> Iterator[Callable[[], None]]:
    """Hold the data dir's relay lock, and the store's for `topic`: two relays on one
    position file would each publish every event (and hide a data loss from each other's
    counts); two relays of one PostgreSQL store to one topic, from two data dirs or
    hosts, would each publish every event. Yields `confirm`, which raises `StoreLockLost`
    once the store's lock went with its database session (a second relay could start)."""
    state_path.parent.mkdir(parents=True, exist_ok=True)
    with open(state_path.with_name(state_path.name + ".lock"), "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RelayBusy(
                f"another relay is publishing from this data dir ({state_path.parent}); "
                "one is enough (stop the other first)"
            ) from None
        if ledger is None:
            yield lambda: None
            return
        with ledger.held_alone(f"relay to {topic}") as store_lock:
            if not store_lock.held:
                raise RelayBusy(
                    f"another relay (another data dir or host) is publishing this event "
                    f"store to topic {topic}; one is enough (stop the other first)"
                )
            yield store_lock.confirm


BatchCallback = Callable[[RelayState, int, int], None]
"""Called after each acknowledged batch with (state, the batch's record count, store head)."""


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
    republish_from_position: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: BatchCallback | None = None,
) -> RelayState:
    """Publish what the broker has not acknowledged yet; with `follow`, keep going.

    Following, it outlasts an unreachable broker: it retries with exponential backoff
    (from the last acknowledged position) and catches up when the broker returns. A
    one-shot run raises the broker's error instead (run it again later), and so does a
    follower for a refusal that stays (`worth_retrying`: authorisation, a record too
    large), rather than retrying it for ever.
    """
    with sole_relay(state_path, ledger, settings.topic) as confirm_sole:
        if republish_from_position is None:
            state = RelayState.load(state_path)
        else:
            state = republish_from(ledger, settings, state_path, republish_from_position)
        check_position(ledger, settings, state)
        backoff = Backoff(should_stop, most=max_backoff_seconds)
        watermarking = _Watermarking(settings)
        kafka_producer: KafkaProducer | None = None
        checked_at: float | None = None  # a broker can restart empty between two batches
        if follow:
            log.info(
                "publishing to %s on %s from store position %s",
                settings.topic, settings.bootstrap, f"{state.position:,}",
            )  # fmt: skip
        while not should_stop():
            try:
                if kafka_producer is None:  # a broker that is down is reported, then retried
                    kafka_producer = producer(settings, **watched())
                if checked_at is None or time.monotonic() - checked_at > check_every_seconds:
                    confirm_sole()
                    watermarking.topic_checked(check_topic(settings, state))
                    checked_at = time.monotonic()
                read_at = datetime.now(UTC)  # before the read: what it finds was stored by then
                last, documents = ledger.documents_after(state.position, batch_size)
                if last == state.position:
                    watermarking.nothing_new(kafka_producer, read_at, state, follow)
                    if not follow:
                        break
                    time.sleep(poll_seconds)
                    continue
                ends = _publish(kafka_producer, settings, documents, state.position)
                state = RelayState(
                    last,
                    state.published + len(documents),
                    settings.topic,
                    _last_event(documents) or state.last_event,
                    {
                        p: max(end, state.ends.get(p, 0))
                        for p, end in {**state.ends, **ends}.items()
                    },
                )
                state.save(state_path)
                if backoff.waited:  # it said the broker was unavailable
                    log.warning("the broker acknowledges again; at store position %s",
                                f"{state.position:,}")  # fmt: skip
                backoff.reset()
                if on_batch:
                    on_batch(state, len(documents), ledger.head())
            except KafkaError as error:
                if kafka_producer is not None:
                    kafka_producer.close(timeout=1)
                    kafka_producer = None
                watermarking.reconnected()
                if not follow or not worth_retrying(error):
                    raise
                log.warning(
                    "broker unavailable (%s); retrying in %.1fs from store position %s",
                    error, backoff.seconds, f"{state.position:,}",
                )  # fmt: skip
                checked_at = None  # the broker may come back empty: look again
                backoff.wait()
        if kafka_producer is not None:
            kafka_producer.close()
        return state


class _Watermarking:
    """When the relay sends watermarks (`consumers.watermarks`): every
    `settings.watermark_seconds` while a follower finds nothing new, and at the end of a
    one-shot run; never when that is 0, nor while the watermarks topic is missing (said
    once: `ledger kafka init` creates it)."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._sent_at: float | None = None
        self._topic_there: bool | None = None  # not looked for yet
        self._checked_ends: dict[int, int] = {}  # the events topic's, when last checked

    def topic_checked(self, ends: dict[int, int]) -> None:
        """The events topic's ends, as `check_topic` found them (what the broker had
        acknowledged was there then)."""
        self._checked_ends = ends

    def reconnected(self) -> None:
        """A new producer, perhaps a broker that came back empty: look for the topic again."""
        if self._topic_there is False:
            self._topic_there = None

    def nothing_new(
        self, kafka_producer: KafkaProducer, read_at: datetime, state: RelayState, follow: bool
    ) -> None:
        every = self._settings.watermark_seconds
        if not every or (
            follow and self._sent_at is not None and time.monotonic() - self._sent_at < every
        ):
            return
        if self._topic_there is None:
            try:
                high_watermarks(self._settings, self._settings.watermark_topic, **watched())
                self._topic_there = True
            except TopicMissing as missing:
                log.warning(
                    "%s: the relay sends no watermarks, so consumers following the clock "
                    "(`ledger consume --as-of now`) wait for events to move it",
                    missing,
                )
                self._topic_there = False
        if self._topic_there:
            # every partition named (a consumer trusts no watermark that leaves one out):
            # where the relay never had a record acknowledged since its position file kept
            # ends (one written before them has none), the end the topic check found
            ends = {**self._checked_ends, **state.ends}
            mark = watermarks.mark(read_at, state.position, ends)
            watermarks.send(kafka_producer, self._settings, mark)
        self._sent_at = time.monotonic()


def _publish(
    kafka_producer: KafkaProducer,
    settings: KafkaSettings,
    documents: list[tuple[int, bytes]],
    relayed: int,
) -> dict[int, int]:
    """Send a batch and wait until the broker has acknowledged every record; returns, per
    partition, the offset after the last record acknowledged. Personal fields are left out
    unless the settings include them (`PERSONAL_DATA_CHOICES`). The first record says that
    every event up to `relayed` is on the topic (`ce_ledgerrelayed`): the batch before was
    acknowledged."""
    futures = []
    for n, (position, document) in enumerate(documents):
        fact = orjson.loads(document)
        withheld = None if settings.personal_data else without_personal_data(fact)
        if withheld is not None:
            fact, document = withheld, orjson.dumps(withheld)
        record = cloudevents.encode(fact, document, position, relayed if n == 0 else None)
        futures.append(
            kafka_producer.send(
                settings.topic, key=record.key, value=record.value, headers=record.headers
            )
        )
    kafka_producer.flush()
    ends: dict[int, int] = {}
    for future in futures:
        metadata = future.get(timeout=0)  # raises the delivery error, if any
        ends[metadata.partition] = max(metadata.offset + 1, ends.get(metadata.partition, 0))
    return ends


def _last_event(documents: list[tuple[int, bytes]]) -> tuple[int, str] | None:
    if not documents:
        return None
    position, document = documents[-1]
    return position, str(orjson.loads(document)["event_id"])
