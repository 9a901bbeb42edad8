"""Moving input files into the ledger: read, validate, record in batches, keep the rejects.

Bad lines never stop a batch: the valid rest is recorded, and each reject is appended to
`DATA_DIR/rejects/<time>-<file>.jsonl` with its line number, original text and reason.
"""

from __future__ import annotations

import csv
import gc
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal

import orjson

from domain.events import IncomingEvent
from domain.intake import Rejected, csv_row_to_record, parse_json_line, parse_record
from domain.ledger import Ledger

Format = Literal["jsonl", "csv"]


@dataclass
class IngestReport:
    lines: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejects_files: list[Path] = field(default_factory=list)
    # the first few rejects, (source, line, reason): to say at once what is wrong
    first_rejects: list[tuple[str, int, str]] = field(default_factory=list)

    def add(self, other: IngestReport) -> None:
        self.lines += other.lines
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.rejected += other.rejected
        self.rejects_files += other.rejects_files
        self.first_rejects += other.first_rejects[: FIRST_REJECTS - len(self.first_rejects)]


FIRST_REJECTS = 5
"""How many rejects an ingest names on its own (the rest are in the rejects file)."""


ProgressCallback = Callable[[int, IngestReport], None]
"""Called after each batch with (bytes read so far, running report)."""


class RejectsFile:
    """Appends rejects as JSON Lines, in line order; the file is created on the first reject
    only. A batch's rejects come in two rounds (lines that do not validate, then events the
    ledger refuses), so they wait in `_pending` until `flush` writes them sorted."""

    def __init__(self, rejects_dir: Path, source_name: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        base = Path(source_name).name if source_name != "-" else "stdin"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in base) or "stdin"
        self.path = rejects_dir / f"{stamp}-{safe}.jsonl"
        self.source_name = source_name
        self.first: list[tuple[str, int, str]] = []
        self._handle: IO[bytes] | None = None
        self._pending: list[tuple[int, bytes, str]] = []

    def add(self, line_number: int, text: bytes, reason: str) -> None:
        self._pending.append((line_number, text, reason))
        if len(self._pending) >= PENDING_REJECTS:  # a file of nothing but rejects
            self.flush()

    def flush(self) -> None:
        """Write the rejects kept so far, by line number."""
        if not self._pending:
            return
        self._pending.sort(key=lambda reject: reject[0])
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("ab")
        rejected_at = datetime.now(UTC).isoformat()
        for line_number, text, reason in self._pending:
            if len(self.first) < FIRST_REJECTS:
                self.first.append((self.source_name, line_number, reason))
            record = {
                "source": self.source_name,
                "line": line_number,
                "text": text.decode("utf-8", errors="backslashreplace"),
                "reason": reason,
                "rejected_at": rejected_at,
            }
            self._handle.write(orjson.dumps(record) + b"\n")
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        if self._handle is not None:
            self._handle.close()


PENDING_REJECTS = 50_000
"""Rejects kept before they are written, at most (they are written sorted per batch)."""


def detect_format(name: str, explicit: Format | None) -> Format:
    if explicit:
        return explicit
    return "csv" if name.lower().endswith(".csv") else "jsonl"


def ingest_stream(
    ledger: Ledger,
    stream: IO[bytes],
    source_name: str,
    rejects_dir: Path,
    *,
    fmt: Format = "jsonl",
    batch_size: int = 5_000,
    on_batch: ProgressCallback | None = None,
) -> IngestReport:
    """Ingest one stream; returns its counts. Rejects go to a file under `rejects_dir`."""
    report = IngestReport()
    rejects = RejectsFile(rejects_dir, source_name)
    lines = _read_jsonl(stream) if fmt == "jsonl" else _read_csv(stream)
    try:
        while True:
            with _cyclic_gc_paused():
                batch, exhausted = _next_batch(lines, batch_size, report, rejects)
                if batch:
                    _record(ledger, batch, report, rejects)
                rejects.flush()
                del batch  # freed by reference counting, before the collector runs again
            if exhausted:
                break
            if on_batch:
                on_batch(_tell(stream), report)
        if on_batch:
            on_batch(_tell(stream), report)
    finally:
        rejects.close()
    if report.rejected:
        report.rejects_files.append(rejects.path)
        report.first_rejects = rejects.first
    return report


