"""Consumer groups that project the Kafka topic into DuckDB, with exactly-once effect.

The projector is the one the embedded path uses; only the source differs. A projector
thread applies decoded records to DuckDB (which releases the GIL while it works) while
the next ones are read and decoded (`consumers.kafka_decoding`): by this process's thread
for a group member following the topic, by decoder processes for a one-shot catch-up or a
rebuild, where kafka-python's pure-Python parsing would otherwise be the limit. Decoded
records wait, merged into one batch, until `max_records` wait (reading pauses then), the
consumer has caught up with the topic, or they have waited `BATCH_WAIT_SECONDS`: a batch
costs the projector a fixed part whatever its size, so a catch-up goes in few large
batches while records arriving at the head of the topic are applied at once.

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
consumer moves on. The derived events each batch reveals go out through
`consumers.derived_publishing`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)

from consumers import watermarks
from consumers.cloudevents import Watermark
from consumers.derived_publishing import DerivedPublisher, publish_until, publishes_derived
from consumers.kafka import (
    SAY_UNREACHABLE_AFTER_SECONDS,
    Backoff,
    KafkaSettings,
    TopicMissing,
    consumer,
    high_watermarks,
    missing_topic,
    watched,
)
from consumers.kafka_decoding import (
    POLL_RECORDS,
    DeadLetters,
    Decoded,
    Decoders,
    decode_polled,
    decoder_count,
    keep_latest,
    resolved,
    seek,
    stream,
    unread,
)
from projections import derived
from projections.projector import AsOf, BatchResult
from projections.rebuild import rebuilding
from projections.schema import RELAYED, connect, stored_checkpoints
from projections.writer import ProjectionWriter

log = logging.getLogger(__name__)

T = TypeVar("T")

BATCH_WAIT_SECONDS = 5.0
"""How long decoded records wait for more to fill their batch while the consumer is behind
the topic's end: longer than it takes to decode `max_records` (about 1.5 s per 50k here),
so a catch-up goes in full batches; records at the topic's head do not wait."""


CATCH_UP_HOLD_SECONDS = 5.0
"""How long a one-shot catch-up holds the projections file before leaving readers a turn
(a group member: `ProjectionWriter`'s default): each release costs a checkpoint and a
reopen, and `ledger query` waits for its turn."""


IDLE_PUBLISH_SECONDS = 5.0
"""How often a member sharing the topic with others checks, while its partitions stay
quiet, whether the others' records revealed transitions of its customers that it may
publish (`_QuietCheck`): each check reads from the file how far the topic is known
complete, which opens the file readers share, and asks the broker for its partitions'
ends."""


REBALANCING = (
    CommitFailedError,
    RebalanceInProgressError,
    IllegalGenerationError,
    UnknownMemberIdError,
)
"""What a group offset commit raises when the group rebalances meanwhile."""


def source_name(group: str) -> str:
    return f"kafka:{group}"


@dataclass
class ConsumeReport:
    events: int = 0
    dead_letters: int = 0
    batches: int = 0
    derived: int = 0
    # a catch-up's progress: records (dead letters included) from the stored offsets to
    # the ends at its start, and those committed so far
    to_read: int | None = None
    records: int = 0
    publishing: bool = True  # whether this group publishes the derived events
    # following the clock (`as_of`): the moment the relay's latest watermark vouched for
    # (None: none), and the clock after it moved
    watermark: datetime | None = None
    clock: datetime | None = None


