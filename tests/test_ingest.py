"""Ingesting real files: bad lines are kept aside with their reason while the rest lands,
re-ingesting is harmless, CSV and JSON Lines mean the same, and concurrent writers on the
same customers never lose an event."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from conftest import event

from bootstrap import Settings, open_ledger
from consumers.ingest import Format, IngestReport, ingest_stream
from domain.customer import Customer
from domain.events import INCOMING
from domain.ledger import Fact, Ledger, former_event_id, to_fact

AT = "2025-03-01T09:30:00+08:00"
ENVELOPE = ("type", "customer_id", "occurred_at", "source_event_id", "source", "actor")


# --- helpers -------------------------------------------------------------------------------


def ingest(
    ledger: Ledger,
    settings: Settings,
    path: Path,
    *,
    batch_size: int = 5_000,
    progress: list[tuple[int, IngestReport]] | None = None,
) -> IngestReport:
    fmt: Format = "csv" if path.suffix == ".csv" else "jsonl"

    def on_batch(done: int, report: IngestReport) -> None:
        if progress is not None:
            progress.append((done, IngestReport(report.lines, report.accepted)))

    with path.open("rb") as stream:
        return ingest_stream(
            ledger,
            stream,
            str(path),
            settings.rejects_dir,
            fmt=fmt,
            batch_size=batch_size,
            on_batch=on_batch,
        )


def jsonl(path: Path, lines: list[dict[str, Any] | bytes | str]) -> Path:
    """Writes JSON Lines; dicts are encoded, bytes and str are written as they are."""
    with path.open("wb") as out:
        for item in lines:
            if isinstance(item, dict):
                out.write(json.dumps(item, ensure_ascii=False).encode())
            elif isinstance(item, str):
                out.write(item.encode())
            else:
                out.write(item)
            out.write(b"\n")
    return path


def to_csv(path: Path, events: list[dict[str, Any]], *, bom: bool = False) -> Path:
    """The same events as CSV: envelope columns, then one `data.` column per data field."""
    data_fields: list[str] = []
    for e in events:
        data_fields += [k for k in e["data"] if k not in data_fields]
    header = [*ENVELOPE, *(f"data.{k}" for k in data_fields)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    for e in events:
        row = [_cell(e.get(k)) for k in ENVELOPE]
        row += [_cell(e["data"].get(k)) for k in data_fields]
        writer.writerow(row)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buffer.getvalue().encode())
    return path


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def rejects(report: IngestReport) -> list[dict[str, Any]]:
    assert len(report.rejects_files) == 1
    lines = report.rejects_files[0].read_bytes().splitlines()
    return [orjson.loads(line) for line in lines]


def stored(ledger: Ledger) -> list[Fact]:
    """Every stored fact, without the time it was recorded (which differs per run)."""
    return [{k: v for k, v in fact.items() if k != "recorded_at"} for _, fact in ledger.all_facts()]


def contact(customer: str, n: int, **envelope: Any) -> dict[str, Any]:
    return event(
        "ContactLogged",
        customer,
        f"2025-03-01T{9 + n // 60:02d}:{n % 60:02d}:00Z",
        {"channel": "chat", "direction": "inbound", "topic": f"question {n}"},
        **envelope,
    )


def purchase(customer: str, order: str, amount: str, **envelope: Any) -> dict[str, Any]:
    return event(
        "PurchaseRecorded",
        customer,
        AT,
        {"order_id": order, "amount": amount, "currency": "EUR"},
        **envelope,
    )


#: A realistic small history touching many event types and both kinds of identity.
HISTORY: list[dict[str, Any]] = [
    event(
        "CustomerRegistered",
        "C-1",
        "2025-01-05T10:00:00+01:00",
        {
            "name": "Ana Ruiz",
            "email": "ana@example.com",
            "birthday": "1990-04-02",
            "city": "Madrid",
        },
        source_event_id="crm-1",
        source="crm",
    ),
    event(
        "ConsentChanged",
        "C-1",
        "2025-01-05T10:01:00+01:00",
        {"purpose": "marketing", "granted": True, "channel": "email"},
    ),
    event(
        "PurchaseRecorded",
        "C-1",
        "2025-01-06T12:00:00+01:00",
        {
            "order_id": "SO-1",
            "amount": "149.90",
            "currency": "EUR",
            "quantity": 2,
            "items": [
                {"sku": "LAMP-1", "quantity": 1, "unit_price": "99.90"},
                {"sku": "BULB-4", "quantity": 1, "unit_price": "50.00"},
            ],
            "store": "Madrid Centro",
        },
        source_event_id="pos-1",
        source="pos",
        actor="clerk-3",
    ),
    event(
        "PurchaseRecorded",
        "C-2",
        "2025-01-07T08:00:00Z",
        {"order_id": "SO-2", "amount": "80", "currency": "USD", "reporting_amount": "73.60"},
        source_event_id="web-9",
        source="web",
    ),
    event(
        "PurchaseRefunded",
        "C-1",
        "2025-01-09T12:00:00+01:00",
        {"order_id": "SO-1", "amount": "50.00", "reason": "bulb broken"},
    ),
    event(
        "ComplaintFiled",
        "C-1",
        "2025-01-09T12:05:00+01:00",
        {"complaint_id": "K-1", "channel": "phone", "category": "product", "priority": "high"},
    ),
    event(
        "ComplaintResolved",
        "C-1",
        "2025-01-10T09:00:00+01:00",
        {"complaint_id": "K-1", "resolution": "refund issued", "compensation": "5.00"},
    ),
    event(
        "SurveyAnswered",
        "C-1",
        "2025-01-11T09:00:00+01:00",
        {"survey_id": "SV-1", "kind": "csat", "score": 4, "comment": "ok, thanks"},
    ),
    event(
        "CustomerProfileUpdated",
        "C-2",
        "2025-01-12T09:00:00Z",
        {"segment": "vip", "preferred_channel": "sms"},
    ),
]


# --- bad lines -----------------------------------------------------------------------------


def test_bad_lines_do_not_stop_the_valid_rest(
    ledger: Ledger, settings: Settings, tmp_path: Path
) -> None:
    path = jsonl(
        tmp_path / "mixed.jsonl",
        [
            HISTORY[0],
            b'{"type": "ContactLogged", ',
            HISTORY[1],
            {**HISTORY[2], "occurred_at": "2025-01-06T12:00:00"},
            HISTORY[2],
            {**HISTORY[3], "type": "PurchaseRecordd"},
            HISTORY[3],
            {**purchase("C-1", "SO-1", "1.00"), "source_event_id": "pos-77"},
        ],
    )
    report = ingest(ledger, settings, path)
    assert (report.lines, report.accepted, report.duplicates, report.rejected) == (8, 4, 0, 4)
    assert [f["type"] for f in ledger.timeline("C-1")] == [
        "CustomerRegistered",
        "ConsentChanged",
        "PurchaseRecorded",
    ]
    assert [f["data"]["order_id"] for f in ledger.timeline("C-2")] == ["SO-2"]


def test_the_rejects_file_holds_line_text_and_reason_of_each_bad_line(
    ledger: Ledger, settings: Settings, tmp_path: Path
) -> None:
    no_offset = json.dumps({**HISTORY[1], "occurred_at": "2025-01-05T10:01:00"})
    over_refund = json.dumps(
        event("PurchaseRefunded", "C-1", AT, {"order_id": "SO-1", "amount": "150.00"})
    )
    lines: list[dict[str, Any] | bytes | str] = [
        HISTORY[0],  # 1
        "[1, 2]",  # 2
        HISTORY[2],  # 3
        "",  # 4 (blank, not a line of data)
        no_offset,  # 5
        b'{"type": "ContactLogged", "customer_id": "caf\xe9"}',  # 6
        over_refund,  # 7
        HISTORY[0] | {"data": {"name": "Another Name"}, "source_event_id": "crm-2"},  # 8
        '{"type": "SurveyAnswerd"}',  # 9
    ]
    path = jsonl(tmp_path / "events.jsonl", lines)
    report = ingest(ledger, settings, path)
    assert (report.accepted, report.rejected) == (2, 6)
    assert report.rejects_files[0].parent == settings.rejects_dir
    assert report.rejects_files[0].name.endswith("-events.jsonl.jsonl")

    rows = rejects(report)  # in line order, though the ledger's refusals come last
    assert [(r["line"], r["reason"]) for r in rows] == [
        (2, "each line must be one JSON object"),
        (5, "occurred_at has no UTC offset (write e.g. 2025-03-01T09:30:00+08:00)"),
        (6, "not UTF-8 text: byte 0xe9 at column 46"),
        (7, "refund 150.00 exceeds what remains refundable on order SO-1 (149.90)"),
        (
            8,
            "customer C-1 is already registered; send CustomerProfileUpdated to change the profile",
        ),
        (9, "unknown event type 'SurveyAnswerd'; did you mean SurveyAnswered?"),
    ]
    assert [line for _, line, _ in report.first_rejects] == [2, 5, 6, 7, 8]  # said at once
    original = path.read_bytes().split(b"\n")
    for row in rows:
        assert row["source"] == str(path)
        raw = original[row["line"] - 1]
        assert row["text"] == raw.decode("utf-8", errors="backslashreplace")
        assert datetime.fromisoformat(row["rejected_at"]).utcoffset() is not None
    assert rows[2]["text"] == '{"type": "ContactLogged", "customer_id": "caf\\xe9"}'


def test_no_rejects_file_when_nothing_is_rejected(
    ledger: Ledger, settings: Settings, tmp_path: Path
) -> None:
    report = ingest(ledger, settings, jsonl(tmp_path / "clean.jsonl", list(HISTORY)))
    assert (report.accepted, report.rejected, report.rejects_files) == (len(HISTORY), 0, [])
    assert not settings.rejects_dir.exists() or not any(settings.rejects_dir.iterdir())


def test_csv_rejects_carry_the_physical_line_and_the_reason(
    ledger: Ledger, settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "consents.csv"
    path.write_bytes(
        b"type,customer_id,occurred_at,data.purpose,data.granted\r\n"  # 1
        b'ConsentChanged,C-1,2025-01-01T00:00:00Z,"mark\r\neting",true\r\n'  # 2-3
        b"ConsentChanged,C-1,2025-01-01T00:00:00Z,caf\xe9,true\r\n"  # 4
        b"ConsentChanged,C-1\r\n"  # 5
        b"\r\n"  # 6
        b"ConsentChanged,C-1,2025-01-01T00:00:00,profiling,maybe\r\n"  # 7
        b"ConsentChanged,C-1,2025-01-02T00:00:00Z,analytics,false\r\n"  # 8
    )
    report = ingest(ledger, settings, path)
    assert (report.lines, report.accepted, report.rejected) == (5, 2, 3)
    assert [(r["line"], r["text"], r["reason"]) for r in rejects(report)] == [
        (4, "ConsentChanged,C-1,2025-01-01T00:00:00Z,caf\\xe9,true", "not UTF-8 text"),
        (5, "ConsentChanged,C-1", "has 2 cells but the header names 5 columns"),
        (
            7,
            "ConsentChanged,C-1,2025-01-01T00:00:00,profiling,maybe",
            "occurred_at has no UTC offset (write e.g. 2025-03-01T09:30:00+08:00); "
            "data.granted: input should be a valid boolean, unable to interpret input",
        ),
    ]
    facts = ledger.timeline("C-1")
    assert [(f["data"]["purpose"], f["data"]["granted"]) for f in facts] == [
        ("mark\r\neting", True),
        ("analytics", False),
    ]


# --- idempotency ---------------------------------------------------------------------------


def test_ingesting_the_same_file_twice_records_it_once(
    ledger: Ledger, settings: Settings, tmp_path: Path
) -> None:
    path = jsonl(tmp_path / "history.jsonl", list(HISTORY))
    first = ingest(ledger, settings, path)
    assert (first.accepted, first.duplicates, first.rejected) == (len(HISTORY), 0, 0)
    head = ledger.head()
    facts = stored(ledger)

    second = ingest(ledger, settings, path)
    assert (second.lines, second.accepted, second.duplicates, second.rejected) == (
        len(HISTORY),
        0,
        len(HISTORY),
        0,
    )
    assert ledger.head() == head
    # A fresh process (no cache) recognises the file from the store alone.
    third = ingest(open_ledger(settings), settings, path)
    assert (third.accepted, third.duplicates) == (0, len(HISTORY))
    assert ledger.head() == head
    assert stored(ledger) == facts


def test_events_without_a_source_event_id_are_deduplicated_by_content(
    ledger: Ledger, settings: Settings, tmp_path: Path
) -> None:
    same = contact("C-1", 1)
    assert "source_event_id" not in same
    reordered = dict(reversed(list(same.items())))
    reordered["data"] = dict(reversed(list(same["data"].items())))
    assert json.dumps(reordered) != json.dumps(same)
    other_topic = contact("C-1", 1) | {"data": {**same["data"], "topic": "another question"}}
    other_actor = contact("C-1", 1, actor="agent-2")
    path = jsonl(tmp_path / "contacts.jsonl", [same, same, reordered, other_topic, other_actor])
    report = ingest(ledger, settings, path)
    assert (report.accepted, report.duplicates) == (3, 2)
    again = ingest(ledger, settings, jsonl(tmp_path / "again.jsonl", [same]))
    assert (again.accepted, again.duplicates) == (0, 1)
    topics = [(f["data"]["topic"], f["actor"]) for f in ledger.timeline("C-1")]
    assert topics == [("question 1", None), ("another question", None), ("question 1", "agent-2")]


def test_the_same_source_event_id_from_another_source_is_another_event(
    ledger: Ledger, settings: Settings, tmp_path: Path
) -> None:
    lines: list[dict[str, Any] | bytes | str] = [
        contact("C-1", 1, source_event_id="k-1", source="pos"),
        contact("C-1", 2, source_event_id="k-1", source="web"),
        contact("C-1", 3, source_event_id="k-1"),  # no source
        contact("C-2", 4, source_event_id="k-1", source="pos"),  # another customer
        # The key decides: same customer, source and key is the same event whatever it says.
        contact("C-1", 5, source_event_id="k-1", source="pos"),
        contact("C-1", 6, source_event_id=" k-1 ", source=" web "),
    ]
    report = ingest(ledger, settings, jsonl(tmp_path / "keys.jsonl", lines))
    assert (report.accepted, report.duplicates, report.rejected) == (4, 2, 0)
    facts = ledger.timeline("C-1")
    assert [(f["source"], f["data"]["topic"]) for f in facts] == [
        ("pos", "question 1"),
        ("web", "question 2"),
        (None, "question 3"),
    ]
    assert len({f["event_id"] for f in facts}) == 3


def test_keys_holding_the_separator_are_other_events(
    ledger: Ledger, settings: Settings, tmp_path: Path
) -> None:
    """Ids are free text: the key's parts joined with \x1f read the same when the
    separator sits in one part or the next; one event was taken for the other's duplicate
    (same customer), or both got one id and the projections kept one (two customers)."""
    lines: list[dict[str, Any] | bytes | str] = [
        contact("C-1", 1, source_event_id="c", source="a\x1fb"),
        contact("C-1", 2, source_event_id="b\x1fc", source="a"),
        contact("C-1\x1fpos", 3, source_event_id="k", source="x"),
        contact("C-1", 4, source_event_id="k", source="pos\x1fx"),
    ]
    report = ingest(ledger, settings, jsonl(tmp_path / "keys.jsonl", lines))
    assert (report.accepted, report.duplicates, report.rejected) == (4, 0, 0)
    facts = [*ledger.timeline("C-1"), *ledger.timeline("C-1\x1fpos")]
    assert len({f["event_id"] for f in facts}) == 4


def test_an_event_stored_under_its_former_separator_id_stays_a_duplicate(
    ledger: Ledger, settings: Settings, tmp_path: Path
) -> None:
    """Before such keys were written as JSON, a store took the event under the joined
    key's id; sending the same event again must not record it twice."""
    sent = contact("Q-1", 1, source_event_id="a\x1fb", source="crm")
    incoming = INCOMING.validate_python(sent)
    former = former_event_id(incoming)
    assert former is not None and former != to_fact(incoming, "")["event_id"]
    # the store as the code before wrote it: the same fact under the former id
    fact = {**to_fact(incoming, datetime.now(UTC).isoformat()), "event_id": former}
    customer = Customer(customer_id="Q-1")
    customer.record(incoming, fact, ledger.reporting_currency)
    ledger.save(customer)
    report = ingest(ledger, settings, jsonl(tmp_path / "again.jsonl", [sent]))
    assert (report.accepted, report.duplicates, report.rejected) == (0, 1, 0)
    assert [f["event_id"] for f in ledger.timeline("Q-1")] == [former]
    assert former_event_id(INCOMING.validate_python(contact("Q-1", 1, source_event_id="k"))) is None


