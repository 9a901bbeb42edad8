"""Rebuilding the projections beside the live file, then swapping atomically.

Both rebuild paths (from the event store, from Kafka) build into `<file>.rebuild`; this
module gives the new file what it must inherit from the old one (the as-of clock, so it
equals the live projection; the published derived events, so nobody is alerted twice
unless asked) and renames it over the old file, so analysts never see a half-built table.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from projections.projector import Projector
from projections.schema import connect, one, run


@contextmanager
def rebuilding(path: Path, *, realert: bool = False) -> Iterator[Path]:
    """Yields the staging path to build into; when the block succeeds, it replaces `path`."""
    staging = path.with_name(path.name + ".rebuild")
    for leftover in (staging, Path(f"{staging}.wal")):
        leftover.unlink(missing_ok=True)
    yield staging
    con = connect(staging)
    try:
        projector = Projector(con)
        if path.exists():
            run(con, "ATTACH ? AS previous (READ_ONLY)", [str(path)])
            clock = one(con, "SELECT max(as_of) FROM previous.projection_clock")
            if clock and clock[0] is not None:
                projector.apply([], {}, clock[0])
            if not realert:
                run(
                    con,
                    "INSERT OR IGNORE INTO derived_published "
                    "SELECT event_id FROM previous.derived_published",
                )
            run(con, "DETACH previous")
    finally:
        con.close()
    os.replace(staging, path)
    Path(f"{path}.wal").unlink(missing_ok=True)