BatchCallback = Callable[[BatchResult, ConsumeReport], None]


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
    stored offsets, releasing it) runs on this thread too, between batches (`submit`). A
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
        publisher: DerivedPublisher | None = None,
    ) -> None:
        self._projections = projections
        self._source = source
        self._max_waiting = max_waiting
        self._max_wait_seconds = max_wait_seconds
        self._publisher = publisher
        self._changed = threading.Condition()
        self._waiting: Decoded | None = None
        self._waiting_since = 0.0
        self._more_to_come = True
        self._publish_until: datetime | None = None
        self._busy = False  # applying a batch
        self._writing = False  # the batch has the file (it may have waited for it)
        self._dropped: set[TopicPartition] = set()  # revoked while the batch waited for it
        self._calling = False  # running a call (which may be waiting for the file)
        self._calls: deque[tuple[Callable[[ProjectionWriter], Any], Future[Any]]] = deque()
        self._applied: list[_Applied] = []
        self._failure: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kafka-projector", daemon=True)

    # --- called from the Kafka side

    def start(self) -> None:
        self._thread.start()

    def hand_over(
        self, decoded: Decoded, *, more_to_come: bool, publish_until: datetime | None
    ) -> None:
        """Add `decoded` to the next batch; `more_to_come` when the Kafka side is behind the
        topic's end (it reads on at once, and a larger batch costs less per record). The
        derived events that batch reveals go out up to `publish_until` (see `_project`)."""
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
            self._publish_until = publish_until
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
            return (
                self._waiting is None and not self._busy and not self._calling and not self._calls
            )

    def applying(self) -> bool:
        """Whether records handed over wait for their batch or are being applied (calls
        such as a release may be under way either way)."""
        with self._changed:
            return self._waiting is not None or self._busy

    def full(self) -> bool:
        """Whether `hand_over` would wait for the batch being applied (which may itself
        wait for the file while a reader holds it)."""
        with self._changed:
            return self._waiting is not None and self._waiting.records >= self._max_waiting

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
        """Forget the records of `partitions` not committed yet: whoever gets them next
        starts from the stored offsets. Those waiting are dropped; so are those of the
        batch being applied while it still waits for the file. A batch that has the file
        commits them before it lets go of it, and whoever reads the stored offsets next
        needs the file (or, in this process, comes after the batch): so this never waits,
        which matters as it runs inside the group's rebalance (a reader may hold the file
        for minutes; settling the derived events may take as long as the broker)."""
        with self._changed:
            if self._waiting is not None:
                kept = self._waiting.without(partitions)
                self._waiting = kept if kept.offsets else None
                self._changed.notify_all()
            if self._busy and not self._writing:
                self._dropped.update(partitions)

    def publishes(self) -> bool:
        return self._publisher is not None

    def newly_owned(self) -> bool:
        """Whether this member was given partitions to publish for since the last call."""
        return self._publisher is not None and self._publisher.newly_owned()

    def publish_all(self, until: datetime | None) -> Future[int]:
        """Send every derived event not sent yet up to business time `until` (None: all;
        for when no partition is behind, see `publish_until`), and have the broker
        acknowledge them, on this thread; how many were marked published comes in the
        future returned."""
        publisher = self._publisher

        def publish(writer: ProjectionWriter) -> int:
            if publisher is None:
                return 0
            projector = writer.projector()
            return publisher.publish(projector, until) + publisher.settle(projector)

        return self.submit(publish)

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
                    publish_until = self._publish_until
                    if call is None and batch is None:
                        return  # stopping, and nothing left to call
                    self._busy = batch is not None
                    self._calling = call is not None
                    self._changed.notify_all()  # room for more to wait
                if call is not None:
                    function, done = call
                    try:
                        done.set_result(function(self._projections))
                    except BaseException as error:  # handed to the caller
                        done.set_exception(error)
                    with self._changed:
                        self._calling = False
                elif batch is not None:
                    applied = self._apply(batch, publish_until)
                    with self._changed:
                        self._busy = self._writing = False
                        self._applied.append(applied)
                        self._changed.notify_all()
        except BaseException as error:  # raised on the Kafka side
            with self._changed:
                self._failure = error
                self._busy = self._writing = False
                self._changed.notify_all()
        finally:
            with self._changed:
                self._stopping = True
                calls, self._calls = list(self._calls), deque()
                self._changed.notify_all()
            for _, done in calls:
                done.set_exception(
                    self._failure or RuntimeError("the projector thread has stopped")
                )
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

    def _apply(self, decoded: Decoded, publish_until: datetime | None) -> _Applied:
        projector = self._projections.projector()  # may wait for the file
        with self._changed:
            self._writing = True
            dropped, self._dropped = self._dropped, set()
        if dropped:
            decoded = decoded.without(dropped)
        batch = decoded.batch()
        checkpoints = {(self._source, stream(tp)): o for tp, o in decoded.offsets.items()}
        relayed = {(RELAYED, tp.topic): decoded.relayed for tp in decoded.offsets}
        result = projector.apply(
            batch, checkpoints, high_marks=relayed if decoded.relayed else None
        )
        published = 0
        if self._publisher is not None:
            published = self._publisher.publish(projector, publish_until)
            with self._changed:
                idle_next = self._waiting is None
            # Settled when there is nothing else to do meanwhile, and before the file is
            # released: whoever opens it next (another member of the group) would send
            # again what was sent and not marked yet.
            if idle_next or self._projections.release_due():
                published += self._publisher.settle(projector)
        self._projections.after_batch()
        return _Applied(decoded.offsets, result, len(batch), published)


class _SeekToStoredOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    """Positions a group member's assigned partitions at the offsets stored in DuckDB.

    The listener runs inside `poll`, and reading the stored offsets may wait for the file
    (a reader holding it, the batch being applied): so assigned partitions are paused and
    the offsets read on the projector thread meanwhile; `seek_assigned`, called before
    each poll, seeks them once they are read. The member goes on polling in between, and
    so stays in the group however long the file is busy.
    """

    def __init__(
        self,
        kafka_consumer: KafkaConsumer,
        projector: _ProjectorThread,
        source: str,
        handed: dict[str, int],
        latest: dict[TopicPartition, datetime],
        publisher: DerivedPublisher | None = None,
        topic: str = "",
    ):
        self.consumer = kafka_consumer
        self.projector = projector
        self.source = source
        self.handed = handed  # where the Kafka side stands, per stream
        self.latest = latest  # the business time handed over, per partition
        self.publisher = publisher
        self.topic = topic  # the events topic, for its partition count
        self.unpositioned: set[TopicPartition] = set()  # paused until their offsets are read
        self._stored: Future[dict[str, int]] | None = None
        # kafka-python keeps revoked partitions in the assignment until the group's join
        # ends, over several polls: none of their customers' transitions is ours meanwhile
        self._revoked: set[TopicPartition] = set()

    def on_partitions_revoked(self, revoked: Any) -> None:
        # Before the partitions move on: their records not committed yet are dropped
        # (`discard`: their next owner reads them again), and so is the business time
        # they reached: were it kept, derived events those records take back (a breach
        # before its acknowledgement) could go out meanwhile.
        # Where the Kafka side stood in them goes too: until they are positioned again,
        # they count as behind.
        self.projector.discard(revoked)
        for tp in revoked:
            self.latest.pop(tp, None)
            self.handed.pop(stream(tp), None)
        self._revoked.update(revoked)
        self.unpositioned.difference_update(revoked)
        if revoked:
            log.info("revoked %s (the group rebalances)", ", ".join(map(stream, sorted(revoked))))
        if not self.unpositioned:
            self._stored = None  # a read still under way is for partitions no longer ours
        self._publish_for_assigned()

    def on_partitions_assigned(self, assigned: Any) -> None:
        self._revoked.clear()
        if not assigned:
            return
        self.consumer.pause(*assigned)
        self.unpositioned.update(assigned)
        source = self.source
        # Runs once the batch being applied is committed (calls run between batches), and
        # no record of these partitions waits for a batch (`discard` dropped them when
        # they were revoked; none was read since, as they are paused).
        self._stored = self.projector.submit(lambda writer: writer.projector().checkpoints(source))

    def seek_assigned(self) -> bool:
        """Seek the assigned partitions to their stored offsets once those are read (the
        member resumes them); whether none is left waiting for them."""
        if self._stored is None:
            return True
        if not self._stored.done():
            return False
        stored, self._stored = self._stored.result(), None
        partitions, self.unpositioned = self.unpositioned, set()  # revoked ones left it
        seek(self.consumer, partitions, stored)
        self.handed.update({stream(tp): stored.get(stream(tp), 0) for tp in partitions})
        if partitions:
            log.info(
                "assigned %s",
                ", ".join(f"{stream(tp)} from offset {self.handed[stream(tp)]:,}"
                          for tp in sorted(partitions)),
            )  # fmt: skip
        self._publish_for_assigned()
        return True

    def _publish_for_assigned(self) -> None:
        """The derived events this member publishes: its own positioned partitions'
        customers'."""
        if self.publisher is not None:
            owned = {
                tp.partition
                for tp in self.consumer.assignment()
                if tp not in self._revoked and tp not in self.unpositioned
            }
            count = len(self.consumer.partitions_for_topic(self.topic) or ())
            self.publisher.own(owned, count)


