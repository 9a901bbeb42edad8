"""The Kafka side of the consumer groups: polled records decoded (validated) into facts for
the projector, the dead-letter topic for those that cannot be, and decoder processes that
do this work in parallel during a catch-up.

kafka-python parses records and their nine CloudEvents headers in pure Python, and each
record is validated with pydantic; in one process that holds the GIL most of the time and
leaves the projector little. For a catch-up of known ranges (one-shot `consume`, a rebuild
from Kafka), `Decoders` starts decoder processes (`python -m consumers.kafka_decoding`),
each reading its share of the partitions directly (assigned, no group) and sending back
what `decode_polled` makes of each poll. Decoders keep no offsets: what they read and the
projections did not commit is read again by the next consumer, so a decoder or its parent
may die at any instant.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, TypeVar

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaTimeoutError

from consumers import cloudevents
from consumers.cloudevents import Watermark
from consumers.kafka import KafkaSettings, ReliableSender, consumer, high_watermarks, watched

log = logging.getLogger(__name__)

T = TypeVar("T")

DLQ_HEADERS = (
    "dlq_original_topic",
    "dlq_original_partition",
    "dlq_original_offset",
    "dlq_error_class",
    "dlq_error_message",
)

STALLED_SECONDS = 15.0
"""How long a decoder polls without getting anything before it asks whether the broker is
still there (an unreachable one fails the catch-up instead of stalling it for ever)."""

POLL_RECORDS = 5_000
"""Records per poll: decoded records reach the projector soon after they arrive, and few
undecoded ones are alive at once (what waits for the projector merges anyway)."""


def stream(tp: TopicPartition) -> str:
    """A partition's name in the projections' checkpoints."""
    return f"{tp.topic}:{tp.partition}"


def unread(
    targets: Mapping[TopicPartition, int], handed: Mapping[str, int]
) -> list[TopicPartition]:
    """The partitions not handed over up to their target offsets."""
    return [tp for tp, end in targets.items() if handed.get(stream(tp), 0) < end]


def resolved(value: T) -> Future[T]:
    """An answer known without asking, in the shape of one asked for (`_Feed.ends`)."""
    done: Future[T] = Future()
    done.set_result(value)
    return done


def keep_latest(
    latest: dict[TopicPartition, datetime], more: Mapping[TopicPartition, datetime]
) -> None:
    """Per partition, the later of two business times."""
    for tp, moment in more.items():
        latest[tp] = max(moment, latest.get(tp, moment))


@dataclass
class Decoded:
    """Decoded records on their way to the projector: per partition, the facts in offset
    order, the next offset to read (past its dead letters too) and the latest business
    time among them; and the highest `ce_ledgerrelayed` among them (0: none)."""

    facts: dict[TopicPartition, list[tuple[int, bytes]]] = field(default_factory=dict)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    latest: dict[TopicPartition, datetime] = field(default_factory=dict)
    records: int = 0  # polled records, dead letters included
    relayed: int = 0  # every event up to this store position was on the topic (see below)

    def merge(self, later: Decoded) -> None:
        for tp, facts in later.facts.items():
            self.facts.setdefault(tp, []).extend(facts)
        self.offsets.update(later.offsets)
        keep_latest(self.latest, later.latest)
        self.records += later.records
        self.relayed = max(self.relayed, later.relayed)

    def without(self, partitions: Collection[TopicPartition]) -> Decoded:
        kept = Decoded(relayed=self.relayed)  # true whoever reads those records next
        for tp, offset in self.offsets.items():
            if tp not in partitions:
                kept.facts[tp] = self.facts.get(tp, [])
                kept.offsets[tp] = offset
                if tp in self.latest:
                    kept.latest[tp] = self.latest[tp]
                kept.records += len(kept.facts[tp])  # near enough for the hand-over limit
        return kept

    def batch(self) -> list[tuple[int, bytes]]:
        return [fact for facts in self.facts.values() for fact in facts]


def decode_polled(polled: Mapping[TopicPartition, list[Any]], dead_letters: DeadLetters) -> Decoded:
    """Validate polled records; those that cannot be decoded go to the dead letters, which
    the broker has acknowledged when this returns."""
    decoded = Decoded()
    decode = cloudevents.decode
    for tp, records in polled.items():
        facts: list[tuple[int, bytes]] = []
        latest: datetime | None = None
        for record in records:
            try:
                fact = decode(record.headers, record.value)
            except cloudevents.UndecodableRecord as error:
                dead_letters.send(record, error)
                continue
            facts.append((fact.position, fact.value))
            if latest is None or fact.occurred_at > latest:
                latest = fact.occurred_at
            if fact.relayed is not None and fact.relayed > decoded.relayed:
                decoded.relayed = fact.relayed
        decoded.facts[tp] = facts
        if latest is not None:
            decoded.latest[tp] = latest
        decoded.offsets[tp] = records[-1].offset + 1
        decoded.records += len(records)
    dead_letters.flush()
    return decoded


class DeadLetters:
    """The dead-letter topic: each record that cannot be decoded, with headers naming where
    it came from and why.

    `sent_below` holds, per stream, an offset below which the dead letters were sent
    already (by the consumer that built the live projections, when this reads the topic
    again to rebuild them): those are counted, not sent again. With `only_count` none is
    sent (a copy's group: the ledger's own group sends them). With `retry` (a follower),
    dead letters the broker did not acknowledge (unreachable, or restarted: it no longer
    knows the idempotent producer's sequence numbers) are sent again with a new
    producer, with backoff, until it does."""

    def __init__(
        self,
        settings: KafkaSettings,
        sent_below: Mapping[str, int] | None = None,
        *,
        retry: bool = False,
        should_stop: Callable[[], bool] = lambda: False,
        only_count: bool = False,
    ) -> None:
        self.settings = settings
        self.sent_below = dict(sent_below or {})
        self.only_count = only_count
        self.count = 0
        self._sender = ReliableSender(
            settings, settings.dlq_topic, "dead letters", retry=retry, should_stop=should_stop
        )
        self._pending: list[dict[str, Any]] = []

    def send(self, record: Any, error: Exception) -> None:
        """Keep a dead letter for the next `flush`."""
        self.count += 1
        origin = stream(TopicPartition(record.topic, record.partition))
        if self.only_count or record.offset < self.sent_below.get(origin, 0):
            return
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
        self._pending.append({"key": record.key, "value": record.value, "headers": headers})

    def flush(self) -> None:
        """Send the dead letters kept and wait until the broker has every one; raises if
        one was not delivered (a follower sends them again until the broker takes them,
        and raises when stopped meanwhile: the records behind them are not committed)."""
        pending, self._pending = self._pending, []
        if len(self._sender.send(pending)) < len(pending):
            raise KafkaTimeoutError(
                "dead letters not acknowledged before the stop; the records behind them "
                "are read again by the next run"
            )

    def close(self) -> None:
        self._sender.close()


def list_dead_letters(settings: KafkaSettings, limit: int = 100) -> list[dict[str, Any]]:
    """The dead-letter topic's records, oldest first, with their provenance headers."""
    reader: KafkaConsumer = consumer(settings, group_id=None, consumer_timeout_ms=2000, **watched())
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


def seek(
    kafka_consumer: KafkaConsumer, partitions: Collection[TopicPartition], stored: dict[str, int]
) -> None:
    """Position each partition at its stored offset, or at its beginning."""
    for tp in partitions:
        offset = stored.get(stream(tp))
        if offset is None:
            kafka_consumer.seek_to_beginning(tp)
        else:
            kafka_consumer.seek(tp, offset)


# --- decoder processes ---------------------------------------------------------------------

Ranges = dict[TopicPartition, tuple[int | None, int]]
"""Per partition, the first offset to read (None: the beginning) and the end to read to."""


def decoder_count(settings: KafkaSettings) -> int:
    """Decoder processes for a catch-up: `settings.decoders`, or one per core (the
    projector's DuckDB work releases the GIL and fits beside them), at most one per
    partition of the topic as configured."""
    wanted = settings.decoders or os.cpu_count() or 1
    return max(1, min(wanted, settings.partitions))


class DecoderFailed(RuntimeError):
    """A decoder process failed or ended unexpectedly; what the projections committed
    stands, and running the same catch-up again continues from there."""


class Decoders:
    """Decoder processes for a catch-up of known ranges; `read` gathers what they decoded.

    Each is a fresh interpreter (`python -m consumers.kafka_decoding`), not a fork of this
    process, which has threads and an open DuckDB file, and talks to it through a socket
    pair. The processes start and connect to the broker at once; `assign` gives them
    their partitions.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        count: int,
        poll_records: int,
        stalled_seconds: float = STALLED_SECONDS,
    ) -> None:
        self._processes: list[subprocess.Popen[bytes]] = []
        self._connections: list[Connection] = []
        try:
            for number in range(count):
                ours, theirs = Pipe()
                self._processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "consumers.kafka_decoding", str(theirs.fileno())],
                        pass_fds=[theirs.fileno()],
                        env=_child_environment(),
                    )
                )
                theirs.close()
                self._connections.append(ours)
                try:
                    ours.send((asdict(settings), poll_records, stalled_seconds))
                except OSError:  # it died at once
                    raise self._ended(number) from None
        except BaseException:
            self.close()
            raise
        self._open: list[Connection] = []
        self._letters = dict.fromkeys(range(count), 0)
        self._targets: dict[TopicPartition, int] = {}
        self._topic = settings.topic

    def assign(
        self,
        ranges: Ranges,
        dead_letters_sent_below: Mapping[str, int] | None = None,
        *,
        only_count: bool = False,
    ) -> None:
        """Share the partitions out (round robin) and start reading. Dead letters below
        `dead_letters_sent_below` (per stream) were sent already, and with `only_count`
        none is sent: see `DeadLetters`."""
        shares: list[Ranges] = [{} for _ in self._connections]
        for n, tp in enumerate(sorted(ranges)):
            shares[n % len(shares)][tp] = ranges[tp]
        sent_below = dead_letters_sent_below or {}
        for number, (connection, share) in enumerate(zip(self._connections, shares, strict=True)):
            try:
                connection.send(
                    (
                        share,
                        {stream(tp): sent_below.get(stream(tp), 0) for tp in share},
                        only_count,
                    )
                )
            except OSError:
                raise self._ended(number) from None
        self._open = list(self._connections)
        self._targets = {tp: end for tp, (_, end) in ranges.items()}

    @property
    def dead_letters(self) -> int:
        return sum(self._letters.values())

    def read(self, timeout_ms: int) -> list[Decoded]:
        """What the decoders sent, waiting up to `timeout_ms` for something. A decoder that
        reports its share read is no reason to return early: nothing found means nothing
        more for now, and what waits for the projector would go as a batch of its own."""
        found: list[Decoded] = []
        deadline = time.monotonic() + timeout_ms / 1000
        while not found and self._open:
            ready = wait(self._open, max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for connection in ready:
                assert isinstance(connection, Connection)
                decoded = self._receive(connection)
                if decoded is not None:
                    found.append(decoded)
        return found

    def _receive(self, connection: Connection) -> Decoded | None:
        """One message of a decoder: what it decoded, or None when its share is read."""
        number = self._connections.index(connection)
        try:
            message = connection.recv()
        except (EOFError, ConnectionResetError):
            raise self._ended(number) from None
        if message is None:
            self._open.remove(connection)
            return None
        if isinstance(message, BaseException):
            raise DecoderFailed(
                f"decoder process {number} failed: {type(message).__name__}: {message}"
            ) from message
        decoded: Decoded
        decoded, self._letters[number] = message
        return decoded

    def _ended(self, number: int) -> DecoderFailed:
        try:
            code: int | None = self._processes[number].wait(5)
        except subprocess.TimeoutExpired:
            code = None
        return DecoderFailed(f"decoder process {number} ended unexpectedly (exit status {code})")

    def behind(self, handed: dict[str, int]) -> list[TopicPartition]:
        """The partitions not read to their ends."""
        return unread(self._targets, handed)

    def shared(self) -> bool:
        return False  # a catch-up reads every partition

    @property
    def topic(self) -> str:
        return self._topic

    def ends(self) -> Future[dict[TopicPartition, int] | None]:
        return resolved(dict(self._targets))  # asked for at its start: a catch-up's ends

    def watermark(self) -> Future[Watermark | None]:
        return resolved(None)  # a catch-up reads it before its ends (`kafka_projection.consume`)

    def read_to(self, ends: dict[TopicPartition, int], handed: dict[str, int]) -> bool:
        return all(handed.get(stream(tp)) == end for tp, end in ends.items())

    def applied(self, offsets: dict[TopicPartition, int]) -> None:
        pass  # no group to tell: the projections hold the offsets

    def close(self) -> None:
        """Stop the decoders: they hold nothing that counts (a decoder whose share is read,
        or that is still starting up when there was nothing to read, has no work left)."""
        for connection in self._connections:
            connection.close()
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _child_environment() -> dict[str, str]:
    """This process's environment, with this project's code first on the import path (the
    decoders run the same code as their parent, installed or not)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}


