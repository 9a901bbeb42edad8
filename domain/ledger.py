"""The ledger application: records catalogue events into customer streams, in batches.

This is the only writer of the event store. Callers hand it validated events; it assigns
each a deterministic event id (so a replayed input is recognised), checks it against the
customer's history, and saves every touched customer in one atomic write. When another
writer got there first (optimistic concurrency), the batch is re-read and retried.
"""

from __future__ import annotations

import hashlib
import random
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

import orjson
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import CanMutateAggregate
from eventsourcing.persistence import (
    IntegrityError,
    JSONTranscoder,
    MapperDeserialisationError,
    Notification,
    Transcoder,
)

from domain.customer import LEDGER_NAMESPACE, Customer, InvariantViolation, customer_stream_id
from domain.events import SCHEMA_VERSION, IncomingEvent

Fact = dict[str, Any]
"""A recorded event in its public JSON form: the envelope, `event_id`, `recorded_at`, `data`."""

_FACT_TOPIC = "Customer.Recorded"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one event handed to `Ledger.record`."""

    status: Literal["accepted", "duplicate", "rejected"]
    event_id: str
    reason: str | None = None


@dataclass
class _Decision:
    """What `Ledger._decide` made of a batch, and where each customer's state came from.

    Customers are keyed by their own id (a string: its hash is cached, a UUID's is
    computed in Python on every lookup)."""

    outcomes: list[Outcome] = field(default_factory=list)
    customers: dict[str, Customer] = field(default_factory=dict)
    to_save: list[CanMutateAggregate[UUID]] = field(default_factory=list)  # input order
    changed: set[str] = field(default_factory=set)  # customers with accepted events
    created: set[str] = field(default_factory=set)  # customers not yet in the store
    from_cache: dict[str, int] = field(default_factory=dict)  # the version when read
    doubtful: set[str] = field(default_factory=set)  # cached customers with rejections
    unsaved: set[str] = field(default_factory=set)  # created, but nothing to save


@dataclass(frozen=True)
class StoreLock:
    """A store-wide lock (`Ledger.held_alone`): whether it was free, and `confirm()`, which
    raises `StoreLockLost` once it is no longer held."""

    held: bool
    confirm: Callable[[], None] = lambda: None


class StoreLockLost(RuntimeError):
    """A store-wide lock went with its database session: another holder may have it now."""


class ConcurrencyExhausted(RuntimeError):
    """Other writers kept winning the race for the same customers; nothing was saved."""


def to_fact(incoming: IncomingEvent, recorded_at: str) -> Fact:
    """The stored and published form of an event (the contract's recorded shape).

    The event id is stable: derived from the source's idempotency key when given, else
    from the content, so the same input recorded twice is recognised as a duplicate.
    """
    dumped = incoming.model_dump(mode="json", exclude_none=True)
    fact: Fact = {
        "event_id": "",
        "type": incoming.type,
        "schema_version": SCHEMA_VERSION,
        "customer_id": incoming.customer_id,
        "occurred_at": dumped["occurred_at"],
        "recorded_at": recorded_at,
        "source_event_id": incoming.source_event_id,
        "source": incoming.source,
        "actor": incoming.actor,
        "data": dumped["data"],
    }
    parts = _source_key(incoming)
    if parts is not None:
        # joined, parts holding the separator could read as others; the rest as ever
        key = "key-json\x1f" + orjson.dumps(parts).decode() if _separated(parts) else _joined(parts)
    else:
        content = {k: v for k, v in fact.items() if k not in ("event_id", "recorded_at")}
        key = "content\x1f" + orjson.dumps(content, option=orjson.OPT_SORT_KEYS).decode()
    fact["event_id"] = event_id_of(key)
    return fact


def _source_key(incoming: IncomingEvent) -> tuple[str, str, str] | None:
    """The parts of an event's idempotency key (None: it has none, its content is the key)."""
    if incoming.source_event_id is None:
        return None
    return (incoming.customer_id, incoming.source or "", incoming.source_event_id)


def _separated(parts: tuple[str, str, str]) -> bool:
    return any("\x1f" in part for part in parts)


def _joined(parts: tuple[str, str, str]) -> str:
    return "key\x1f" + "\x1f".join(parts)


def former_event_id(incoming: IncomingEvent) -> str | None:
    """The id an event whose source key holds the \x1f separator got until 2026-11-24,
    when such keys were joined as they are: a store may hold the event under it, and the
    same event sent again must still be a duplicate. None for every other event."""
    parts = _source_key(incoming)
    return event_id_of(_joined(parts)) if parts is not None and _separated(parts) else None


_READ_PAGE = 10_000


def _compact(document: bytes) -> bytes:
    """A right-sized copy: a bytes object from orjson keeps ~4 kB of heap behind it (its
    growth buffer, shrunk in place), ten times the document; batches hold 100k of them."""
    return memoryview(document).tobytes()


_NAMESPACE_BYTES = LEDGER_NAMESPACE.bytes  # a property that builds them on every read


def event_id_of(key: str) -> str:
    """`str(uuid5(LEDGER_NAMESPACE, key))`, the same text written straight from the SHA-1
    digest (four times faster than building a UUID; the ingest computes one per event)."""
    h = hashlib.sha1(_NAMESPACE_BYTES + key.encode()).hexdigest()
    # The version (5) is the 13th hex digit; the RFC 4122 variant sets the 17th to 10xx.
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


class OrjsonTranscoder(JSONTranscoder):
    """The library's JSON format (`_type_`/`_data_` for datetimes, decimals, UUIDs), written
    and read with orjson: the store's encoding and decoding run several times faster.

    orjson writes UUIDs as plain strings, so state must not hold UUID values (ours holds
    JSON-native facts and the event timestamp only).
    """

    def encode(self, obj: Any) -> bytes:
        return orjson.dumps(obj, default=self._encode_any, option=orjson.OPT_PASSTHROUGH_DATETIME)

    def _encode_any(self, obj: Any) -> dict[str, Any]:
        # Every stored event has one datetime (its timestamp): encode it as the library's
        # DatetimeAsISO transcoding does, without the lookup and the extra calls.
        if type(obj) is datetime:
            return {"_type_": "datetime_iso", "_data_": obj.isoformat()}
        return self._encode_obj(obj)

    def decode(self, data: bytes) -> Any:
        return self._revive(orjson.loads(data))

    def _revive(self, value: Any) -> Any:
        if isinstance(value, dict):
            return self._decode_obj({key: self._revive(item) for key, item in value.items()})
        if isinstance(value, list):
            return [self._revive(item) for item in value]
        return value


def in_business_order(recorded: Iterable[tuple[int, Fact]]) -> list[Fact]:
    """Facts given in their order of recording (as `Ledger.recorded`), in business-time
    order; those at the same time keep their order of recording (the sort is stable)."""
    return sorted(
        (fact for _, fact in recorded), key=lambda f: datetime.fromisoformat(f["occurred_at"])
    )


def _replay(customer: Customer | None, events: Iterable[Customer.Event]) -> Customer | None:
    """A customer from its stored events: the library's `project_aggregate` without its
    typing.Protocol isinstance check per event, which takes as long as all the rest of
    reading a customer back on Python 3.11."""
    for stored in events:
        customer = stored.mutate(customer)
    return customer


@dataclass(frozen=True, slots=True)
class StoredFact:
    """A fact as the store holds it: its position, its stream and version there, its JSON."""

    position: int
    stream: UUID
    version: int
    document: bytes


class Ledger(Application[UUID]):
    """Customer streams in an `eventsourcing` event store (SQLite or PostgreSQL)."""

    name = "CustomerLedger"
    max_attempts = 8
    max_cached_customers = 200_000

    def __init__(self, env: dict[str, str] | None = None, reporting_currency: str = "EUR"):
        super().__init__(env)
        self.reporting_currency = reporting_currency
        # Our own cache: aggregates saved by this process, dropped on any conflict.
        self._customers: dict[str, Customer] = {}
        self._key_checked = False

    def construct_transcoder(self) -> Transcoder:
        transcoder = OrjsonTranscoder()
        self.register_transcodings(transcoder)
        return transcoder

    # --- writing -----------------------------------------------------------------------

    def record(self, events: Sequence[IncomingEvent]) -> list[Outcome]:
        """Record a batch atomically; returns one outcome per event, in order."""
        self._check_key()
        for attempt in range(self.max_attempts):
            decision = self._decide(events)
            if self._any_stale(decision):
                # A rejection was judged on a cached copy that another process has since
                # outdated: re-read and decide the batch again. Every customer of the
                # attempt is forgotten: deciding changed them.
                self._forget(decision.customers)
                continue
            # Straight to the recorder rather than save(): save() runs two typing.Protocol
            # isinstance checks per aggregate (a fifth of the ingest time on Python 3.11),
            # and the event store's put() builds a Recording per event that nobody reads.
            stored = [self.mapper.to_stored_event(e) for e in decision.to_save]
            try:
                self.recorder.insert_events(stored)
            except IntegrityError:
                # Another writer saved to one of these customers first: forget what we
                # knew about all of them, re-read, and decide every event again.
                self._forget(decision.customers)
                time.sleep(random.uniform(0, min(0.5, 0.01 * 2**attempt)))
                continue
            self._remember(
                {i: c for i, c in decision.customers.items() if i not in decision.unsaved}
            )
            return decision.outcomes
        if len(events) > 1:
            # Under heavy contention a large batch rarely wins the race as a whole: save
            # it in two halves (each atomic), which makes progress every time.
            middle = len(events) // 2
            return self.record(events[:middle]) + self.record(events[middle:])
        raise ConcurrencyExhausted(
            f"gave up after {self.max_attempts} attempts: other writers kept changing "
            f"customer {events[0].customer_id}; this event was not saved, so it is safe to "
            "run again"
        )

    def _check_key(self) -> None:
        """Before a write, read the store's first event with this process's key
        (`MapperDeserialisationError` if it cannot): a store holds the events of one key,
        or of none. Writing to a new customer reads no stream, so a missing or wrong key
        would otherwise add events that the store's own key cannot read. Once one was
        read it holds for good; an empty store is looked at again at each write (another
        process may have written first)."""
        if self._key_checked:
            return
        first = self.recorder.select_notifications(start=None, limit=1)
        if first:
            self._state(first[0].state)
            self._key_checked = True

    def _decide(self, events: Sequence[IncomingEvent]) -> _Decision:
        """Decide every event against its customer's history, in order."""
        recorded_at = datetime.now(UTC).isoformat()
        decision = _Decision()
        for incoming in events:
            customer_id = incoming.customer_id
            customer = decision.customers.get(customer_id)
            if customer is None:
                customer = decision.customers[customer_id] = self._load(customer_id, decision)
            fact = to_fact(incoming, recorded_at)
            event_id = fact["event_id"]
            former = former_event_id(incoming)
            if customer.has_seen(event_id) or (former is not None and customer.has_seen(former)):
                decision.outcomes.append(Outcome("duplicate", event_id))
                continue
            try:
                customer.record(incoming, fact, self.reporting_currency)
            except InvariantViolation as violation:
                decision.outcomes.append(Outcome("rejected", event_id, str(violation)))
                if customer_id in decision.from_cache:
                    decision.doubtful.add(customer_id)
                continue
            decision.outcomes.append(Outcome("accepted", event_id))
            decision.changed.add(customer_id)
            decision.to_save.extend(customer.collect_events())  # keeps the input order
        decision.unsaved = decision.created - decision.changed
        return decision

    def _any_stale(self, decision: _Decision) -> bool:
        """Has any cached customer with a rejection gained events in the store since?"""
        return any(
            self.recorder.select_events(
                customer_stream_id(customer_id), gt=decision.from_cache[customer_id], limit=1
            )
            for customer_id in decision.doubtful
        )

    def _load(self, customer_id: str, decision: _Decision) -> Customer:
        cached = self._customers.get(customer_id)
        if cached is not None:
            decision.from_cache[customer_id] = cached.version
            return cached
        stream_id = customer_stream_id(customer_id)
        try:
            customer: Customer = self.repository.get(stream_id, projector_func=_replay)
        except AggregateNotFoundError:
            customer = Customer(customer_id)
            decision.created.add(customer_id)
        return customer

    def _forget(self, customer_ids: Iterable[str]) -> None:
        for customer_id in customer_ids:
            self._customers.pop(customer_id, None)

    def _remember(self, customers: dict[str, Customer]) -> None:
        if len(self._customers) + len(customers) > self.max_cached_customers:
            self._customers.clear()
        self._customers.update(customers)

    # --- reading -----------------------------------------------------------------------

    def timeline(self, customer_id: str) -> list[Fact]:
        """Every fact about a customer in business-time order (then recording order)."""
        return in_business_order(self.recorded(customer_id))

    def recorded(self, customer_id: str) -> list[tuple[int, Fact]]:
        """Every fact about a customer in recording order, with its version in the
        customer's stream (which orders them as their store positions do)."""
        stream = self.repository.event_store.get(customer_stream_id(customer_id))
        return [(e.originator_version, e.fact) for e in stream if isinstance(e, Customer.Recorded)]

    @contextmanager
    def held_alone(self, name: str) -> Iterator[StoreLock]:
        """Hold the store-wide lock `name` while the block runs; yields whether nobody else
        held it, and a way to confirm it is still held. A PostgreSQL store can be shared by
        hosts and data dirs, so the lock is an advisory lock of its database, keyed by the
        store's schema and table as well, held by a session of its own; a SQLite store
        belongs to its data dir, whose own locks suffice (always held)."""
        from eventsourcing.postgres import PostgresDatastore  # psycopg: only when it is used

        datastore = getattr(self.recorder, "datastore", None)
        if not isinstance(datastore, PostgresDatastore):
            yield StoreLock(held=True)
            return
        table = getattr(self.recorder, "events_table_name", "")
        key = f"customer-ledger {datastore.schema}.{table} {name}"
        with datastore.get_connection() as connection:  # autocommit: a session lock
            row = connection.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [key]).fetchone()
            held = bool(row and next(iter(row.values())))

            def confirm() -> None:
                # a session lock lasts as long as its session: a session that still answers
                # still holds it
                try:
                    connection.execute("SELECT 1").fetchone()
                except Exception as error:
                    raise StoreLockLost(
                        f"the event store's lock {name!r} was lost with its database session "
                        f"(the database restarted, or ended the session): {error}"
                    ) from error

            try:
                yield StoreLock(held=held, confirm=confirm)
            finally:
                if held:  # best effort: a lost session has released it already
                    with suppress(Exception):
                        connection.execute("SELECT pg_advisory_unlock(hashtext(%s))", [key])

    def head(self) -> int:
        """The position of the newest event in the store (0 when empty)."""
        return self.recorder.max_notification_id() or 0

    def documents_after(self, position: int, limit: int) -> tuple[int, list[tuple[int, bytes]]]:
        """Up to `limit` stored facts after `position`, as (position, fact JSON) pairs.

        Returns the last position read too (it may hold no fact: stream openings are
        skipped). The JSON is the contract's recorded shape: what projections mirror and
        what the relay publishes.
        """
        documents: list[tuple[int, bytes]] = []
        last = position
        for page in self._pages_after(position, limit):
            documents.extend(
                (n.id, self._document(n.state)) for n in page if n.topic.endswith(_FACT_TOPIC)
            )
            last = page[-1].id
        return last, documents

    def stored_after(self, position: int, limit: int) -> tuple[int, list[StoredFact]]:
        """Like `documents_after`, each fact with the stream it is stored in and its version
        there (for audits: a fact moved to another stream is an alteration too)."""
        stored: list[StoredFact] = []
        last = position
        for page in self._pages_after(position, limit):
            stored.extend(
                StoredFact(
                    n.id, UUID(str(n.originator_id)), n.originator_version, self._document(n.state)
                )
                for n in page
                if n.topic.endswith(_FACT_TOPIC)
            )
            last = page[-1].id
        return last, stored

    def _pages_after(self, position: int, limit: int) -> Iterator[Sequence[Notification]]:
        """The store's log after `position`, up to `limit` records, in pages: the store's
        rows and notification objects take ~4 kB per event while they live, the documents
        a tenth of that."""
        last = position
        while limit > 0:
            notifications = self.recorder.select_notifications(
                start=last, limit=min(limit, _READ_PAGE), inclusive_of_start=False
            )
            if not notifications:
                return
            yield notifications
            last = notifications[-1].id
            limit -= len(notifications)

    def _document(self, stored: bytes) -> bytes:
        """A stored fact's JSON, as the contract's recorded shape."""
        return _compact(orjson.dumps(self._state(stored)["fact"]))

    def _state(self, stored: bytes) -> dict[str, Any]:
        """A Recorded event's state. Its `fact` holds JSON-native values only, so plain JSON
        decoding (after the store's own decryption and decompression) gives it exactly."""
        try:
            if self.mapper.cipher:
                stored = self.mapper.cipher.decrypt(stored)
            if self.mapper.compressor:
                stored = self.mapper.compressor.decompress(stored)
            state: dict[str, Any] = orjson.loads(stored)
        except (ValueError, zlib.error) as error:  # another key's cipher tag, ciphertext
            # read as JSON, or a store's bytes decompressed that were never compressed
            raise MapperDeserialisationError(f"a stored event cannot be read: {error}") from error
        return state

    def facts_after(self, position: int, limit: int) -> tuple[int, list[tuple[int, Fact]]]:
        """Like `documents_after`, with each fact decoded to a dict."""
        last, documents = self.documents_after(position, limit)
        return last, [(pos, orjson.loads(doc)) for pos, doc in documents]

    def all_facts(self, batch_size: int = 10_000) -> Iterator[tuple[int, Fact]]:
        """Every fact in store order, read in batches (for rebuilds and audits)."""
        position = 0
        while True:
            last, facts = self.facts_after(position, batch_size)
            if last == position:
                return
            yield from facts
            position = last