# --- where decoded records come from ---------------------------------------------------------


class _Feed(Protocol):
    """Decoded records for the projector: from this process's group member, or from
    decoder processes."""

    @property
    def dead_letters(self) -> int: ...

    def read(self, timeout_ms: int) -> list[Decoded]:
        """What was decoded since the last call, waiting up to `timeout_ms` for something."""
        ...

    def behind(self, handed: dict[str, int]) -> list[TopicPartition]:
        """The partitions with records to read that were not handed over yet."""
        ...

    def shared(self) -> bool:
        """Whether others read some of the topic's partitions (members of its group)."""
        ...

    @property
    def topic(self) -> str: ...

    def ends(self) -> Future[dict[TopicPartition, int] | None]:
        """Each partition's end as the broker reports it when asked now (not as an earlier
        fetch found it), without waiting for the answer (None: the broker cannot say)."""
        ...

    def watermark(self) -> Future[Watermark | None]:
        """The relay's latest watermark, without waiting for the answer (None: none known)."""
        ...

    def read_to(self, ends: dict[TopicPartition, int], handed: dict[str, int]) -> bool:
        """Whether every partition it reads was handed over up to exactly `ends`."""
        ...

    def applied(self, offsets: dict[TopicPartition, int]) -> None:
        """The projections committed these next offsets."""
        ...

    def close(self) -> None: ...


UNASSIGNED_SAY_AFTER_SECONDS = 60.0
"""How long a group member waits for partitions before saying so: longer than a join
waits for members that died without leaving (`max_poll_interval_ms`, 30 s)."""


class _Lasting:
    """A state of a group member someone watching it should hear of: said once it has
    lasted `say_after` seconds, again every `say_again_every`, and when it ends (if it
    was said). Messages take the seconds it has lasted as `{seconds}`."""

    def __init__(self, lasting: str, over: str, say_after: float, say_again_every: float = 60.0):
        self._lasting, self._over = lasting, over
        self._say_after, self._say_again_every = say_after, say_again_every
        self._since: float | None = None
        self._said_at: float | None = None

    def observe(self, holds: bool) -> None:
        now = time.monotonic()
        if not holds:
            if self._said_at is not None and self._since is not None:
                log.warning(self._over.format(seconds=f"{now - self._since:.0f}"))
            self._since = self._said_at = None
            return
        if self._since is None:
            self._since = now
        due = self._say_after if self._said_at is None else self._say_again_every
        if now - (self._said_at or self._since) >= due:
            self._said_at = now
            log.warning(self._lasting.format(seconds=f"{now - self._since:.0f}"))


def _disconnected(kafka_consumer: KafkaConsumer) -> bool:
    """Whether the consumer has no connection to any broker (kafka-python reconnects by
    itself, without a word: a member waiting for a broker looks like one with nothing
    to read)."""
    metrics = kafka_consumer.metrics().get("consumer-metrics", {})
    return bool(metrics.get("connection-count", 1) == 0)


def _in_background(function: Callable[[], T]) -> Future[T]:
    """`function` on a daemon thread of its own (one that hangs does not hold the exit)."""
    done: Future[T] = Future()

    def run() -> None:
        try:
            done.set_result(function())
        except BaseException as error:  # handed to whoever looks at the future
            done.set_exception(error)

    threading.Thread(target=run, name="ask", daemon=True).start()
    return done


