"""The benchmark's phases, each meant to run alone in a child process (see runner.py).

Usage (by runner.py): `python bench/phases.py PHASE PARAMS.json RESULT.json`.

Every phase takes a dict of parameters and returns a dict of measurements; `main` adds
the child's own peak RSS and CPU time, so each figure is charged to the process that
did the work. With `_profile` in the parameters the phase runs under cProfile and the
statistics are written beside the given path (`.prof` and a `.txt` summary).

Timers measure only the work named by the phase: reading input files, creating topics
and starting clients happen before the clock starts.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

Params = dict[str, Any]
Result = dict[str, Any]

PHASES: dict[str, Callable[[Params], Result]] = {}

# generate_history makes about 29-30 events per customer over its two years (a lower guess
# is safe: `_history` cuts a longer history to size).
EVENTS_PER_CUSTOMER = 28


def phase(function: Callable[[Params], Result]) -> Callable[[Params], Result]:
    """Register a phase under its function name."""
    PHASES[function.__name__] = function
    return function


# --- data ----------------------------------------------------------------------------------


def _history(size: int, seed: int) -> list[dict[str, Any]]:
    """Exactly `size` realistic events: a time-ordered prefix of a generated history.

    A prefix of a history recorded in order is itself a valid history (no event depends
    on a later one), so truncating keeps every event acceptable to the ledger.
    """
    from domain.demo_history import generate_history

    customers = size // EVENTS_PER_CUSTOMER + 1
    while True:
        events = generate_history(customers=customers, seed=seed)
        if len(events) >= size:
            return events[:size]
        customers = int(customers * 1.1) + 1


@phase
def generate(p: Params) -> Result:
    """Write the JSONL input for one size (customer ids may be given a distinct prefix, so
    the latency test's customers never collide with the history already stored)."""
    started = time.perf_counter()
    events = _history(int(p["size"]), int(p["seed"]))
    prefix = p.get("customer_prefix")
    if prefix:
        for event in events:
            event["customer_id"] = prefix + event["customer_id"][1:]
    path = Path(p["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    with temporary.open("wb") as out:
        for event in events:
            out.write(orjson.dumps(event) + b"\n")
    temporary.replace(path)
    return {
        "events": len(events),
        "customers": len({e["customer_id"] for e in events}),
        "bytes": path.stat().st_size,
        "seconds": time.perf_counter() - started,
    }


def _open_ledger(data_dir: str) -> Any:
    """A Ledger on a SQLite file under `data_dir`, configured explicitly: the benchmark
    must not pick up a PostgreSQL store or a cipher key from the caller's environment."""
    from bootstrap import Settings, open_ledger

    return open_ledger(Settings(data_dir=Path(data_dir)))


def _read_docs(path: str) -> Iterator[tuple[int, bytes]]:
    """The (position, fact JSON) pairs written by `export_docs`."""
    with open(path, "rb") as handle:
        for line in handle:
            position, document = line.rstrip(b"\n").split(b"\t", 1)
            yield int(position), document


@phase
def export_docs(p: Params) -> Result:
    """Dump the stored facts as `position<TAB>json` lines: the raw phases replay exactly
    the ledger's documents (same sizes, same keys) without touching the store."""
    ledger = _open_ledger(p["data_dir"])
    count = size = 0
    customers: set[str] = set()
    position = 0
    with open(p["out"], "wb") as out:
        while True:
            last, documents = ledger.documents_after(position, 20_000)
            if last == position:
                break
            for pos, document in documents:
                out.write(b"%d\t%s\n" % (pos, document))
                count += 1
                size += len(document)
                customers.add(orjson.loads(document)["customer_id"])
            position = last
    return {
        "facts": count,
        "mean_fact_bytes": size / max(count, 1),
        "customers": len(customers),
        "head": ledger.head(),
    }


# --- the ledger's phases ------------------------------------------------------------------


@phase
def ingest(p: Params) -> Result:
    """File → validated → stored, with a fresh Ledger on an empty SQLite store."""
    from consumers.ingest import ingest_stream

    data_dir = Path(p["data_dir"])
    ledger = _open_ledger(str(data_dir))
    batch_ends: list[float] = []
    with open(p["jsonl"], "rb") as stream:
        started = time.perf_counter()
        report = ingest_stream(
            ledger,
            stream,
            p["jsonl"],
            data_dir / "rejects",
            batch_size=int(p.get("batch_size", 5_000)),
            on_batch=lambda _read, _report: batch_ends.append(time.perf_counter()),
        )
        seconds = time.perf_counter() - started
    return {
        "lines": report.lines,
        "accepted": report.accepted,
        "duplicates": report.duplicates,
        "rejected": report.rejected,
        "seconds": seconds,
        "rate": report.lines / seconds,
        "batch_seconds": _intervals(started, batch_ends),
        "head": ledger.head(),
    }


def _intervals(start: float, ends: list[float]) -> list[float]:
    """Durations between consecutive timestamps, the first measured from `start`."""
    return [b - a for a, b in zip([start, *ends], ends, strict=False)]


class _BatchTimer:
    """Times each projection batch from its hand-over to the projector to the commit.

    It wraps the ledger instance's `documents_after`, which the follower calls for the
    next batch as it hands one over (reading ahead), and is the `on_batch` callback (the
    batch's end), so connecting and creating the schema before the first batch are not
    charged to it.
    """

    def __init__(self, ledger: Any) -> None:
        self.batches: list[dict[str, float]] = []
        self._started = 0.0
        read = ledger.documents_after

        def timed_read(position: int, limit: int) -> Any:
            self._started = time.perf_counter()
            return read(position, limit)

        ledger.documents_after = timed_read

    def __call__(self, result: Any, position: int, _head: int) -> None:
        self.batches.append(
            {
                "at": time.time(),
                "position": position,
                "events": result.events,
                "customers": result.customers,
                "seconds": time.perf_counter() - self._started,
            }
        )


@phase
def catch_up(p: Params) -> Result:
    """The embedded projection path into a fresh DuckDB file, batch by batch."""
    from consumers.store_follower import catch_up as follow_store

    ledger = _open_ledger(p["data_dir"])
    timer = _BatchTimer(ledger)
    projections = Path(p["projections"])
    started = time.perf_counter()
    position = follow_store(ledger, projections, batch_size=int(p["batch_size"]), on_batch=timer)
    seconds = time.perf_counter() - started
    events = sum(int(b["events"]) for b in timer.batches)
    return {
        "events": events,
        "position": position,
        "seconds": seconds,
        "rate": events / seconds,
        "batch_size": int(p["batch_size"]),
        "batches": timer.batches,
        "duckdb_bytes": projections.stat().st_size,
    }


@phase
def rebuild(p: Params) -> Result:
    """store_follower.rebuild: every table from position 0 into a new file, swapped in."""
    from consumers.store_follower import rebuild as rebuild_projections

    ledger = _open_ledger(p["data_dir"])
    events = 0

    def count(result: Any, _position: int, _head: int) -> None:
        nonlocal events
        events += result.events

    started = time.perf_counter()
    rebuild_projections(ledger, Path(p["projections"]), on_batch=count)
    seconds = time.perf_counter() - started
    return {"events": events, "seconds": seconds, "rate": events / seconds}


def _kafka_settings(p: Params) -> Any:
    from consumers.kafka import KafkaSettings

    if "group" in p:  # the ledger's own group: it publishes the derived events, as in production
        return KafkaSettings(bootstrap=p["bootstrap"], topic=p["topic"], group=p["group"])
    return KafkaSettings(bootstrap=p["bootstrap"], topic=p["topic"])


@phase
def relay(p: Params) -> Result:
    """relay.run from position 0 to a fresh topic (created before the clock starts)."""
    from consumers import relay as relay_tools
    from consumers.kafka import ensure_topics

    settings = _kafka_settings(p)
    ensure_topics(settings)
    ledger = _open_ledger(p["data_dir"])
    started = time.perf_counter()
    state = relay_tools.run(ledger, settings, Path(p["state"]))
    seconds = time.perf_counter() - started
    return {
        "events": state.published,
        "position": state.position,
        "seconds": seconds,
        "rate": state.published / seconds,
    }


@phase
def kafka_projection(p: Params) -> Result:
    """A one-shot kafka_projection.consume (fresh group name) into a fresh DuckDB file.

    It reads the partitions directly, in decoder processes (no group join), so the
    throughput is timed from the call, starting the decoders included, to the last batch
    committed, and also, as a second figure, from the first records reaching the
    projector. (Should a group member be measured, the clock starts at its assignment.)
    """
    from consumers import kafka_projection as kp

    marks: dict[str, float] = {}
    _mark_first_call(kp._ProjectorThread, "hand_over", marks, "first_record")
    listener = getattr(kp, "_SeekToStoredOffsets", None)
    if listener is not None:
        _mark_first_call(listener, "on_partitions_assigned", marks, "assigned")
    settings = _kafka_settings(p)
    started = time.perf_counter()
    report = kp.consume(
        Path(p["projections"]),
        settings,
        group=p["group"],
        # every attempt (and the profile's rerun) starts a new file on the same topic, so
        # each publishes the history's derived events again, as the first one did
        realert=True,
        on_batch=lambda _result, _report: marks.__setitem__("last_batch", time.perf_counter()),
    )
    finished = time.perf_counter()
    last = marks.get("last_batch", finished)
    assigned = marks.get("assigned", started)
    first = marks.get("first_record", assigned)
    return {
        "events": report.events,
        "batches": report.batches,
        "dead_letters": report.dead_letters,
        "derived_published": report.derived,
        "seconds": last - assigned,
        "rate": report.events / max(last - assigned, 1e-9),
        "seconds_from_first_record": last - first,
        "rate_from_first_record": report.events / max(last - first, 1e-9),
        "join_seconds": assigned - started,
        "total_seconds": finished - started,
        "hooks_found": sorted(marks),
    }


def _mark_first_call(owner: Any, name: str, marks: dict[str, float], mark: str) -> None:
    """Wrap `owner.name` to note when it is first called (private hooks of the product:
    when one is missing, the figure falls back to a wider interval, never a narrower one)."""
    original = getattr(owner, name, None)
    if original is None:
        return

    def marked(*args: Any, **kwargs: Any) -> Any:
        marks.setdefault(mark, time.perf_counter())
        return original(*args, **kwargs)

    setattr(owner, name, marked)


# --- raw limits ------------------------------------------------------------------------------


@phase
def raw_save(p: Params) -> Result:
    """eventsourcing's batched save on a SQLite file: simple aggregates, many per save.

    As many events as the ledger stores, over as many aggregates as it has customers,
    each event carrying a payload as long as the mean fact JSON, `batch_events` events
    per `app.save(*aggregates)` (the ingest batch size). The library's defaults
    otherwise (its JSON transcoder, `save` with its checks).
    """
    from eventsourcing.application import Application
    from raw_models import Note

    events, aggregates = int(p["events"]), max(1, int(p["aggregates"]))
    payload = "x" * int(p["payload_bytes"])
    batch_events = int(p.get("batch_events", 5_000))
    app: Application[Any] = Application(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": p["db"],
            "SQLITE_LOCK_TIMEOUT": "30",
        }
    )
    notes: list[Note | None] = [None] * aggregates
    made = turn = 0
    started = time.perf_counter()
    while made < events:
        touched: dict[int, Note] = {}
        for _ in range(min(batch_events, events - made)):
            slot = turn % aggregates
            turn += 1
            note = notes[slot]
            if note is None:
                note = notes[slot] = Note(slot)  # the creation event is one event
            else:
                note.note(payload)
            touched[slot] = note
        app.save(*touched.values())
        made += min(batch_events, events - made)
    seconds = time.perf_counter() - started
    return {"events": made, "seconds": seconds, "rate": made / seconds}


@phase
def raw_duckdb(p: Params) -> Result:
    """DuckDB bulk append of Arrow tables: the same rows as the events mirror (already
    parsed and typed, outside the clock) into a plain table, `batch_rows` per commit."""
    import duckdb
    import pyarrow as pa

    table = _facts_as_arrow(p["docs"])
    batch_rows = int(p["batch_rows"])
    con = duckdb.connect(p["db"])
    con.execute(
        "CREATE TABLE events (position BIGINT, event_id VARCHAR, type VARCHAR, "
        "schema_version INTEGER, customer_id VARCHAR, occurred_at TIMESTAMPTZ, "
        "recorded_at TIMESTAMPTZ, source VARCHAR, actor VARCHAR, source_event_id VARCHAR, "
        "data VARCHAR)"
    )
    started = time.perf_counter()
    for offset in range(0, table.num_rows, batch_rows):
        chunk: pa.Table = table.slice(offset, batch_rows)  # noqa: F841 (read by DuckDB)
        con.begin()
        con.execute("INSERT INTO events SELECT * FROM chunk")
        con.commit()
    seconds = time.perf_counter() - started
    rows = con.execute("SELECT count(*) FROM events").fetchone()
    con.close()
    count = int(rows[0]) if rows else 0
    return {"rows": count, "seconds": seconds, "rate": count / seconds}


def _facts_as_arrow(docs_path: str) -> Any:
    """The exported facts as one typed Arrow table (the events mirror's columns)."""
    import pyarrow as pa

    names = ("event_id", "type", "schema_version", "customer_id", "occurred_at",
             "recorded_at", "source", "actor", "source_event_id")  # fmt: skip
    columns: dict[str, list[Any]] = {"position": [], **{n: [] for n in names}, "data": []}
    for position, document in _read_docs(docs_path):
        fact = orjson.loads(document)
        columns["position"].append(position)
        for name in names:
            columns[name].append(fact.get(name))
        columns["data"].append(orjson.dumps(fact["data"]).decode())
    utc = pa.timestamp("us", tz="UTC")
    arrays = {name: pa.array(values) for name, values in columns.items()}
    arrays["schema_version"] = arrays["schema_version"].cast(pa.int32())
    for name in ("occurred_at", "recorded_at"):
        arrays[name] = arrays[name].cast(utc)
    return pa.table(arrays)


def _kafka_records(docs_path: str) -> list[tuple[bytes, bytes]]:
    """(key, value) of each exported fact: the customer id and the fact JSON."""
    return [
        (orjson.loads(document)["customer_id"].encode(), document)
        for _, document in _read_docs(docs_path)
    ]


@phase
def raw_produce(p: Params) -> Result:
    """A bare kafka-python produce loop: acks=all, the ledger's fact JSON as values (so the
    same sizes), keyed by customer, the relay producer's batching (linger 10 ms, 256 KiB)
    but no compression, idempotence or headers; one flush at the end."""
    from kafka import KafkaProducer

    _create_topic(p["bootstrap"], p["topic"], int(p.get("partitions", 6)))
    records = _kafka_records(p["docs"])
    producer = KafkaProducer(
        bootstrap_servers=p["bootstrap"].split(","),
        acks="all",
        linger_ms=10,
        batch_size=256 * 1024,
        max_in_flight_requests_per_connection=5,
    )
    errors: list[Exception] = []
    started = time.perf_counter()
    for key, value in records:
        producer.send(p["topic"], key=key, value=value).add_errback(errors.append)
    producer.flush()
    seconds = time.perf_counter() - started
    producer.close()
    if errors:
        raise RuntimeError(f"{len(errors)} records were not delivered: {errors[0]!r}")
    return {
        "records": len(records),
        "seconds": seconds,
        "rate": len(records) / seconds,
        "crc32c_c": _crc32c_in_use(),
    }


@phase
def raw_consume_headerless(p: Params) -> Result:
    """`raw_consume` over the raw produce topic: the same keys and values as the relayed
    topic, without its nine CloudEvents headers (and uncompressed). kafka-python parses
    each header in pure Python, so the gap between the two loops is what the event
    contract's headers cost every reader of the topic that uses it."""
    return raw_consume(p)


def _crc32c_in_use() -> bool:
    """Whether kafka-python checksums record batches with the C crc32c package."""
    from kafka.record import util

    return bool(getattr(util, "crc32c_c", None))


def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        admin.close()


@phase
def raw_consume(p: Params) -> Result:
    """A bare kafka-python consume loop over a topic (no group: assigned partitions, from
    the beginning), with the ledger consumer's fetch sizes; timed from the first poll
    (partitions assigned, nothing fetched yet) to the last expected record."""
    from kafka import KafkaConsumer, TopicPartition

    expected = int(p["expected"])
    reader = KafkaConsumer(
        bootstrap_servers=p["bootstrap"].split(","),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=20_000,  # as many as the consumer group polls per batch
        fetch_max_bytes=32 * 1024 * 1024,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    partitions = sorted(reader.partitions_for_topic(p["topic"]) or set())
    tps = [TopicPartition(p["topic"], n) for n in partitions]
    reader.assign(tps)
    reader.seek_to_beginning(*tps)
    count = size = 0
    first = 0.0
    deadline = time.monotonic() + float(p.get("timeout", 600))
    started = time.perf_counter()
    while count < expected and time.monotonic() < deadline:
        for records in reader.poll(timeout_ms=500).values():
            if not first:
                first = time.perf_counter()
            count += len(records)
            size += sum(len(r.value) for r in records)
    finished = time.perf_counter()
    reader.close()
    seconds = max(finished - started, 1e-9)
    return {
        "records": count,
        "bytes": size,
        "seconds": seconds,
        "rate": count / seconds,
        "first_record_seconds": (first or finished) - started,
    }


# --- the latency test's processes -------------------------------------------------------------


@phase
def lat_projector(p: Params) -> Result:
    """The embedded projector following the store, polling every 50 ms, until told to stop
    (a stop file appears)."""
    from consumers.store_follower import catch_up as follow_store

    ledger = _open_ledger(p["data_dir"])
    stop = Path(p["stop"])
    timer = _BatchTimer(ledger)
    position = follow_store(
        ledger,
        Path(p["projections"]),
        follow=True,
        poll_seconds=0.05,
        on_batch=timer,
        should_stop=stop.exists,
    )
    seconds = [b["seconds"] for b in timer.batches]
    Path(p["out"]).write_bytes(orjson.dumps(timer.batches))
    return {
        "position": position,
        "batches": len(seconds),
        "mean_batch_events": sum(b["events"] for b in timer.batches) / max(len(seconds), 1),
        "mean_batch_seconds": sum(seconds) / max(len(seconds), 1),
        "max_batch_seconds": max(seconds, default=None),
    }


@phase
def lat_reader(p: Params) -> Result:
    """An analyst polling the newest position visible in the events table through a
    read-only DuckDB connection, opened per query (the projector needs the write lock
    between queries). Writes every change it sees as (time, max position)."""
    from projections.schema import connect

    stop, ready = Path(p["stop"]), Path(p["ready"])
    interval = float(p.get("interval", 0.02))
    seen: list[tuple[float, int]] = []
    last = -1
    queries = 0
    waits: list[float] = []
    while not stop.exists():
        asked = time.time()
        con = connect(p["projections"], read_only=True, wait_seconds=60)
        waits.append(time.time() - asked)
        try:
            row = con.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()
        finally:
            con.close()
        now = time.time()
        queries += 1
        visible = int(row[0]) if row else 0
        if visible != last:
            seen.append((now, visible))
            last = visible
            ready.write_text(str(visible))
        time.sleep(interval)
    Path(p["out"]).write_bytes(orjson.dumps(seen))
    waits.sort()
    return {
        "queries": queries,
        "changes": len(seen),
        "connect_wait_p50": waits[len(waits) // 2] if waits else None,
        "connect_wait_max": waits[-1] if waits else None,
    }


@phase
def lat_writer(p: Params) -> Result:
    """Record small batches at a steady rate: every `tick` seconds the events due by then
    (validated beforehand), logging when each batch committed and its last position."""
    from domain.intake import Rejected, parse_json_line

    rate, seconds, tick = float(p["rate"]), float(p["seconds"]), float(p.get("tick", 0.05))
    with open(p["jsonl"], "rb") as handle:
        lines = handle.read().splitlines()[
            int(p["offset"]) : int(p["offset"]) + int(rate * seconds)
        ]
    events = [e for e in (parse_json_line(line) for line in lines) if not isinstance(e, Rejected)]
    ledger = _open_ledger(p["data_dir"])
    log: list[tuple[float, int, int]] = []  # (committed at, last position, events)
    sent = rejected = 0
    started = time.time()
    tick_no = 0
    while sent < len(events):
        tick_no += 1
        due = min(len(events), int(rate * tick * tick_no))
        wake = started + tick * tick_no
        if due > sent:
            outcomes = ledger.record(events[sent:due])
            log.append((time.time(), ledger.head(), due - sent))
            rejected += sum(o.status != "accepted" for o in outcomes)
            sent = due
        pause = wake - time.time()
        if pause > 0:
            time.sleep(pause)
    elapsed = time.time() - started
    Path(p["out"]).write_bytes(orjson.dumps(log))
    return {
        "events": sent,
        "not_accepted": rejected,
        "seconds": elapsed,
        "achieved_rate": sent / elapsed,
        "target_rate": rate,
    }


# --- entry point ------------------------------------------------------------------------------


class _SqlTimer:
    """Time per SQL statement of the projections (cProfile sees one opaque `run` call).

    Wraps `run` and `one` of `projections.schema` wherever a projections module
    imported them, keyed by the calling function and the statement's first words. The
    durations are kept in call order, so the report can set a statement's first calls
    beside its last ones: the statements whose cost grows with the history show there.
    """

    def __init__(self) -> None:
        self.durations: dict[str, list[float]] = {}

    def install(self) -> None:
        from projections import schema

        connect = schema.connect

        def timed_connect(*args: Any, **kwargs: Any) -> Any:
            return _TimedCommits(connect(*args, **kwargs), self)

        replacements = {"run": self._timed(schema.run), "one": self._timed(schema.one)}
        replacements["connect"] = timed_connect
        for name, replacement in replacements.items():
            original = getattr(schema, name)
            for module in list(sys.modules.values()):
                if (getattr(module, "__name__", "") or "").startswith("projections") and (
                    getattr(module, name, None) is original
                ):
                    setattr(module, name, replacement)

    def add(self, key: str, seconds: float) -> None:
        self.durations.setdefault(key, []).append(seconds)

    def _timed(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """A multi-statement `run` (no parameters) is timed statement by statement: as one,
        its whole time went under its first statement's words."""

        def timed(con: Any, sql: str, params: object = None) -> Any:
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "?").rsplit(".", 1)[-1]
            where = f"{module}.{caller.f_code.co_name}"
            statements = [sql]
            if params is None:
                statements = [found.query for found in con.extract_statements(sql)] or [sql]
            result = None
            for statement in statements:
                lines = statement.split("\n")
                words = " ".join(line for line in lines if not line.strip().startswith("--"))
                started = time.perf_counter()
                try:
                    result = original(con, statement, params)
                finally:
                    key = f"{where}: {' '.join(words.split())[:80]}"
                    self.add(key, time.perf_counter() - started)
            return result

        return timed

    def report(self, top: int = 15) -> str:
        """Statements by total time, with the mean of their first and last 3 calls."""
        ranked = sorted(self.durations.items(), key=lambda item: -sum(item[1]))[:top]
        lines = [f"{'total s':>9} {'calls':>6} {'first3 s':>9} {'last3 s':>9}  statement"]
        for key, times in ranked:
            first, last = sum(times[:3]) / len(times[:3]), sum(times[-3:]) / len(times[-3:])
            lines.append(f"{sum(times):9.3f} {len(times):6d} {first:9.4f} {last:9.4f}  {key}")
        return "\n".join(lines)


class _TimedCommits:
    """A DuckDB connection whose commits are timed: a C method, invisible to cProfile,
    and the moment DuckDB writes its WAL and, past a size, checkpoints the file."""

    def __init__(self, con: Any, timer: _SqlTimer) -> None:
        self._con = con
        self._timer = timer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)

    def commit(self) -> Any:
        started = time.perf_counter()
        try:
            return self._con.commit()
        finally:
            self._timer.add(
                "connection.commit: COMMIT (WAL write, checkpoints)", time.perf_counter() - started
            )


def _project_functions(profiler: cProfile.Profile, top: int = 15) -> str:
    """The project's own functions by cumulative time: which of its steps the time is
    spent under, whatever library does the work below them."""
    root = str(Path(__file__).resolve().parent.parent)
    rows = []
    measured = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    for (filename, line, function), (_, calls, own, total, _) in measured.items():
        if filename.startswith(root) and "/.venv/" not in filename and "/bench/" not in filename:
            where = f"{Path(filename).relative_to(root)}:{line}({function})"
            rows.append((total, own, calls, where))
    rows.sort(reverse=True)
    header = f"{'cumtime':>9} {'tottime':>9} {'ncalls':>9}  function"
    lines = [f"{t:9.3f} {o:9.3f} {c:9d}  {w}" for t, o, c, w in rows[:top]]
    return "\n".join([header, *lines])


def _profiled(function: Callable[[Params], Result], params: Params, path: Path) -> Result:
    """Run a phase under cProfile (and the SQL timer); write `<path>.prof` and a
    readable `<path>.txt` whose sections start with `=== `: projection SQL statements by
    time, the project's functions by cumulative time, all functions by own time."""
    import projections.projector  # noqa: F401 (imports every projections module to patch)

    sql = _SqlTimer()
    sql.install()
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        return function(params)
    finally:
        profiler.disable()
        profiler.dump_stats(str(path.with_suffix(".prof")))
        text = io.StringIO()
        if sql.durations:
            text.write("=== projection SQL statements by total time\n")
            text.write(sql.report() + "\n\n")
        text.write("=== project functions by cumulative time\n")
        text.write(_project_functions(profiler) + "\n\n")
        stats = pstats.Stats(profiler, stream=text).strip_dirs()
        text.write("=== all functions by own time (tottime)\n")
        stats.sort_stats("tottime").print_stats(30)
        text.write("=== all functions by cumulative time\n")
        stats.sort_stats("cumulative").print_stats(40)
        path.with_suffix(".txt").write_text(text.getvalue())


def main(argv: list[str]) -> None:
    name, params_path, result_path = argv[1:4]
    params: Params = json.loads(Path(params_path).read_text())
    profile = params.pop("_profile", None)
    function = PHASES[name]
    started = time.perf_counter()
    result = _profiled(function, params, Path(profile)) if profile else function(params)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # e.g. Kafka decoder processes
    result.update(
        phase_seconds=time.perf_counter() - started,
        peak_rss_bytes=usage.ru_maxrss * 1024,  # Linux reports kilobytes
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        children_peak_rss_bytes=children.ru_maxrss * 1024,  # the largest child
        children_cpu_seconds=children.ru_utime + children.ru_stime,
    )
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv)
