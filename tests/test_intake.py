"""Intake: one line in, an event or a reason a person can act on. Every reason that
domain/intake.py can give is asserted here on its words."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from domain.events import (
    EVENT_TYPES,
    INCOMING,
    ConsentChanged,
    CustomerProfileUpdated,
    CustomerRegistered,
    PurchaseRecorded,
    SurveyAnswered,
)
from domain.intake import (
    MAX_LINE_BYTES,
    Rejected,
    csv_row_to_record,
    explain,
    parse_json_line,
    parse_record,
)

AT = "2025-03-01T09:30:00+08:00"
ALL_TYPES = ", ".join(EVENT_TYPES)


def purchase(**data: Any) -> dict[str, Any]:
    body = {"order_id": "SO-1", "amount": "19.90", "currency": "EUR", **data}
    return {
        "type": "PurchaseRecorded",
        "customer_id": "C-1",
        "occurred_at": AT,
        "data": {k: v for k, v in body.items() if v is not None},
    }


def survey(kind: str, score: int) -> dict[str, Any]:
    return {
        "type": "SurveyAnswered",
        "customer_id": "C-1",
        "occurred_at": AT,
        "data": {"survey_id": "SV-1", "kind": kind, "score": score},
    }


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def reason(raw: bytes | dict[str, Any]) -> str:
    """The rejection reason for a line (bytes) or an object (sent as one JSON line)."""
    result = parse_json_line(raw if isinstance(raw, bytes) else line(raw))
    assert isinstance(result, Rejected), f"expected a rejection, got {result!r}"
    return result.reason


def record_reason(record: dict[str, Any]) -> str:
    result = parse_record(record)
    assert isinstance(result, Rejected), f"expected a rejection, got {result!r}"
    return result.reason


# --- accepted lines ------------------------------------------------------------------------


def test_a_valid_line_becomes_its_catalogue_event() -> None:
    parsed = parse_json_line(line(purchase()))
    assert isinstance(parsed, PurchaseRecorded)
    assert parsed.data.amount == Decimal("19.90")
    assert parsed.customer_id == "C-1"


def test_a_valid_record_becomes_its_catalogue_event() -> None:
    parsed = parse_record(purchase())
    assert isinstance(parsed, PurchaseRecorded)
    assert parsed.data.order_id == "SO-1"


# --- the line itself -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", [b'{"type": ', b"{'type': 'ContactLogged'}", b'{"type":"ContactLogged",}', b"hello"]
)
def test_invalid_json(raw: bytes) -> None:
    text = reason(raw)
    assert text.startswith("not valid JSON (")
    assert text.endswith(")")
    assert "line 1 column" in text


def test_invalid_json_says_where() -> None:
    assert reason(b'{"type": ') == "not valid JSON (EOF while parsing a value at line 1 column 9)"


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"PurchaseRecorded"', b"42", b"null", b"true"])
def test_not_an_object(raw: bytes) -> None:
    assert reason(raw) == "each line must be one JSON object"


def test_a_line_at_the_limit_is_read_and_one_byte_more_is_refused() -> None:
    body = line(purchase())
    at_limit = body + b" " * (MAX_LINE_BYTES - len(body))
    assert len(at_limit) == MAX_LINE_BYTES
    assert isinstance(parse_json_line(at_limit), PurchaseRecorded)
    too_long = at_limit + b" "
    assert reason(too_long) == (
        f"the line is {MAX_LINE_BYTES + 1:,} bytes; the limit is {MAX_LINE_BYTES:,}"
    )
    assert reason(too_long) == "the line is 262,145 bytes; the limit is 262,144"


def test_an_over_long_line_is_refused_before_it_is_parsed() -> None:
    # Not even JSON: the length is the first and only complaint.
    raw = b"x" * (MAX_LINE_BYTES * 2)
    assert reason(raw) == "the line is 524,288 bytes; the limit is 262,144"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"type":"\xff"}', "not UTF-8 text: byte 0xff at column 10"),
        (b'{"customer_id":"caf\xe9"}', "not UTF-8 text: byte 0xe9 at column 20"),
        (b"\xc3\x28", "not UTF-8 text: byte 0xc3 at column 1"),
    ],
)
def test_not_utf8(raw: bytes, expected: str) -> None:
    assert reason(raw) == expected


def test_utf8_text_is_fine() -> None:
    event = purchase()
    event["customer_id"] = "客户-1"
    parsed = parse_json_line(json.dumps(event, ensure_ascii=False).encode())
    assert isinstance(parsed, PurchaseRecorded)
    assert parsed.customer_id == "客户-1"


# --- the type ------------------------------------------------------------------------------


def test_missing_type() -> None:
    event = purchase()
    del event["type"]
    assert reason(event) == f"type is missing; it must be one of: {ALL_TYPES}"
    assert reason(b"{}") == f"type is missing; it must be one of: {ALL_TYPES}"


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("PurchaseRecordd", "PurchaseRecorded"),
        ("PurchaseRefund", "PurchaseRefunded"),
        ("ComplaintFiling", "ComplaintFiled"),
        ("CustomerRegister", "CustomerRegistered"),
        ("SurveyAnswer", "SurveyAnswered"),
    ],
)
def test_unknown_type_with_a_hint(typo: str, meant: str) -> None:
    assert reason({**purchase(), "type": typo}) == (
        f"unknown event type {typo!r}; did you mean {meant}?"
    )


def test_unknown_type_without_a_close_match_lists_the_known_types() -> None:
    assert (
        reason({**purchase(), "type": "Zzz"})
        == f"unknown event type 'Zzz'; known types: {ALL_TYPES}"
    )


# --- the envelope --------------------------------------------------------------------------


@pytest.mark.parametrize("naive", ["2025-03-01T09:30:00", "2025-03-01T09:30", "2025-03-01"])
def test_no_utc_offset(naive: str) -> None:
    assert reason({**purchase(), "occurred_at": naive}) == (
        "occurred_at has no UTC offset (write e.g. 2025-03-01T09:30:00+08:00)"
    )


@pytest.mark.parametrize("bad", ["yesterday", "2025-13-01T09:30:00Z", "2025-03-01T25:00:00Z"])
def test_bad_date_time(bad: str) -> None:
    assert reason({**purchase(), "occurred_at": bad}) == (
        f"occurred_at is not an ISO-8601 date-time with offset: {bad!r}"
    )


@pytest.mark.parametrize(("bad", "shown"), [([2025, 3, 1], "[2025, 3, 1]"), (True, "True")])
def test_a_date_time_of_the_wrong_json_type(bad: Any, shown: str) -> None:
    assert reason({**purchase(), "occurred_at": bad}) == (
        f"occurred_at is not an ISO-8601 date-time with offset: {shown}"
    )


@pytest.mark.parametrize("field", ["customer_id", "occurred_at", "data"])
def test_missing_envelope_field(field: str) -> None:
    event = purchase()
    del event[field]
    assert reason(event) == f"{field} is missing"


def test_missing_data_field() -> None:
    event = purchase()
    del event["data"]["order_id"]
    assert reason(event) == "data.order_id is missing"


def test_missing_nested_field_names_its_position() -> None:
    assert reason(purchase(items=[{"sku": "A"}, {"name": "no sku"}])) == (
        "data.items.1.sku is missing"
    )


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("occured_at", "occurred_at"),
        ("customer", "customer_id"),
        ("source_id", "source"),
        ("sorce", "source"),
        ("acter", "actor"),
        ("dat", "data"),
        ("source_event", "source_event_id"),
    ],
)
def test_unknown_envelope_field_with_a_hint(typo: str, meant: str) -> None:
    event = {**purchase(), typo: "x"}
    assert reason(event) == f"unknown field {typo} (did you mean {meant}?)"


def test_misspelt_occurred_at_reports_both_problems() -> None:
    event = purchase()
    event["occured_at"] = event.pop("occurred_at")
    assert reason(event) == (
        "occurred_at is missing; unknown field occured_at (did you mean occurred_at?)"
    )


def test_unknown_field_without_a_hint() -> None:
    assert reason({**purchase(), "colour": "red"}) == "unknown field colour"


def test_unknown_data_field_gets_no_envelope_hint() -> None:
    # 'source' is an envelope field: data.sorce must not be told to use it.
    assert reason(purchase(sorce="pos")) == "unknown field data.sorce"
    assert reason(purchase(extra=1)) == "unknown field data.extra"


def test_short_text_limits_are_explained() -> None:
    assert reason({**purchase(), "customer_id": "  "}) == (
        "customer_id: string should have at least 1 character"
    )
    assert reason({**purchase(), "customer_id": "x" * 129}) == (
        "customer_id: string should have at most 128 characters"
    )


# --- data values ---------------------------------------------------------------------------


def test_bad_decimal() -> None:
    assert reason(purchase(amount="12,50")) == "data.amount: input should be a valid decimal"
    assert reason(purchase(amount="twelve")) == "data.amount: input should be a valid decimal"


def test_too_many_decimal_places() -> None:
    assert reason(purchase(amount="1.23456")) == (
        "data.amount: decimal input should have no more than 4 decimal places"
    )
    raw = line(purchase(amount="X")).replace(b'"X"', b"0.30000000000000004")
    assert reason(raw) == "data.amount: decimal input should have no more than 4 decimal places"


def test_non_positive_amount() -> None:
    assert reason(purchase(amount="0")) == "data.amount: input should be greater than 0"
    assert reason(purchase(amount="-3")) == "data.amount: input should be greater than 0"


@pytest.mark.parametrize("currency", ["XYZ", "ABC", "EU1"])
def test_invalid_currency(currency: str) -> None:
    assert reason(purchase(currency=currency)) == (
        "data.currency: invalid ISO 4217 currency code. See https://en.wikipedia.org/wiki/ISO_4217"
    )


@pytest.mark.parametrize(
    ("currency", "expected"),
    [
        ("EURO", "data.currency: string should have at most 3 characters"),
        ("€", "data.currency: string should have at least 3 characters"),
    ],
)
def test_currency_of_the_wrong_length(currency: str, expected: str) -> None:
    assert reason(purchase(currency=currency)) == expected


def test_invalid_enum_value_lists_the_choices() -> None:
    event = {
        "type": "ContactLogged",
        "customer_id": "C-1",
        "occurred_at": AT,
        "data": {"channel": "fax", "direction": "inbound"},
    }
    assert reason(event) == (
        "data.channel: input should be 'phone', 'email', 'sms', 'chat', 'web', 'store', "
        "'visit', 'letter', 'social' or 'call_center'"
    )


@pytest.mark.parametrize(
    ("kind", "score", "expected"),
    [
        ("nps", 11, "data: a nps score must be from 0 to 10"),
        ("nps", -1, "data: a nps score must be from 0 to 10"),
        ("csat", 0, "data: a csat score must be from 1 to 5"),
        ("csat", 6, "data: a csat score must be from 1 to 5"),
        ("ces", 8, "data: a ces score must be from 1 to 7"),
        ("callback", 0, "data: a callback score must be from 1 to 5"),
    ],
)
def test_survey_score_out_of_range(kind: str, score: int, expected: str) -> None:
    assert reason(survey(kind, score)) == expected


def test_survey_score_on_the_edge_is_accepted() -> None:
    assert isinstance(parse_json_line(line(survey("nps", 0))), SurveyAnswered)
    assert isinstance(parse_json_line(line(survey("ces", 7))), SurveyAnswered)


def test_profile_update_with_no_fields() -> None:
    event = {"type": "CustomerProfileUpdated", "customer_id": "C-1", "occurred_at": AT}
    assert reason({**event, "data": {}}) == (
        "data: a profile update must change at least one field"
    )
    assert reason({**event, "data": None}) == "data: input should be an object"
    # Naming a field, even to clear it, is a change.
    for data in ({"segment": "vip"}, {"phone": None}):
        parsed = parse_json_line(line({**event, "data": data}))
        assert isinstance(parsed, CustomerProfileUpdated)
        assert parsed.data.model_fields_set == set(data)


def test_every_problem_of_a_line_is_listed() -> None:
    event = purchase(amount="-1", currency="XYZ")
    event["occurred_at"] = "2025-03-01T09:30:00"
    event["custmer_id"] = event.pop("customer_id")
    parts = reason(event).split("; ")
    assert "customer_id is missing" in parts
    assert "occurred_at has no UTC offset (write e.g. 2025-03-01T09:30:00+08:00)" in parts
    assert "unknown field custmer_id (did you mean customer_id?)" in parts
    assert "data.amount: input should be greater than 0" in parts
    assert any(p.startswith("data.currency: invalid ISO 4217") for p in parts)
    assert len(parts) == 5


def test_reasons_never_name_the_union_tag() -> None:
    text = reason(purchase(amount="abc"))
    assert "PurchaseRecorded" not in text
    assert text.startswith("data.amount")


def test_records_get_the_same_reasons_as_lines() -> None:
    cases = [
        purchase(amount="1.23456"),
        {**purchase(), "occurred_at": "2025-03-01T09:30:00"},
        {**purchase(), "type": "PurchaseRecordd"},
        {**purchase(), "occured_at": AT},
        survey("csat", 9),
    ]
    for case in cases:
        assert record_reason(case) == reason(case)


def test_a_record_that_is_not_an_object() -> None:
    result = parse_record(["not", "a", "dict"])  # type: ignore[arg-type]
    assert isinstance(result, Rejected)
    assert result.reason == "each line must be one JSON object"


def test_explain_joins_every_error_of_a_validation_error() -> None:
    with pytest.raises(ValidationError) as caught:
        INCOMING.validate_python({"type": "ConsentChanged", "data": {"granted": True}})
    assert explain(caught.value) == (
        "customer_id is missing; occurred_at is missing; data.purpose is missing"
    )


# --- CSV rows ------------------------------------------------------------------------------


def csv_rows(text: str) -> list[dict[str, str | None]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_row_nests_data_columns_and_keeps_envelope_columns() -> None:
    row = {
        "type": "PurchaseRecorded",
        "customer_id": "C-1",
        "occurred_at": AT,
        "source_event_id": "pos-1",
        "data.order_id": "SO-1",
        "data.amount": "12.50",
        "data.currency": "EUR",
    }
    assert csv_row_to_record(row) == {
        "type": "PurchaseRecorded",
        "customer_id": "C-1",
        "occurred_at": AT,
        "source_event_id": "pos-1",
        "data": {"order_id": "SO-1", "amount": "12.50", "currency": "EUR"},
    }


def test_csv_empty_cells_are_left_out() -> None:
    rows = csv_rows(
        "type,customer_id,occurred_at,source,actor,data.purpose,data.granted,data.channel\n"
        f"ConsentChanged,C-1,{AT},,,marketing,true,\n"
    )
    record = csv_row_to_record(rows[0])
    assert record == {
        "type": "ConsentChanged",
        "customer_id": "C-1",
        "occurred_at": AT,
        "data": {"purpose": "marketing", "granted": "true"},
    }
    parsed = parse_record(record)
    assert isinstance(parsed, ConsentChanged)
    assert parsed.data.granted is True
    assert parsed.data.channel is None
    assert parsed.source is None


def test_csv_row_without_data_columns_still_has_data() -> None:
    record = csv_row_to_record(
        {"type": "CustomerRegistered", "customer_id": "C-1", "occurred_at": AT}
    )
    assert record["data"] == {}
    assert isinstance(parse_record(record), CustomerRegistered)
    update = csv_row_to_record(
        {"type": "CustomerProfileUpdated", "customer_id": "C-1", "occurred_at": AT, "data.city": ""}
    )
    assert parse_record(update) == Rejected("data: a profile update must change at least one field")


def test_csv_json_cell_for_items() -> None:
    items = [{"sku": "SOFA-3", "quantity": 1, "unit_price": "999.90"}, {"sku": "CUSH-1"}]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["type", "customer_id", "occurred_at", "data.order_id", "data.amount"]
    writer.writerow([*header, "data.currency", "data.items", "data.quantity"])
    writer.writerow(
        ["PurchaseRecorded", "C-1", AT, "SO-1", "999.90", "EUR", json.dumps(items), "2"]
    )
    record = csv_row_to_record(csv_rows(buffer.getvalue())[0])
    assert record["data"]["items"] == items
    parsed = parse_record(record)
    assert isinstance(parsed, PurchaseRecorded)
    assert parsed.data.items is not None
    assert [item.sku for item in parsed.data.items] == ["SOFA-3", "CUSH-1"]
    assert parsed.data.items[0].unit_price == Decimal("999.90")
    assert parsed.data.quantity == 2
    assert parsed.data.amount == Decimal("999.90")


def test_csv_cell_that_only_looks_like_json_stays_text() -> None:
    record = csv_row_to_record({"type": "ContactLogged", "data.notes": "[urgent] call back"})
    assert record["data"]["notes"] == "[urgent] call back"
    record = csv_row_to_record({"type": "ContactLogged", "data.notes": "{see file"})
    assert record["data"]["notes"] == "{see file"


def test_csv_broken_items_cell_is_rejected_with_a_reason() -> None:
    row = {
        "type": "PurchaseRecorded",
        "customer_id": "C-1",
        "occurred_at": AT,
        "data.order_id": "SO-1",
        "data.amount": "1",
        "data.currency": "EUR",
        "data.items": '[{"sku": "A"',
    }
    assert parse_record(csv_row_to_record(row)) == Rejected(
        "data.items: input should be a valid list"
    )


def test_csv_surplus_cells_without_a_column_are_ignored() -> None:
    rows = csv_rows(f"type,customer_id,occurred_at\nCustomerRegistered,C-1,{AT},surplus\n")
    assert rows[0].get(None) == ["surplus"]  # type: ignore[call-overload]
    record = csv_row_to_record(rows[0])
    assert record == {
        "type": "CustomerRegistered",
        "customer_id": "C-1",
        "occurred_at": AT,
        "data": {},
    }


def test_csv_missing_cells_are_left_out() -> None:
    rows = csv_rows("type,customer_id,occurred_at,data.name\nCustomerRegistered,C-1\n")
    record = csv_row_to_record(rows[0])
    assert record == {"type": "CustomerRegistered", "customer_id": "C-1", "data": {}}
    assert parse_record(record) == Rejected("occurred_at is missing")


def test_csv_cells_get_the_same_reasons_as_json() -> None:
    row = {
        "type": "SurveyAnswered",
        "customer_id": "C-1",
        "occurred_at": "2025-03-01 09:30:00",
        "data.survey_id": "SV-1",
        "data.kind": "nps",
        "data.score": "11",
    }
    assert parse_record(csv_row_to_record(row)) == Rejected(
        "occurred_at has no UTC offset (write e.g. 2025-03-01T09:30:00+08:00); "
        "data: a nps score must be from 0 to 10"
    )
