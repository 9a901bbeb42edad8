"""Rebuilding the projections beside the live file, then swapping atomically.

Both rebuild paths (from the event store, from Kafka) build into `<file>.rebuild`; this
module gives the new file what it must inherit from the old one (the as-of clock, so it
equals the live projection; the published derived events, so nobody is alerted twice
unless asked) and renames it over the old file, so analysts never see a half-built table.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import duckdb

from projections import derived
from projections.projector import Projector
from projections.schema import connect, one, run

log = logging.getLogger(__name__)


class RebuildBehind(RuntimeError):
    """The rebuilt projections lack events the live ones hold: the source lost what the
    live file was built from (a broker that came back empty, a topic past its retention),
    or does not hold it yet (a relay behind the store), or is another source."""


MISSING = """
SELECT count(*), any_value(old.event_id)
FROM previous.events AS old
ANTI JOIN events USING (event_id)
"""
"""The live file's events the rebuild lacks. Events, not offsets: a topic republished from
the store after a data loss holds every event once, at lower offsets than the live file
read (the relay's repeats after a crash are gone), and is complete."""


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
            missing, example = one(con, MISSING) or (0, None)
            if missing:
                con.close()
                for leftover in leftovers:
                    leftover.unlink(missing_ok=True)
                raise RebuildBehind(
                    f"the rebuild lacks {missing:,} of the live projections' events (event "
                    f"{example}, for one): its source lost data, or is behind (on Kafka: a "
                    "broker that restarted empty or a relay behind the store: `ledger relay "
                    "--republish --from 0` or `ledger relay`, then rebuild again; `ledger "
                    "rebuild` rebuilds from the store); the live projections are unchanged"
                )
            clock = one(con, "SELECT max(as_of) FROM previous.projection_clock")
            if clock and clock[0] is not None:
                projector.apply([], {}, clock[0])
            _carry_over_published(con, clock[0] if clock else None, realert=realert)
            run(con, "DETACH previous")
    finally:
        con.close()
    os.replace(staging, path)
    Path(f"{path}.wal").unlink(missing_ok=True)


def _carry_over_published(
    con: duckdb.DuckDBPyConnection, clock: datetime | None, *, realert: bool
) -> None:
    """What the old file published stays published, so nobody is alerted twice (unless
    `realert`: then all of it goes out again, and withdrawals still count on from the
    old file's, so a later one gets a new id). An upgrade (a file of an older schema
    version) must not send the history of a derived type new in this version
    (`derived.INTRODUCED_IN`) as if it just happened either."""
    try:
        row = one(con, "SELECT schema_version FROM previous.projection_meta")
    except duckdb.CatalogException:  # before projection_meta existed
        row = (1,)
    previous_version = int(row[0]) if row else 1
    unaddressed = derived.carry_over_published(con, previous_version, realert=realert)
    if unaddressed:
        log.warning(
            "%s published derived events were taken back by late events before this "
            "version: no withdrawal can be sent for them (the old projections kept no "
            "customer to address it to)",
            f"{unaddressed:,}",
        )
    if clock is None or realert:
        return
    counted = derived.count_history_as_published(con, previous_version, clock)
    for kind, count in counted.items():
        log.warning(
            "%s %s events at or before %s (new in this version) are counted as published, "
            "not sent: they describe the past (`--realert` sends every derived event again, "
            "these included)",
            f"{count:,}", kind, clock,
        )  # fmt: skip
