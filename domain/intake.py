"""Turning one line of input into a catalogue event, or a reason a person can act on.

Pure functions: no files, no store. `consumers/ingest.py` reads the files and keeps the
rejects; this module decides what a line means and, when it means nothing valid, says why
("line 17: occurred_at has no UTC offset").
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from domain.events import EVENT_TYPES, INCOMING, IncomingEvent

MAX_LINE_BYTES = 256 * 1024
_ENVELOPE_FIELDS = ("type", "customer_id", "occurred_at", "source_event_id", "source", "actor")


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str


def parse_json_line(raw: bytes) -> IncomingEvent | Rejected:
    """One JSON Lines line (without its newline) to an event or a rejection."""
    if len(raw) > MAX_LINE_BYTES:
        return Rejected(f"the line is {len(raw):,} bytes; the limit is {MAX_LINE_BYTES:,}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return Rejected(
            f"not UTF-8 text: byte 0x{raw[error.start]:02x} at column {error.start + 1}"
        )
    if LONG_NUMBER.search(raw):  # a float would round it, to as few digits as fit
        exact = _parse_exactly(raw)
        if exact is not None:
            return exact
    try:
        return INCOMING.validate_json(raw)
    except ValidationError as error:
        if any(e["type"] == "float_money" for e in error.errors()):
            return _parse_exactly(raw) or Rejected(explain(error))
        return Rejected(explain(error))


LONG_NUMBER = re.compile(rb"(?:\d\.?){16,}")
"""A run of 16 digits or more, perhaps with a decimal point: a JSON number longer than a
binary float holds exactly. Its float may print short (45638427113698.0977 reads as
45638427113698.1), so `float_money` cannot see it: such a line is read exactly. A long
digit run inside a string (an id) costs only the slower reading."""


def _parse_exactly(raw: bytes) -> IncomingEvent | Rejected | None:
    """The slow, exact reading of numbers (fractional ones as Decimals); None when the
    line is no JSON (the usual reading says why)."""
    try:
        record = exact_json(raw)
    except ValueError:  # JSONDecodeError
        return None
    return parse_record(record)


def exact_json(raw: bytes | str) -> Any:
    """JSON with every fractional number read as an exact Decimal, not a binary float."""
    return json.loads(raw, parse_float=Decimal)


def parse_record(record: Mapping[str, Any]) -> IncomingEvent | Rejected:
    """An already-decoded object (a CSV row, a `record` command) to an event or rejection."""
    try:
        return INCOMING.validate_python(record)
    except ValidationError as error:
        return Rejected(explain(error))


def csv_row_to_record(row: Mapping[str, str | None]) -> dict[str, Any]:
    """A CSV row with envelope columns and `data.`-prefixed columns to an event object.

    Empty cells are left out; a `data.` cell holding a JSON list or object (line items)
    is parsed as JSON.
    """
    record: dict[str, Any] = {}
    data: dict[str, Any] = {}
    for column, cell in row.items():
        if column is None or cell is None or cell == "":
            continue
        if column.startswith("data."):
            value: Any = cell
            if cell[:1] in "[{":
                try:
                    value = orjson.loads(cell)
                except orjson.JSONDecodeError:
                    value = cell
            data[column.removeprefix("data.")] = value
        else:
            record[column] = cell
    record["data"] = data
    return record


def explain(error: ValidationError) -> str:
    """Every problem of a rejected event, in words: 'data.amount: ...; occurred_at ...'."""
    return "; ".join(_explain_one(detail) for detail in error.errors(include_url=False))


def _explain_one(detail: ErrorDetails) -> str:
    kind = detail["type"]
    loc = [str(part) for part in detail["loc"]]
    if loc and loc[0] in EVENT_TYPES:  # the discriminator's tag, not a field
        loc = loc[1:]
    field = ".".join(loc) or "the event"
    if kind == "json_invalid":
        return f"not valid JSON ({detail['msg'].removeprefix('Invalid JSON: ')})"
    if kind in ("model_attributes_type", "model_type", "dict_type") and not loc:
        return "each line must be one JSON object"
    if kind == "union_tag_not_found":
        return "type is missing; it must be one of: " + ", ".join(EVENT_TYPES)
    if kind == "union_tag_invalid":
        tag = detail.get("ctx", {}).get("tag", "?")
        hint = difflib.get_close_matches(str(tag), EVENT_TYPES, n=1)
        known = f"did you mean {hint[0]}?" if hint else "known types: " + ", ".join(EVENT_TYPES)
        return f"unknown event type {tag!r}; {known}"
    if kind == "timezone_aware":
        return f"{field} has no UTC offset (write e.g. 2025-03-01T09:30:00+08:00)"
    if kind == "missing":
        return f"{field} is missing"
    if kind == "extra_forbidden":
        name = loc[-1] if loc else "?"
        options = (*_ENVELOPE_FIELDS, "data") if len(loc) == 1 else ()
        hint = difflib.get_close_matches(name, options, n=1)
        return f"unknown field {field}" + (f" (did you mean {hint[0]}?)" if hint else "")
    if kind in ("datetime_parsing", "datetime_from_date_parsing", "datetime_type"):
        return f"{field} is not an ISO-8601 date-time with offset: {detail['input']!r}"
    message = detail["msg"].removeprefix("Value error, ")
    return f"{field}: {message[:1].lower()}{message[1:]}"