class _GroupMember:
    """A consumer group member polling and decoding on the calling thread (following the
    topic: records arrive a few at a time, and the group moves partitions around).

    It never stops polling, which would make the group drop it after
    `max_poll_interval_ms`. Instead of waiting for the projector thread (which may wait
    for the file while a reader holds it), it pauses partitions: all of them while a full
    batch waits, and those newly assigned until their stored offsets are read."""

    def __init__(
        self,
        kafka_consumer: KafkaConsumer,
        dead_letters: DeadLetters,
        projector: _ProjectorThread,
        listener: _SeekToStoredOffsets,
        settings: KafkaSettings,
    ) -> None:
        self.consumer = kafka_consumer
        self._settings = settings
        self._said_no_watermarks = False  # the watermarks topic missing (an older deployment)
        self._dead_letters = dead_letters
        self._projector = projector
        self._listener = listener
        self._disconnected = _Lasting(
            "no connection to the broker for {seconds} s; kafka-python keeps reconnecting, "
            "and the projections stay as they are until it answers",
            "the broker answers again after {seconds} s; following on",
            say_after=SAY_UNREACHABLE_AFTER_SECONDS,
        )
        self._unassigned = _Lasting(
            "no partition assigned to this member for {seconds} s: the group has more "
            "members than the topic has partitions, or waits for members that left without "
            "a word; the dev broker (Tansu) assigns nothing again to a group whose members "
            "all left at the same moment: restart it (README, Kafka)",
            "partitions assigned after {seconds} s",
            say_after=UNASSIGNED_SAY_AFTER_SECONDS,
            say_again_every=600.0,
        )

    @property
    def dead_letters(self) -> int:
        return self._dead_letters.count

    def read(self, timeout_ms: int) -> list[Decoded]:
        self._listener.seek_assigned()
        assigned = self.consumer.assignment()
        held = assigned if self._projector.full() else assigned & self._listener.unpositioned
        paused = self.consumer.paused()
        if held != paused:
            self.consumer.resume(*(paused - held))
            self.consumer.pause(*(held - paused))
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        self._disconnected.observe(not polled and _disconnected(self.consumer))
        self._unassigned.observe(not self.consumer.assignment())
        self._read_again_where_lost()
        return [decode_polled(polled, self._dead_letters)] if polled else []

    def _read_again_where_lost(self) -> None:
        """Partitions positioned beyond their end, as the last fetch reported it: the topic
        lost data (a broker that restarted empty) and holds its republished events at lower
        offsets. They are read again from their beginning, as a one-shot consume does
        (`_within`); events projected before are recognised by id. Apache Kafka answers a
        fetch there with OFFSET_OUT_OF_RANGE, which kafka-python's reset handles; Tansu
        answers with no records, and the member waited there for good, skipping every new
        event."""
        handed = self._listener.handed  # where each partition's records were handed up to
        for tp in self.consumer.assignment() - self._listener.unpositioned:
            end = self.consumer.highwater(tp)
            at = handed.get(stream(tp))
            if end is not None and at is not None and at > end:
                log.warning(
                    "partition %s ends at %s, before this member's offset %s (the topic lost "
                    "data and was republished?): reading it again from its beginning",
                    stream(tp), f"{end:,}", f"{at:,}",
                )  # fmt: skip
                self.consumer.seek_to_beginning(tp)
                handed[stream(tp)] = 0  # behind until read again

    def shared(self) -> bool:
        """Unknown partitions (metadata missing for a moment) count as shared."""
        topic_partitions = self.consumer.partitions_for_topic(self._listener.topic)
        return not topic_partitions or len(self.consumer.assignment()) < len(topic_partitions)

    @property
    def topic(self) -> str:
        return self._listener.topic

    def ends(self) -> Future[dict[TopicPartition, int] | None]:
        """Asked by a probe of its own, on a thread of its own: the poll loop goes on
        meanwhile (a broker slow to answer would hold the group's rebalances). Not asked
        when the member has no connection, where the probe would wait for one."""
        if _disconnected(self.consumer):
            return resolved(None)
        return _in_background(self._ask_ends)

    def watermark(self) -> Future[Watermark | None]:
        """Read as the ends are (`ends`)."""
        if _disconnected(self.consumer):
            return resolved(None)
        return _in_background(self._ask_watermark)

    def _ask_watermark(self) -> Watermark | None:
        try:
            return watermarks.latest(self._settings, fetch_max_wait_ms=50, **watched())
        except TopicMissing as missing:
            if not self._said_no_watermarks:
                log.warning("%s: the as-of clock moves with the events only", missing)
                self._said_no_watermarks = True
        except KafkaError as error:
            log.info("the relay's latest watermark is not known now: %s", error)
        return None

    def _ask_ends(self) -> dict[TopicPartition, int] | None:
        try:  # the broker need not hold the probe's fetch for records to come
            return high_watermarks(
                self._settings, self.topic, wait_seconds=5.0, fetch_max_wait_ms=50, **watched()
            )
        except (KafkaError, TopicMissing) as error:
            log.info("the partitions' ends are not known now: %s", error)
            return None

    def read_to(self, ends: dict[TopicPartition, int], handed: dict[str, int]) -> bool:
        """Exactly to the ends: beyond one, the topic lost data (`_read_again_where_lost`)."""
        assigned = self.consumer.assignment()
        return (
            bool(assigned)
            and not self._listener.unpositioned
            and all(tp in ends and handed.get(stream(tp)) == ends[tp] for tp in assigned)
        )

    def behind(self, handed: dict[str, int]) -> list[TopicPartition]:
        """The assigned partitions where the broker had more when it last answered a fetch
        (or has not answered yet)."""
        ends = {tp: self.consumer.highwater(tp) for tp in self.consumer.assignment()}
        return [tp for tp, end in ends.items() if end is None or handed.get(stream(tp), 0) < end]

    def applied(self, offsets: dict[TopicPartition, int]) -> None:
        """Tell the group too, for lag tooling (the projections keep the real offsets): not
        worth failing for when the group is rebalancing meanwhile (its next commit says)."""
        assigned = self.consumer.assignment()
        try:
            self.consumer.commit(
                {tp: OffsetAndMetadata(o, None, -1) for tp, o in offsets.items() if tp in assigned}
            )
        except REBALANCING as error:
            log.info("group offsets not committed during a rebalance: %s", error)

    def close(self) -> None:
        self._dead_letters.close()
        self.consumer.close(autocommit=False)