def test_event_ids_never_change_between_versions() -> None:
    """Stores hold these ids: re-ingesting a file is only harmless while its ids stay
    the same (uuid5 in the ledger's namespace of the key, or of the content)."""
    call = {"channel": "phone", "direction": "inbound"}
    keyed = event("ContactLogged", "C-1", AT, call, source_event_id="k-1", source="pos")
    unkeyed = event("ContactLogged", "C-ü", AT, call | {"topic": "Grüße"})
    ids = [to_fact(INCOMING.validate_python(e), "")["event_id"] for e in (keyed, unkeyed)]
    assert ids == ["1b32d513-a419-5bc5-af4d-21ddaec027a4", "26ae442b-dc2a-5586-a861-0d9ea3074203"]


# --- CSV and JSON Lines --------------------------------------------------------------------


def test_csv_and_jsonl_of_the_same_events_store_the_same_facts(tmp_path: Path) -> None:
    as_jsonl = Settings(data_dir=tmp_path / "from-jsonl")
    as_csv = Settings(data_dir=tmp_path / "from-csv")
    jsonl_ledger, csv_ledger = open_ledger(as_jsonl), open_ledger(as_csv)
    events = [*HISTORY, HISTORY[0]]  # the repeat is a duplicate in both
    jsonl_report = ingest(jsonl_ledger, as_jsonl, jsonl(tmp_path / "h.jsonl", list(events)))
    csv_report = ingest(csv_ledger, as_csv, to_csv(tmp_path / "h.csv", events))
    assert (csv_report.lines, csv_report.accepted, csv_report.duplicates) == (
        jsonl_report.lines,
        jsonl_report.accepted,
        jsonl_report.duplicates,
    )
    assert (jsonl_report.accepted, jsonl_report.duplicates, csv_report.rejected) == (
        len(HISTORY),
        1,
        0,
    )
    assert stored(csv_ledger) == stored(jsonl_ledger)
    purchase_fact = next(f for f in stored(csv_ledger) if f["data"].get("order_id") == "SO-1")
    assert purchase_fact["data"]["items"][1] == {
        "sku": "BULB-4",
        "quantity": 1,
        "unit_price": "50.00",
    }
    assert purchase_fact["data"]["quantity"] == 2


