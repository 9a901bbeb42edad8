"""Kafka records in CloudEvents 1.0 binary content mode: the subscribers' wire contract.

- key: the customer id (UTF-8), so each customer's events share a partition and keep order;
- value: the event as JSON, the recorded shape of `domain.events` (`ledger schema`);
- headers: `ce_specversion`, `ce_id` (the event id), `ce_source`, `ce_type`, `ce_time`
  (business time), `ce_subject` (customer id), `ce_dataschema`, `content-type`, and the
  extension `ce_ledgerposition` (the event store's position); the first record of each
  batch the relay sends also carries the extension `ce_ledgerrelayed`: every event at or
  below that store position was on the topic, in whatever partition, before this record
  was sent (the relay sends a batch only once the broker has acknowledged the one
  before). Partitions are read at their own pace, and a record does not say by itself
  what the others hold.

Any Kafka client can read the topic with these rules alone; `decode` is the inverse used
by this project's consumer groups, and rejects what a subscriber could not trust.

The watermarks topic (`<topic>.watermarks`) carries the relay's `RelayWatermark`s, same
envelope (`ce_type` customer_ledger.RelayWatermark, `ce_time` its moment, key the events
topic's name): every event recorded at or before `data.complete_until` is at or below
store position `data.position`, and the broker had acknowledged every one of those on
the events topic, below `data.ends` (per partition, the offset after the last record the
relay had acknowledged), before the watermark was sent. A subscriber that has read each
partition of the events topic to the end it finds after reading a watermark (an end not
below the watermark's: else the topic lost data since) has every event recorded up to
that moment.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import orjson
from pydantic import ValidationError

from domain.events import RECORDED, type_schema_id
from domain.intake import explain

SPEC_VERSION = b"1.0"
TYPE_PREFIX = "customer_ledger."

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    key: bytes
    value: bytes
    headers: Headers


def encode(
    fact: dict[str, Any], document: bytes, position: int | None, relayed: int | None = None
) -> KafkaRecord:
    """The record for one recorded (or derived) event; `document` is its JSON; `relayed`:
    the store position up to which every event is on the topic already, if known."""
    headers: Headers = [
        ("ce_specversion", SPEC_VERSION),
        ("ce_id", fact["event_id"].encode()),
        ("ce_source", source_uri(fact.get("source")).encode()),
        ("ce_type", f"{TYPE_PREFIX}{fact['type']}".encode()),
        ("ce_time", fact["occurred_at"].encode()),
        ("ce_subject", fact["customer_id"].encode()),
        ("ce_dataschema", type_schema_id(fact["type"]).encode()),
        ("content-type", b"application/json"),
    ]
    if position is not None:
        headers.append(("ce_ledgerposition", str(position).encode()))
    if relayed is not None:
        headers.append(("ce_ledgerrelayed", str(relayed).encode()))
    return KafkaRecord(fact["customer_id"].encode(), document, headers)


def source_uri(source: str | None) -> str:
    """`ce_source`: a URI reference (CloudEvents), so the producer's free-text source is
    percent-encoded (UTF-8) where it holds what a URN may not ("POS #3 / Zürich")."""
    return f"urn:customer-ledger:{quote(source or 'ledger', safe=URN_SAFE)}"


URN_SAFE = "-._~:@!$&'()*+,;=/"
"""Characters a URN's specific string may hold as they are (RFC 3986 pchar and '/')."""


class UndecodableRecord(ValueError):
    """A record a subscriber cannot trust; the message says why (for the dead letters)."""


@dataclass(frozen=True, slots=True)
class DecodedRecord:
    position: int  # in the event store
    value: bytes  # the event's JSON
    occurred_at: datetime
    relayed: int | None  # `ce_ledgerrelayed`, when the record carries it


def decode(headers: Headers, value: bytes | None) -> DecodedRecord:
    """A record of the events topic, validated."""
    found = dict(headers)
    if found.get("ce_specversion") != SPEC_VERSION:
        raise UndecodableRecord("not a CloudEvents 1.0 record (ce_specversion header)")
    try:
        position = int(found["ce_ledgerposition"])
    except (KeyError, ValueError):
        raise UndecodableRecord("ce_ledgerposition header missing or not a number") from None
    if value is None:
        raise UndecodableRecord("the record has no value")
    try:
        event = RECORDED.validate_json(value)
    except ValidationError as error:
        raise UndecodableRecord(explain(error)) from None
    if found.get("ce_id", b"").decode(errors="replace") != str(event.event_id):
        raise UndecodableRecord("ce_id does not match the event's event_id")
    return DecodedRecord(position, value, event.occurred_at, _relayed(found, position))


def _relayed(headers: dict[str, bytes], position: int) -> int | None:
    """`ce_ledgerrelayed`, when the record can be saying it: the relay's claim is always
    below the record's own position (a foreign producer's header is not believed)."""
    try:
        relayed = int(headers["ce_ledgerrelayed"])
    except (KeyError, ValueError):
        return None
    return relayed if 0 <= relayed < position else None


WATERMARK_TYPE = "RelayWatermark"
RELAY_SOURCE = "urn:customer-ledger:relay"


@dataclass(frozen=True, slots=True)
class Watermark:
    """The relay's word that the events topic is complete up to a moment: every event
    recorded at or before `complete_until` is at or below store position `position`, and
    all of those were on the topic (acknowledged) before the watermark was sent."""

    complete_until: datetime
    position: int
    # per partition of the events topic, the offset after the last record the relay had
    # acknowledged: a topic that ends before them lost what the watermark vouches for
    ends: dict[int, int]


def encode_watermark(mark: Watermark, topic: str) -> KafkaRecord:
    """The record of a watermark for `topic` (the events topic: also its key)."""
    moment = mark.complete_until.astimezone(UTC).isoformat()
    digest = hashlib.md5(f"watermark|{topic}|{mark.position}|{moment}".encode()).digest()
    headers: Headers = [
        ("ce_specversion", SPEC_VERSION),
        ("ce_id", str(uuid.UUID(bytes=digest)).encode()),
        ("ce_source", RELAY_SOURCE.encode()),
        ("ce_type", f"{TYPE_PREFIX}{WATERMARK_TYPE}".encode()),
        ("ce_time", moment.encode()),
        ("content-type", b"application/json"),
    ]
    ends = {str(partition): end for partition, end in sorted(mark.ends.items())}
    value = orjson.dumps({"complete_until": moment, "position": mark.position, "ends": ends})
    return KafkaRecord(topic.encode(), value, headers)


def decode_watermark(headers: Headers, value: bytes | None) -> Watermark:
    """A record of the watermarks topic; `UndecodableRecord` unless it is one."""
    found = dict(headers)
    if found.get("ce_type") != f"{TYPE_PREFIX}{WATERMARK_TYPE}".encode():
        raise UndecodableRecord(f"not a {WATERMARK_TYPE} (ce_type header)")
    try:
        data = orjson.loads(value or b"")
        moment = datetime.fromisoformat(data["complete_until"])
        position = int(data["position"])
        ends = {int(partition): int(end) for partition, end in data["ends"].items()}
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise UndecodableRecord(f"not a {WATERMARK_TYPE}'s data: {error}") from None
    if moment.tzinfo is None or position < 0:
        raise UndecodableRecord(f"a {WATERMARK_TYPE} needs an offset time and a position")
    return Watermark(moment, position, ends)