# --- consuming -------------------------------------------------------------------------------


def consume(
    projections_path: Path,
    settings: KafkaSettings,
    group: str | None = None,
    *,
    follow: bool = False,
    poll_ms: int = 500,
    max_records: int = 50_000,
    decoders: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: BatchCallback | None = None,
    realert: bool = False,
    as_of: AsOf | None = None,
) -> ConsumeReport:
    """Project the events topic into DuckDB; offsets live in DuckDB under `group`.

    With `follow` it joins the consumer group `group`, so several consumers can share the
    partitions, and keeps going. Without it, it is a one-shot catch-up: `decoders` processes
    (default: `decoder_count`) read every partition directly (no group join, so no
    waiting for members that died without leaving) from the stored offsets up to the high
    watermarks at the start, then it stops. A batch holds at most about `max_records`
    records. The derived events are published by `settings.group` alone
    (`publishes_derived`).

    With `as_of`, the as-of clock follows the relay's watermarks (`consumers.watermarks`),
    no further than `as_of`: a catch-up reads the latest one before the ends it reads to,
    and moves the clock there at the end; a follower, whenever it is idle
    (`IDLE_PUBLISH_SECONDS`). `report.watermark` says what the last one vouched for.
    """
    group = group or settings.group
    source = source_name(group)
    report = ConsumeReport(publishing=publishes_derived(settings, group))
    if report.publishing and not realert and not projections_path.exists():
        _refuse_to_realert(projections_path, settings)
    publisher = (
        DerivedPublisher(settings, retry=follow, should_stop=should_stop)
        if report.publishing
        else None
    )
    decoders = None if follow else decoders or decoder_count(settings)
    poll_records = min(max_records, POLL_RECORDS)
    writer = (
        ProjectionWriter(projections_path, wait_seconds=None)  # outlasts a reader's session
        if decoders is None
        else ProjectionWriter(
            projections_path,
            hold_seconds=CATCH_UP_HOLD_SECONDS,
            threads=_projector_threads(decoders),
        )
    )
    projector = _ProjectorThread(writer, source, max_waiting=max_records, publisher=publisher)
    feed: _Feed | None = None
    latest: dict[TopicPartition, datetime] = {}  # business time handed over, per partition
    projector.start()
    handed: dict[str, int] = {}  # the next offset to hand over, per stream
    watermark: Watermark | None = None  # a catch-up's, read before its ends
    try:
        if decoders is None:
            # The file is not needed to join: the stored offsets of the partitions
            # assigned are read then (a reader may be holding it meanwhile).
            kafka_consumer = _joining(settings, group, poll_records, should_stop)
            if kafka_consumer is None:
                return report  # stopped while the broker was unreachable
            if not kafka_consumer.partitions_for_topic(settings.topic):
                kafka_consumer.close()
                raise missing_topic(settings, settings.topic)
            listener = _SeekToStoredOffsets(
                kafka_consumer, projector, source, handed, latest, publisher, settings.topic
            )
            feed = _GroupMember(
                kafka_consumer,
                DeadLetters(
                    settings, retry=True, should_stop=should_stop, only_count=publisher is None
                ),
                projector,
                listener,
                settings,
            )
            if publisher is not None:
                publisher.own((), 0)  # nobody's derived events until partitions are assigned
            kafka_consumer.subscribe([settings.topic], listener=listener)
            publishing = f"; publishing derived events to {settings.derived_topic}"
            log.info(
                "following %s on %s as group %s%s", settings.topic, settings.bootstrap, group,
                "" if publisher is None else publishing,
            )  # fmt: skip
            targets = None
        else:
            feed = Decoders(settings, decoders, poll_records)
            # read before the ends: once read to them, every event it vouches for is in
            if as_of is not None:
                watermark = _latest_watermark(settings)
            targets = high_watermarks(settings, settings.topic, **watched())
            if watermark is not None and not watermarks.held(watermark, targets):
                log.warning(
                    "the events topic ends before what the relay's latest watermark vouches "
                    "for (it lost data since: republish it, `ledger relay --republish`): the "
                    "as-of clock moves with the events only"
                )
                watermark = None
            # made (or opened) while the decoder processes start, once the topic is known
            stored = projector.call(lambda writer: writer.projector().checkpoints(source))
            kept = _within(stored, targets)
            if len(kept) < len(stored):  # stored at once, in case nothing is read there now
                again = {(source, stream): 0 for stream in stored.keys() - kept.keys()}
                projector.call(lambda writer: writer.projector().apply([], again))
            handed.update(kept)
            feed.assign(
                {tp: (handed.get(stream(tp)), end) for tp, end in targets.items()},
                only_count=not report.publishing,
            )
        _project(
            feed,
            projector,
            report,
            handed=handed,
            latest=latest,
            targets=targets,
            poll_ms=poll_ms,
            release_when_idle=True,
            should_stop=should_stop,
            on_batch=on_batch,
            as_of=as_of if decoders is None else None,
        )
        if targets is not None and as_of is not None and not unread(targets, handed):
            report.watermark = None if watermark is None else watermark.complete_until
            clock = watermarks.clock_target(watermark, as_of)
            if clock is not None:
                report.clock = projector.call(_clock_mover(clock)).as_of
                report.derived += projector.publish_all(None).result()
    finally:
        if publisher is not None:
            publisher.finishing()
        projector.stop()
        if publisher is not None:
            publisher.close()
        if feed is not None:
            feed.close()
    return report


