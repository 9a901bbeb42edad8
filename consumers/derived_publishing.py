"""Publishing the derived events (stage changes, SLA warnings and breaches, response alarms,
and the withdrawals of those a late event took back) to the derived topic: once per
transition, in business-time order, by the ledger's own consumer group.

The projector thread decides what may go out (`publish_until`: nothing a partition still
behind could take back); `DerivedPublisher` sends it on a thread of its own and marks in
the projections file what the broker acknowledged, so a restart re-sends only what was
sent and not marked (under the same ids), never skips.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from kafka import TopicPartition

from consumers import cloudevents
from consumers.kafka import KafkaSettings, ReliableSender, partition_of
from projections import derived
from projections.projector import Projector


def publishes_derived(settings: KafkaSettings, group: str) -> bool:
    """Only the ledger's own group (`settings.group`) publishes the derived events: another
    group projects into a file of its own (an analyst's copy, a trial), and publishing
    from there would alert downstream systems again for every transition."""
    return group == settings.group


NOTHING_YET = datetime.min.replace(tzinfo=UTC)
"""The business time of a partition nothing was read from yet: it holds everything back."""


def publish_until(
    latest: Mapping[TopicPartition, datetime],
    behind: Collection[TopicPartition],
    *,
    shared: bool = False,
) -> datetime | None:
    """How far in business time derived events may go out (those before it): the point
    every partition with records still to read has reached (None: nothing is behind).

    Partitions are read at their own pace, so the projections' clock (the latest business
    time handed over anywhere) runs ahead of a partition read later, and the transitions
    it reveals there may be taken back by that partition's next records: a complaint
    looks breached until its resolution, in time, is read. A partition holds the records
    in the order they were recorded, which for events recorded as they happen is their
    business-time order; so once every partition behind has reached a time, nothing read
    later takes back a transition before it (a backfill recorded late still can). A
    partition read to its end does not hold the others back.

    A member that shares the topic with other members of its group (`shared`) also goes
    no further than its own partitions were read (the latest time in `latest`, which
    holds its partitions only). The file's clock moves with the others' records too, and a
    partition of its own that its last fetch found read to the end may have received
    records since, earlier than that clock (the relay appends in the order events were
    recorded, so everything before the latest time it read was there when it read it):
    it published a breach whose resolution had just been recorded (a review of a group
    of two).
    """
    until = min(latest.get(tp, NOTHING_YET) for tp in behind) if behind else None
    if not shared:
        return until
    reached = max(latest.values(), default=NOTHING_YET)
    return reached if until is None else min(until, reached)


class DerivedPublisher:
    """Publishes the derived events each batch reveals, on a thread of its own, so that the
    projector thread goes on with the next batch while they are sent.

    Called by the projector thread (which owns the file) after each batch: it marks as
    acknowledged what the broker acknowledged since, writes down the new events (and
    withdrawals) it hands to the sending thread (`derived_published`, before they are
    sent), and events handed over and not acknowledged yet are not handed over again.
    `settle` waits for every acknowledgement and marks them all. After a crash, what was
    handed over and not marked acknowledged is sent again (same ids), or withdrawn if a
    late event took it back meanwhile: nothing is skipped, and subscribers' last word on
    each event is the right one.

    With `retry` (a follower), what the broker did not acknowledge (unreachable, or
    restarted: its idempotent producer's sequence numbers are unknown there) is sent
    again with a new producer, with backoff (`ReliableSender`), until it is acknowledged
    or the run ends (`finishing`, `should_stop`); otherwise the failure ends the run.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        retry: bool = False,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings
        self._sender = ReliableSender(
            settings,
            settings.derived_topic,
            "derived events",
            retry=retry,
            should_stop=lambda: self._closing or self._finishing or should_stop(),
        )
        self._changed = threading.Condition()
        self._to_send: deque[list[derived.Word]] = deque()
        self._sending = False
        self._acknowledged: list[derived.Word] = []
        self._failure: BaseException | None = None
        self._closing = False
        self._finishing = False  # retries end: what fails now goes out with the next run
        self._abandoned = False  # a send failed while finishing: the rest is not tried
        # handed to the sender, not marked acknowledged yet (the projector thread's)
        self._in_flight: set[tuple[str, int]] = set()
        self._thread: threading.Thread | None = None
        self._owned: tuple[frozenset[int], int] | None = None  # None: every customer
        self._newly_owned = False

    def own(self, partitions: Collection[int], count: int) -> None:
        """Publish from now on the derived events of the customers whose events live in
        `partitions` (of the events topic's `count`) only. Members of a group share one
        file, and each knows how far in business time its own partitions were read: one
        publishing another's customers' transitions could send what that member's
        records, not read yet, take back."""
        self._owned = (frozenset(partitions), count)
        self._newly_owned = bool(partitions)

    def newly_owned(self) -> bool:
        """Whether it was given partitions since the last call: what waits unpublished for
        their customers (held back, or left by an earlier run) may go out now."""
        found, self._newly_owned = self._newly_owned, False
        return found

    # --- on the projector thread

    def publish(self, projector: Projector, until: datetime | None) -> int:
        """Mark what was acknowledged, send what is new up to business time `until` (None:
        all) and the withdrawals of what a late event took back; returns how many were
        marked."""
        marked = self._mark_acknowledged(projector)
        # A withdrawal written down makes due the event it withdrew when that holds at
        # another time (or again): a second round hands it over at once, a third finds
        # nothing more (bounded all the same).
        for _ in range(3):
            pending = [
                word
                for word in derived.unpublished(projector.con, until)
                if word.key not in self._in_flight and self._owns(word.fact["customer_id"])
            ]
            if not pending:
                break
            derived.mark_sending(projector.con, pending)
            self._in_flight.update(word.key for word in pending)
            with self._changed:
                self._to_send.append(pending)
                self._changed.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="derived", daemon=True)
                self._thread.start()
        return marked

    def _owns(self, customer_id: str) -> bool:
        owned = self._owned
        if owned is None:
            return True
        partitions, count = owned
        return bool(partitions) and partition_of(customer_id, count) in partitions

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
            derived.mark_acknowledged(projector.con, acknowledged)
            self._in_flight.difference_update(word.key for word in acknowledged)
        return len(acknowledged)

    def finishing(self) -> None:
        """The run is ending: what is sent still goes out, but a send that fails is not
        tried again (a broker that stays down must not hold the stop); what it held goes
        out with the next run, under the same ids."""
        self._finishing = True

    def close(self) -> None:
        """Stop sending (what was sent and not marked is sent again next time)."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._sender.close()

    # --- on the sending thread

    def _run(self) -> None:
        while True:
            with self._changed:
                while not (self._to_send or self._closing):
                    self._changed.wait()
                if self._closing:
                    return
                words = self._to_send.popleft()
                self._sending = True
            try:
                sent = self._send(words)
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

    def _send(self, words: list[derived.Word]) -> list[derived.Word]:
        """The words the broker acknowledged (not all when the run ended while retrying:
        the rest go out with the next run, under the same ids, and this run sends no
        more)."""
        if self._abandoned:
            return []
        records = [derived_record(word.fact) for word in words]
        acknowledged = [words[i] for i in self._sender.send(records)]
        if len(acknowledged) < len(words):
            self._abandoned = True
        return acknowledged


def derived_record(fact: dict[str, Any]) -> dict[str, Any]:
    """A derived event (its recorded shape) as a record of the derived topic."""
    record = cloudevents.encode(fact, orjson.dumps(fact), None)
    return {"key": record.key, "value": record.value, "headers": record.headers}
