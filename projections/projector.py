"""The projector: applies one batch of recorded events to every projection, atomically.

It does not know where events come from (the event store's notification log or a Kafka
consumer group): the caller passes the batch and the checkpoints to store with it. The
projection writes and the checkpoints commit in one DuckDB transaction, so a crash at any
instant leaves either the whole batch applied and acknowledged, or none of it.

Per batch: bulk-append to `events`, then set-based SQL over the batch's new events and the
state carried from earlier batches (ladder positions, complaint steps, contacts, profile
totals), then the ABC split across all customers, then the derived events (stage changes,
SLA warnings and breaches, response alarms) those changes revealed. No step reads the
whole history, so a batch costs the same however much came before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import duckdb

from domain.policy import LadderPolicy, ResponsePolicy, SlaPolicy
from projections import derived, loyalty, mirror, profiles, responses, sla
from projections.schema import create_schema, one, run

Checkpoint = tuple[str, str]
"""(source, stream): ('event-store', '') or ('kafka:<group>', '<topic>:<partition>')."""

EVENT_STORE: Checkpoint = ("event-store", "")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class LiveClock:
    """The as-of clock kept moving with the time (`--as-of now`), `lag` behind it: how
    late events may be recorded after they happened (LEDGER_CLOCK_LAG_SECONDS). An event
    recorded later than that, with a business time the clock has passed, is late: what
    it takes back was derived (and, through Kafka, published) meanwhile."""

    lag: timedelta = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) - self.lag


AsOf = datetime | LiveClock
"""Where the as-of clock moves: to a moment, or along with the time (on the embedded
path with the wall clock; through Kafka as far as the relay's watermarks vouch)."""


def moment(as_of: AsOf | None) -> datetime | None:
    """The moment `as_of` stands for now."""
    return as_of.now() if isinstance(as_of, LiveClock) else as_of


RAISE_CHECKPOINT = """
INSERT INTO projection_checkpoints VALUES (?, ?, ?)
ON CONFLICT (source, stream) DO UPDATE SET position = greatest(position, excluded.position)
"""


@dataclass(frozen=True)
class BatchResult:
    events: int
    new_events: int
    customers: int
    as_of: datetime


class Projector:
    """Owns one read-write connection to the projections file."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        sla_policy: SlaPolicy | None = None,
        ladder: LadderPolicy | None = None,
        response_policy: ResponsePolicy | None = None,
    ) -> None:
        self.con = con
        self.ladder = ladder or LadderPolicy()
        create_schema(con, sla_policy, self.ladder, response_policy)

    def checkpoint(self, source: str, stream: str = "") -> int | None:
        row = one(
            self.con,
            "SELECT position FROM projection_checkpoints WHERE source = ? AND stream = ?",
            [source, stream],
        )
        return int(row[0]) if row else None

    def checkpoints(self, source: str) -> dict[str, int]:
        rows = self.con.execute(
            "SELECT stream, position FROM projection_checkpoints WHERE source = ?", [source]
        ).fetchall()
        return {stream: int(position) for stream, position in rows}

    def apply(
        self,
        batch: Sequence[tuple[int, bytes]],
        checkpoints: Mapping[Checkpoint, int],
        as_of: datetime | None = None,
        high_marks: Mapping[Checkpoint, int] | None = None,
    ) -> BatchResult:
        """Project `batch` ((position, fact JSON) pairs) and store `checkpoints`, atomically;
        `high_marks` are stored too, each only where higher than the one stored.

        `as_of` may only move the clock forward; by default the clock is the latest
        business time seen (the event-time watermark).
        """
        con = self.con
        con.begin()
        try:
            new_events = mirror.append(con, batch)
            touched = one(con, "SELECT count(*) FROM touched")
            clock = self._advance_clock(as_of)
            loyalty.refresh(con, self.ladder)
            sla.refresh(con, clock)
            responses.refresh(con, clock)
            profiles.refresh(con)
            derived.refresh(con, clock)
            for (source, stream), position in checkpoints.items():
                run(
                    con,
                    "INSERT OR REPLACE INTO projection_checkpoints VALUES (?, ?, ?)",
                    [source, stream, position],
                )
            for (source, stream), position in (high_marks or {}).items():
                run(con, RAISE_CHECKPOINT, [source, stream, position])
            con.commit()
        except BaseException:
            con.rollback()
            raise
        return BatchResult(len(batch), new_events, int(touched[0]) if touched else 0, clock)

    def _advance_clock(self, requested: datetime | None) -> datetime:
        """The clock of this batch, stored only when it moved (an unchanged table costs
        nothing to commit and to checkpoint)."""
        row = one(
            self.con,
            """
            SELECT stored, greatest(stored, (SELECT max(occurred_at) FROM fresh), ?::TIMESTAMPTZ)
            FROM (SELECT (SELECT max(as_of) FROM projection_clock) AS stored)
            """,
            [requested],
        )
        stored, moved = row if row else (None, None)
        clock: datetime = moved if moved is not None else EPOCH
        if stored is None or clock != stored:
            run(self.con, "INSERT OR REPLACE INTO projection_clock VALUES (TRUE, ?)", [clock])
        return clock
