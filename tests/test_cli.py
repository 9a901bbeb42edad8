"""The `ledger` command end to end: real subprocesses, real files, real stores.

Each test runs the installed console script with the LEDGER_* variables removed from the
environment (unless a test sets one on purpose) and checks exit statuses, output and the
files left behind. Subprocesses cost about a second each, so steps that belong together
share one data directory.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
import typer
from conftest import children_of, event, running
from kafka import KafkaProducer
from kafka.errors import (
    KafkaTimeoutError,
    OutOfOrderSequenceNumberError,
    TopicAuthorizationFailedError,
)

import cli
from bootstrap import Settings, open_ledger
from consumers.kafka import KafkaSettings, free_port
from domain.demo_history import generate_history
from projections.schema import ProjectionsOutdated

LEDGER = Path(sys.executable).parent / "ledger"

EVENT_TYPES = {
    "CustomerRegistered",
    "CustomerProfileUpdated",
    "ConsentChanged",
    "ContactLogged",
    "PurchaseRecorded",
    "PurchaseRefunded",
    "ComplaintFiled",
    "ComplaintAcknowledged",
    "ComplaintEscalated",
    "ComplaintOnHold",
    "ComplaintResumed",
    "ComplaintResolved",
    "ComplaintReopened",
    "ComplaintClosed",
    "SurveyAnswered",
}
COMMANDS = (
    "ingest", "record", "project", "rebuild", "query", "history", "verify", "schema", "demo",
)  # fmt: skip


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def message(self) -> str:
        """stderr with rich's line wrapping undone."""
        return " ".join(self.err.split())

    def json(self) -> Any:
        return json.loads(self.out)


def ledger_command(
    args: tuple[str, ...], data_dir: Path | None, env: dict[str, str] | None
) -> tuple[list[str], dict[str, str]]:
    """The command line and its environment: without the runner's ledger settings or
    forced colours, wide and plain, plus `env`."""
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith("LEDGER_") and k != "FORCE_COLOR"
    }
    environment.update(COLUMNS="200", NO_COLOR="1", **(env or {}))
    command = [str(LEDGER)]
    if data_dir is not None:
        command += ["--data-dir", str(data_dir)]
    return [*command, *args], environment


def run(
    *args: str,
    data_dir: Path | None = None,
    cwd: Path,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
) -> Result:
    command, environment = ledger_command(args, data_dir, env)
    completed = subprocess.run(
        command,
        cwd=cwd,
        env=environment,
        input=stdin or b"",
        capture_output=True,
        timeout=120,
        check=False,
    )
    return Result(
        completed.returncode,
        completed.stdout.decode(),
        completed.stderr.decode(),
    )


def run_on_a_terminal(
    *args: str, data_dir: Path, cwd: Path, env: dict[str, str], stdin: bytes = b""
) -> Result:
    """`run` with stderr on a pseudo-terminal, where the progress bars are drawn; `err` is
    what the terminal received."""
    main, terminal = pty.openpty()
    command, environment = ledger_command(args, data_dir, {"TERM": "xterm", **env})
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=environment,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    received = bytearray()

    def drain() -> None:  # the terminal must be read while the command writes to it
        with suppress(OSError):  # EIO once the command closed its end
            while chunk := os.read(main, 65536):
                received.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = process.communicate(stdin, timeout=120)
    reader.join(timeout=10)
    os.close(main)
    return Result(process.returncode, out.decode(), received.decode(errors="replace"))


def line(type_: str, customer: str, at: str, data: dict[str, Any], **envelope: Any) -> str:
    return orjson.dumps(
        {"type": type_, "customer_id": customer, "occurred_at": at, **envelope, "data": data}
    ).decode()


