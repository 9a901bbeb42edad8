"""Property tests of intake and ingest: whatever a file holds, ingest never raises, every
bad line is kept aside with its line number and a reason, every good line lands once, and
the store holds exactly what was accepted.

Each generated file mixes valid catalogue events (contacts, purchases with decimal
amounts, surveys on their scale; with or without idempotency keys) with exact copies, new
events reusing an earlier idempotency key, and bad lines of every kind: malformed JSON,
wrong types, fields and lines over their limits, invalid UTF-8, times without an offset,
unknown types, missing and unknown fields, and events the customer's history forbids.
A small model beside the generator says what must become of each line.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bootstrap import Settings, open_ledger
from consumers.ingest import IngestReport, ingest_stream
from domain.events import EVENT_MODELS, EVENT_TYPES, SURVEY_SCALES, Channel, Direction
from domain.intake import MAX_LINE_BYTES, Rejected, parse_json_line
from domain.ledger import Fact

Json = dict[str, Any]

# --- building blocks -----------------------------------------------------------------------

ID_CHARS = "abcXYZ0189-_.:ñ漢"
ids = st.text(alphabet=ID_CHARS, min_size=1, max_size=12)
customers = st.sampled_from(["C1", "C2", "C3", "Ñandú-7", "客户-9"])
offsets = st.sampled_from(
    [
        UTC,
        timezone(timedelta(hours=8)),
        timezone(timedelta(hours=-5, minutes=-30)),
        timezone(timedelta(hours=14)),
        timezone(timedelta(hours=-12)),
    ]
)
# business times before the time of recording (a later one is rejected: see test_invariants)
moments = st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2025, 12, 31), timezones=offsets
)
free_text = st.text(max_size=120)  # any Unicode, newlines and NULs included
NUMBER = "\x00number:"  # a placeholder: the JSON text carries the digits as a number


def iso(moment: datetime, zulu: bool) -> str:
    text = moment.isoformat()
    return text.replace("+00:00", "Z") if zulu else text


@st.composite
def money(draw: st.DrawFn, *, as_number_ok: bool = True) -> str:
    """A positive amount with at most 14 integer digits and 4 decimal places, written as
    a JSON string, or (when it has at most 15 significant digits, so a binary float keeps
    it exactly) sometimes as a JSON number."""
    places = draw(st.integers(0, 4))
    digits = draw(st.integers(1, 10 ** (14 + places) - 1))
    text = format(Decimal(digits).scaleb(-places), "f")
    significant = len(str(digits).lstrip("0"))
    if as_number_ok and significant <= 15 and draw(st.booleans()):
        return NUMBER + text
    return text


def dumps(obj: Any) -> bytes:
    """JSON text of `obj`; placeholder strings become bare JSON numbers."""
    text = json.dumps(obj, ensure_ascii=False)
    parts = text.split(f'"{json.dumps(NUMBER)[1:-1]}')
    out = parts[0]
    for part in parts[1:]:
        number, rest = part.split('"', 1)
        out += number + rest
    return out.encode()


def plain(value: Any) -> Any:
    """A generated value as the stored fact carries it (money compared as Decimal)."""
    if isinstance(value, str) and value.startswith(NUMBER):
        return Decimal(value.removeprefix(NUMBER))
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Good:
    """A valid event; `tag_field` of its data receives a per-line unique tag."""

    type: str
    customer: str
    when: datetime
    zulu: bool
    envelope: Json  # source, source_event_id, actor (when present)
    data: Json
    tag_field: str

    def obj(self, tag: str) -> Json:
        return {
            "type": self.type,
            "customer_id": self.customer,
            "occurred_at": iso(self.when, self.zulu),
            **self.envelope,
            "data": {**self.data, self.tag_field: tag},
        }


@st.composite
def envelopes(draw: st.DrawFn) -> Json:
    envelope: Json = {}
    if draw(st.booleans()):
        envelope["source_event_id"] = draw(ids)
    if draw(st.booleans()):
        envelope["source"] = draw(st.sampled_from(["pos", "crm", "web", "呼叫中心"]))
    if draw(st.booleans()):
        envelope["actor"] = draw(ids)
    return envelope


@st.composite
def contact_data(draw: st.DrawFn) -> Json:
    data: Json = {
        "channel": draw(st.sampled_from([c.value for c in Channel])),
        "direction": draw(st.sampled_from([d.value for d in Direction])),
    }
    if draw(st.booleans()):
        data["notes"] = draw(free_text)
    if draw(st.booleans()):
        data["duration_seconds"] = draw(st.integers(0, 86_400))
    if draw(st.booleans()):
        data["agent"] = draw(ids)
    return data


@st.composite
def purchase_data(draw: st.DrawFn) -> Json:
    data: Json = {"amount": draw(money())}
    if draw(st.booleans()):
        data["currency"] = "EUR"
    else:  # a foreign currency needs the amount in the reporting currency too
        data["currency"] = draw(st.sampled_from(["USD", "CNY", "JPY"]))
        data["reporting_amount"] = draw(money())
    if draw(st.booleans()):
        data["quantity"] = draw(st.integers(1, 50))
    if draw(st.booleans()):
        data["items"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"sku": ids, "quantity": st.integers(1, 9)},
                    optional={"unit_price": money(as_number_ok=False)},
                ),
                min_size=1,
                max_size=3,
            )
        )
    if draw(st.booleans()):
        data["store"] = draw(ids)
    return data


@st.composite
def survey_data(draw: st.DrawFn) -> Json:
    kind = draw(st.sampled_from(sorted(SURVEY_SCALES)))
    low, high = SURVEY_SCALES[kind]
    data: Json = {"kind": kind.value, "score": draw(st.integers(low, high))}
    if draw(st.booleans()):
        data["comment"] = draw(free_text)
    return data


@st.composite
def good_events(draw: st.DrawFn) -> Good:
    kind = draw(st.sampled_from(["ContactLogged", "PurchaseRecorded", "SurveyAnswered"]))
    data, tag_field = {
        "ContactLogged": (contact_data, "topic"),
        "PurchaseRecorded": (purchase_data, "order_id"),
        "SurveyAnswered": (survey_data, "survey_id"),
    }[kind]
    return Good(
        kind,
        draw(customers),
        draw(moments),
        draw(st.booleans()),
        draw(envelopes()),
        draw(data()),
        tag_field,
    )


# --- bad lines -----------------------------------------------------------------------------

INVALID_UTF8 = [b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\xe2\x82"]
BAD_MARK = "@@not-utf-8@@"

WRONG_VALUES: dict[str, list[tuple[str, Any, str]]] = {  # (field path, value, reason mentions)
    "*": [
        ("customer_id", 123, "customer_id"),
        ("customer_id", ["C1"], "customer_id"),
        ("customer_id", "", "customer_id"),
        ("occurred_at", 1_700_000_000, "occurred_at"),
        ("occurred_at", "yesterday", "occurred_at"),
        ("occurred_at", "2025-02-30T10:00:00Z", "occurred_at"),
        ("data", [], "data"),
        ("data", "nothing", "data"),
        ("source_event_id", {"k": 1}, "source_event_id"),
        ("actor", 5, "actor"),
    ],
    "ContactLogged": [
        ("data.direction", "sideways", "data.direction"),
        ("data.channel", 7, "data.channel"),
        ("data.duration_seconds", "long", "data.duration_seconds"),
        ("data.duration_seconds", -1, "data.duration_seconds"),
        ("data.duration_seconds", 86_401, "data.duration_seconds"),
    ],
    "PurchaseRecorded": [
        ("data.amount", [1], "data.amount"),
        ("data.amount", "-5", "data.amount"),
        ("data.amount", "0", "data.amount"),
        ("data.amount", "1.00001", "data.amount"),
        ("data.amount", "NaN", "data.amount"),
        ("data.amount", "12,50", "data.amount"),
        ("data.currency", "EURO", "data.currency"),
        ("data.quantity", 0, "data.quantity"),
        ("data.items", {"sku": "x"}, "data.items"),
    ],
    "SurveyAnswered": [
        ("data.score", "high", "data.score"),
        ("data.score", 3.5, "data.score"),
        ("data.score", 11, "score must be from"),
        ("data.score", -1, "score must be from"),
        ("data.kind", "stars", "data.kind"),
    ],
}
TOO_LONG: dict[str, list[tuple[str, int, str]]] = {  # (field path, length, reason mentions)
    "*": [
        ("customer_id", 129, "customer_id"),
        ("source_event_id", 129, "source_event_id"),
        ("actor", 201, "actor"),
    ],
    "ContactLogged": [("data.notes", 10_001, "data.notes"), ("data.topic", 201, "data.topic")],
    "PurchaseRecorded": [
        ("data.store", 201, "data.store"),
        ("data.order_id", 129, "data.order_id"),
    ],
    "SurveyAnswered": [("data.comment", 10_001, "data.comment")],
}
TEXT_FIELD = {"ContactLogged": "notes", "PurchaseRecorded": "store", "SurveyAnswered": "comment"}


def put(obj: Json, path: str, value: Any) -> Json:
    """A copy of `obj` with the dotted `path` set to `value`."""
    head, _, rest = path.partition(".")
    copy = dict(obj)
    copy[head] = put(copy[head], rest, value) if rest else value
    return copy


@dataclass(frozen=True)
class Bad:
    raw: bytes
    mentions: tuple[str, ...]  # the reason contains one of these (empty: any reason)


@st.composite
def bad_lines(draw: st.DrawFn, base: Good, tag: str) -> Bad:
    obj = base.obj(tag)
    kind = draw(
        st.sampled_from(
            [
                "truncated",
                "garbage",
                "not an object",
                "wrong type",
                "too long",
                "line too long",
                "invalid utf-8",
                "no offset",
                "unknown type",
                "missing",
                "unknown field",
                "refund of no order",
                "step of no complaint",
            ]
        )
    )
    if kind == "truncated":
        text = dumps(obj)
        cut = text[: draw(st.integers(1, len(text) - 1))]
        try:
            cut.decode()
        except UnicodeDecodeError:
            return Bad(cut, ("not UTF-8 text",))
        return Bad(cut, ("not valid JSON",))
    if kind == "garbage":
        raw = draw(
            st.one_of(st.binary(min_size=1, max_size=80), st.text(min_size=1).map(str.encode))
        ).replace(b"\n", b" ")
        if not raw.rstrip(b"\r\n").strip():
            raw = b"?" + raw
        return Bad(raw, ())
    if kind == "not an object":
        value = draw(st.sampled_from([[obj], "event", 42, None, True, [1, 2]]))
        return Bad(dumps(value) if isinstance(value, list) else json.dumps(value).encode(), ())
    if kind == "wrong type":
        path, value, mentions = draw(st.sampled_from(WRONG_VALUES["*"] + WRONG_VALUES[base.type]))
        return Bad(dumps(put(obj, path, value)), (mentions,))
    if kind == "too long":
        path, length, mentions = draw(st.sampled_from(TOO_LONG["*"] + TOO_LONG[base.type]))
        return Bad(dumps(put(obj, path, "x" * length)), (mentions,))
    if kind == "line too long":
        padded = put(obj, f"data.{TEXT_FIELD[base.type]}", "y" * (MAX_LINE_BYTES + 1))
        return Bad(dumps(padded), (f"the limit is {MAX_LINE_BYTES:,}",))
    if kind == "invalid utf-8":
        marked = put(obj, "actor", f"agent{BAD_MARK}")
        bad = dumps(marked).replace(BAD_MARK.encode(), draw(st.sampled_from(INVALID_UTF8)))
        return Bad(bad, ("not UTF-8 text",))
    if kind == "no offset":
        naive = base.when.replace(tzinfo=None).isoformat()
        return Bad(dumps({**obj, "occurred_at": naive}), ("occurred_at has no UTC offset",))
    if kind == "unknown type":
        name = draw(st.text(max_size=20).filter(lambda t: t not in EVENT_TYPES))
        return Bad(dumps({**obj, "type": name}), ("unknown event type",))
    if kind == "missing":
        field = draw(st.sampled_from(["type", "customer_id", "occurred_at", "data"]))
        rest = {k: v for k, v in obj.items() if k != field}
        return Bad(dumps(rest), (f"{field} is missing",))
    if kind == "unknown field":
        where = draw(st.sampled_from(["", "data."]))
        return Bad(dumps(put(obj, f"{where}colour", "red")), (f"unknown field {where}colour",))
    if kind == "refund of no order":
        refund = {
            "type": "PurchaseRefunded",
            "customer_id": base.customer,
            "occurred_at": iso(base.when, base.zulu),
            "data": {"order_id": f"NOPE-{tag}", "amount": "1.00"},
        }
        return Bad(dumps(refund), ("was never recorded",))
    step = {
        "type": "ComplaintAcknowledged",
        "customer_id": base.customer,
        "occurred_at": iso(base.when, base.zulu),
        "data": {"complaint_id": f"K-NOPE-{tag}"},
    }
    return Bad(dumps(step), ("was never filed",))


# --- a whole file and what must become of each line ----------------------------------------


@dataclass
class Line:
    raw: bytes  # as written, without the line terminator
    expect: str  # accepted | duplicate | rejected | blank
    mentions: tuple[str, ...] = ()
    tag: str | None = None
    good: Good | None = None
    obj: Json | None = None


Key = tuple[str, ...]


def key_of(good: Good, tag: str) -> Key:
    """What identifies an event to the ledger: its idempotency key when it has one (the
    customer, source and key), else its content (here unique through the tag)."""
    sid = good.envelope.get("source_event_id")
    if sid is not None:
        return ("key", good.customer, good.envelope.get("source", ""), sid)
    return ("content", tag)


@st.composite
def input_files(draw: st.DrawFn) -> tuple[list[Line], list[bytes]]:
    """The lines of a file with what must become of each, and the terminators."""
    lines: list[Line] = []
    seen: set[Key] = set()
    landed: list[tuple[Good, str, bytes]] = []  # good lines so far (for copies)
    for number in range(1, draw(st.integers(1, 30)) + 1):
        tag = f"u{number}"
        choice = draw(
            st.sampled_from(["good", "good", "good", "copy", "same key", "bad", "bad", "blank"])
        )
        if choice == "copy" and landed:
            good, first_tag, raw = draw(st.sampled_from(landed))
            lines.append(Line(raw, "duplicate", tag=first_tag, good=good))
            continue
        if choice == "same key" and any("source_event_id" in g.envelope for g, _, _ in landed):
            earlier = draw(
                st.sampled_from([g for g, _, _ in landed if "source_event_id" in g.envelope])
            )
            fresh = draw(good_events())  # other content, the same customer, source and key
            envelope = {k: v for k, v in fresh.envelope.items() if k == "actor"}
            envelope |= {k: v for k, v in earlier.envelope.items() if k != "actor"}
            good = Good(
                fresh.type,
                earlier.customer,
                fresh.when,
                fresh.zulu,
                envelope,
                fresh.data,
                fresh.tag_field,
            )
            raw = dumps(good.obj(tag))
            assert key_of(good, tag) in seen
            lines.append(Line(raw, "duplicate", tag=tag, good=good))
            continue
        if choice == "bad":
            bad = draw(bad_lines(draw(good_events()), tag))
            lines.append(Line(bad.raw, "rejected", bad.mentions))
            continue
        if choice == "blank":
            lines.append(Line(draw(st.sampled_from([b"", b" ", b"\t \t", b"\r"])), "blank"))
            continue
        good = draw(good_events())
        raw = dumps(good.obj(tag))
        key = key_of(good, tag)
        expect = "duplicate" if key in seen else "accepted"
        seen.add(key)
        landed.append((good, tag, raw))
        lines.append(Line(raw, expect, tag=tag, good=good, obj=good.obj(tag)))
    terminators = [draw(st.sampled_from([b"\n", b"\r\n"])) for _ in lines]
    if draw(st.booleans()):
        terminators[-1] = b""  # no newline at the end of the file
    return lines, terminators


# --- checking a fact against the line it came from -----------------------------------------


def assert_fact_is(fact: Fact, obj: Json) -> None:
    for name in ("type", "customer_id", "source", "actor", "source_event_id"):
        assert fact[name] == obj.get(name), (name, fact, obj)
    stored_at, sent_at = (datetime.fromisoformat(fact["occurred_at"]), obj["occurred_at"])
    sent = datetime.fromisoformat(sent_at.replace("Z", "+00:00"))
    assert (stored_at, stored_at.utcoffset()) == (sent, sent.utcoffset())
    assert_data_is(fact["data"], plain(obj["data"]))


def assert_data_is(stored: Any, sent: Any) -> None:
    """Every field sent is stored with its value."""
    if isinstance(sent, dict):
        for name, value in sent.items():
            assert name in stored, (name, stored)
            assert_data_is(stored[name], value)
    elif isinstance(sent, list):
        assert len(stored) == len(sent)
        for one, other in zip(stored, sent, strict=True):
            assert_data_is(one, other)
    elif isinstance(sent, Decimal):  # sent as a JSON number: the same number
        assert Decimal(stored) == sent, (stored, sent)
    else:  # money sent as a string is stored as written
        assert stored == sent, (stored, sent)


# --- ingest --------------------------------------------------------------------------------

runs = itertools.count()


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(file=input_files(), batch_size=st.one_of(st.integers(1, 7), st.just(5_000)))
def test_ingest_accounts_for_every_line_and_stores_exactly_the_accepted_events(
    tmp_path: Path, file: tuple[list[Line], list[bytes]], batch_size: int
) -> None:
    lines, terminators = file
    run = tmp_path / f"run-{next(runs)}"
    settings_ = Settings(data_dir=run / "data")
    source = run / "input.jsonl"
    run.mkdir()
    source.write_bytes(
        b"".join(line.raw + end for line, end in zip(lines, terminators, strict=True))
    )
    ledger = open_ledger(settings_)
    try:
        with source.open("rb") as stream:
            report = ingest_stream(
                ledger,
                stream,
                str(source),
                settings_.rejects_dir,
                batch_size=batch_size,
            )
        check_report(report, lines)
        check_rejects(report, lines, source)
        check_store([fact for _, fact in ledger.all_facts()], lines)
    finally:
        ledger.close()


def counted(lines: list[Line], expect: str) -> int:
    return sum(line.expect == expect for line in lines)


def check_report(report: IngestReport, lines: list[Line]) -> None:
    non_blank = [line for line in lines if line.raw.rstrip(b"\r\n").strip()]
    assert all(line.expect != "blank" for line in non_blank)
    assert report.lines == len(non_blank)
    assert (report.accepted, report.duplicates, report.rejected) == (
        counted(lines, "accepted"),
        counted(lines, "duplicate"),
        counted(lines, "rejected"),
    )
    assert report.accepted + report.duplicates + report.rejected == report.lines


def check_rejects(report: IngestReport, lines: list[Line], source: Path) -> None:
    bad = {n: line for n, line in enumerate(lines, start=1) if line.expect == "rejected"}
    if not bad:
        assert report.rejects_files == []
        return
    (path,) = report.rejects_files
    rows = [orjson.loads(text) for text in path.read_bytes().splitlines()]
    assert sorted(row["line"] for row in rows) == sorted(bad)  # each bad line, once
    for row in rows:
        line = bad[row["line"]]
        assert row["source"] == str(source)
        assert row["text"] == line.raw.rstrip(b"\r\n").decode("utf-8", "backslashreplace")
        assert isinstance(row["reason"], str) and row["reason"].strip(), row
        if line.mentions:
            assert any(m in row["reason"] for m in line.mentions), (row["reason"], line.mentions)


def check_store(stored: list[Fact], lines: list[Line]) -> None:
    """`stored`: every fact, in the order the store recorded them."""
    accepted = [line for line in lines if line.expect == "accepted"]
    assert len(stored) == len(accepted)
    assert len({fact["event_id"] for fact in stored}) == len(stored)
    by_tag = {tag_of(fact): fact for fact in stored}
    assert sorted(by_tag) == sorted(str(line.tag) for line in accepted)
    for line in accepted:
        assert line.obj is not None
        assert_fact_is(by_tag[str(line.tag)], line.obj)
    # They were recorded in the order of the file.
    assert [tag_of(fact) for fact in stored] == [line.tag for line in accepted]


def tag_of(fact: Fact) -> str:
    data = fact["data"]
    return str(data.get("topic") or data.get("order_id") or data.get("survey_id"))


# --- money written as a JSON number --------------------------------------------------------


@settings(max_examples=200, deadline=None, database=None)
@given(digits=st.integers(1, 10**18 - 1), places=st.integers(0, 4))
@example(digits=123456789012345678, places=4)  # 12345678901234.5678
@example(digits=999999999999999999, places=4)  # 99999999999999.9999
@example(digits=456_384_271_136_980_977, places=4)  # its float prints 45638427113698.1
def test_money_written_as_a_json_number_is_kept_exactly(digits: int, places: int) -> None:
    """The contract: money is 'a decimal string or number, never rounded through binary
    floats'. A JSON number within the limits (18 digits, 4 places) keeps its exact value."""
    amount = Decimal(digits).scaleb(-places)
    if amount.adjusted() >= 14:  # more than 14 integer digits: beyond the limit
        return
    text = format(amount, "f")
    raw = (
        b'{"type": "PurchaseRecorded", "customer_id": "C1", '
        b'"occurred_at": "2025-03-01T09:30:00+08:00", '
        b'"data": {"order_id": "O1", "currency": "EUR", "amount": ' + text.encode() + b"}}"
    )
    parsed = parse_json_line(raw)
    assert not isinstance(parsed, Rejected), (text, parsed)
    assert parsed.data.amount == amount, (text, parsed.data.amount)  # type: ignore[union-attr]


