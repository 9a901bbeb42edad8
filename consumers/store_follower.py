"""The embedded path: follow the event store's notification log into the projections.

SQLite has no push subscriptions, so the follower polls `select_notifications` from the
position stored in DuckDB (`projection_checkpoints`), which the projector advances in the
same transaction as the projection writes: exactly-once effect across crashes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from domain.ledger import Ledger
from projections.projector import EVENT_STORE, AsOf, BatchResult, LiveClock, moment
from projections.rebuild import rebuilding
from projections.writer import ProjectionWriter

LIVE_CLOCK_SECONDS = 10.0
"""How often a follower keeping the clock at the wall clock (`--as-of now`) moves it while
no event comes: each move opens the file readers share for a moment."""

ProgressCallback = Callable[[BatchResult, int, int], None]
"""Called after each batch with (result, position reached, store head)."""


def catch_up(
    ledger: Ledger,
    projections_path: Path,
    *,
    batch_size: int = 100_000,
    as_of: AsOf | None = None,
    follow: bool = False,
    poll_seconds: float = 0.5,
    clock_seconds: float = LIVE_CLOCK_SECONDS,
    on_batch: ProgressCallback | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    bulk: bool = False,
) -> int:
    """Project every stored event not yet projected; with `follow`, keep polling.

    `as_of` moves the as-of clock; a `LiveClock` keeps it at the wall clock (less its
    lag): at each batch, and while following every `clock_seconds` with no new events
    (the SLA alarms of a quiet ledger go off in time). Returns the position reached.
    The projections file is held only while batches come (see `projections.writer`), so
    analysts can query it meanwhile; in `bulk` (a file nobody reads yet) it is held
    throughout.
    """
    # following, it outlasts an analyst's session holding the file
    writer = ProjectionWriter(projections_path, bulk=bulk, wait_seconds=None if follow else 30.0)
    try:
        position = writer.projector().checkpoint(*EVENT_STORE) or 0
        clock_moved_at = time.monotonic()
        if as_of is not None:
            writer.projector().apply([], {EVENT_STORE: position}, moment(as_of))
        with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as reader:
            while True:
                for last, documents in _read_ahead(reader, ledger, position, batch_size):
                    result = writer.projector().apply(documents, {EVENT_STORE: last}, moment(as_of))
                    position, clock_moved_at = last, time.monotonic()
                    writer.after_batch()
                    if on_batch:
                        on_batch(result, position, ledger.head())
                live = isinstance(as_of, LiveClock)
                if live and time.monotonic() - clock_moved_at >= clock_seconds:
                    writer.projector().apply([], {EVENT_STORE: position}, moment(as_of))
                    clock_moved_at = time.monotonic()
                writer.release()
                if not follow or should_stop():
                    return position
                time.sleep(poll_seconds)
    finally:
        writer.release()


def _read_ahead(
    reader: ThreadPoolExecutor, ledger: Ledger, position: int, batch_size: int
) -> Iterator[tuple[int, list[tuple[int, bytes]]]]:
    """The batches after `position` until the store's end, each read while the caller
    projects the one before (SQLite and DuckDB release the GIL, so both cores work)."""
    pending = reader.submit(ledger.documents_after, position, batch_size)
    while True:
        last, documents = pending.result()
        if last == position:
            return
        pending = reader.submit(ledger.documents_after, last, batch_size)
        yield last, documents
        position = last


def rebuild(
    ledger: Ledger,
    projections_path: Path,
    *,
    batch_size: int = 100_000,
    realert: bool = False,
    on_batch: ProgressCallback | None = None,
) -> int:
    """Rebuild every table from position 0 into a new file, then swap it in atomically
    (see `projections.rebuild`)."""
    with rebuilding(projections_path, realert=realert) as staging:
        return catch_up(ledger, staging, batch_size=batch_size, on_batch=on_batch, bulk=True)