def test_a_csv_with_a_byte_order_mark_reads_like_one_without(
    ledger: Ledger, settings: Settings, tmp_path: Path
) -> None:
    # Spreadsheet programs write "CSV UTF-8" with a BOM before the header.
    report = ingest(ledger, settings, to_csv(tmp_path / "excel.csv", list(HISTORY), bom=True))
    assert (report.accepted, report.rejected) == (len(HISTORY), 0)


# --- reading -------------------------------------------------------------------------------


def test_blank_lines_are_ignored(ledger: Ledger, settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_bytes(
        b"\n"
        + json.dumps(HISTORY[0]).encode()
        + b"\r\n   \n\t\r\n\n"
        + json.dumps(HISTORY[1]).encode()
        + b"\n\n"
        + b"not json\n"
        + b"\n"
    )
    report = ingest(ledger, settings, path)
    assert (report.lines, report.accepted, report.rejected) == (3, 2, 1)
    assert [r["line"] for r in rejects(report)] == [8]


def test_a_file_larger_than_a_batch_is_recorded_in_several_batches(
    ledger: Ledger, settings: Settings, tmp_path: Path
) -> None:
    lines: list[dict[str, Any] | bytes | str] = [contact(f"C-{n % 4}", n) for n in range(45)]
    # Facts in one batch that the invariants check in a later one.
    lines[2] = purchase("C-2", "SO-1", "30.00")
    lines[40] = event("PurchaseRefunded", "C-2", AT, {"order_id": "SO-1", "amount": "20.00"})
    lines[41] = event(
        "PurchaseRefunded", "C-2", AT, {"order_id": "SO-1", "amount": "20.00", "reason": "x"}
    )
    lines.append(contact("C-0", 0))  # a repeat of line 1, seven batches later
    path = jsonl(tmp_path / "many.jsonl", lines)
    progress: list[tuple[int, IngestReport]] = []
    report = ingest(ledger, settings, path, batch_size=7, progress=progress)
    assert (report.lines, report.accepted, report.duplicates, report.rejected) == (46, 44, 1, 1)
    assert rejects(report)[0]["line"] == 42
    assert rejects(report)[0]["reason"] == (
        "refund 20.00 exceeds what remains refundable on order SO-1 (10.00)"
    )
    # One progress call per full batch of 7 and one at the end.
    assert [p.lines for _, p in progress] == [7, 14, 21, 28, 35, 42, 46]
    assert [p.accepted for _, p in progress][-1] == 44
    done = [d for d, _ in progress]
    assert done == sorted(done)
    assert done[-1] == path.stat().st_size
    assert sum(len(ledger.timeline(f"C-{n}")) for n in range(4)) == 44


# --- concurrent writers --------------------------------------------------------------------

CUSTOMERS = ("C-A", "C-B", "C-C")
EVENTS_PER_WRITER = 300


def writer_events(writer: int) -> list[dict[str, Any]]:
    """Distinct events of one writer, spread over the same three customers."""
    events: list[dict[str, Any]] = []
    for n in range(EVENTS_PER_WRITER):
        customer = CUSTOMERS[n % 3]
        when = f"2025-03-01T{n // 60:02d}:{n % 60:02d}:00Z"
        if n % 10 == 0:  # orders are checked against the customer's history
            events.append(
                event(
                    "PurchaseRecorded",
                    customer,
                    when,
                    {"order_id": f"W{writer}-{n}", "amount": "10.00", "currency": "EUR"},
                    source_event_id=f"W{writer}-{n}",
                    source=f"writer-{writer}",
                )
            )
        elif n % 2:  # identified by key
            events.append(
                contact(customer, n, source_event_id=f"W{writer}-{n}", source=f"writer-{writer}")
            )
        else:  # identified by content
            events.append(
                event(
                    "ContactLogged",
                    customer,
                    when,
                    {"channel": "phone", "direction": "outbound", "topic": f"W{writer} call {n}"},
                )
            )
    return events


def concurrent_writer(data_dir: str, writer: int, start: Any, result: str) -> None:
    """Runs in its own process: its own Ledger on the shared SQLite file."""
    ledger = open_ledger(Settings(data_dir=Path(data_dir)))
    events = [INCOMING.validate_python(e) for e in writer_events(writer)]
    start.wait(timeout=60)
    statuses: list[str] = []
    for i in range(0, len(events), 20):
        statuses += [o.status for o in ledger.record(events[i : i + 20])]
    Path(result).write_text(json.dumps(statuses))


def test_concurrent_writers_on_the_same_customers_lose_no_event(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    open_ledger(settings)  # creates the store before the writers race
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    results = [tmp_path / f"writer-{w}.json" for w in (1, 2)]
    processes = [
        context.Process(
            target=concurrent_writer, args=(str(settings.data_dir), w, start, str(results[w - 1]))
        )
        for w in (1, 2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]
    for result in results:
        assert json.loads(result.read_text()) == ["accepted"] * EVENTS_PER_WRITER

    expected: dict[str, set[str]] = {c: set() for c in CUSTOMERS}
    for writer in (1, 2):
        for e in writer_events(writer):
            expected[e["customer_id"]].add(to_fact(INCOMING.validate_python(e), "")["event_id"])
    ledger = open_ledger(settings)
    for customer in CUSTOMERS:
        ids = [fact["event_id"] for fact in ledger.timeline(customer)]
        assert len(ids) == len(expected[customer]) == 2 * EVENTS_PER_WRITER // 3
        assert len(set(ids)) == len(ids)
        assert set(ids) == expected[customer]
