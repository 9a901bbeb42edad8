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


class RebuildBehind(RuntimeError):
    """The rebuilt projections stand behind the live ones in a source both read: the source
    lost what the live file was built from (a broker that came back empty, say)."""


BEHIND = """
SELECT old.source, old.stream, old.position, new.position
FROM previous.projection_checkpoints AS old
JOIN projection_checkpoints AS new USING (source, stream)
WHERE new.position < old.position
ORDER BY ALL
"""


@contextmanager
def rebuilding(path: Path, *, realert: bool = False) -> Iterator[Path]:
    """Yields the staging path to build into; when the block succeeds, it replaces `path`,
    unless the new file is behind the old one (`RebuildBehind`: the old file stays)."""
    staging = path.with_name(path.name + ".rebuild")
    leftovers = (staging, Path(f"{staging}.wal"))
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    yield staging
    con = connect(staging)
    try:
        projector = Projector(con)
        if path.exists():
            run(con, "ATTACH ? AS previous (READ_ONLY)", [str(path)])
            behind = con.execute(BEHIND).fetchall()
            if behind:
                con.close()
                for leftover in leftovers:
                    leftover.unlink(missing_ok=True)
                source, stream, old, new = behind[0]
                raise RebuildBehind(
                    f"the rebuild read {stream} ({source}) up to {new:,} but the live "
                    f"projections stand at {old:,}: the source lost data (on Kafka, a broker "
                    "that restarted empty: `ledger relay --republish --from 0`, then rebuild "
                    "again); the live projections are unchanged"
                )
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
