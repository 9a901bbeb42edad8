"""For auditors: what a customer's history held at a past moment, and proof that the
recorded history was not altered since a digest of it was kept.

Events carry two times: when they happened (`occurred_at`) and when the ledger recorded
them (`recorded_at`). `as_it_stood` keeps the events that had happened by a moment, or
that the ledger knew of by then, or both: a late event (recorded after it happened) is in
the first view and not in the second.

The proof is a hash chain over the recorded history. The digest at a store position is
SHA-256 chained over every event recorded up to there, in store order: each link hashes
the previous digest, the event's position, the stream it is stored in (the customer's
aggregate) and its version there, and the event in the contract's recorded JSON (what
the projections mirror). Changing, removing, inserting, reordering or moving any of those
events to another stream changes the digest at every position from there on, and no one
can make other events give the same digest.

A digest proves nothing alone: an auditor keeps one (`ledger verify` prints it, with its
position), and later `ledger verify --expect POSITION:DIGEST` recomputes it from the store.
Events recorded after that position do not change it. The chain covers the events as
recorded, personal fields included, not the bytes stored for them: in a store encrypted
with `LEDGER_CIPHER_KEY` it is computed from the events decrypted (the key is needed).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from domain.ledger import Fact, Ledger, StoredFact


def as_it_stood(
    recorded: Sequence[tuple[int, Fact]],
    *,
    happened_by: datetime | None = None,
    known_by: datetime | None = None,
) -> list[tuple[int, Fact]]:
    """The facts (with their order of recording) that had happened by `happened_by` and
    that the ledger had recorded by `known_by` (either bound may be left out)."""
    return [
        (order, fact)
        for order, fact in recorded
        if (happened_by is None or datetime.fromisoformat(fact["occurred_at"]) <= happened_by)
        and (known_by is None or datetime.fromisoformat(fact["recorded_at"]) <= known_by)
    ]


CHAIN_START = hashlib.sha256(b"customer-ledger event chain v1").digest()
"""The digest before the first event (so an empty store has one too)."""

READ_BATCH = 10_000

ProgressCallback = Callable[[int, int], None]
"""Called after each batch read with (position reached, position the chain ends at)."""


@dataclass(frozen=True)
class ChainPoint:
    """Where a chain ends (a store position, 0 for none), how many events it covers, and
    its digest (64 hexadecimal digits)."""

    position: int
    events: int
    digest: str

    def __str__(self) -> str:
        return f"{self.position}:{self.digest}"


class MalformedChainPoint(ValueError):
    """Not `POSITION:DIGEST` as `ledger verify` prints it."""


_POINT = re.compile(r"(\d+):([0-9a-f]{64})")


def parse_point(text: str) -> tuple[int, str]:
    """(position, digest) from `POSITION:DIGEST` (thousands separators allowed)."""
    match = _POINT.fullmatch(text.strip().replace(",", "").lower())
    if match is None:
        raise MalformedChainPoint(
            f"{text!r} is not POSITION:DIGEST (a position, a colon, 64 hexadecimal digits), "
            "as `ledger verify` prints it"
        )
    return int(match[1]), match[2]


def link(previous: bytes, fact: StoredFact) -> bytes:
    """The next digest of the chain. All but the JSON, last, have fixed sizes (the previous
    digest 32 bytes, the position 8, the stream's id 16, the version 8), so no two
    different events hash the same input."""
    return hashlib.sha256(
        previous
        + fact.position.to_bytes(8, "big")
        + fact.stream.bytes
        + fact.version.to_bytes(8, "big")
        + fact.document
    ).digest()


def chain(
    ledger: Ledger, until: int | None = None, on_progress: ProgressCallback | None = None
) -> ChainPoint:
    """The chain over every event up to position `until` (default: the store's head when
    called; events recorded meanwhile are not included). A store that ends before `until`
    gives the chain up to its end."""
    head = ledger.head()
    end = head if until is None else until
    digest, events, position = CHAIN_START, 0, 0
    while position < end:
        last, facts = ledger.stored_after(position, min(READ_BATCH, end - position))
        if last == position:
            break  # the store ends before `end`
        for fact in facts:
            if fact.position > end:  # past a gap in the positions (PostgreSQL's sequence)
                break
            digest = link(digest, fact)
            events += 1
        position = min(last, end)
        if on_progress is not None:
            on_progress(position, end)
    return ChainPoint(min(end, max(head, position)), events, digest.hex())


@dataclass(frozen=True)
class Verdict:
    """How a digest kept earlier compares with the store now."""

    expected: tuple[int, str]
    found: ChainPoint
    head: int  # the store's head when checked

    @property
    def store_ends_before(self) -> bool:
        """The store ends before the digest's position: events were removed (or the digest
        is of another store)."""
        return self.expected[0] > self.head

    @property
    def unaltered(self) -> bool:
        return not self.store_ends_before and self.found.digest == self.expected[1]

    @property
    def outcome(self) -> str:
        """'unaltered', 'altered' or 'store_ends_before' (for scripts)."""
        if self.store_ends_before:
            return "store_ends_before"
        return "unaltered" if self.unaltered else "altered"


def verify(
    ledger: Ledger, expected: tuple[int, str], on_progress: ProgressCallback | None = None
) -> Verdict:
    """Recompute the chain up to the position of a digest kept earlier."""
    head = ledger.head()
    position, _ = expected
    return Verdict(expected, chain(ledger, position, on_progress), head)
