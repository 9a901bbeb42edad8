"""The embedded path: follow the event store's notification log into the projections.

SQLite has no push subscriptions, so the follower polls `select_notifications` from the
position stored in DuckDB (`projection_checkpoints`), which the projector advances in the
same transaction as the projection writes: exactly-once effect across crashes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from domain.ledger import Ledger
from projections.projector import EVENT_STORE, BatchResult, Projector
from projections.rebuild import rebuilding
from projections.schema import connect

ProgressCallback = Callable[[BatchResult, int, int], None]
"""Called after each batch with (result, position reached, store head)."""


def catch_up(
    ledger: Ledger,
    projections_path: Path,
    *,
    batch_size: int = 20_000,
    as_of: datetime | None = None,
    follow: bool = False,
    poll_seconds: float = 0.5,
    on_batch: ProgressCallback | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """Project every stored event not yet projected; with `follow`, keep polling.

    Returns the position reached. While following, the projections file is opened only
    for the duration of a batch, so analysts can query it between batches.
    """
    position = 0
    while True:
        con = connect(projections_path)
        try:
            projector = Projector(con)
            position = projector.checkpoint(*EVENT_STORE) or 0
            head = ledger.head()
            caught_up = position >= head
            if caught_up and as_of is not None:
                projector.apply([], {EVENT_STORE: position}, as_of)
            while position < head:
                last, documents = ledger.documents_after(position, batch_size)
                if last == position:
                    break
                result = projector.apply(documents, {EVENT_STORE: last}, as_of)
                position = last
                if on_batch:
                    on_batch(result, position, head)
        finally:
            con.close()
        if not follow or should_stop():
            return position
        time.sleep(poll_seconds)


def rebuild(
    ledger: Ledger,
    projections_path: Path,
    *,
    batch_size: int = 20_000,
    realert: bool = False,
    on_batch: ProgressCallback | None = None,
) -> int:
    """Rebuild every table from position 0 into a new file, then swap it in atomically
    (see `projections.rebuild`)."""
    with rebuilding(projections_path, realert=realert) as staging:
        return catch_up(ledger, staging, batch_size=batch_size, on_batch=on_batch)
