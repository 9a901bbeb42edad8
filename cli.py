"""The `ledger` command: parses arguments and delegates; no business logic lives here.

Exit status: 0 success; 1 some input was rejected (the rest landed); 2 usage error;
3 the store or the projections could not be used (the message says why); 130 interrupted
(Ctrl-C) before a one-shot command finished (a follower stops on Ctrl-C with 0).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import duckdb
import orjson
import typer
from eventsourcing.persistence import MapperDeserialisationError, PersistenceError
from kafka.errors import (
    BrokerNotAvailableError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
)
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from bootstrap import ConfigError, Settings, open_ledger
from consumers import LOG_FORMAT, LOG_TIME_FORMAT, kafka_projection, store_follower
from consumers import ingest as ingest_files
from consumers import kafka as kafka_tools
from consumers import relay as relay_tools
from consumers.derived_publishing import publishes_derived
from consumers.kafka import KafkaSettings, TopicMissing, worth_retrying
from consumers.kafka_decoding import DecoderFailed, list_dead_letters
from consumers.status import PipelineStatus, pipeline_status
from domain import audit
from domain.customer import AHEAD_OF_RECORDING
from domain.events import EVENT_MODELS, contract_schema, contract_types, type_schema
from domain.intake import Rejected, exact_json, parse_record
from domain.ledger import ConcurrencyExhausted, Ledger, StoreLockLost, in_business_order
from projections import reports, snapshot
from projections.projector import AsOf, BatchResult, LiveClock
from projections.rebuild import RebuildBehind
from projections.schema import (
    ProjectionsOutdated,
    ProjectionsUnavailable,
    connect,
    stored_clock,
)

EXIT_REJECTED = 1
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it (SIGTERM: 143)
EXIT_OUTPUT_CLOSED = 128 + signal.SIGPIPE  # 141: whoever read the output stopped reading

app = typer.Typer(
    name="ledger",
    help="Event-sourced customer-interaction ledger: record, project, query and audit.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _console(stderr: bool = False) -> Console:
    """Text is printed as it is (data holding "[/b]" is not rich markup), one message a
    line; piped or redirected, tables keep their natural width instead of 80 columns."""
    terminal = Console(stderr=stderr).is_terminal
    return Console(stderr=stderr, markup=False, soft_wrap=True, width=None if terminal else 10_000)


out = _console()
err = _console(stderr=True)


class State:
    settings: Settings = Settings()


OWN_LOGGERS = ("bootstrap", "consumers", "domain", "projections")


class _ConsoleHandler(logging.Handler):
    """Log lines through the console the progress bars use, so a line goes above a bar,
    not through it; one line each, as wide as it is."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            err.print(self.format(record), highlight=False)
        except Exception:
            self.handleError(record)


def _log_to_stderr() -> None:
    """The ledger's own log lines (warnings; a follower's news too, `_log_progress`) on
    stderr, with their time and level."""
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_TIME_FORMAT))
    for name in OWN_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


def _log_progress() -> None:
    """A follower runs as a service: it also says when it starts, which partitions it
    was given or lost, and when a broker it had lost answers again."""
    logging.getLogger("consumers").setLevel(logging.INFO)


@app.callback()
def _global(
    data_dir: Annotated[
        Path,
        typer.Option(
            envvar="LEDGER_DATA_DIR",
            help="Holds the SQLite event store, projections.duckdb and rejects/.",
        ),
    ] = Path("ledger-data"),
) -> None:
    try:
        State.settings = Settings.from_env(data_dir=data_dir)
    except ConfigError as error:
        _fail(str(error), code=2)


def _ledger(*, create: bool = True) -> Ledger:
    """The ledger; commands that only look (not `create`) start no new one: a mistyped
    --data-dir would otherwise look like an empty, healthy ledger."""
    settings = State.settings
    if not create and not settings.holds_a_ledger():
        _fail(
            f"no ledger in {settings.data_dir} (--data-dir, LEDGER_DATA_DIR): "
            "`ledger ingest` or `ledger demo` creates one there"
        )
    try:
        return open_ledger(settings)
    except ConfigError as error:
        _fail(str(error))
    except Exception as error:  # the store's driver errors vary by backend
        _fail(f"cannot open the event store {State.settings.event_store_label}: {error}")


def _fail(message: str, code: int = EXIT_UNAVAILABLE) -> NoReturn:
    _say_error(message)
    raise typer.Exit(code)


def _say_error(message: str) -> None:
    err.print(Text.assemble(("error:", "red"), " ", message))


def _wait_for_the_ledger(poll_seconds: float = 1.0) -> None:
    """A follower started before the first ingest (services started together) waits for
    the ledger to be made, saying so once, instead of failing: a one-shot command
    refuses a data dir with no ledger (`_ledger`)."""
    settings = State.settings
    if settings.holds_a_ledger():
        return
    err.print(
        f"no ledger in {settings.data_dir} yet (--data-dir, LEDGER_DATA_DIR): waiting for "
        "the first `ledger ingest` to make it"
    )
    while not settings.holds_a_ledger():
        time.sleep(poll_seconds)