class WouldRealert(RuntimeError):
    """A new projections file would publish every derived event the topic already holds."""


def _refuse_to_realert(projections_path: Path, settings: KafkaSettings) -> None:
    """Raise `WouldRealert` when the derived topic holds records: the publishing group's
    file is new (a mistyped or lost data dir), and it would send every derived event of
    the history again. An unreachable broker or a missing topic says nothing here."""
    try:
        held = sum(high_watermarks(settings, settings.derived_topic, **watched()).values())
    except (KafkaError, TopicMissing):
        return
    if held:
        raise WouldRealert(
            f"the derived topic {settings.derived_topic} holds {held:,} records, but there "
            f"are no projections at {projections_path} yet: from a new file (a mistyped or "
            f"lost --data-dir / LEDGER_DATA_DIR?) group {settings.group} would publish every "
            "derived event of the history again. Point the data dir at the group's "
            "projections, or run `ledger consume --realert` to publish them all again"
        )


def _within(stored: dict[str, int], ends: dict[TopicPartition, int]) -> dict[str, int]:
    """The stored offsets, less those beyond their partition's end: the topic lost data
    and was republished (`ledger relay --republish`), so what it holds now sits at lower
    offsets. Those partitions are read again from their beginning, as a group member's
    are (kafka-python resets an offset out of range to the earliest): events projected
    before are recognised by id, the new ones are not skipped."""
    kept = dict(stored)
    for tp, end in ends.items():
        offset = kept.get(stream(tp))
        if offset is not None and offset > end:
            log.warning(
                "partition %s ends at %s, before the projections' offset %s (the topic lost "
                "data and was republished?): reading it again from its beginning",
                stream(tp), f"{end:,}", f"{offset:,}",
            )  # fmt: skip
            del kept[stream(tp)]
    return kept


def _joining(
    settings: KafkaSettings,
    group: str,
    poll_records: int,
    should_stop: Callable[[], bool],
    max_backoff_seconds: float = 30.0,
) -> KafkaConsumer | None:
    """A group member's consumer. A follower outlasts a broker that cannot be reached at
    its start, as the relay does: it says so and retries with backoff (once connected,
    kafka-python reconnects by itself). None: stopped meanwhile."""
    backoff = Backoff(should_stop, most=max_backoff_seconds)
    while not should_stop():
        try:
            return consumer(settings, group_id=group, max_poll_records=poll_records, **watched())
        except KafkaError as error:
            log.warning("broker unavailable (%s); retrying in %.1fs", error, backoff.seconds)
        backoff.wait()
    return None


def _projector_threads(decoders: int) -> int:
    """DuckDB's threads beside `decoders` busy processes: the cores they leave (at least
    one); more only contend with them for the same cores."""
    return max(1, (os.cpu_count() or 1) - decoders)


@dataclass(frozen=True)
class _Vouched:
    """What a quiet check found the member may do: move the clock to `clock`, and publish
    its customers' transitions up to `publish_until` (when `publish`; None: all)."""

    clock: datetime | None
    publish: bool
    publish_until: datetime | None