Batch = list[tuple[int, bytes, IncomingEvent]]
"""(line number, original bytes, event) of each valid line of a batch."""


def _next_batch(
    lines: Iterator[Parsed], batch_size: int, report: IngestReport, rejects: RejectsFile
) -> tuple[Batch, bool]:
    """The next `batch_size` valid lines (rejects are counted and kept on the way), and
    whether the input ended before the batch was full."""
    batch: Batch = []
    for line_number, raw, parsed in lines:
        report.lines += 1
        if isinstance(parsed, Rejected):
            report.rejected += 1
            rejects.add(line_number, raw, parsed.reason)
            continue
        batch.append((line_number, raw, parsed))
        if len(batch) >= batch_size:
            return batch, False
    return batch, True


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused while a batch is read and recorded.

    A batch keeps thousands of fresh objects alive (validated events, facts, stored
    events) and the collector would traverse them again and again as they age: a fifth
    of the ingest time. They form no reference cycles, so reference counting frees them
    all the same; the collector runs as usual between batches. Left alone when something
    else has already turned the collector off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _record(ledger: Ledger, batch: Batch, report: IngestReport, rejects: RejectsFile) -> None:
    outcomes = ledger.record([event for _, _, event in batch])
    for (line_number, raw, _), outcome in zip(batch, outcomes, strict=True):
        if outcome.status == "accepted":
            report.accepted += 1
        elif outcome.status == "duplicate":
            report.duplicates += 1
        else:
            report.rejected += 1
            rejects.add(line_number, raw, outcome.reason or "rejected")


Parsed = tuple[int, bytes, IncomingEvent | Rejected]
"""(line number, original bytes without the newline, what the line means)."""


def _read_jsonl(stream: IO[bytes]) -> Iterator[Parsed]:
    for number, raw in enumerate(stream, start=1):
        line = raw.rstrip(b"\r\n")
        if line.strip():
            yield number, line, parse_json_line(line)


class _RawLines:
    """Feeds the csv module text lines while remembering the raw bytes of each record."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.number = 0
        self.raw: list[bytes] = []

    def __iter__(self) -> _RawLines:
        return self

    def __next__(self) -> str:
        raw = self._stream.readline()
        if not raw:
            raise StopIteration
        self.number += 1
        self.raw.append(raw.rstrip(b"\r\n"))
        return raw.decode("utf-8", errors="replace")


def _read_csv(stream: IO[bytes]) -> Iterator[Parsed]:
    """CSV with a header row; a record may span lines (quoted newlines)."""
    feed = _RawLines(stream)
    reader = csv.reader(feed)
    header = [column.strip().lstrip("\ufeff") for column in next(reader, [])]
    feed.raw.clear()
    for cells in reader:
        first = feed.number - len(feed.raw) + 1
        raw, feed.raw = b"\n".join(feed.raw), []
        if not raw.strip():
            continue
        parsed: IncomingEvent | Rejected
        if b"\xef\xbf\xbd" not in raw and "\ufffd" in ",".join(cells):
            parsed = Rejected("not UTF-8 text")
        elif len(cells) != len(header):
            parsed = Rejected(f"has {len(cells)} cells but the header names {len(header)} columns")
        else:
            parsed = parse_record(csv_row_to_record(dict(zip(header, cells, strict=True))))
        yield first, raw, parsed


def _tell(stream: IO[bytes]) -> int:
    try:
        return stream.tell()
    except (OSError, ValueError):
        return 0


def open_source(name: str) -> tuple[IO[bytes], int]:
    """A file or '-' (stdin) as a binary stream, with its size in bytes (0 if unknown)."""
    if name == "-":
        return sys.stdin.buffer, 0
    path = Path(name)
    return path.open("rb"), path.stat().st_size