def _parse_moment(value: str, option: str, *, not_ahead_because: str | None = None) -> datetime:
    """'now' or an ISO-8601 date-time with a UTC offset (a usage error otherwise); with
    `not_ahead_because`, not more than `AHEAD_OF_RECORDING` after now, for that reason."""
    if value == "now":
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        _fail(f"{option} {value!r} is not 'now' or an ISO-8601 date-time", code=2)
    if moment.tzinfo is None:
        example = value if "T" in value or " " in value else f"{value}T00:00:00"
        _fail(f"{option} {value!r} has no UTC offset (write e.g. {example}+00:00)", code=2)
    if not_ahead_because is not None and moment > datetime.now(UTC) + AHEAD_OF_RECORDING:
        _fail(
            f"{option} {value} lies more than {AHEAD_OF_RECORDING} after now: "
            f"{not_ahead_because} (check the year and the UTC offset)",
            code=2,
        )
    return moment


def _parse_as_of(value: str | None) -> AsOf | None:
    """`--as-of` of `project` and `consume`: "now" (kept: a follower moves along with the
    time), or a moment not in the future."""
    if value is None:
        return None
    if value == "now":
        return LiveClock(State.settings.clock_lag)
    return _parse_moment(
        value,
        "--as-of",
        not_ahead_because="the as-of clock never goes back, so a future time would leave "
        "every running SLA clock breached for good",
    )


def _project_what_was_recorded(ledger: Ledger) -> ProjectionsUnavailable | None:
    """After `ingest` or `record`: bring the projections up to date, or with a broker
    configured say who does. Returns why the projections could not be updated (the file
    is busy or outdated): the events are recorded all the same, and recording them again
    would add nothing, so the caller says that rather than "try again"."""
    if State.settings.kafka is not None:
        err.print("projections follow through Kafka: run `ledger relay` and `ledger consume`")
        return None
    try:
        _project(ledger)
    except ProjectionsUnavailable as error:
        return error
    return None


def _projections_behind(why: ProjectionsUnavailable) -> NoReturn:
    catch_up = "`ledger rebuild`" if isinstance(why, ProjectionsOutdated) else "`ledger project`"
    _fail(
        f"recorded, but the projections were not updated: {why}. Nothing needs recording "
        f"again: {catch_up} brings the projections up to date"
    )


def _project(ledger: Ledger, as_of: AsOf | None = None, follow: bool = False) -> int:
    """Bring the projections up to date from the store, with a progress bar on a terminal."""
    with _progress() as progress:
        task = progress.add_task("projecting", total=None)

        def on_batch(result: BatchResult, position: int, head: int) -> None:
            progress.update(task, completed=position, total=head)

        return store_follower.catch_up(
            ledger,
            State.settings.projections_path,
            as_of=as_of,
            follow=follow,
            on_batch=on_batch,
        )


def _print_table(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None
) -> None:
    table = Table(*columns, title=title, title_justify="left")
    for row in rows:
        table.add_row(*("" if value is None else str(value) for value in row))
    out.print(table)


def _print_json_lines(objects: Iterable[Any]) -> None:
    for obj in objects:
        sys.stdout.buffer.write(orjson.dumps(obj, default=str) + b"\n")


def _kafka_progress(progress: Progress, description: str) -> kafka_projection.BatchCallback:
    """A progress bar over the records a Kafka catch-up has to read."""
    task = progress.add_task(description, total=None)

    def on_batch(_result: BatchResult, report: kafka_projection.ConsumeReport) -> None:
        progress.update(task, completed=report.records, total=report.to_read)

    return on_batch


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),  # "?" while the total is unknown
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


# --- writing -------------------------------------------------------------------------------


class InputFormat(StrEnum):
    jsonl = "jsonl"
    csv = "csv"


@app.command()
def ingest(
    files: Annotated[list[str], typer.Argument(help="JSON Lines or CSV files; '-' reads stdin.")],
    fmt: Annotated[
        InputFormat | None,
        typer.Option("--format", help="Input format (default: by extension; stdin is jsonl)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Events saved per atomic write.")] = 5000,
    project: Annotated[
        bool, typer.Option(help="Bring the projections up to date before returning.")
    ] = True,
) -> None:
    """Validate and record events; bad lines are kept in DATA_DIR/rejects/ with reasons."""
    for name in files:  # all readable before anything is recorded
        if name != "-" and not os.access(name, os.R_OK):
            _fail(f"cannot read {name}: no such file, or not readable", code=2)
        if name != "-" and os.path.isdir(name):
            _fail(f"cannot read {name}: it is a directory (name the files in it)", code=2)
    ledger = _ledger()
    total = ingest_files.IngestReport()
    for name in files:
        total.add(_ingest_one(ledger, name, fmt, batch_size))
    projections_behind = _project_what_was_recorded(ledger) if project else None
    out.print(
        f"accepted {total.accepted:,}, duplicates {total.duplicates:,}, rejected {total.rejected:,}"
    )
    for source, line, reason in total.first_rejects:
        err.print(f"{source}:{line}: {reason}")
    if total.rejected > len(total.first_rejects):
        err.print(f"… {total.rejected - len(total.first_rejects):,} more rejects")
    for path in total.rejects_files:
        err.print(f"rejects kept in {path}")
    if projections_behind is not None:
        _projections_behind(projections_behind)
    if total.rejected:
        raise typer.Exit(EXIT_REJECTED)


def _ingest_one(
    ledger: Ledger, name: str, fmt: InputFormat | None, batch_size: int
) -> ingest_files.IngestReport:
    try:
        stream, size = ingest_files.open_source(name)
    except OSError as error:
        _fail(f"cannot read {name}: {error.strerror}", code=2)
    with stream, _progress() as progress:
        task = progress.add_task(f"ingesting {name}", total=size or None)

        def show(done: int, _report: ingest_files.IngestReport) -> None:
            progress.update(task, completed=done)

        report = ingest_files.ingest_stream(
            ledger,
            stream,
            name,
            State.settings.rejects_dir,
            fmt=ingest_files.detect_format(name, fmt.value if fmt else None),
            batch_size=batch_size,
            on_batch=show,
        )
    err.print(
        f"{name}: {report.lines:,} line{'' if report.lines == 1 else 's'}, "
        f"{report.accepted:,} accepted, "
        f"{report.duplicates:,} duplicates, {report.rejected:,} rejected"
    )
    return report


