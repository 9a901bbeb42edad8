"""The topics' wire contract, read by a different client library (confluent-kafka, i.e.
librdkafka) with none of this project's decoding code: every record carries the documented
CloudEvents 1.0 binary-mode headers, its key is the customer id, its value is the recorded
event as JSON, and each customer's events sit in one partition in store order. The derived
events follow the same conventions, valid against the schemas `ledger schema` prints.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote

import jsonschema
import pytest
from confluent_kafka import Consumer, KafkaError, Message
from conftest import PROJECT_ROOT, differences, embedded, event, record, tables
from referencing import Registry, Resource

from bootstrap import Settings
from consumers import kafka_projection, relay
from consumers.kafka import KafkaSettings, ensure_topics
from domain.demo_history import generate_history
from domain.events import without_personal_data
from domain.ledger import Ledger

pytestmark = pytest.mark.kafka

RECORDED_FIELDS = {
    "event_id",
    "type",
    "schema_version",
    "customer_id",
    "occurred_at",
    "recorded_at",
    "data",
}


def read_everything(bootstrap: str, topic: str, expected: int) -> list[Message]:
    """Poll with a fresh group until `expected` records arrived (and a little longer, to
    notice extras), or fail after a deadline: the group join takes a few seconds."""
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"contract-{uuid.uuid4().hex[:10]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
        }
    )
    messages: list[Message] = []
    try:
        reader.subscribe([topic])
        deadline = time.monotonic() + 60
        quiet_until: float | None = None
        while time.monotonic() < deadline:
            message = reader.poll(0.5)
            if message is None:
                if quiet_until is not None and time.monotonic() > quiet_until:
                    break
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                pytest.fail(f"confluent-kafka reports {error}")
            messages.append(message)
            if len(messages) >= expected and quiet_until is None:
                quiet_until = time.monotonic() + 1.0
    finally:
        reader.close()
    assert len(messages) == expected, f"read {len(messages)} of {expected} records"
    return messages


def envelope(message: Message) -> tuple[str, dict[str, Any], dict[str, bytes]]:
    """A record's key, JSON value and headers, checked against the envelope every topic
    shares: CloudEvents 1.0 binary-mode headers naming the event, the customer as key."""
    pairs = cast(list[tuple[str, bytes]], message.headers() or [])
    headers = dict(pairs)
    assert len(headers) == len(pairs), "a header is repeated"
    value = json.loads(message.value() or b"")
    key = (message.key() or b"").decode()
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_id"].decode() == value["event_id"]
    assert headers["ce_type"].decode() == "customer_ledger." + value["type"]
    assert headers["ce_subject"].decode() == key == value["customer_id"]
    assert headers["ce_time"].decode() == value["occurred_at"]
    assert headers["content-type"] == b"application/json"
    # a URI reference: the free-text source percent-encoded (UTF-8)
    source = re.fullmatch(r"urn:customer-ledger:([A-Za-z0-9\-._~:@!$&'()*+,;=/%]+)",
                          headers["ce_source"].decode())  # fmt: skip
    assert source is not None, headers["ce_source"]
    assert unquote(source[1]) == (value.get("source") or "ledger")
    # the `$id` of the type's schema (`ledger schema TYPE`)
    assert headers["ce_dataschema"].decode() == f"urn:customer-ledger:schema:{value['type']}:v1"
    return key, value, headers


def test_topic_follows_the_cloudevents_contract(
    ledger: Ledger, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    history = generate_history(customers=40)
    # a source a URN may not hold as it is (spaces, '#', non-ASCII)
    history[0] = {**history[0], "source": "Point of Sale #3 / Zürich"}
    outcomes = record(ledger, history)
    assert all(o.status == "accepted" for o in outcomes)
    stored: dict[str, tuple[int, dict[str, Any]]] = {
        fact["event_id"]: (position, fact) for position, fact in ledger.all_facts()
    }
    store_order: dict[str, list[str]] = defaultdict(list)
    for event_id, (_, fact) in sorted(stored.items(), key=lambda item: item[1][0]):
        store_order[fact["customer_id"]].append(event_id)
    relay.run(ledger, kafka_settings, tmp_path / "relay.json")

    messages = read_everything(kafka_settings.bootstrap, kafka_settings.topic, len(stored))

    seen: set[str] = set()
    partitions_of: dict[str, set[int]] = defaultdict(set)
    in_topic: dict[str, list[tuple[int, int, int, str]]] = defaultdict(list)
    for message in messages:
        key, value, headers = envelope(message)
        assert set(value) >= RECORDED_FIELDS, sorted(RECORDED_FIELDS - set(value))
        assert isinstance(value["data"], dict)
        event_id = value["event_id"]
        assert event_id in stored, f"{event_id} is not in the store"
        assert event_id not in seen, f"{event_id} published twice"
        seen.add(event_id)
        position, fact = stored[event_id]
        assert value == (without_personal_data(fact) or fact)  # personal fields withheld
        ledger_position = headers["ce_ledgerposition"].decode()
        assert ledger_position.isdigit(), ledger_position
        assert int(ledger_position) == position

        partition, offset = message.partition(), message.offset()
        assert partition is not None and offset is not None
        partitions_of[key].add(partition)
        in_topic[key].append((partition, offset, position, event_id))

    assert seen == set(stored)
    assert any(without_personal_data(fact) for _, fact in stored.values()), "none to withhold"
    for customer, records in in_topic.items():
        assert len(partitions_of[customer]) == 1, (customer, partitions_of[customer])
        records.sort()  # by (partition, offset): the topic's order
        positions = [position for _, _, position, _ in records]
        assert all(a < b for a, b in pairwise(positions)), customer
        assert [event_id for *_, event_id in records] == store_order[customer]
    assert set(in_topic) == set(store_order)
    assert len({p for ps in partitions_of.values() for p in ps}) > 1, "keys should spread"


def test_the_first_record_of_each_relay_batch_says_how_far_the_topic_is_complete(
    ledger: Ledger, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """`ce_ledgerrelayed` on the first record of each batch the relay sends: the store
    position of the batch before's end, up to which every event is on the topic (in
    whatever partition) before this record was sent."""
    outcomes = record(ledger, generate_history(customers=15))
    assert all(o.status == "accepted" for o in outcomes)
    batches: list[tuple[int, int]] = []  # (first position, last position) of each batch
    relay.run(
        ledger, kafka_settings, tmp_path / "relay.json", batch_size=100,
        on_batch=lambda state, _sent, _head: batches.append(
            ((batches[-1][1] if batches else 0) + 1, state.position)
        ),
    )  # fmt: skip
    facts = sum(1 for _ in ledger.all_facts())
    messages = read_everything(kafka_settings.bootstrap, kafka_settings.topic, facts)
    stamped: dict[int, int] = {}  # the record's position: its ce_ledgerrelayed
    for message in messages:
        headers = dict(cast(list[tuple[str, bytes]], message.headers() or []))
        if "ce_ledgerrelayed" in headers:
            stamped[int(headers["ce_ledgerposition"])] = int(headers["ce_ledgerrelayed"])
    assert len(batches) > 3
    # per batch, its first record, saying: everything up to the batch before's end
    first_records = {}
    for first, last in batches:
        in_batch = [position for position in stamped if first <= position <= last]
        assert len(in_batch) == 1, (first, last, in_batch)
        first_records[in_batch[0]] = first - 1
    assert stamped == first_records


def test_the_relay_says_on_the_watermarks_topic_how_far_the_events_topic_is_complete(
    ledger: Ledger, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """With nothing new to send, the relay sends a `RelayWatermark` to the watermarks
    topic: the events' envelope, keyed by the events topic; every event recorded up to
    `complete_until` (a margin before the relay's read) is at or below `position`, the
    position the relay reached, and on the topic below `ends`."""
    outcomes = record(ledger, generate_history(customers=5))
    assert all(o.status == "accepted" for o in outcomes)
    before = datetime.now(UTC)
    state = relay.run(ledger, kafka_settings, tmp_path / "relay.json")
    after = datetime.now(UTC)

    (message,) = read_everything(kafka_settings.bootstrap, kafka_settings.watermark_topic, 1)
    headers = dict(cast(list[tuple[str, bytes]], message.headers() or []))
    value = json.loads(message.value() or b"")
    assert (message.key() or b"").decode() == kafka_settings.topic
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_type"] == b"customer_ledger.RelayWatermark"
    assert headers["ce_source"] == b"urn:customer-ledger:relay"
    assert uuid.UUID(headers["ce_id"].decode())
    assert headers["content-type"] == b"application/json"
    assert headers["ce_time"].decode() == value["complete_until"]
    assert value["position"] == state.position == ledger.head() > 0
    # every partition: the offset after the last record the relay had acknowledged
    ends = {int(partition): end for partition, end in value["ends"].items()}
    every = range(kafka_settings.partitions)
    assert ends == {partition: state.ends.get(partition, 0) for partition in every}
    assert sum(ends.values()) == state.published > 0
    vouched = datetime.fromisoformat(value["complete_until"])
    margin = timedelta(seconds=60)
    assert before - margin <= vouched <= after - margin
    recorded = [datetime.fromisoformat(fact["recorded_at"]) for _, fact in ledger.all_facts()]
    assert max(recorded) < before


def test_derived_topic_follows_the_same_contract(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """Stage changes, SLA warnings and breaches, response alarms and the withdrawals of
    those a late event took back reach downstream systems in the events' envelope: values
    valid against their schemas in `ledger schema`, headers naming them, the customer as
    key, and each customer's derived events in one partition, in business-time order (a
    withdrawal, dated as what it withdraws, after it)."""
    history = generate_history(customers=40)
    filed_at = max(datetime.fromisoformat(e["occurred_at"]) for e in history) - timedelta(hours=48)

    def complaint(type_: str, hours: float, **data: Any) -> dict[str, Any]:
        at = (filed_at + timedelta(hours=hours)).isoformat()
        return event(type_, "C-LATE", at, {"complaint_id": "K-1", **data})

    urgent = complaint("ComplaintFiled", 0, channel="phone", category="delivery", priority="urgent")
    outcomes = record(ledger, [*history, urgent, complaint("ComplaintAcknowledged", 0.25)])
    assert all(o.status == "accepted" for o in outcomes)
    state = tmp_path / "relay.json"
    relay.run(ledger, kafka_settings, state)
    report = kafka_projection.consume(settings.projections_path, kafka_settings)
    # resolved in time after all, as recorded late: the breach published is taken back
    late = record(ledger, [complaint("ComplaintResolved", 20, resolution="refund")])
    assert [o.status for o in late] == ["accepted"]
    relay.run(ledger, kafka_settings, state)
    withdrawals = kafka_projection.consume(settings.projections_path, kafka_settings)
    assert withdrawals.derived == 1
    printed = subprocess.run(
        [sys.executable, "-m", "cli", "schema"],
        cwd=PROJECT_ROOT, capture_output=True, check=True, text=True,
    )  # fmt: skip
    document = json.loads(printed.stdout)
    schemas = document["derived"]
    assert set(schemas) == {
        "LoyaltyStageChanged",
        "SlaWarning",
        "SlaBreached",
        "ResponseOverdue",
        "DerivedEventWithdrawn",
    }
    # a subscriber may also refer into the whole document: its references must resolve
    registry = Registry().with_resource(document["$id"], Resource.from_contents(document))

    def by_reference(type_: str) -> jsonschema.Draft202012Validator:
        reference = {"$ref": f"{document['$id']}#/derived/{type_}"}
        return jsonschema.Draft202012Validator(reference, registry=registry)

    # or to the schema a record names in `ce_dataschema`, as `ledger schema TYPE` prints it
    for type_ in schemas:
        cut_out = json.loads(
            subprocess.run(
                [sys.executable, "-m", "cli", "schema", type_],
                cwd=PROJECT_ROOT, capture_output=True, check=True, text=True,
            ).stdout
        )  # fmt: skip
        registry = registry.with_resource(cut_out["$id"], Resource.from_contents(cut_out))

    messages = read_everything(
        kafka_settings.bootstrap, kafka_settings.derived_topic, report.derived + 1
    )

    seen: set[str] = set()
    partitions_of: dict[str, set[int]] = defaultdict(set)
    in_topic: dict[str, list[tuple[int, int, datetime, dict[str, Any]]]] = defaultdict(list)
    withdrawn: list[tuple[str, int, int, dict[str, Any]]] = []
    for message in messages:
        key, value, headers = envelope(message)
        jsonschema.validate(value, schemas[value["type"]])
        by_reference(value["type"]).validate(value)
        named = {"$ref": headers["ce_dataschema"].decode()}
        jsonschema.Draft202012Validator(named, registry=registry).validate(value)
        assert set(value) == set(schemas[value["type"]]["properties"]), "undocumented fields"
        assert value["event_id"] not in seen, f"{value['event_id']} published twice"
        seen.add(value["event_id"])
        assert "ce_ledgerposition" not in headers, "derived events have no store position"

        partition, offset = message.partition(), message.offset()
        assert partition is not None and offset is not None
        partitions_of[key].add(partition)
        if value["type"] == "DerivedEventWithdrawn":
            withdrawn.append((key, partition, offset, value))
        else:
            at = datetime.fromisoformat(value["occurred_at"])
            in_topic[key].append((partition, offset, at, value))

    assert {t for t in (json.loads(m.value() or b"")["type"] for m in messages)} == set(schemas)
    for customer, records in in_topic.items():
        assert len(partitions_of[customer]) == 1, (customer, partitions_of[customer])
        times = [at for _, _, at, _ in sorted(records, key=lambda r: r[:2])]  # the topic's order
        assert times == sorted(times), f"{customer}'s derived events are not in time order"
    ((customer, partition, offset, withdrawal),) = withdrawn
    ((breach_partition, breach_offset, _, breach),) = [
        record
        for record in in_topic[customer]
        if record[3]["event_id"] == withdrawal["data"]["withdrawn_event_id"]
    ]
    assert partition == breach_partition and offset > breach_offset, "withdrawn before sent"
    assert (customer, breach["type"], breach["data"]["complaint_id"]) == (
        "C-LATE",
        "SlaBreached",
        "K-1",
    )
    assert withdrawal["data"]["withdrawn_type"] == "SlaBreached"
    assert withdrawal["occurred_at"] == breach["occurred_at"]


def test_a_moved_transition_is_withdrawn_then_sent_again_at_its_new_time(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """A hold recorded late moves a published warning and breach to later times under the
    same ids (subscribers held the old times: a review). On the topic, each id's words
    are: the event, its withdrawal, the event at its new time; in one partition, in
    that order, all from the one `consume` that read the hold."""
    filed_at = datetime(2025, 3, 3, 9, tzinfo=UTC)

    def step(type_: str, hours: float, complaint_id: str = "K", **data: Any) -> dict[str, Any]:
        at = (filed_at + timedelta(hours=hours)).isoformat()
        return event(type_, "C-MOVE", at, {"complaint_id": complaint_id, **data})

    filed = {"channel": "phone", "category": "delivery"}
    first = [step("ComplaintFiled", 0, priority="urgent", **filed),
             step("ComplaintAcknowledged", 0.25),
             step("ComplaintFiled", 30, "clock", priority="low", **filed)]  # fmt: skip
    assert all(o.status == "accepted" for o in record(ledger, first))
    state = tmp_path / "relay.json"
    relay.run(ledger, kafka_settings, state)
    sent = kafka_projection.consume(settings.projections_path, kafka_settings).derived
    hold = [step("ComplaintOnHold", 5, reason="customer"), step("ComplaintResumed", 7)]
    assert all(o.status == "accepted" for o in record(ledger, hold))
    relay.run(ledger, kafka_settings, state)
    resent = kafka_projection.consume(settings.projections_path, kafka_settings).derived

    messages = read_everything(
        kafka_settings.bootstrap, kafka_settings.derived_topic, sent + resent
    )
    words: dict[str, list[tuple[str, str]]] = defaultdict(list)  # by the id they concern
    partitions: set[int | None] = set()
    for message in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        _, value, _ = envelope(message)
        partitions.add(message.partition())
        concerns = value["data"].get("withdrawn_event_id", value["event_id"])
        words[concerns].append((value["type"], value["occurred_at"][:16]))
    assert len(partitions) == 1, "one customer, one partition"
    moved = {
        "SlaWarning": [("SlaWarning", "2025-03-04T03:00"),
                       ("DerivedEventWithdrawn", "2025-03-04T03:00"),
                       ("SlaWarning", "2025-03-04T05:00")],  # 18 + 2 h on hold
        "SlaBreached": [("SlaBreached", "2025-03-04T09:00"),
                        ("DerivedEventWithdrawn", "2025-03-04T09:00"),
                        ("SlaBreached", "2025-03-04T11:00")],
    }  # fmt: skip
    of_k = {said[0][0]: said for said in words.values() if len(said) > 1}
    assert of_k == moved
    assert resent == 4


def test_personal_fields_reach_the_topic_only_when_asked_for(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """Kafka is read by every subscriber, keeps every record and is not encrypted by
    LEDGER_CIPHER_KEY: the relay withholds the catalogue's personal fields unless
    LEDGER_KAFKA_PERSONAL_DATA=include. An update that changed only personal fields still
    goes out (the profile changed), with nothing left in its data, and projects as the
    embedded path does."""
    at = "2025-03-01T09:30:00+00:00"
    personal = {"name": "Zoë Müller", "email": "zoe@example.com", "birthday": "1990-01-02"}
    events = [
        {"type": "CustomerRegistered", "customer_id": "C-1", "occurred_at": at,
         "data": {**personal, "region": "Bayern", "segment": "vip"}},
        {"type": "CustomerProfileUpdated", "customer_id": "C-1", "occurred_at": at,
         "source_event_id": "u-1", "data": {"email": "zoe@example.org"}},
        {"type": "CustomerProfileUpdated", "customer_id": "C-1", "occurred_at": at,
         "source_event_id": "u-2", "data": {"phone": "+49 1", "city": "München"}},
    ]  # fmt: skip
    assert all(o.status == "accepted" for o in record(ledger, events))
    facts = [fact for _, fact in ledger.all_facts()]

    relay.run(ledger, kafka_settings, tmp_path / "relay.json")
    withheld = [json.loads(m.value() or b"") for m in read_everything(
        kafka_settings.bootstrap, kafka_settings.topic, len(facts))]  # fmt: skip
    by_id = {value["event_id"]: value for value in withheld}
    assert [by_id[f["event_id"]]["data"] for f in facts] == [
        {"region": "Bayern", "segment": "vip"},
        {},
        {"city": "München"},
    ]
    assert "zoe@" not in json.dumps(withheld) and "Zo" not in json.dumps(withheld)
    report = kafka_projection.consume(settings.projections_path, kafka_settings)
    assert report.dead_letters == 0
    assert differences(tables(settings.projections_path), embedded(ledger, tmp_path)) == {}

    included = dataclasses.replace(
        kafka_settings, topic=f"{kafka_settings.topic}-personal", personal_data=True
    )
    ensure_topics(included)
    relay.run(ledger, included, tmp_path / "relay-personal.json")
    published = [json.loads(m.value() or b"") for m in read_everything(
        included.bootstrap, included.topic, len(facts))]  # fmt: skip
    assert sorted(published, key=lambda v: v["event_id"]) == sorted(
        facts, key=lambda f: f["event_id"]
    )