# --- parse_json_line on anything -----------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
DATA_FIELDS = sorted(
    {
        name
        for model in EVENT_MODELS
        for name in getattr(model.model_fields["data"].annotation, "model_fields", {})
    }
)
near_events = st.fixed_dictionaries(
    {"type": st.sampled_from(EVENT_TYPES)},
    optional={
        "customer_id": st.one_of(customers, json_values),
        "occurred_at": st.one_of(moments.map(datetime.isoformat), json_values),
        "source_event_id": st.one_of(ids, json_values),
        "data": st.dictionaries(
            st.sampled_from(DATA_FIELDS),
            st.one_of(json_values, ids, moments.map(datetime.isoformat)),
            max_size=6,
        ),
    },
)


@st.composite
def mutated_events(draw: st.DrawFn) -> bytes:
    """A valid event's JSON with a few bytes replaced, inserted or deleted."""
    good = draw(good_events())
    raw = bytearray(dumps(good.obj("t1")))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw) - 1))
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.integers(0, 255))
        if op == "replace":
            raw[at] = byte
        elif op == "insert":
            raw.insert(at, byte)
        elif len(raw) > 1:
            del raw[at]
    return bytes(raw)


@settings(max_examples=400, deadline=None, database=None)
@given(
    raw=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=200).map(str.encode),
        json_values.map(lambda v: json.dumps(v).encode()),
        near_events.map(lambda v: json.dumps(v, ensure_ascii=False).encode()),
        good_events().map(lambda g: dumps(g.obj("t1"))),
        mutated_events(),
    )
)
def test_parse_json_line_never_raises_and_answers_an_event_or_a_reason(raw: bytes) -> None:
    result = parse_json_line(raw)
    if isinstance(result, Rejected):
        assert isinstance(result.reason, str) and result.reason.strip()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            assert result.reason.startswith("not UTF-8 text: byte 0x"), result.reason
        return
    assert isinstance(result, EVENT_MODELS)
    assert len(raw) <= MAX_LINE_BYTES
    decoded = json.loads(raw)
    assert isinstance(decoded, dict) and decoded["type"] == result.type
    # The event's own JSON means the same event.
    assert parse_json_line(result.model_dump_json().encode()) == result