@app.command()
def record(
    event_type: Annotated[
        str, typer.Argument(metavar="TYPE", help="An event type, e.g. ContactLogged.")
    ],
    customer: Annotated[str, typer.Option(help="The customer id.")],
    data: Annotated[str, typer.Option(help="The event's data as a JSON object.")] = "{}",
    occurred_at: Annotated[
        str | None, typer.Option(help="ISO-8601 with offset (default: now).")
    ] = None,
    source_event_id: Annotated[str | None, typer.Option(help="Idempotency key.")] = None,
    actor: Annotated[str | None, typer.Option(help="Who records it.")] = None,
) -> None:
    """Record one event (and, with no broker configured, update the projections)."""
    try:
        payload = exact_json(data)
    except ValueError as error:
        _fail(f"--data is not valid JSON: {error}", code=2)
    candidate = {
        "type": event_type,
        "customer_id": customer,
        "occurred_at": occurred_at or datetime.now(UTC).isoformat(),
        "source_event_id": source_event_id,
        "source": "cli",
        "actor": actor,
        "data": payload,
    }
    known = [m.__name__ for m in EVENT_MODELS]
    if event_type not in known:
        _fail(f"unknown event type {event_type!r}; known: {', '.join(known)}", code=2)
    parsed = parse_record(candidate)
    if isinstance(parsed, Rejected):
        _fail(parsed.reason, code=EXIT_REJECTED)
    ledger = _ledger()
    (outcome,) = ledger.record([parsed])
    if outcome.status == "rejected":
        _fail(outcome.reason or "rejected", code=EXIT_REJECTED)
    out.print(f"{outcome.status} {outcome.event_id}")
    projections_behind = _project_what_was_recorded(ledger)
    if projections_behind is not None:
        _projections_behind(projections_behind)


# --- projections ---------------------------------------------------------------------------


def _refuse_beside_kafka(instead: str) -> None:
    """With a broker configured the projections follow the topic, and their file holds
    the consumer group's offsets: projecting from the store beside it would write another
    source's checkpoint into it, and a rebuild from the store would drop the offsets (the
    next consume would read the whole topic again, sending its dead letters again)."""
    if State.settings.kafka is not None:
        _fail(
            "the projections follow Kafka here (LEDGER_KAFKA_BOOTSTRAP is set): run "
            f"`{instead}` instead (or unset LEDGER_KAFKA_BOOTSTRAP for the embedded path)",
            2,
        )


@app.command()
def project(
    follow: Annotated[bool, typer.Option(help="Keep following new events until Ctrl-C.")] = False,
    as_of: Annotated[
        str | None,
        typer.Option(
            help="Move the as-of clock (SLA states) to an ISO time, or 'now' (less "
            "LEDGER_CLOCK_LAG_SECONDS; with --follow it keeps moving with the wall clock)."
        ),
    ] = None,
) -> None:
    """Project stored events into DuckDB from where the projections left off."""
    if as_of is not None and State.settings.kafka is not None:
        _fail(
            "the projections follow Kafka here (LEDGER_KAFKA_BOOTSTRAP is set): move their "
            "as-of clock with `ledger consume --as-of`, which follows the relay's watermarks",
            2,
        )
    _refuse_beside_kafka("ledger consume")
    ledger = _ledger()
    requested = _parse_as_of(as_of)
    try:
        position = _project(ledger, as_of=requested, follow=follow)
    except Interrupted:
        if follow:
            return  # Ctrl-C is how a follower stops
        raise
    out.print(f"projections at position {position:,} of {ledger.head():,}")
    # a moment asked for that the clock had passed (a live clock trails the events)
    moved_to = requested if isinstance(requested, datetime) else None
    if moved_to is not None:
        con = connect(State.settings.projections_path, read_only=True)
        try:
            clock = stored_clock(con)
        finally:
            con.close()
        if clock is not None and clock > moved_to:
            err.print(
                f"the as-of clock stays at {clock.astimezone(UTC).isoformat()}: it never goes back"
            )