GOOD = [
    line(
        "CustomerRegistered",
        "C1",
        "2025-01-01T09:00:00+08:00",
        {"name": "Alice Example", "region": "East", "segment": "retail"},
        source_event_id="crm-1",
        source="crm",
    ),
    line(
        "PurchaseRecorded",
        "C1",
        "2025-01-02T10:00:00Z",
        {"order_id": "O1", "amount": "120.00", "currency": "EUR"},
    ),
    line(
        "PurchaseRecorded",
        "C1",
        "2025-03-02T10:00:00Z",
        {"order_id": "O2", "amount": "30", "currency": "EUR"},
        source_event_id="pos-2",
    ),
    line(
        "ContactLogged", "C2", "2025-01-05T10:00:00Z", {"channel": "phone", "direction": "inbound"}
    ),
    line(
        "ComplaintFiled",
        "C2",
        "2025-01-06T10:00:00Z",
        {"complaint_id": "K1", "channel": "phone", "category": "billing", "priority": "high"},
    ),
]
BAD = {  # text: what its reason must say
    "this is not json": "not valid JSON",
    line("PurchaseMade", "C1", "2025-01-02T10:00:00Z", {}): "unknown event type 'PurchaseMade'",
    line(
        "PurchaseRefunded", "C1", "2025-01-03T10:00:00Z", {"order_id": "O1", "amount": "500"}
    ): "exceeds what remains refundable",
    line(
        "ContactLogged", "C2", "2025-01-05T10:00:00", {"channel": "sms", "direction": "outbound"}
    ): "occurred_at has no UTC offset",
}
PROFILES_SQL = (
    "SELECT customer_id, purchase_count, total_spend, complaint_count "
    "FROM customer_profiles ORDER BY customer_id"
)
EXPECTED_PROFILES = [
    {"customer_id": "C1", "purchase_count": 2, "total_spend": "150.0000", "complaint_count": 0},
    {"customer_id": "C2", "purchase_count": 0, "total_spend": "0.0000", "complaint_count": 1},
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{text}\n" for text in lines))
    return path


def rejects_in(data_dir: Path) -> dict[Path, list[dict[str, Any]]]:
    return {
        path: [json.loads(text) for text in path.read_text().splitlines()]
        for path in sorted((data_dir / "rejects").glob("*"))
    }


# --- ingest --------------------------------------------------------------------------------


def test_ingest_keeps_rejects_projects_and_recognises_a_replay(tmp_path: Path) -> None:
    data = tmp_path / "d"
    bad = list(BAD)
    mixed = [GOOD[0], bad[0], GOOD[1], bad[1], GOOD[2], bad[2], GOOD[3], "", bad[3], GOOD[4]]
    source = write_lines(tmp_path / "mixed.jsonl", mixed)

    first = run("ingest", str(source), data_dir=data, cwd=tmp_path)
    assert first.code == 1, first
    assert first.out.strip() == "accepted 5, duplicates 0, rejected 4"

    (rejects_file, rejects), *others = rejects_in(data).items()
    assert not others
    assert rejects_file.name.endswith("mixed.jsonl.jsonl")
    assert str(rejects_file.name) in first.message
    # Parse rejects are written as lines are read, invariant rejects when their batch is
    # recorded: the file is not in line order.
    rejects.sort(key=lambda r: r["line"])
    assert [r["line"] for r in rejects] == [2, 4, 6, 9]
    assert [r["text"] for r in rejects] == bad
    assert {r["source"] for r in rejects} == {str(source)}
    for reject, expected in zip(rejects, BAD.values(), strict=True):
        assert expected in reject["reason"], reject
    # and said at once, each with its line (the first five of them)
    said = [
        line
        for line in first.err.splitlines()
        if re.match(rf"{re.escape(str(source))}:\d+: ", line)
    ]
    assert sorted(said) == sorted(f"{source}:{r['line']}: {r['reason']}" for r in rejects)

    projected = run("query", PROFILES_SQL, "--format", "json", data_dir=data, cwd=tmp_path)
    assert projected.code == 0, projected
    assert projected.json() == EXPECTED_PROFILES

    replay = run(
        "ingest", str(write_lines(tmp_path / "good.jsonl", GOOD)), data_dir=data, cwd=tmp_path
    )
    assert replay.code == 0, replay
    assert replay.out.strip() == "accepted 0, duplicates 5, rejected 0"
    assert len(rejects_in(data)) == 1


CSV_TEXT = """\
type,customer_id,occurred_at,source_event_id,data.channel,data.direction,data.notes,data.order_id,data.amount,data.currency
CustomerRegistered,S2,2025-02-01T09:00:00Z,r1,,,,,,
ContactLogged,S2,2025-02-02T09:00:00Z,c1,phone,inbound,"multi, line
note",,,
PurchaseRecorded,S2,2025-02-03T09:00:00Z,p1,,,,O1,12.5,EUR
ContactLogged,S2,2025-02-04T09:00:00Z,c2,phone
PurchaseRecorded,S2,2025-02-05T09:00:00Z,p2,,,,O2,7,USD
"""


def test_ingest_from_stdin_and_csv(tmp_path: Path) -> None:
    data = tmp_path / "d"
    piped = [
        line("CustomerRegistered", "S1", "2025-02-01T08:00:00Z", {"region": "West"}),
        "{not json",
        line(
            "ContactLogged",
            "S1",
            "2025-02-02T08:00:00Z",
            {"channel": "sms", "direction": "outbound"},
        ),
    ]
    from_stdin = run(
        "ingest", "-", data_dir=data, cwd=tmp_path, stdin="\n".join(piped).encode() + b"\n"
    )
    assert from_stdin.code == 1, from_stdin
    assert from_stdin.out.strip() == "accepted 2, duplicates 0, rejected 1"
    ((stdin_rejects, (reject,)),) = rejects_in(data).items()
    assert "stdin" in stdin_rejects.name
    assert (reject["line"], reject["text"]) == (2, "{not json")

    source = tmp_path / "orders.csv"
    source.write_text(CSV_TEXT)
    from_csv = run("ingest", str(source), data_dir=data, cwd=tmp_path)
    assert from_csv.code == 1, from_csv
    assert from_csv.out.strip() == "accepted 3, duplicates 0, rejected 2"
    (csv_rejects,) = [r for path, r in rejects_in(data).items() if "orders.csv" in path.name]
    assert [r["line"] for r in csv_rejects] == [6, 7]
    assert "header names 10 columns" in csv_rejects[0]["reason"]
    assert "data.reporting_amount" in csv_rejects[1]["reason"]

    events = run(
        "query",
        "SELECT customer_id, type, source_event_id, data->>'notes' AS notes, "
        "data->>'amount' AS amount FROM events ORDER BY occurred_at",
        "--format",
        "json",
        data_dir=data,
        cwd=tmp_path,
    )
    assert events.code == 0, events
    assert [(e["customer_id"], e["type"]) for e in events.json()] == [
        ("S1", "CustomerRegistered"),
        ("S2", "CustomerRegistered"),
        ("S1", "ContactLogged"),
        ("S2", "ContactLogged"),
        ("S2", "PurchaseRecorded"),
    ]
    assert events.json()[3]["notes"] == "multi, line\nnote"
    assert events.json()[4]["amount"] == "12.5"


# --- record and history --------------------------------------------------------------------


def record_in_an_outdated_file(data: Path, cwd: Path, *, version: int) -> str:
    """Record a contact, then leave the projections as schema `version` left them (from
    version 4 back, `derived_published` held the ids only); returns the contact's data."""
    contact = '{"channel": "phone", "direction": "inbound", "topic": "outdated"}'
    recorded = run("record", "ContactLogged", "--customer", "C1", "--data", contact,
                   data_dir=data, cwd=cwd)  # fmt: skip
    assert recorded.code == 0, recorded
    con = duckdb.connect(str(data / "projections.duckdb"))
    con.execute("DROP TABLE derived_published")
    con.execute("CREATE TABLE derived_published (event_id UUID PRIMARY KEY)")
    con.execute("UPDATE projection_meta SET schema_version = ?", [version])
    con.close()
    return contact


def test_recorded_events_are_said_recorded_when_the_projections_cannot_follow(
    tmp_path: Path,
) -> None:
    """A projections file that cannot be updated (busy, or of another version) after the
    events were recorded: "try again" made a user record the same contact twice (a review
    of the README). The command says the events are recorded, exits 3, and `ledger
    project` is what to run."""
    data = tmp_path / "d"
    contact = record_in_an_outdated_file(data, tmp_path, version=1)

    second = run("record", "ContactLogged", "--customer", "C1", "--data", contact,
                 data_dir=data, cwd=tmp_path)  # fmt: skip
    assert second.code == 3, second
    assert re.fullmatch(r"accepted [0-9a-f-]{36}", second.out.strip()), second.out
    assert "recorded, but the projections were not updated" in second.message
    assert "Nothing needs recording again: `ledger rebuild`" in second.message  # outdated

    (tmp_path / "more.jsonl").write_text(
        orjson.dumps(event("CustomerRegistered", "C2", "2025-06-01T09:00:00Z")).decode()
    )
    ingested = run("ingest", "more.jsonl", data_dir=data, cwd=tmp_path)
    assert ingested.code == 3, ingested
    assert "accepted 1, duplicates 0, rejected 0" in ingested.out
    assert "recorded, but the projections were not updated" in ingested.message
    history = run("history", "C1", "--json", data_dir=data, cwd=tmp_path)
    assert len(history.out.splitlines()) == 2, "both contacts are recorded"


def test_record_then_history_in_business_time_order(tmp_path: Path) -> None:
    data = tmp_path / "d"
    late = run(
        "record",
        "ContactLogged",
        "--customer",
        "C9",
        "--data",
        '{"channel": "phone", "direction": "inbound", "topic": "late"}',
        "--occurred-at",
        "2025-01-05T09:30:00Z",
        "--source-event-id",
        "call-2",
        data_dir=data,
        cwd=tmp_path,
    )
    assert late.code == 0, late
    match = re.fullmatch(r"accepted ([0-9a-f-]{36})", late.out.strip())
    assert match, late.out
    late_id = match.group(1)

    # Recorded second, but earlier in business time (09:00Z), though later as a string.
    early = run(
        "record",
        "ContactLogged",
        "--customer",
        "C9",
        "--data",
        '{"channel": "email", "direction": "outbound", "topic": "early"}',
        "--occurred-at",
        "2025-01-05T10:00:00+01:00",
        data_dir=data,
        cwd=tmp_path,
    )
    assert early.code == 0, early

    again = run(
        "record",
        "ContactLogged",
        "--customer",
        "C9",
        "--data",
        '{"channel": "phone", "direction": "inbound", "topic": "late"}',
        "--occurred-at",
        "2025-01-05T09:30:00Z",
        "--source-event-id",
        "call-2",
        data_dir=data,
        cwd=tmp_path,
    )
    assert (again.code, again.out.strip()) == (0, f"duplicate {late_id}")

    refused = run(
        "record",
        "PurchaseRefunded",
        "--customer",
        "C9",
        "--data",
        '{"order_id": "NOPE", "amount": "1"}',
        data_dir=data,
        cwd=tmp_path,
    )
    assert refused.code == 1, refused
    assert "order NOPE was never recorded for customer C9" in refused.message

    timeline = run("history", "C9", "--json", data_dir=data, cwd=tmp_path)
    assert timeline.code == 0, timeline
    facts = [json.loads(text) for text in timeline.out.splitlines()]
    assert [f["data"]["topic"] for f in facts] == ["early", "late"]
    assert [f["type"] for f in facts] == ["ContactLogged", "ContactLogged"]
    assert facts[1]["event_id"] == late_id
    assert facts[1]["source_event_id"] == "call-2"
    assert {f["source"] for f in facts} == {"cli"}

    table = run("history", "C9", data_dir=data, cwd=tmp_path)
    assert table.code == 0, table
    assert table.out.count("ContactLogged") == 2
    assert table.out.index("topic=early") < table.out.index("topic=late")

    projected = run(
        "query",
        "SELECT count(*) AS n FROM events WHERE customer_id = 'C9'",
        "--format",
        "csv",
        data_dir=data,
        cwd=tmp_path,
    )
    assert projected.out == "n\n2\n"

    unknown = run("history", "NOBODY", data_dir=data, cwd=tmp_path)
    assert unknown.code != 0
    assert "no events for customer 'NOBODY'" in unknown.message
    assert unknown.out == ""


# --- query ---------------------------------------------------------------------------------


def test_query_formats_and_errors(tmp_path: Path) -> None:
    data = tmp_path / "d"
    source = write_lines(tmp_path / "good.jsonl", GOOD)
    assert run("ingest", str(source), data_dir=data, cwd=tmp_path).code == 0

    as_csv = run("query", PROFILES_SQL, "--format", "csv", data_dir=data, cwd=tmp_path)
    assert as_csv.code == 0, as_csv
    assert list(csv.DictReader(io.StringIO(as_csv.out))) == [
        {k: str(v) for k, v in row.items()} for row in EXPECTED_PROFILES
    ]
    assert as_csv.out.splitlines()[0] == "customer_id,purchase_count,total_spend,complaint_count"

    as_json = run("query", PROFILES_SQL, "--format", "json", data_dir=data, cwd=tmp_path)
    assert as_json.code == 0, as_json
    assert as_json.json() == EXPECTED_PROFILES

    as_table = run("query", PROFILES_SQL, data_dir=data, cwd=tmp_path)
    assert as_table.code == 0, as_table
    header = next(text for text in as_table.out.splitlines() if "customer_id" in text)
    assert re.search(r"customer_id\W+purchase_count\W+total_spend\W+complaint_count", header)
    rows = [re.findall(r"[\w.]+", text) for text in as_table.out.splitlines()]
    assert ["C1", "2", "150.0000", "0"] in rows
    assert ["C2", "0", "0.0000", "1"] in rows

    broken = run("query", "SELECT * FROM no_such_table", data_dir=data, cwd=tmp_path)
    assert broken.code == 2, broken
    assert "query failed" in broken.message
    assert "no_such_table" in broken.message

    writing = run("query", "DELETE FROM customer_profiles", data_dir=data, cwd=tmp_path)
    assert writing.code == 2, writing
    two = run("query", "SELECT 1; SELECT 2", data_dir=data, cwd=tmp_path)
    assert two.code == 2 and "one statement at a time, please (2 given)" in two.message, two
    assert run("query", "SELECT 1;", data_dir=data, cwd=tmp_path).code == 0
    still = run("query", PROFILES_SQL, "--format", "json", data_dir=data, cwd=tmp_path)
    assert still.json() == EXPECTED_PROFILES

    missing = tmp_path / "missing"
    nothing = run("query", "SELECT 1", data_dir=missing, cwd=tmp_path)
    assert nothing.code == 3, nothing
    assert "no projections at" in nothing.message
    assert "ledger ingest" in nothing.message
    assert not missing.exists()
    through_kafka = {"LEDGER_KAFKA_BOOTSTRAP": "127.0.0.1:1"}  # not reached: only its mode
    nothing = run("query", "SELECT 1", data_dir=missing, cwd=tmp_path, env=through_kafka)
    assert nothing.code == 3 and "run `ledger relay`, then `ledger consume`" in nothing.message


# --- schema --------------------------------------------------------------------------------


def test_schema_prints_the_contract(tmp_path: Path) -> None:
    everything = run("schema", cwd=tmp_path)
    assert everything.code == 0, everything
    document = everything.json()
    assert set(document["discriminator"]["mapping"]) == EVENT_TYPES
    assert len(document["oneOf"]) == 15
    assert set(document["$defs"]) >= EVENT_TYPES

    one = run("schema", "PurchaseRecorded", cwd=tmp_path)
    assert one.code == 0, one
    purchase = one.json()
    assert purchase["title"] == "PurchaseRecorded"
    assert purchase["$id"] == "urn:customer-ledger:schema:PurchaseRecorded:v1"  # ce_dataschema
    assert purchase["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    producers = run("schema", "--ingest", cwd=tmp_path).json()
    assert producers["$id"] == "urn:customer-ledger:schema:ingest" != document["$id"]
    assert "oneOf" not in purchase
    assert {"customer_id", "occurred_at", "type", "data"} <= set(purchase["properties"])
    assert "ComplaintFiled" not in purchase.get("$defs", {})

    unknown = run("schema", "Nope", cwd=tmp_path)
    assert unknown.code == 2, unknown
    assert "unknown event type 'Nope'" in unknown.message
    assert unknown.out == ""


# --- projections ---------------------------------------------------------------------------


SLA_SQL = (
    "SELECT complaint_id, first_response_status, resolution_status FROM complaint_sla "
    "ORDER BY complaint_id"
)


def test_project_as_of_moves_pending_sla_to_breached(tmp_path: Path) -> None:
    data = tmp_path / "d"
    events = [
        line(
            "ComplaintFiled",
            "C3",
            "2025-01-01T08:00:00Z",
            {"complaint_id": "K0", "channel": "email", "category": "delivery"},
        ),
        line("ComplaintAcknowledged", "C3", "2025-01-01T09:00:00Z", {"complaint_id": "K0"}),
        line(
            "ComplaintResolved",
            "C3",
            "2025-01-02T09:00:00Z",
            {"complaint_id": "K0", "resolution": "redelivered"},
        ),
        # Filed last (so the event-time clock stands at its filing), never acknowledged.
        line(
            "ComplaintFiled",
            "C2",
            "2025-01-06T10:00:00Z",
            {"complaint_id": "K1", "channel": "phone", "category": "billing", "priority": "high"},
        ),
    ]
    assert (
        run(
            "ingest", str(write_lines(tmp_path / "in.jsonl", events)), data_dir=data, cwd=tmp_path
        ).code
        == 0
    )

    before = run("query", SLA_SQL, "--format", "json", data_dir=data, cwd=tmp_path)
    assert before.json() == [
        {"complaint_id": "K0", "first_response_status": "met", "resolution_status": "met"},
        {"complaint_id": "K1", "first_response_status": "pending", "resolution_status": "pending"},
    ]

    moved = run("project", "--as-of", "2026-06-01T00:00:00+00:00", data_dir=data, cwd=tmp_path)
    assert moved.code == 0, moved
    assert re.fullmatch(r"projections at position ([\d,]+) of \1", moved.out.strip()), moved.out

    after = run(
        "query",
        f"SELECT *, (SELECT as_of FROM projection_clock) AS clock FROM ({SLA_SQL})",
        "--format",
        "json",
        data_dir=data,
        cwd=tmp_path,
    )
    assert [{k: v for k, v in row.items() if k != "clock"} for row in after.json()] == [
        {"complaint_id": "K0", "first_response_status": "met", "resolution_status": "met"},
        {
            "complaint_id": "K1",
            "first_response_status": "breached",
            "resolution_status": "breached",
        },
    ]
    assert after.json()[0]["clock"].startswith("2026-06-01T00:00:00")

    naive = run("project", "--as-of", "2026-06-01T00:00:00", data_dir=data, cwd=tmp_path)
    assert naive.code == 2, naive
    assert "has no UTC offset (write e.g. 2026-06-01T00:00:00+00:00)" in naive.message
    a_date = run("project", "--as-of", "2026-06-01", data_dir=data, cwd=tmp_path)
    assert "(write e.g. 2026-06-01T00:00:00+00:00)" in a_date.message, a_date

    # the clock never goes back: a time in the future (a typo in the year) is refused
    future = datetime.now(UTC) + timedelta(hours=2)
    ahead = run("project", "--as-of", future.isoformat(), data_dir=data, cwd=tmp_path)
    assert ahead.code == 2 and "lies more than 1:00:00 after now" in ahead.message, ahead
    assert run("project", "--as-of", "now", data_dir=data, cwd=tmp_path).code == 0

    earlier = run("project", "--as-of", "2026-01-01T00:00:00+00:00", data_dir=data, cwd=tmp_path)
    assert earlier.code == 0, earlier
    assert "the as-of clock stays at" in earlier.err and "it never goes back" in earlier.err
    assert "stays at" not in moved.err


EVERY_TABLE_SQL = (
    " UNION ALL ".join(
        f"SELECT '{table}' AS t, to_json(x)::VARCHAR AS row FROM {table} AS x"
        for table in (
            "events",
            "customer_profiles",
            "loyalty_stage_history",
            "complaint_sla",
            "response_waits",
        )
    )
    + " ORDER BY ALL"
)
SUMMARY_TITLES = (
    "Customers per loyalty stage",
    "ABC classification",
    "Complaint SLA compliance",
    "Response alarm: waits for an answer",
    "Top complaint categories",
)


def test_demo_is_deterministic_and_rebuild_changes_nothing(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for data in (first, second):
        demo = run("demo", "--customers", "40", "--seed", "3", data_dir=data, cwd=tmp_path)
        assert demo.code == 0, demo
        for title in SUMMARY_TITLES:
            assert title in demo.out
        assert re.search(r"ingested [\d,]+ events \(0 duplicates, 0 rejected\)", demo.out)

    again = run("demo", "--customers", "30", data_dir=first, cwd=tmp_path)
    assert again.code == 2 and "already holds a ledger" in again.message, again

    profiles = "SELECT * FROM customer_profiles ORDER BY ALL"
    one = run("query", profiles, "--format", "csv", data_dir=first, cwd=tmp_path)
    two = run("query", profiles, "--format", "csv", data_dir=second, cwd=tmp_path)
    assert one.code == two.code == 0
    assert len(one.out.splitlines()) == 41
    assert one.out == two.out

    # Move the clock first: a rebuild must keep it (SLA states), not fall back to the
    # event-time watermark.
    assert (
        run("project", "--as-of", "2026-06-01T00:00:00+00:00", data_dir=first, cwd=tmp_path).code
        == 0
    )
    before = run("query", EVERY_TABLE_SQL, "--format", "csv", data_dir=first, cwd=tmp_path)
    rebuilt = run("rebuild", data_dir=first, cwd=tmp_path)
    assert rebuilt.code == 0, rebuilt
    assert re.fullmatch(r"rebuilt projections up to position [\d,]+", rebuilt.out.strip())
    after = run("query", EVERY_TABLE_SQL, "--format", "csv", data_dir=first, cwd=tmp_path)
    assert before.code == after.code == 0
    assert len(before.out.splitlines()) > 1000
    assert after.out == before.out
    assert '""resolution_status"":""breached""' in after.out


def kafka_env(settings: KafkaSettings) -> dict[str, str]:
    """The environment naming the test's broker, topics and group."""
    return {
        "LEDGER_KAFKA_BOOTSTRAP": settings.bootstrap,
        "LEDGER_KAFKA_TOPIC": settings.topic,
        "LEDGER_KAFKA_PARTITIONS": str(settings.partitions),
        "LEDGER_KAFKA_GROUP": settings.group,
    }


def test_the_demo_through_kafka_builds_what_the_embedded_demo_builds(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    """`make demo-kafka`: the same history relayed and consumed through the broker gives
    the same tables and summary as `make demo`, and publishes the derived events."""
    embedded, via_kafka = tmp_path / "embedded", tmp_path / "kafka"
    shown = run("demo", "--customers", "30", data_dir=embedded, cwd=tmp_path)
    through = run("demo", "--customers", "30", "--via-kafka", data_dir=via_kafka,
                  cwd=tmp_path, env=kafka_env(kafka_settings))  # fmt: skip
    assert shown.code == through.code == 0, through
    assert shown.out == through.out.replace(str(via_kafka), str(embedded))
    published = re.search(r"published ([\d,]+) derived events", through.message)
    assert published and int(published.group(1).replace(",", "")) > 0, through.message
    compared = ("customer_profiles", "loyalty_stage_history", "complaint_sla",
                "response_waits", "derived_events")  # fmt: skip
    projected = " UNION ALL ".join(  # events.recorded_at differs: each demo records anew
        f"SELECT '{table}' AS t, to_json(x)::VARCHAR AS row FROM {table} AS x" for table in compared
    )
    tables = [run("query", f"{projected} ORDER BY ALL", "--format", "csv", data_dir=data,
                  cwd=tmp_path) for data in (embedded, via_kafka)]  # fmt: skip
    assert tables[0].code == tables[1].code == 0
    assert tables[0].out == tables[1].out and len(tables[0].out.splitlines()) > 200


def test_long_work_shows_progress_on_a_terminal(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    """On a terminal, ingest, project, consume and rebuild draw a progress bar, also while
    the total is not known yet (a file read from stdin, a projection or catch-up about to
    start); elsewhere they draw nothing (the other tests)."""
    data = tmp_path / "d"
    kafka = kafka_env(kafka_settings)
    events = generate_history(customers=20)
    piped = b"".join(orjson.dumps(e) + b"\n" for e in events)

    ingested = run_on_a_terminal("ingest", "-", data_dir=data, cwd=tmp_path, env=kafka, stdin=piped)
    assert ingested.code == 0, ingested
    assert ingested.out.strip() == f"accepted {len(events)}, duplicates 0, rejected 0"
    assert "ingesting" in ingested.err, ingested.err[-500:]
    assert run("relay", data_dir=data, cwd=tmp_path, env=kafka).code == 0
    for command, bar in [
        (("consume",), "consuming"),
        (("rebuild", "--from-kafka"), "rebuilding"),
    ]:
        shown = run_on_a_terminal(*command, data_dir=data, cwd=tmp_path, env=kafka)
        assert shown.code == 0, shown
        assert bar in shown.err, (command, shown.err[-500:])
    # a rebuild leaves the derived events it would send again to the group's next consume
    realerted = run("rebuild", "--from-kafka", "--realert", data_dir=data, cwd=tmp_path, env=kafka)
    assert realerted.code == 0, realerted
    said = re.search(r"([\d,]+) derived events wait for the next `ledger consume`", realerted.out)
    assert said is not None, realerted.out

    def derived_waiting() -> int:
        shown = run("status", "--json", data_dir=data, cwd=tmp_path, env=kafka)
        return int(shown.json()["derived"]["waiting"])

    assert derived_waiting() == int(said[1].replace(",", "")) > 0
    assert run("consume", data_dir=data, cwd=tmp_path, env=kafka).code == 0
    assert derived_waiting() == 0
    # the embedded path's catch-up (recorded with a broker set: not projected yet)
    embedded = tmp_path / "embedded"
    recorded = run("ingest", "-", data_dir=embedded, cwd=tmp_path, env=kafka, stdin=piped)
    assert recorded.code == 0, recorded
    shown = run_on_a_terminal("project", data_dir=embedded, cwd=tmp_path, env={})
    assert shown.code == 0, shown
    assert "projecting" in shown.err, shown.err[-500:]
    consumed = run("query", "SELECT count(*) AS n FROM events", "--format", "json",
                   data_dir=data, cwd=tmp_path)  # fmt: skip
    assert consumed.code == 0, consumed
    assert consumed.json() == [{"n": len(events)}]


def test_status_on_projections_of_an_older_version_says_to_rebuild(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    """After an upgrade of the code, `status` is what an operator runs first: on a file
    of an older schema version it showed a DuckDB binder error (a review). It shows what
    every version holds, says to rebuild, and exits 3; `--json` still parses."""
    data = tmp_path / "d"
    record_in_an_outdated_file(data, tmp_path, version=4)

    shown = run("status", "--json", data_dir=data, cwd=tmp_path, env=kafka_env(kafka_settings))
    assert shown.code == 3, shown
    found = shown.json()
    assert found["store_head"] > 0 and found["clock"] is not None
    (outdated,) = [p for p in found["problems"] if "schema version 4" in p]
    assert "run `ledger rebuild`" in outdated and outdated in shown.message
    assert "Binder" not in shown.err


def test_status_tells_where_each_stage_stands(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    """`ledger status`: the store's head, the relay, the group's lag per partition and the
    derived events acknowledged; `--json` says the same for monitoring. An unreachable
    broker still leaves the rest, then exits 3 saying why."""
    data, kafka = tmp_path / "d", kafka_env(kafka_settings)
    events = generate_history(customers=20)
    cut = len(events) // 2
    (tmp_path / "first.jsonl").write_text("\n".join(orjson.dumps(e).decode() for e in events[:cut]))
    (tmp_path / "rest.jsonl").write_text("\n".join(orjson.dumps(e).decode() for e in events[cut:]))
    for command in [("ingest", "first.jsonl"), ("relay",), ("consume",),
                    ("ingest", "rest.jsonl"), ("relay",)]:  # fmt: skip
        if command == ("consume",):  # a record it cannot decode: one dead letter
            with KafkaProducer(bootstrap_servers=kafka_settings.bootstrap) as poison:
                poison.send(kafka_settings.topic, key=b"c-poison", value=b"{not json").get(10)
        done = run(*command, data_dir=data, cwd=tmp_path, env=kafka)
        assert done.code == 0, (command, done)
        if command == ("consume",):  # said by a decoder process, as the CLI says things
            timed = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} WARNING dead letter "
            assert re.search(timed + re.escape(kafka_settings.topic), done.err), done.err

    now = datetime.now(UTC)
    shown = run("status", "--json", data_dir=data, cwd=tmp_path, env=kafka)
    assert shown.code == 0, shown
    found = shown.json()
    assert found["relay_position"] == found["store_head"] > len(events)
    assert found["relay_behind"] == 0
    partitions = found["partitions"]
    assert len(partitions) == kafka_settings.partitions
    assert sum(p["lag"] for p in partitions) == len(events) - cut, "the rest is not consumed"
    assert all(p["lag"] == p["highwater"] - (p["projected"] or 0) for p in partitions)
    derived = found["derived"]
    assert derived["published"] == derived["derived"] > 0 and derived["waiting"] == 0
    assert derived["withdrawn"] == 0
    assert found["group"] == kafka_settings.group and found["broker_error"] is None
    assert found["dead_letters"] == {"topic": kafka_settings.dlq_topic, "records": 1}
    # the one-shot relay's watermark, when it found nothing new: a margin before its read
    vouched = datetime.fromisoformat(found["relay_watermark"])
    assert now - timedelta(minutes=10) < vouched <= now - timedelta(seconds=60)

    table = run("status", data_dir=data, cwd=tmp_path, env=kafka)
    assert table.code == 0, table
    shown_text = " ".join(table.out.split())  # rich wraps a title wider than its table
    assert f"group {kafka_settings.group} on {kafka_settings.topic}" in shown_text
    assert f"{derived['published']:,} of {derived['derived']:,}" in shown_text
    assert f"dead letters │ {kafka_settings.dlq_topic} │ 1 │" in shown_text
    assert f"{kafka_settings.watermark_topic} │ {vouched}" in shown_text
    assert "behind the store head" not in shown_text

    # recorded, not relayed yet: the relay is behind the store
    (tmp_path / "more.jsonl").write_text(
        orjson.dumps(event("CustomerRegistered", "c-late", "2025-06-01T09:00:00Z")).decode()
    )
    assert run("ingest", "more.jsonl", data_dir=data, cwd=tmp_path, env=kafka).code == 0
    behind = run("status", "--json", data_dir=data, cwd=tmp_path, env=kafka).json()
    assert behind["relay_behind"] == behind["store_head"] - behind["relay_position"] > 0
    assert behind["relay_position"] == found["relay_position"]
    shown_text = " ".join(run("status", data_dir=data, cwd=tmp_path, env=kafka).out.split())
    assert f"{behind['relay_behind']:,} behind the store head" in shown_text

    down = {**kafka, "LEDGER_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    unreachable = run("status", data_dir=data, cwd=tmp_path, env=down)
    assert unreachable.code == 3
    assert "event store head" in unreachable.out and "relay (acknowledged)" in unreachable.out
    assert "cannot reach the broker at 127.0.0.1:1" in unreachable.message
    assert "leaked" not in unreachable.err  # nanobind, at exit with a Kafka thread left over

    # another topic (mistyped, or the broker lost it): the rest still shows, and the
    # relay's position is said to be another topic's
    renamed = {**kafka, "LEDGER_KAFKA_TOPIC": f"{kafka_settings.topic}-typo"}
    elsewhere = run("status", data_dir=data, cwd=tmp_path, env=renamed)
    assert elsewhere.code == 3
    assert "event store head" in elsewhere.out and "relay (acknowledged)" in elsewhere.out
    assert "does not exist" in elsewhere.message
    assert f"is for topic {kafka_settings.topic}," in " ".join(elsewhere.err.split())


def test_kafka_commands_refuse_what_would_lose_data(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    """A mistyped topic, a republish past the store's head, a stray --from, a one-shot
    relay with no broker: each ends with one line saying why and a non-zero status, and
    the projections and the relay's position stay as they were."""
    data, kafka = tmp_path / "d", kafka_env(kafka_settings)
    events = generate_history(customers=10)
    (tmp_path / "h.jsonl").write_text("\n".join(orjson.dumps(e).decode() for e in events))
    relayed: list[str] = []
    republish = ("relay", "--republish", "--from", "0")
    for command in [("ingest", "h.jsonl"), ("relay",), ("relay",), republish, ("consume",)]:
        done = run(*command, data_dir=data, cwd=tmp_path, env=kafka)
        assert done.code == 0, (command, done)
        if command[0] == "relay":
            relayed.append(" ".join(done.out.split()))
    n, twice = f"{len(events):,}", f"{2 * len(events):,}"
    assert f"{n} records acknowledged in this run ({n} in all)" in relayed[0], relayed
    assert f"0 records acknowledged in this run ({n} in all)" in relayed[1], relayed
    assert f"{n} records acknowledged in this run ({twice} in all)" in relayed[2], relayed

    def projected() -> int:
        counted = run("query", "SELECT count(*) AS n FROM events", "--format", "json",
                      data_dir=data, cwd=tmp_path)  # fmt: skip
        assert counted.code == 0, counted
        return int(counted.json()[0]["n"])

    assert projected() == len(events)
    typo = {**kafka, "LEDGER_KAFKA_TOPIC": kafka_settings.topic + "-typo"}
    for command in [("rebuild", "--from-kafka"), ("consume",), ("consume", "--follow"),
                    ("dlq", "list")]:  # fmt: skip
        refused = run(*command, data_dir=data, cwd=tmp_path, env=typo)
        assert refused.code == 3, (command, refused)
        assert f"topic {kafka_settings.topic}-typo" in refused.message, (command, refused)
        assert "does not exist" in refused.message and "ledger kafka init" in refused.message
        assert "Traceback" not in refused.err
    # the relay's position is the other topic's: it says so before it looks for the topic
    refused = run("relay", data_dir=data, cwd=tmp_path, env=typo)
    assert refused.code == 3, refused
    said = " ".join(refused.err.split())
    assert f"is for topic {kafka_settings.topic}, not {kafka_settings.topic}-typo" in said
    assert f"set it back to {kafka_settings.topic};" in said, said  # before any republish
    assert projected() == len(events), "a rebuild from a missing topic emptied the projections"
    fresh = tmp_path / "fresh"
    for command in [("consume",), ("consume", "--follow"), ("rebuild", "--from-kafka")]:
        refused = run(*command, data_dir=fresh, cwd=tmp_path, env=typo)
        assert refused.code == 3, (command, refused)
        assert not list(fresh.glob("projections*")), f"{command} created a projections file"
    # the publishing group on a mistyped data dir would send every derived event again
    typo_dir = tmp_path / "dta"
    for command in [("consume",), ("consume", "--follow")]:
        refused = run(*command, data_dir=typo_dir, cwd=tmp_path, env=kafka)
        assert refused.code == 3 and "would publish every derived event" in refused.message
        assert "ledger consume --realert" in refused.message, refused
    again = run("consume", "--realert", data_dir=typo_dir, cwd=tmp_path, env=kafka)
    assert again.code == 0 and "0 derived events published" not in again.out, again
    # a relay on a mistyped data dir would sit at position 0 of a new, empty store for good
    idle = run("relay", data_dir=fresh, cwd=tmp_path, env=kafka)
    assert idle.code == 3 and f"no ledger in {fresh}" in idle.message, idle
    assert not fresh.exists()
    fresh.mkdir()  # nor in an existing directory without a store (review: helper-38)
    idle = run("relay", data_dir=fresh, cwd=tmp_path, env=kafka)
    assert idle.code == 3 and f"no ledger in {fresh}" in idle.message, idle
    assert list(fresh.iterdir()) == []
    fresh.rmdir()

    def relay_position() -> int:
        shown = run("status", "--json", data_dir=data, cwd=tmp_path, env=kafka)
        assert shown.code == 0, shown
        return int(shown.json()["relay_position"])

    head = relay_position()
    beyond = run("relay", "--republish", "--from", str(head + 1), data_dir=data, cwd=tmp_path,
                 env=kafka)  # fmt: skip
    assert beyond.code == 2 and "beyond the event store's head" in beyond.message, beyond
    stray = run("relay", "--from", "0", data_dir=data, cwd=tmp_path, env=kafka)
    assert stray.code == 2 and "--republish" in stray.message, stray
    # beside Kafka, the store's path would write into the group's file, or drop its offsets
    for command, instead in [(("project",), "ledger consume"),
                             (("rebuild",), "ledger rebuild --from-kafka")]:  # fmt: skip
        refused = run(*command, data_dir=data, cwd=tmp_path, env=kafka)
        assert refused.code == 2 and f"run `{instead}` instead" in refused.message, refused
    as_of = run("project", "--as-of", "now", data_dir=data, cwd=tmp_path, env=kafka)
    assert as_of.code == 2 and "`ledger consume --as-of`" in as_of.message, as_of
    # there, the relay's watermark moves the clock, and the consume says how far
    moved = run("consume", "--as-of", "now", data_dir=data, cwd=tmp_path, env=kafka)
    assert moved.code == 0 and "as-of clock at " in moved.out, moved
    assert "the relay vouches for every event recorded up to" in " ".join(moved.out.split())
    assert run("rebuild", "--group", "g", data_dir=data, cwd=tmp_path).code == 2
    assert relay_position() == head

    down = {**kafka, "LEDGER_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    # a one-shot relay returns (no endless retries); each says so in one line
    for command in [("relay",), ("dlq", "list"), ("rebuild", "--from-kafka")]:
        failed = run(*command, data_dir=data, cwd=tmp_path, env=down)
        assert failed.code == 3, (command, failed)
        said = "error: cannot reach the broker at 127.0.0.1:1: KafkaTimeoutError: Unable to"
        assert failed.message.startswith(said), (command, failed)
    assert projected() == len(events)


def test_tls_to_a_plaintext_listener_ends_with_a_message_not_a_hang(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    """kafka-python 3.0 waits for a TLS handshake without a deadline; Tansu's plaintext
    listener takes the ClientHello for the start of a 369 MB request and waits too: with
    LEDGER_KAFKA_SECURITY_PROTOCOL=SSL every command hung (`dlq list` > 10 min). Each now
    ends with exit 3 and one line (the subprocess timeout catches a hang)."""
    (tmp_path / "h.jsonl").write_bytes(orjson.dumps(generate_history(customers=1)[0]))
    assert run("ingest", "h.jsonl", data_dir=tmp_path / "d", cwd=tmp_path).code == 0
    tls = {**kafka_env(kafka_settings), "LEDGER_KAFKA_SECURITY_PROTOCOL": "SSL"}
    for command in [("dlq", "list"), ("status",), ("relay",), ("consume",), ("kafka", "init")]:
        failed = run(*command, data_dir=tmp_path / "d", cwd=tmp_path, env=tls)
        assert failed.code == 3, (command, failed)
        assert "Traceback" not in failed.err
        said = failed.message
        assert f"cannot reach the broker at {kafka_settings.bootstrap}" in said, (command, said)
        if "LEDGER_TEST_KAFKA_BOOTSTRAP" not in os.environ:  # Apache Kafka closes instead
            assert "answered no TLS handshake within 5 s" in said, (command, said)
            assert "set LEDGER_KAFKA_SECURITY_PROTOCOL to PLAINTEXT" in said, (command, said)


def test_a_broker_that_answers_with_an_error_is_not_called_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """After a broker restart a follower's idempotent producer gets OutOfOrderSequenceNumber
    or UnknownProducerId: it was reported as "cannot reach the broker" (an operator's
    review), which sends the on-call person looking for a network problem."""
    settings = KafkaSettings(bootstrap="127.0.0.1:9")
    for error, said in [
        (OutOfOrderSequenceNumberError("sequence"), "answered with an error"),
        (KafkaTimeoutError("no broker"), "cannot reach the broker"),
        (TopicAuthorizationFailedError("topic"), "again will not help until that is fixed"),
    ]:
        with pytest.raises(typer.Exit) as ended, cli._reaching(settings):
            raise error
        assert ended.value.exit_code == 3
        assert said in " ".join(capsys.readouterr().err.split()), error


def test_errors_are_named_once() -> None:
    """kafka-python's errors already start with their class name; others get it."""
    assert cli._named(KafkaTimeoutError("no broker")) == "KafkaTimeoutError: no broker"
    assert cli._named(OSError("disk full")) == "OSError: disk full"


# --- the command line as a whole -----------------------------------------------------------


def test_help_lists_every_command(tmp_path: Path) -> None:
    helped = run("--help", cwd=tmp_path)
    assert helped.code == 0, helped
    for command in COMMANDS:
        assert re.search(rf"^\W*{command}\s", helped.out, re.MULTILINE), command


def test_a_reader_that_stops_reading_ends_the_command_as_sigpipe_would(tmp_path: Path) -> None:
    """`ledger query … | head`: the command ends with 141 (128 + SIGPIPE, as a Unix tool
    killed by it), not 1, which means rejected input here, and says nothing."""
    data = tmp_path / "d"
    made = run("record", "CustomerRegistered", "--customer", "A1", data_dir=data, cwd=tmp_path)
    assert made.code == 0, made
    command, environment = ledger_command(
        ("query", "--format", "csv", "SELECT range AS n FROM range(2000000)"), data, None
    )
    process = subprocess.Popen(
        command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline() == b"n\n"
    process.stdout.close()  # as `head -1` does once it has its line
    error = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141, error
    assert error == ""


def test_data_is_printed_as_it_is_and_tables_keep_their_width(tmp_path: Path) -> None:
    """Square brackets in data are text, not rich markup (a note holding "[/code]" crashed
    `history`; "[red]hi" lost its brackets); piped, a table is not cut to 80 columns."""
    data = tmp_path / "d"
    note = {"channel": "chat", "direction": "inbound", "notes": "pasted [/code] and [red]hi"}
    recorded = run("record", "ContactLogged", "--customer", "M[/b]1", "--data",
                   json.dumps(note), data_dir=data, cwd=tmp_path)  # fmt: skip
    assert recorded.code == 0, recorded
    shown = run("history", "M[/b]1", data_dir=data, cwd=tmp_path)
    assert shown.code == 0, shown
    assert "pasted [/code] and [red]hi" in shown.out
    wide = "x" * 250
    queried = run("query", f"SELECT '[red]hi' AS tag, '{wide}' AS wide", data_dir=data,
                  cwd=tmp_path)  # fmt: skip
    assert queried.code == 0, queried
    assert "[red]hi" in queried.out and wide in queried.out


def test_malformed_settings_and_empty_sql_are_usage_errors(tmp_path: Path) -> None:
    data = tmp_path / "d"
    broker = {"LEDGER_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    malformed = [
        ({**broker, "LEDGER_KAFKA_DECODERS": "two"}, "LEDGER_KAFKA_DECODERS='two'"),
        ({**broker, "LEDGER_KAFKA_PARTITIONS": "0"}, "LEDGER_KAFKA_PARTITIONS='0'"),
        ({"LEDGER_REPORTING_CURRENCY": "euro"}, "LEDGER_REPORTING_CURRENCY='EURO'"),
    ]
    for env, named in malformed:
        refused = run("query", "SELECT 1", data_dir=data, cwd=tmp_path, env=env)
        assert refused.code == 2 and named in refused.message, (env, refused)
        assert "Traceback" not in refused.err
    empty = run("query", " ; ", data_dir=data, cwd=tmp_path)
    assert empty.code == 2 and "no SQL given" in empty.message, empty


def test_the_dev_broker_stops_its_broker_when_killed(tmp_path: Path) -> None:
    """`kill` (SIGTERM) of `ledger dev-broker` stops the Tansu process it started."""
    command, env = ledger_command(("dev-broker", "--port", str(free_port())), None, None)
    dev = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    try:
        assert dev.stderr is not None
        assert "broker on" in dev.stderr.readline().decode()
        brokers = children_of(dev.pid)
        assert brokers and all(running(pid) for pid in brokers)
        dev.terminate()
        assert dev.wait(timeout=20) == 0
        assert not any(running(pid) for pid in brokers), "the broker outlived dev-broker"
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()


def test_mistakes_start_nothing(tmp_path: Path) -> None:
    """A mistyped data dir is not a new, empty ledger to the commands that only look; a
    file list with a missing file records none of them; an unknown type is a usage
    error."""
    typo = tmp_path / "typo"
    for command in [("status",), ("history", "C1")]:
        refused = run(*command, data_dir=typo, cwd=tmp_path)
        assert refused.code == 3 and f"no ledger in {typo}" in refused.message, refused
    assert not typo.exists()
    # a directory that exists but holds no ledger is no ledger either (review: helper-38)
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in [("history", "C1"), ("verify",)]:
        refused = run(*command, data_dir=empty, cwd=tmp_path)
        assert refused.code == 3 and f"no ledger in {empty}" in refused.message, refused
    assert list(empty.iterdir()) == []
    # beside a broker, the embedded demo would write the store's checkpoint into the file
    # the consumer group projects into (review: helper-38)
    broker = {"LEDGER_KAFKA_BOOTSTRAP": "127.0.0.1:9", "LEDGER_KAFKA_PARTITIONS": "3"}
    refused = run("demo", "--customers", "2", data_dir=empty, cwd=tmp_path, env=broker)
    assert refused.code == 2 and "`ledger demo --via-kafka`" in refused.message, refused
    assert list(empty.iterdir()) == []
    # status there (a consumer's data dir, say) reads the head as 0 and makes no store,
    # which the commands above would take for a ledger (review: helper-39)
    shown = run("status", "--json", data_dir=empty, cwd=tmp_path)
    assert shown.code == 0 and shown.json()["store_head"] == 0, shown
    assert list(empty.iterdir()) == []

    data = tmp_path / "d"
    good = tmp_path / "good.jsonl"
    good.write_text(line("CustomerRegistered", "C1", "2025-01-01T09:00:00Z", {}) + "\n")
    refused = run("ingest", str(good), str(tmp_path / "missing.jsonl"), data_dir=data,
                  cwd=tmp_path)  # fmt: skip
    assert refused.code == 2 and "missing.jsonl" in refused.message, refused
    assert not data.exists(), "nothing is recorded when one of the files cannot be read"
    a_directory = run("ingest", str(good), str(tmp_path), data_dir=data, cwd=tmp_path)
    assert a_directory.code == 2 and "it is a directory" in a_directory.message, a_directory
    assert not data.exists(), "nothing is recorded when one of the files is a directory"

    unknown = run("record", "CustomerRegisterd", "--customer", "C1", data_dir=data,
                  cwd=tmp_path)  # fmt: skip
    assert unknown.code == 2 and "unknown event type 'CustomerRegisterd'" in unknown.message


def test_the_data_dir_comes_from_ledger_data_dir(tmp_path: Path) -> None:
    data, cwd = tmp_path / "from-env", tmp_path / "cwd"
    cwd.mkdir()
    env = {"LEDGER_DATA_DIR": str(data)}
    source = write_lines(tmp_path / "good.jsonl", GOOD)
    ingested = run("ingest", str(source), cwd=cwd, env=env)
    assert ingested.code == 0, ingested
    assert (data / "events.sqlite3").is_file()
    assert (data / "projections.duckdb").is_file()
    assert list(cwd.iterdir()) == []

    queried = run("query", PROFILES_SQL, "--format", "json", cwd=cwd, env=env)
    assert queried.json() == EXPECTED_PROFILES


def test_a_non_postgresql_event_store_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "d"
    source = write_lines(tmp_path / "good.jsonl", GOOD)
    refused = run(
        "ingest",
        str(source),
        data_dir=data,
        cwd=tmp_path,
        env={"LEDGER_EVENT_STORE": "mysql://user@db.example:3306/crm"},
    )
    assert refused.code == 2, refused  # a malformed setting: a usage error
    assert "LEDGER_EVENT_STORE" in refused.message
    assert "not a PostgreSQL URL" in refused.message
    assert not (data / "events.sqlite3").exists()


@pytest.mark.postgres
def test_ingest_into_postgresql_end_to_end(tmp_path: Path, postgres_settings: Settings) -> None:
    assert postgres_settings.event_store
    data = tmp_path / "fresh"
    env = {"LEDGER_EVENT_STORE": postgres_settings.event_store}
    source = write_lines(tmp_path / "good.jsonl", GOOD)

    ingested = run("ingest", str(source), data_dir=data, cwd=tmp_path, env=env)
    assert ingested.code == 0, ingested
    assert ingested.out.strip() == "accepted 5, duplicates 0, rejected 0"
    assert not (data / "events.sqlite3").exists()

    queried = run("query", PROFILES_SQL, "--format", "json", data_dir=data, cwd=tmp_path, env=env)
    assert queried.code == 0, queried
    assert queried.json() == EXPECTED_PROFILES

    timeline = run("history", "C1", "--json", data_dir=data, cwd=tmp_path, env=env)
    assert timeline.code == 0, timeline
    assert [json.loads(t)["type"] for t in timeline.out.splitlines()] == [
        "CustomerRegistered",
        "PurchaseRecorded",
        "PurchaseRecorded",
    ]

    ledger = open_ledger(postgres_settings)  # the events are in PostgreSQL itself
    try:
        assert len(ledger.timeline("C1")) == 3
        assert len(ledger.timeline("C2")) == 2
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("sent", "status", "said"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "stopped by SIGTERM")],
)
def test_ctrl_c_or_sigterm_ends_a_one_shot_command_with_128_plus_the_signal(
    tmp_path: Path, sent: signal.Signals, status: int, said: str
) -> None:
    """Ctrl-C is no success (0) and no rejected input (1, click's "Aborted!"): 130, and a
    line saying what stays; SIGTERM (kill, systemd, a container stop) the same, 143 (it
    killed the process outright before). Here ingest waits for more of its input."""
    command, environment = ledger_command(("ingest", "-"), tmp_path / "d", None)
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=environment,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdin is not None
    process.stdin.write(orjson.dumps(generate_history(customers=2)[0]) + b"\n")
    process.stdin.flush()
    try:
        time.sleep(3)  # started, and waiting for more input (stdin stays open)
        process.send_signal(sent)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        process.stdin.close()
    assert process.stderr is not None
    text = process.stderr.read().decode()
    assert process.returncode == status, text
    assert f"{said}: what was stored before stays" in text
    assert "Traceback" not in text and "Aborted" not in text


def test_sigterm_stops_a_follower_as_ctrl_c_does(tmp_path: Path) -> None:
    """A service manager stops a follower with SIGTERM: it ends its current batch's
    transaction as on Ctrl-C and exits 0 (it was killed outright, status -15, before)."""
    data = tmp_path / "d"
    (tmp_path / "h.jsonl").write_bytes(orjson.dumps(generate_history(customers=2)[0]))
    assert run("ingest", "h.jsonl", "--no-project", data_dir=data, cwd=tmp_path).code == 0
    command, environment = ledger_command(("project", "--follow"), data, None)
    process = subprocess.Popen(
        command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (data / "projections.duckdb").exists():
            time.sleep(0.2)
        time.sleep(1)  # following: projected, now polling the store
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err.decode()[-2000:]
    assert "Traceback" not in err.decode()


def test_a_relay_started_before_the_first_ingest_waits_for_the_ledger(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    """Services started together: `relay --follow` before the first ingest exited 3 ("no
    ledger"), to be restarted by its manager; it now says it waits, and publishes what
    the first ingest records. A one-shot relay still refuses (a mistyped data dir)."""
    data, kafka = tmp_path / "d", kafka_env(kafka_settings)
    assert run("relay", data_dir=data, cwd=tmp_path, env=kafka).code == 3
    events = generate_history(customers=3)
    (tmp_path / "h.jsonl").write_text("\n".join(orjson.dumps(e).decode() for e in events))
    command, environment = ledger_command(("relay", "--follow"), data, kafka)
    said = tmp_path / "relay.err"
    with said.open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=environment, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and b"waiting" not in said.read_bytes():
            assert process.poll() is None, said.read_text()
            time.sleep(0.1)
        assert run("ingest", "h.jsonl", data_dir=data, cwd=tmp_path, env=kafka).code == 0
        position = data / "relay-position.json"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            position.exists() and orjson.loads(position.read_bytes())["published"] == len(events)
        ):
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    err = said.read_text()
    assert process.returncode == 0, err[-2000:]
    assert "waiting for the first `ledger ingest`" in " ".join(err.split())
    assert orjson.loads(position.read_bytes())["published"] == len(events)


def test_an_encrypted_store_read_with_another_key_is_refused_in_one_line(tmp_path: Path) -> None:
    from eventsourcing.cryptography import AESCipher

    data = tmp_path / "d"
    events = generate_history(customers=3)
    (tmp_path / "h.jsonl").write_text("\n".join(orjson.dumps(e).decode() for e in events))
    key = {"LEDGER_CIPHER_KEY": AESCipher.create_key(16)}
    assert run("ingest", "h.jsonl", data_dir=data, cwd=tmp_path, env=key).code == 0
    customer = events[0]["customer_id"]
    for env in ({"LEDGER_CIPHER_KEY": AESCipher.create_key(16)}, {}):  # another key, none
        for command in (("history", customer), ("rebuild",), ("ingest", "h.jsonl")):
            refused = run(*command, data_dir=data, cwd=tmp_path, env=env)
            assert refused.code == 3, (command, refused)
            assert "the event store cannot be read" in refused.message, refused
            assert "LEDGER_CIPHER_KEY" in refused.message and "Traceback" not in refused.err
    shown = run("history", customer, data_dir=data, cwd=tmp_path, env=key)
    assert shown.code == 0, shown


def test_a_new_customer_is_not_recorded_under_another_key(tmp_path: Path) -> None:
    """Recording a new customer reads no stream, yet the store's first event is read with
    the key before anything is written: an event under another key, or none, would make
    the store unreadable with either (review: helper-38)."""
    from eventsourcing.cryptography import AESCipher

    newcomer = orjson.dumps(event("ContactLogged", "C-NEW", "2025-01-06T09:00:00Z", {
        "channel": "phone", "direction": "inbound", "topic": "question"})) + b"\n"  # fmt: skip
    key = AESCipher.create_key(16)
    stores = {  # the store's key, then the keys that must be refused
        "encrypted": (key, [AESCipher.create_key(16), None]),
        "plain": (None, [key]),
    }
    for name, (own, others) in stores.items():
        data = tmp_path / name
        first = orjson.dumps(event("CustomerRegistered", "C-1", "2025-01-06T08:00:00Z",
                                   {"name": "Ann Example"})) + b"\n"  # fmt: skip
        own_env = {"LEDGER_CIPHER_KEY": own} if own else {}
        assert run("ingest", "-", data_dir=data, cwd=tmp_path, env=own_env, stdin=first).code == 0
        head = open_ledger(Settings(data_dir=data, cipher_key=own)).head()
        for other in others:
            env = {"LEDGER_CIPHER_KEY": other} if other else {}
            for command in (("ingest", "-"), ("record", "ContactLogged", "--customer", "C-NEW",
                            "--data", '{"channel": "phone", "direction": "inbound"}')):  # fmt: skip
                refused = run(*command, data_dir=data, cwd=tmp_path, env=env, stdin=newcomer)
                assert refused.code == 3, (name, command, refused)
                assert "the event store cannot be read" in refused.message, refused
        # nothing was added: the store reads whole with its own key
        assert run("verify", data_dir=data, cwd=tmp_path, env=own_env).code == 0
        assert run("history", "C-NEW", data_dir=data, cwd=tmp_path, env=own_env).code == 1
        assert open_ledger(Settings(data_dir=data, cipher_key=own)).head() == head


def test_an_outdated_file_beside_kafka_names_the_rebuild_from_kafka(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With a broker configured `ledger rebuild` refuses (exit 2) and names the Kafka
    rebuild: the schema message must name that one (a review of the diff)."""
    monkeypatch.setattr(
        cli.State, "settings", Settings(data_dir=tmp_path, kafka=KafkaSettings("127.0.0.1:9"))
    )
    with pytest.raises(SystemExit) as ended:
        cli._end_with(ProjectionsOutdated("version 3; run `ledger rebuild` to rebuild it"))
    assert ended.value.code == 3
    assert "`ledger rebuild --from-kafka`" in " ".join(capsys.readouterr().err.split())
