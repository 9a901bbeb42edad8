"""The ledger application: records catalogue events into customer streams, in batches.

This is the only writer of the event store. Callers hand it validated events; it assigns
each a deterministic event id (so a replayed input is recognised), checks it against the
customer's history, and saves every touched customer in one atomic write. When another
writer got there first (optimistic concurrency), the batch is re-read and retried.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID, uuid5

import orjson
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError

from domain.customer import LEDGER_NAMESPACE, Customer, InvariantViolation, customer_stream_id
from domain.events import SCHEMA_VERSION, IncomingEvent

Fact = dict[str, Any]
"""A recorded event in its public JSON form: the envelope, `event_id`, `recorded_at`, `data`."""

_FACT_TOPIC_SUFFIX = "Customer.Recorded"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one event handed to `Ledger.record`."""

    status: Literal["accepted", "duplicate", "rejected"]
    event_id: UUID | None = None
    reason: str | None = None


class ConcurrencyExhausted(RuntimeError):
    """Other writers kept winning the race for the same customers; nothing was saved."""


def to_fact(incoming: IncomingEvent, recorded_at: datetime) -> Fact:
    """The stored and published form of an event (the contract's recorded shape).

    The event id is stable: derived from the source's idempotency key when given, else
    from the content, so the same input recorded twice is recognised as a duplicate.
    """
    fact: Fact = {
        "event_id": "",
        "type": incoming.type,
        "schema_version": SCHEMA_VERSION,
        "customer_id": incoming.customer_id,
        "occurred_at": incoming.occurred_at.isoformat(),
        "recorded_at": recorded_at.isoformat(),
        "source_event_id": incoming.source_event_id,
        "source": incoming.source,
        "actor": incoming.actor,
        "data": incoming.data.model_dump(mode="json", exclude_none=True),
    }
    if incoming.source_event_id is not None:
        key = f"key\x1f{incoming.customer_id}\x1f{incoming.source or ''}\x1f{incoming.source_event_id}"
    else:
        content = {k: v for k, v in fact.items() if k not in ("event_id", "recorded_at")}
        key = "content\x1f" + orjson.dumps(content, option=orjson.OPT_SORT_KEYS).decode()
    fact["event_id"] = str(uuid5(LEDGER_NAMESPACE, key))
    return fact


class Ledger(Application[UUID]):
    """Customer streams in an `eventsourcing` event store (SQLite or PostgreSQL)."""

    name = "CustomerLedger"
    max_attempts = 8
    max_cached_customers = 200_000

    def __init__(self, env: dict[str, str] | None = None, reporting_currency: str = "EUR"):
        super().__init__(env)
        self.reporting_currency = reporting_currency
        # Our own cache: aggregates saved by this process, dropped on any conflict.
        self._customers: dict[UUID, Customer] = {}

    # --- writing -----------------------------------------------------------------------

    def record(self, events: Sequence[IncomingEvent]) -> list[Outcome]:
        """Record a batch atomically; returns one outcome per event, in order."""
        for attempt in range(self.max_attempts):
            outcomes, touched = self._apply(events)
            try:
                self.save(*touched.values())
            except IntegrityError:
                for stream_id in touched:
                    self._customers.pop(stream_id, None)
                time.sleep(random.uniform(0, 0.02 * 2**attempt))
                continue
            self._remember(touched)
            return outcomes
        raise ConcurrencyExhausted(
            f"gave up after {self.max_attempts} attempts: other writers kept changing the "
            "same customers; nothing from this batch was saved, so it is safe to run again"
        )

    def _apply(self, events: Sequence[IncomingEvent]) -> tuple[list[Outcome], dict[UUID, Customer]]:
        recorded_at = datetime.now(UTC)
        touched: dict[UUID, Customer] = {}
        outcomes: list[Outcome] = []
        for incoming in events:
            stream_id = customer_stream_id(incoming.customer_id)
            customer = touched.get(stream_id) or self._load(stream_id, incoming.customer_id)
            fact = to_fact(incoming, recorded_at)
            event_id = UUID(fact["event_id"])
            if customer.has_seen(fact["event_id"]):
                outcomes.append(Outcome("duplicate", event_id))
                continue
            try:
                customer.record(incoming, fact, self.reporting_currency)
            except InvariantViolation as violation:
                outcomes.append(Outcome("rejected", event_id, str(violation)))
                continue
            touched[stream_id] = customer
            outcomes.append(Outcome("accepted", event_id))
        return outcomes, touched

    def _load(self, stream_id: UUID, customer_id: str) -> Customer:
        cached = self._customers.get(stream_id)
        if cached is not None:
            return cached
        try:
            customer: Customer = self.repository.get(stream_id)
        except AggregateNotFoundError:
            customer = Customer(customer_id)
        return customer

    def _remember(self, touched: dict[UUID, Customer]) -> None:
        if len(self._customers) + len(touched) > self.max_cached_customers:
            self._customers.clear()
        self._customers.update(touched)

    # --- reading -----------------------------------------------------------------------

    def timeline(self, customer_id: str) -> list[Fact]:
        """Every fact about a customer, in the order the ledger recorded them."""
        stream = self.repository.event_store.get(customer_stream_id(customer_id))
        return [e.fact for e in stream if type(e).__name__ == "Recorded"]  # type: ignore[attr-defined]

    def head(self) -> int:
        """The position of the newest event in the store (0 when empty)."""
        return self.recorder.max_notification_id() or 0

    def facts_after(self, position: int, limit: int) -> tuple[int, list[tuple[int, Fact]]]:
        """Up to `limit` stored events after `position`: (last position read, facts)."""
        notifications = self.recorder.select_notifications(
            start=position, limit=limit, inclusive_of_start=False
        )
        facts = [
            (n.id, self.mapper.to_domain_event(n).fact)  # type: ignore[attr-defined]
            for n in notifications
            if n.topic.endswith(_FACT_TOPIC_SUFFIX)
        ]
        last = notifications[-1].id if notifications else position
        return last, facts

    def all_facts(self, batch_size: int = 10_000) -> Iterator[tuple[int, Fact]]:
        """Every fact in store order, read in batches (for rebuilds and audits)."""
        position = 0
        while True:
            last, facts = self.facts_after(position, batch_size)
            if last == position:
                return
            yield from facts
            position = last