@app.command()
def rebuild(
    from_kafka: Annotated[
        bool, typer.Option("--from-kafka", help="Read the events topic from offset 0.")
    ] = False,
    group: Annotated[
        str | None,
        typer.Option(help="With --from-kafka: the consumer group (default LEDGER_KAFKA_GROUP)."),
    ] = None,
    realert: Annotated[
        bool,
        typer.Option(
            help="Publish every derived event again, and with --from-kafka send the dead "
            "letters again (default: only new ones)."
        ),
    ] = False,
) -> None:
    """Rebuild every projection from the start into a new file, then swap it in atomically."""
    path = State.settings.projections_path
    if group is not None and not from_kafka:
        _fail("--group goes with --from-kafka (a rebuild from the store has no group)", 2)
    if not from_kafka:
        _refuse_beside_kafka("ledger rebuild --from-kafka")
    if from_kafka:
        settings = _kafka()
        with _reaching(settings), _progress() as progress:
            events = kafka_projection.rebuild_from_kafka(
                path,
                settings,
                group,
                realert=realert,
                on_batch=_kafka_progress(progress, "rebuilding"),
            )
        out.print(f"rebuilt projections from {events:,} events on Kafka")
        waiting = kafka_projection.derived_waiting(path)
        if waiting and publishes_derived(settings, group or settings.group):
            out.print(
                f"{waiting:,} derived events wait for the next `ledger consume` (or the "
                "running `consume --follow`), which publishes them"
            )
        return
    ledger = _ledger()
    with _progress() as progress:
        task = progress.add_task("rebuilding", total=ledger.head())
        position = store_follower.rebuild(
            ledger,
            path,
            realert=realert,
            on_batch=lambda _r, pos, head: progress.update(task, completed=pos, total=head),
        )
    out.print(f"rebuilt projections up to position {position:,}")


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="Read-only SQL over the projections.")],
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="Output format.")
    ] = OutputFormat.table,
) -> None:
    """Run read-only SQL on the projections (events, customer_profiles, complaint_sla, ...)."""
    path = State.settings.projections_path
    if not sql.strip(" \t\n;"):
        _fail("no SQL given, e.g. ledger query 'SELECT * FROM customer_profiles LIMIT 5'", 2)
    if not path.exists():
        if State.settings.kafka is None:
            _fail(f"no projections at {path}; run `ledger ingest` or `ledger project` first")
        _fail(
            f"no projections at {path}; with a broker configured they are built from the "
            "topic: run `ledger relay`, then `ledger consume`"
        )
    con = connect(path, read_only=True)
    try:
        statements = len(con.extract_statements(sql))
        if statements > 1:  # DuckDB would run them all and show the last one's rows only
            _fail(f"one statement at a time, please ({statements} given)", code=2)
        result = con.execute(sql)
    except duckdb.Error as error:  # parser, catalog, binder, read-only ... errors
        _fail(f"query failed: {error}", code=2)
    columns = [d[0] for d in result.description or []]
    rows = result.fetchall()
    con.close()
    if fmt is OutputFormat.json:
        sys.stdout.buffer.write(
            orjson.dumps(
                [dict(zip(columns, r, strict=True)) for r in rows],
                default=str,
                option=orjson.OPT_INDENT_2,
            )
            + b"\n"
        )
    elif fmt is OutputFormat.csv:
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        _print_table(columns, rows)


# --- auditors ------------------------------------------------------------------------------


@app.command()
def history(
    customer_id: Annotated[str, typer.Argument(help="The customer whose timeline to print.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON: a line per event (--state: one object).")
    ] = False,
    as_of: Annotated[
        str | None,
        typer.Option(
            metavar="TIME",
            help="Only what had happened by then (business time): 'now' or ISO-8601 "
            "with a UTC offset.",
        ),
    ] = None,
    known_at: Annotated[
        str | None,
        typer.Option(
            metavar="TIME",
            help="Only what the ledger had recorded by then: 'now' or ISO-8601 with a UTC offset.",
        ),
    ] = None,
    state: Annotated[
        bool,
        typer.Option(
            "--state",
            help="Instead of the timeline, the customer's projections as they stood "
            "(profile, stages, complaints and their SLA, response waits, derived events), "
            "computed from those events with the clock at --as-of; else as the live "
            "projections' clock was when --known-at, or is now.",
        ),
    ] = False,
) -> None:
    """Print a customer's timeline from the event store, or their projections (--state).

    --as-of: what had happened by then; --known-at: what the ledger knew then."""
    happened_by = (
        None
        if as_of is None
        else _parse_moment(as_of, "--as-of", not_ahead_because="nothing has happened by then yet")
    )
    known_by = None if known_at is None else _parse_moment(known_at, "--known-at")
    recorded = _ledger(create=False).recorded(customer_id)
    if not recorded:
        _fail(f"no events for customer {customer_id!r}", code=EXIT_REJECTED)
    kept = audit.as_it_stood(recorded, happened_by=happened_by, known_by=known_by)
    if not kept:
        bounds = " and ".join(
            f"{what} {moment.isoformat()}"
            for what, moment in (
                ("had happened by", happened_by),
                ("had been recorded by", known_by),
            )
            if moment is not None
        )
        _fail(f"customer {customer_id!r} has no events that {bounds}", code=EXIT_REJECTED)
    if state:
        clock = happened_by or snapshot.live_clock(State.settings.projections_path, known_by)
        _print_customer_state(customer_id, snapshot.customer_state(kept, clock), as_json)
        return
    facts = in_business_order(kept)
    if as_json:
        _print_json_lines(facts)
        return
    _print_table(
        ["occurred_at", "type", "details", "recorded_at", "source"],
        [
            (
                f["occurred_at"],
                f["type"],
                ", ".join(f"{k}={v}" for k, v in f["data"].items()),
                f["recorded_at"],
                f.get("source"),
            )
            for f in facts
        ],
    )


STATE_COLUMNS = {
    "loyalty_stages": ("stage", "entered_at", "exited_at", "reason"),
    "complaints": ("complaint_id", "priority", "status", "filed_at", "first_response_status",
                   "resolution_due", "resolution_status"),
    "response_waits": ("started_at", "channel", "alarm_at", "answered_at", "status"),
    "derived_events": ("occurred_at", "type", "data"),
}  # fmt: skip
"""The columns `history --state` shows of each table (--json: every column)."""