def _decode_ranges(
    settings: KafkaSettings, poll_records: int, stalled_seconds: float, connection: Connection
) -> None:
    """The decoder process: reads the ranges sent to it, sends what `decode_polled` makes
    of each poll (with its dead-letter count so far), then None. It stops when its parent
    is gone, and raises the broker's error when it cannot be reached."""
    parent = os.getppid()
    reader = consumer(settings, group_id=None, max_poll_records=poll_records)
    dead_letters: DeadLetters | None = None
    try:
        ranges: Ranges
        ranges, sent_below, only_count = connection.recv()
        dead_letters = DeadLetters(settings, sent_below, only_count=only_count)
        reader.assign(list(ranges))
        seek(reader, ranges, {stream(tp): s for tp, (s, _) in ranges.items() if s is not None})
        sent = {tp: start or 0 for tp, (start, _) in ranges.items()}
        progressed = time.monotonic()
        while any(sent[tp] < end for tp, (_, end) in ranges.items()):
            polled = reader.poll(timeout_ms=500)
            if polled:
                decoded = decode_polled(polled, dead_letters)
            else:  # a partition may end in offsets that hold no record
                positions = {tp: reader.position(tp) for tp in ranges}
                decoded = Decoded(
                    offsets={tp: p for tp, p in positions.items() if p is not None and p > sent[tp]}
                )
                if not decoded.offsets:
                    if os.getppid() != parent:
                        return  # killed: nobody will apply what it reads
                    if time.monotonic() - progressed > stalled_seconds:
                        high_watermarks(settings, settings.topic, **watched())  # raises
                        progressed = time.monotonic()
                    continue
            progressed = time.monotonic()
            sent.update(decoded.offsets)
            connection.send((decoded, dead_letters.count))
        connection.send(None)
    finally:
        if dead_letters is not None:
            dead_letters.close()
        reader.close()


def main(fd: int) -> None:
    """Entry point of a decoder process; a failure is sent to the parent, which raises it.
    When the parent is gone the process just ends: nothing it did not commit counts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    connection = Connection(fd)
    try:
        settings, poll_records, stalled_seconds = connection.recv()
        _decode_ranges(KafkaSettings(**settings), poll_records, stalled_seconds, connection)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass
    except BaseException as error:
        log.exception("decoder process failed")
        with suppress(OSError):
            try:
                connection.send(error)
            except pickle.PicklingError:
                connection.send(RuntimeError(f"{type(error).__name__}: {error}"))


if __name__ == "__main__":
    from consumers import LOG_FORMAT, LOG_TIME_FORMAT

    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt=LOG_TIME_FORMAT)
    # kafka-python logs each retry (a broker not reachable yet) and, on closing, what it
    # cancels: noise on the user's terminal from every decoder. What comes of it reaches
    # the parent as an exception, which reports it once.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    # What is sent back must pickle under the module's importable name, not __main__.
    from consumers import kafka_decoding

    kafka_decoding.main(int(sys.argv[1]))
