"""Holding the projections file for writing, briefly.

DuckDB allows one writing process per file, and a reading process only while no one
writes. Projectors therefore hold the file while batches keep coming, but release it
when idle and at least every `hold_seconds`, so analysts' read-only queries get their
turn (`ledger query` waits for the lock) while ingestion keeps running.

A file nobody reads yet (a rebuild's staging file) is written in `bulk`: held throughout,
with the write-ahead log left to grow and folded into the file once, at the end, instead
of after every few batches.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import duckdb

from projections.projector import Projector
from projections.schema import connect, relayed_until

#: In bulk, the WAL is checkpointed at this size (and on close) rather than DuckDB's 16 MB.
BULK_CHECKPOINT_THRESHOLD = "64MB"


class ProjectionWriter:
    def __init__(
        self,
        path: Path,
        hold_seconds: float = 1.0,
        readers_turn_seconds: float = 0.15,
        *,
        bulk: bool = False,
        threads: int | None = None,
        wait_seconds: float | None = 30.0,
    ) -> None:
        self.path = path
        self.wait_seconds = wait_seconds  # for the lock, at each opening (None: no limit)
        self.bulk = bulk
        self.threads = threads  # DuckDB's threads (None: one per core)
        self.hold_seconds = float("inf") if bulk else hold_seconds
        self.readers_turn_seconds = readers_turn_seconds
        self._con: duckdb.DuckDBPyConnection | None = None
        self._projector: Projector | None = None
        self._opened_at = 0.0
        self._released_at = 0.0

    def projector(self) -> Projector:
        """The projector on an open connection (opening the file when released; a writer
        that released it only just now first leaves readers their turn)."""
        if self._projector is None:
            wait = self._released_at + self.readers_turn_seconds - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._con = connect(self.path, wait_seconds=self.wait_seconds)
            if self.bulk:
                self._con.execute(f"SET checkpoint_threshold = '{BULK_CHECKPOINT_THRESHOLD}'")
            if self.threads:
                self._con.execute(f"SET threads = {int(self.threads)}")
            self._projector = Projector(self._con)
            self._opened_at = time.monotonic()
        return self._projector

    def relayed_until(self, topic: str) -> datetime | None:
        """`schema.relayed_until`. A released file is opened just to read it, without
        setting up the projector (a group member idle on quiet partitions asks every few
        seconds), and left released."""
        if self._con is not None:
            return relayed_until(self._con, topic)
        con = connect(self.path, wait_seconds=self.wait_seconds)
        try:
            return relayed_until(con, topic)
        finally:
            con.close()

    def release_due(self) -> bool:
        """Whether `after_batch` will release the file: held longer than `hold_seconds`."""
        return self._con is not None and time.monotonic() - self._opened_at > self.hold_seconds

    def after_batch(self) -> None:
        if self.release_due():
            self.release()

    def release(self) -> None:
        if self._con is not None:
            self._con.close()
            self._released_at = time.monotonic()
        self._con, self._projector = None, None