def _print_customer_state(customer_id: str, state: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json_lines([{"customer_id": customer_id, **state}])
        return
    out.print(f"{customer_id} as of {state['as_of'].isoformat()}", markup=False)
    profile = state["profile"][0] if state["profile"] else {}
    _print_table(["field", "value"], [(k, v) for k, v in profile.items() if v is not None])
    for name, columns in STATE_COLUMNS.items():
        if state[name]:
            rows = [[row[column] for column in columns] for row in state[name]]
            _print_table(columns, rows, title=name)


@app.command()
def verify(
    expect: Annotated[
        str | None,
        typer.Option(
            metavar="POSITION:DIGEST",
            help="A digest kept from an earlier run: check that the events up to its "
            "position are still the ones it covered (exit 1 if not).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Prove the recorded history unaltered: print its hash-chain digest, or check one.

    Keep the digest outside this machine; --expect checks it later (exit 1 if altered)."""
    try:
        expected = None if expect is None else audit.parse_point(expect)
    except audit.MalformedChainPoint as error:
        _fail(str(error), code=2)
    ledger = _ledger(create=False)
    with _progress() as progress:
        task = progress.add_task("hashing", total=None)

        def on_progress(position: int, end: int) -> None:
            progress.update(task, completed=position, total=end)

        if expected is None:
            point = audit.chain(ledger, on_progress=on_progress)
        else:
            verdict = audit.verify(ledger, expected, on_progress=on_progress)
            point = verdict.found
    document = {"position": point.position, "events": point.events, "digest": point.digest}
    if expected is None:
        if as_json:
            _print_json_lines([document])
            return
        # the digest alone on stdout (`ledger verify > kept.txt`); the rest is for the reader
        err.print(f"{point.events:,} events up to position {point.position:,}: digest")
        print(point)
        err.print(
            "Keep it outside this machine: `ledger verify --expect` with it shows later "
            "whether any of these events was altered, removed or inserted since."
        )
        return
    position, digest = expected
    if as_json:
        _print_json_lines([{
            **document,
            "expected_position": position,
            "expected_digest": digest,
            "head": verdict.head,
            "outcome": verdict.outcome,
        }])  # fmt: skip
    elif verdict.unaltered:
        out.print(
            f"unaltered: the {point.events:,} events up to position {position:,} give the "
            "digest kept"
        )
    elif verdict.store_ends_before:
        _say_error(
            f"the store ends at position {verdict.head:,}, before {position:,}: events were "
            "removed, or the digest is of another store"
        )
    else:
        _say_error(
            f"ALTERED: the {point.events:,} events up to position {position:,} give digest "
            f"{point.digest}, not the one kept: an event up to there was altered, removed or "
            "inserted since (or the digest is of another store)"
        )
    if not verdict.unaltered:
        raise typer.Exit(EXIT_REJECTED)


@app.command()
def schema(
    event_type: Annotated[str | None, typer.Argument(metavar="TYPE", help="One type only.")] = None,
    ingest_format: Annotated[
        bool, typer.Option("--ingest", help="The shape producers send (without ledger fields).")
    ] = False,
) -> None:
    """Print the JSON Schema of every event type and of the derived events.

    By default the recorded shape subscribers receive; --ingest: the shape producers send."""
    known = contract_types(ingest=ingest_format)
    if event_type is not None and event_type not in known:
        _fail(f"unknown event type {event_type!r}; known: {', '.join(known)}", code=2)
    document = (
        type_schema(event_type, ingest=ingest_format)
        if event_type
        else contract_schema(ingest=ingest_format)
    )
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


# --- Kafka ---------------------------------------------------------------------------------

kafka_app = typer.Typer(help="Topics on the configured broker.", no_args_is_help=True)
dlq_app = typer.Typer(help="The dead-letter topic.", no_args_is_help=True)
app.add_typer(kafka_app, name="kafka")
app.add_typer(dlq_app, name="dlq")


def _kafka() -> KafkaSettings:
    if State.settings.kafka is None:
        _fail("no broker configured: set LEDGER_KAFKA_BOOTSTRAP (e.g. 127.0.0.1:9092)", code=2)
    return State.settings.kafka


UNREACHABLE = (KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError, BrokerNotAvailableError)
"""kafka-python's errors for a broker that cannot be reached (a `NoTlsListener` too)."""


@contextmanager
def _reaching(settings: KafkaSettings) -> Iterator[None]:
    """A Kafka command's block: a broker error ends it with one line and exit status 3,
    saying whether the broker could not be reached, answered with an error that may pass
    (after a restart, say: an idempotent producer's sequence is then unknown to it), or
    refused what running again would not change."""
    try:
        yield
    except UNREACHABLE as error:
        _fail(f"cannot reach the broker at {settings.bootstrap}: {error}")
    except KafkaError as error:
        if not worth_retrying(error):
            _fail(
                f"the broker at {settings.bootstrap} refused: {error}. Running the command "
                "again will not help until that is fixed (the client's rights on the topic, "
                "or a record larger than the broker or client accepts)"
            )
        _fail(
            f"the broker at {settings.bootstrap} answered with an error: {error} (restarted? "
            "run the same command again: it carries on from what was stored and adds "
            "nothing twice)"
        )


@kafka_app.command("init")
def kafka_init() -> None:
    """Create the events, derived-events, dead-letter and watermark topics (when missing)."""
    settings = _kafka()
    with _reaching(settings):
        try:
            created = kafka_tools.ensure_topics(settings)
        except kafka_tools.PartitionsDiffer as error:
            _fail(str(error))
        retention = kafka_tools.short_retention(settings)
    out.print(f"created: {', '.join(created)}" if created else "topics already exist")
    if retention:
        err.print(f"warning: {retention}", markup=False)


@app.command()
def relay(
    follow: Annotated[bool, typer.Option(help="Keep publishing new events until Ctrl-C.")] = False,
    republish: Annotated[
        bool, typer.Option(help="Publish again from --from (after the topic lost data).")
    ] = False,
    from_position: Annotated[
        int | None,
        typer.Option(
            "--from",
            min=0,
            help="With --republish: the first store position to publish again (default 0).",
        ),
    ] = None,
) -> None:
    """Publish every stored event, in order, to the events topic (CloudEvents on Kafka)."""
    if from_position is not None and not republish:
        _fail("--from goes with --republish (the relay otherwise continues where it stands)", 2)
    if follow:
        _log_progress()
        try:
            _wait_for_the_ledger()
        except Interrupted:
            return  # Ctrl-C is how a follower stops
    settings, ledger, state_path = _kafka(), _ledger(create=False), State.settings.relay_state_path
    acknowledged = [0]  # records the broker acknowledged in this run
    with _reaching(settings):
        try:
            with _progress() as progress:
                task = progress.add_task("publishing", total=ledger.head())

                def batch_done(state: relay_tools.RelayState, records: int, head: int) -> None:
                    acknowledged[0] += records
                    progress.update(task, completed=state.position, total=head)

                state = relay_tools.run(
                    ledger,
                    settings,
                    state_path,
                    follow=follow,
                    republish_from_position=(from_position or 0) if republish else None,
                    on_batch=batch_done,
                )
        except relay_tools.InvalidRepublish as error:
            _fail(str(error), code=2)
        except (
            relay_tools.TopicDataLost,
            relay_tools.RelayStateMismatch,
            relay_tools.RelayBusy,
            kafka_tools.PartitionsDiffer,
        ) as error:
            _fail(str(error))
        except StoreLockLost as error:
            _fail(
                f"{error}; stopped, since another relay may have started meanwhile: start "
                "this one again (it refuses while another runs, and resumes from its "
                "acknowledged position)"
            )
        except Interrupted:
            if follow:
                return  # Ctrl-C is how a follower stops
            raise
    out.print(
        f"relay at position {state.position:,}; {acknowledged[0]:,} records "
        f"acknowledged in this run ({state.published:,} in all)"
    )


@app.command()
def consume(
    follow: Annotated[bool, typer.Option(help="Keep consuming until Ctrl-C.")] = False,
    group: Annotated[
        str | None,
        typer.Option(
            help="The consumer group (default LEDGER_KAFKA_GROUP or ledger-projections). "
            "Only that default group publishes the derived events."
        ),
    ] = None,
    realert: Annotated[
        bool,
        typer.Option(
            help="From a new projections file, publish every derived event even though the "
            "derived topic already holds records (refused otherwise: a mistyped data dir)."
        ),
    ] = False,
    as_of: Annotated[
        str | None,
        typer.Option(
            help="Move the as-of clock (SLA states) with the relay's watermarks: 'now' (as "
            "far as they vouch the topic complete, less LEDGER_CLOCK_LAG_SECONDS; with "
            "--follow, as they come) or an ISO time (no further)."
        ),
    ] = None,
) -> None:
    """Project the events topic into DuckDB: a catch-up to its end, or --follow.

    A catch-up reads every partition; --follow joins the group and shares them."""
    settings = _kafka()
    requested = _parse_as_of(as_of)
    if follow:
        _log_progress()
    with _reaching(settings):
        try:
            with _progress() as progress:
                report = kafka_projection.consume(
                    State.settings.projections_path,
                    settings,
                    group,
                    follow=follow,
                    on_batch=None if follow else _kafka_progress(progress, "consuming"),
                    realert=realert,
                    as_of=requested,
                )
        except kafka_projection.WouldRealert as error:
            _fail(str(error))
        except Interrupted:
            if follow:
                return  # Ctrl-C is how a follower stops
            raise
    derived = (
        f"{report.derived:,} derived events published"
        if report.publishing
        else f"derived events are published by group {settings.group} only"
    )
    out.print(
        f"projected {report.events:,} events in {report.batches:,} batches; "
        f"{report.dead_letters:,} dead letters; {derived}"
    )
    if requested is not None and not follow:
        _say_clock(report, settings)


def _say_clock(report: kafka_projection.ConsumeReport, settings: KafkaSettings) -> None:
    """Where `consume --as-of` left the as-of clock, and why not further."""
    if report.watermark is None:
        err.print(
            f"no watermark of the relay's to go by on {settings.watermark_topic} (`ledger "
            "relay` sends one when it has nothing new; see the warning above, if any): the "
            "as-of clock moved with the events only"
        )
    elif report.clock is not None:
        out.print(
            f"as-of clock at {report.clock.astimezone(UTC).isoformat()} (the relay vouches "
            f"for every event recorded up to {report.watermark.astimezone(UTC).isoformat()})"
        )


@dlq_app.command("list")
def dlq_list(
    limit: Annotated[int, typer.Option(min=1, help="At most this many records.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Show the dead letters with the topic, partition, offset and error of each."""
    settings = _kafka()
    with _reaching(settings):
        letters = list_dead_letters(settings, limit)
    if as_json:
        _print_json_lines(letters)
        return
    table = Table("original", "error", "message", "key", "value")
    for letter in letters:
        table.add_row(
            f"{letter['original_topic']}:{letter['original_partition']}@{letter['original_offset']}",
            letter["error_class"] or "",
            letter["error_message"] or "",
            letter["key"],
            letter["value"][:80],
        )
    out.print(table)
    out.print(
        f"{len(letters)} dead letters"
        + (f" (the first {limit}: --limit)" if len(letters) == limit else "")
    )


@app.command()
def status(
    group: Annotated[
        str | None, typer.Option(help="The consumer group to report (default LEDGER_KAFKA_GROUP).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object, for monitoring (lag, waiting alerts).")
    ] = False,
) -> None:
    """Store head, projection positions and clock, relay position, lag per partition."""
    settings = State.settings
    # a consumer's data dir holds projections and no store: its head reads as 0, and no
    # store is made there (a relay would take it for a ledger); a missing dir is refused
    consumer_only = settings.data_dir.is_dir() and not settings.holds_a_ledger()
    found = pipeline_status(
        None if consumer_only else _ledger(create=False),
        event_store=settings.event_store_label,
        projections_path=settings.projections_path,
        relay_state_path=settings.relay_state_path,
        kafka=settings.kafka,
        group=group,
    )
    if as_json:
        _print_json_lines([_status_document(found)])
    else:
        _print_status(found)
    for problem in found.problems:
        _say_error(problem)
    if found.broker_error is not None:
        _fail(found.broker_error)
    if found.problems:
        raise typer.Exit(EXIT_UNAVAILABLE)


def _print_status(found: PipelineStatus) -> None:
    table = Table("what", "where", "position", title="customer-ledger", title_justify="left")
    table.add_row("event store head", found.event_store, f"{found.store_head:,}")
    for source, position in found.projections.items():
        table.add_row("projections", source, f"{position:,}")
    if found.clock is not None:
        table.add_row("projection as-of clock", "", str(found.clock))
    if found.topic_complete_until is not None:
        table.add_row(
            "topic known complete (to the relay's previous batch)", found.relay_topic or "",
            str(found.topic_complete_until),
        )  # fmt: skip
    if found.relay_topic is not None:
        behind = f" ({found.relay_behind:,} behind the store head)" if found.relay_behind else ""
        table.add_row(
            "relay (acknowledged)", found.relay_topic, f"{found.relay_position:,}{behind}"
        )
    if found.relay_watermark is not None:
        table.add_row(
            "relay watermark (every event recorded up to it is on the topic)",
            f"{found.relay_topic}.watermarks", str(found.relay_watermark),
        )  # fmt: skip
    if found.derived is not None:
        published = f"{found.derived.published:,} of {found.derived.derived:,}"
        if found.derived.withdrawn or found.derived.withdrawals_waiting:
            published += (
                f" ({found.derived.withdrawn:,} withdrawn since by late events, "
                f"{found.derived.withdrawals_waiting:,} withdrawals waiting)"
            )
        table.add_row("derived events acknowledged", found.derived.topic, published)
    if found.dead_letters is not None:
        table.add_row("dead letters", found.dead_letters.topic, f"{found.dead_letters.records:,}")
    out.print(table)
    if found.relay_topic is None or found.broker_error is not None:
        return
    lag_table = Table(
        "partition",
        "projected offset",
        "high watermark",
        "lag",
        title=f"group {found.group} on {found.relay_topic}",
        title_justify="left",
    )
    for lag in found.partitions:
        lag_table.add_row(
            str(lag.partition),
            f"{lag.projected or 0:,}",
            "?" if lag.highwater is None else f"{lag.highwater:,}",
            "?" if lag.lag is None else f"{lag.lag:,}",
        )
    out.print(lag_table)


def _status_document(found: PipelineStatus) -> dict[str, Any]:
    document = asdict(found)
    if found.derived is not None:
        document["derived"]["waiting"] = found.derived.waiting
    for partition, lag in zip(document["partitions"], found.partitions, strict=True):
        partition["lag"] = lag.lag
    return document


@app.command("dev-broker")
def dev_broker(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 9092,
) -> None:
    """Run the bundled Tansu broker (memory storage: nothing survives a restart)."""
    broker = kafka_tools.DevBroker(port)
    # `kill` (SIGTERM) too stops the broker, which would otherwise outlive this command:
    # from before it starts, so that a kill right after it says where it is stops it too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        try:
            broker.start()
        except RuntimeError as error:
            _fail(str(error))
        err.print(f"broker on {broker.bootstrap}; export LEDGER_KAFKA_BOOTSTRAP={broker.bootstrap}")
        assert broker.process is not None
        broker.process.wait()
    except Interrupted:
        pass  # Ctrl-C is how it stops
    finally:
        broker.stop()


# --- demo ----------------------------------------------------------------------------------


@app.command()
def demo(
    customers: Annotated[int, typer.Option(min=1, help="How many customers to simulate.")] = 500,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed, the same history.")] = 7,
    via_kafka: Annotated[
        bool,
        typer.Option(
            "--via-kafka",
            help="Relay and consume through Kafka (LEDGER_KAFKA_BOOTSTRAP, else the bundled "
            "dev broker on a free port).",
        ),
    ] = False,
) -> None:
    """Generate a realistic two-year CRM history, ingest it, and summarise the projections."""
    from domain.demo_history import generate_history

    settings = State.settings
    if not via_kafka:
        _refuse_beside_kafka("ledger demo --via-kafka")
    ledger = _ledger()
    if ledger.head():
        _fail(
            f"the event store ({settings.event_store_label}) already holds a ledger: the "
            "demo records a history of its own, and mixed with another it would be refused "
            "in part; give it a new --data-dir, or remove this one",
            code=2,
        )
    events = generate_history(customers=customers, seed=seed)
    path = settings.data_dir / f"demo-{customers}-{seed}.jsonl"
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    err.print(f"generated {len(events):,} events for {customers:,} customers in {path}")
    report = _ingest_one(ledger, str(path), None, 5000)
    if via_kafka:
        with ExitStack() as stack:
            kafka = settings.kafka
            if kafka is None:
                broker = stack.enter_context(kafka_tools.dev_broker())
                err.print(f"started the bundled broker on {broker.bootstrap}")
                kafka = KafkaSettings(bootstrap=broker.bootstrap)
            kafka_tools.ensure_topics(kafka)
            relayed = relay_tools.run(ledger, kafka, settings.relay_state_path)
            consumed = kafka_projection.consume(settings.projections_path, kafka)
            err.print(
                f"relayed up to position {relayed.position:,}; consumed {consumed.events:,} "
                f"events; published {consumed.derived:,} derived events"
            )
    else:
        _project(ledger)
    out.print(
        f"ingested {report.accepted:,} events ({report.duplicates:,} duplicates, "
        f"{report.rejected:,} rejected)"
    )
    con = connect(settings.projections_path, read_only=True)
    try:
        for title, columns, rows in reports.summary(con):
            _print_table(columns, rows, title)
    finally:
        con.close()
    out.print(
        f"explore: ledger --data-dir {settings.data_dir} query "
        "'SELECT * FROM customer_profiles LIMIT 5'"
    )


class Interrupted(BaseException):
    """Ctrl-C, or SIGTERM (`kill`, systemd, a container stop). Not KeyboardInterrupt,
    which click turns into "Aborted!" and exit status 1 (the status of rejected input); a
    follower stops on it normally (a group member leaves its group at once instead of
    being waited for), anything else ends with 128 + the signal (130, 143) and a line
    saying that what was stored stays."""


_INTERRUPTED_BY: list[signal.Signals] = []  # the signals received, in order


def _interrupt(signum: int, frame: object) -> None:
    _INTERRUPTED_BY.append(signal.Signals(signum))
    raise Interrupted


def _interrupted() -> NoReturn:
    by = _INTERRUPTED_BY[0] if _INTERRUPTED_BY else signal.SIGINT
    said = "interrupted" if by == signal.SIGINT else f"stopped by {by.name}"
    _say_error(
        f"{said}: what was stored before stays (whole batches only); run the same "
        "command again to continue: it adds nothing twice"
    )
    sys.exit(EXIT_INTERRUPTED + by - signal.SIGINT)


def main() -> None:
    """Runs the app; failures of the store, the projections, the disk or the broker end
    with a message and exit status 3 instead of a traceback. What was recorded before
    stays recorded (whole batches only), so the same command can simply be run again."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    _log_to_stderr()
    try:
        app()
    except SystemExit as ending:
        if ending.code == EXIT_REJECTED and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            # click (vendored in typer) ends a command whose reader went away (`ledger
            # query … | head`) with 1, which here means rejected input, after wrapping
            # stdout so; a Unix tool ends as killed by SIGPIPE
            sys.exit(EXIT_OUTPUT_CLOSED)
        raise  # the command's own ending (a follower that stopped on Ctrl-C included)
    except BaseException as error:
        # After a Ctrl-C, whatever came out is its doing: libraries report it their own
        # way (orjson as a TypeError from its `default` hook, DuckDB as "Query
        # interrupted", and a rollback after it as "no transaction is active")
        if _INTERRUPTED_BY:
            _interrupted()
        _end_with(error)


def _end_with(error: BaseException) -> NoReturn:
    """Failures of the store, the projections, the disk or the broker: a message and exit
    status 3 (outside click: sys.exit, not typer.Exit); anything else is a bug, raised as
    it is."""
    message: str | None = None
    if isinstance(error, ProjectionsOutdated) and State.settings.kafka is not None:
        message = f"{error} (with a broker configured: `ledger rebuild --from-kafka`)"
    elif isinstance(error, ProjectionsUnavailable | TopicMissing | RebuildBehind):
        message = str(error)
    elif isinstance(error, MapperDeserialisationError):
        message = (
            f"the event store cannot be read ({error}): its events were encrypted with "
            "another LEDGER_CIPHER_KEY, or it is encrypted and LEDGER_CIPHER_KEY is not set "
            "(or set for a store that is not encrypted); nothing was changed"
        )
    elif isinstance(
        error,
        PersistenceError
        | ConcurrencyExhausted
        | duckdb.Error
        | OSError
        | KafkaError
        | DecoderFailed,
    ):
        message = (
            f"{_what_failed(error)}: {_named(error)}\n"
            "What was stored before this point is stored whole; fix the cause and run the "
            "same command again: it carries on from there and adds nothing twice."
        )
    if message is None:
        raise error
    _say_error(message)
    sys.exit(EXIT_UNAVAILABLE)


def _named(error: BaseException) -> str:
    """The error with its class name once (kafka-python's errors already start with it)."""
    text, name = str(error), type(error).__name__
    return text if text.startswith(name) else f"{name}: {text}"


def _what_failed(error: BaseException) -> str:
    settings = State.settings
    if isinstance(error, PersistenceError | ConcurrencyExhausted):
        return f"the event store ({settings.event_store_label}) failed"
    if isinstance(error, duckdb.Error):
        return f"the projections ({settings.projections_path}) failed"
    if isinstance(error, KafkaError):
        return "the Kafka broker failed"
    if isinstance(error, DecoderFailed):
        return "reading the Kafka topic failed"
    return f"the data directory ({settings.data_dir}) failed"


if __name__ == "__main__":
    main()