class _QuietCheck:
    """A group member's check, while its partitions stay quiet, for what it may do without
    new records (see `_project`): publish its customers' transitions that the other
    members' records revealed (a publishing member sharing the topic), and move the clock
    with the relay's watermarks (when asked to follow it: `as_of`). It reads how far the
    topic is known complete (from the file, on the projector thread; for the first) and
    the relay's latest watermark (for both), then asks the broker for the partitions'
    ends: each step starts once the one before is done, on a thread of its own, so the
    poll loop never waits for any."""

    def __init__(self, every_seconds: float, as_of: AsOf | None = None) -> None:
        self.every_seconds = every_seconds
        self.as_of = as_of
        self._asked: Future[Any] | None = None
        self._asking = ""  # what `_asked` will answer: "bound", "watermark" or "ends"
        self._bound: datetime | None = None
        self._watermark: Watermark | None = None
        self._published: datetime | None = None  # the bound last published up to
        self._clock: datetime | None = None  # the clock last moved to
        self._due = time.monotonic() + every_seconds

    def wanted(self, shared_publisher: bool) -> bool:
        """Whether a quiet member has anything to check for."""
        return shared_publisher or self.as_of is not None

    def newly_owned(self) -> None:
        """New partitions: what was published up to the last bound was not their
        customers', so the same bound is worth publishing up to again."""
        self._published = None

    def step(
        self,
        quiet: bool,
        shared_publisher: bool,
        projector: _ProjectorThread,
        feed: _Feed,
        handed: dict[str, int],
    ) -> _Vouched | None:
        """Move the check on; what the member may do now, if anything."""
        if self._asked is None:
            if quiet and time.monotonic() >= self._due:
                self._bound = self._watermark = None
                if shared_publisher:
                    topic = feed.topic
                    self._ask("bound", projector.submit(lambda writer: writer.relayed_until(topic)))
                else:
                    self._ask("watermark", feed.watermark())
            return None
        if not self._asked.done():
            return None
        answer, asking, self._asked = self._asked.result(), self._asking, None
        if asking == "bound":
            self._bound = answer
            self._ask("watermark", feed.watermark())
        elif asking == "watermark":
            self._watermark = answer
            if self._news(shared_publisher) == (None, None):
                self._due = time.monotonic() + self.every_seconds  # nothing new to do
            else:
                self._ask("ends", feed.ends())  # asked only now, after the watermark was read
        else:
            self._due = time.monotonic() + self.every_seconds
            mark = self._watermark
            if mark is not None and answer is not None and not watermarks.held(mark, answer):
                log.info("the events topic ends before the relay's watermark: ignored")
                self._watermark = None
            if quiet and answer is not None and feed.read_to(answer, handed):
                return self._vouched(shared_publisher)
        return None

    def _ask(self, what: str, asked: Future[Any]) -> None:
        self._asking, self._asked = what, asked

    def _news(self, shared_publisher: bool) -> tuple[datetime | None, datetime | None]:
        """What the bound and the watermark read would let it do, once read to the ends:
        the clock to move to, and (sharing the topic, publishing) the business time to
        publish up to; None for what was done already."""
        vouched = None if self._watermark is None else watermarks.vouched_until(self._watermark)
        clock = None
        if vouched is not None and self.as_of is not None:
            clock = watermarks.clock_for(vouched, self.as_of)
            if self._clock is not None and clock <= self._clock:
                clock = None
        if not shared_publisher:
            return clock, None
        bound = max((t for t in (self._bound, vouched, clock) if t is not None), default=None)
        if bound is not None and self._published is not None and bound <= self._published:
            bound = None
        return clock, bound

    def _vouched(self, shared_publisher: bool) -> _Vouched | None:
        """Read to the ends asked after the bound and the watermark: every event of its
        customers up to either is in."""
        clock, bound = self._news(shared_publisher)
        if clock is not None:
            self._clock = clock
        if bound is not None:
            self._published = bound
        if not shared_publisher:  # its partitions are all there are: all that holds goes out
            return _Vouched(clock, True, None) if clock is not None else None
        if bound is None:
            return _Vouched(clock, False, None) if clock is not None else None
        return _Vouched(clock, True, bound)


def _latest_watermark(settings: KafkaSettings) -> Watermark | None:
    """The relay's latest watermark; None, said, when the watermarks topic is missing."""
    try:
        return watermarks.latest(settings, **watched())
    except TopicMissing as missing:
        log.warning("%s: the as-of clock moves with the events only", missing)
    except KafkaError as error:
        log.warning("the relay's latest watermark not read (%s): the as-of clock moves with "
                    "the events only", error)  # fmt: skip
    return None


def _clock_mover(clock: datetime) -> Callable[[ProjectionWriter], BatchResult]:
    """Moves the projections' as-of clock to `clock` (never back), on the projector thread:
    the SLA states and derived events it reveals are written with it."""
    return lambda writer: writer.projector().apply([], {}, clock)


def _project(
    feed: _Feed,
    projector: _ProjectorThread,
    report: ConsumeReport,
    *,
    handed: dict[str, int],
    latest: dict[TopicPartition, datetime] | None = None,
    targets: dict[TopicPartition, int] | None,
    poll_ms: int,
    release_when_idle: bool,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: BatchCallback | None = None,
    idle_publish_seconds: float = IDLE_PUBLISH_SECONDS,
    as_of: AsOf | None = None,
) -> None:
    """Hand what the feed decodes to the projector thread and report the batches it
    committed, until `should_stop` or (with `targets`) every partition was read to its
    target; returns when everything read is applied. `handed` holds, per stream, the next
    offset to hand over (kept up to date here, and by the listener on assignments);
    `latest` the business time handed over per partition (the listener drops revoked
    partitions' times).

    A member sharing the topic publishes no further than its own partitions were read
    (`publish_until`). While they stay quiet, the transitions of its customers that the
    others' records reveal (a deadline the file's clock has passed) would wait for its
    next record, for as long as that takes. So every `idle_publish_seconds` while it is
    idle, a publishing member reads from the file how far the topic is known to be
    complete (`relayed_until`: the latest business time among the events up to the
    highest `ce_ledgerrelayed` applied) and the relay's latest watermark (which covers
    the relay's last batch before a lull too), then asks the broker for its partitions'
    ends. Read exactly to them, it has read every event of its customers up to the later
    of the two, and events recorded later happened later: its customers' transitions
    before that time go out. (The file's own clock will not do: a record of another
    partition can reach the broker before an earlier one of this member's, sent in the
    same batch.)

    With `as_of` (following the clock), every member checks so while idle, and once read
    exactly to the ends, moves the clock to the watermark (no further than `as_of`), then
    publishes what that reveals (`consumers.watermarks`)."""

    start, committed = dict(handed), dict(handed)  # a catch-up's progress
    latest = {} if latest is None else latest
    # Derived events may wait unpublished: held back while partitions were behind, or left
    # by an earlier run that ended between a commit and the broker's acknowledgement.
    withheld = True
    # Work on the file asked for between batches. Not waited for: the file may be held by
    # a reader, and a group member that stopped polling meanwhile would be dropped.
    publishing: Future[int] | None = None
    releasing: Future[None] | None = None
    moving: Future[BatchResult] | None = None  # the clock, with a watermark
    quiet_check = _QuietCheck(idle_publish_seconds, as_of)
    if targets is not None:
        report.to_read = sum(max(0, end - start.get(stream(tp), 0)) for tp, end in targets.items())

    def report_applied(applied: list[_Applied]) -> None:
        for batch in applied:
            report.events += batch.events
            report.batches += 1
            report.derived += batch.derived
            if targets is not None:
                committed.update({stream(tp): o for tp, o in batch.offsets.items()})
                report.records = sum(o - start.get(s, 0) for s, o in committed.items())
            if on_batch:
                on_batch(batch.result, report)
        if applied:
            feed.applied({tp: o for batch in applied for tp, o in batch.offsets.items()})

    while not should_stop():
        report_applied(projector.applied())
        if targets is not None and not unread(targets, handed):
            break
        found = feed.read(poll_ms)
        report.dead_letters = feed.dead_letters
        if publishing is not None and publishing.done():
            report.derived += publishing.result()
            publishing = None
        if releasing is not None and releasing.done():
            releasing.result()  # raises what failed
            releasing = None
        if moving is not None and moving.done():
            moving.result()  # raises what failed
            moving = None
        if not found:
            projector.nothing_more_to_come()
            if projector.newly_owned():
                withheld = True
                quiet_check.newly_owned()
            idle = projector.idle()
            if withheld and idle and publishing is None and not feed.behind(handed):
                publishing = projector.publish_all(publish_until(latest, (), shared=feed.shared()))
                withheld = idle = False
            shared_publisher = projector.publishes() and feed.shared()
            quiet = (
                not projector.applying()
                and publishing is None
                and moving is None
                and quiet_check.wanted(shared_publisher)
            )
            vouched = quiet_check.step(quiet, shared_publisher, projector, feed, handed)
            if vouched is not None:
                if vouched.clock is not None:
                    moving = projector.submit(_clock_mover(vouched.clock))
                if vouched.publish:
                    publishing = projector.publish_all(vouched.publish_until)
                idle = False
            if release_when_idle and idle and releasing is None:
                releasing = projector.submit(ProjectionWriter.release)
            continue
        for decoded in found:
            handed.update({stream(tp): o for tp, o in decoded.offsets.items()})
            keep_latest(latest, decoded.latest)
            behind = feed.behind(handed)
            until = publish_until(latest, behind, shared=feed.shared())
            withheld = withheld or until is not None
            projector.hand_over(decoded, more_to_come=bool(behind), publish_until=until)
    report_applied(projector.drain())
    if publishing is not None:
        report.derived += publishing.result()
    if withheld and not feed.behind(handed):
        until = publish_until(latest, (), shared=feed.shared())
        report.derived += projector.publish_all(until).result()


def rebuild_from_kafka(
    projections_path: Path,
    settings: KafkaSettings,
    group: str | None = None,
    *,
    realert: bool = False,
    max_records: int = 50_000,
    on_batch: BatchCallback | None = None,
) -> int:
    """Project the whole topic from offset 0 into a new file, then swap it in atomically
    (see `projections.rebuild`). The new file holds the group's offsets at the topic's
    end, so `consume` continues from there. Nothing is sent again unless `realert`: neither
    the derived events the live file published nor the dead letters of the records the
    live file's consumer read (it had them acknowledged before it committed past them)."""
    source = source_name(group or settings.group)
    dead_letters_sent_below = {} if realert else _stored_offsets(projections_path, source)
    report = ConsumeReport()
    with rebuilding(projections_path, realert=realert) as staging:
        count = decoder_count(settings)
        # they start while the file is made
        decoders = Decoders(settings, count, min(max_records, POLL_RECORDS))
        projector = _ProjectorThread(
            ProjectionWriter(staging, bulk=True, threads=_projector_threads(count)),
            source,
            max_waiting=max_records,
        )
        try:
            projector.start()
            ends = high_watermarks(settings, settings.topic, **watched())
            projector.call(
                lambda writer: writer.projector().apply(
                    [], {(source, stream(tp)): 0 for tp in ends}
                )
            )
            decoders.assign(
                {tp: (None, end) for tp, end in ends.items()},
                dead_letters_sent_below,
                only_count=not publishes_derived(settings, group or settings.group),  # a copy
            )
            _project(decoders, projector, report, handed={}, targets=ends, poll_ms=1000,
                     release_when_idle=False, on_batch=on_batch)  # fmt: skip
        finally:
            projector.stop()
            decoders.close()
    return report.events


def derived_waiting(projections_path: Path) -> int:
    """How many derived events (withdrawals included) the projections hold that the broker
    has not acknowledged: a rebuild leaves them to the group's next `consume` (or its
    running follower), which publishes as part of its batches."""
    con = connect(projections_path, read_only=True)
    try:
        held, published, _, withdrawals = derived.publication(con)
    finally:
        con.close()
    return held - published + withdrawals


def _stored_offsets(projections_path: Path, source: str) -> dict[str, int]:
    """The offsets `source` committed in a projections file, per stream (none: no file)."""
    if not projections_path.exists():
        return {}
    con = connect(projections_path, read_only=True)
    try:
        return {stream: offset for s, stream, offset in stored_checkpoints(con) if s == source}
    finally:
        con.close()
