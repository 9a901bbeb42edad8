"""The event catalogue is the public contract: every type validates, money is exact,
business time carries an offset, personal fields are marked, and free text is bounded."""

from __future__ import annotations

import json
from datetime import UTC, timedelta
from decimal import Decimal
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from domain.events import (
    EVENT_MODELS,
    EVENT_TYPES,
    INCOMING,
    SURVEY_SCALES,
    CustomerRegistered,
    PurchaseRecorded,
    PurchaseRefunded,
    SurveyKind,
    contract_schema,
    type_schema,
)
from domain.ledger import to_fact

AT = "2025-03-01T09:30:00+08:00"

#: One realistic example of every event type, in the ingest format.
EXAMPLES: dict[str, dict[str, Any]] = {
    "CustomerRegistered": {
        "name": "Li Wei",
        "email": "li.wei@example.com",
        "phone": "+86 21 5555 0101",
        "address": "88 Century Avenue, Pudong",
        "birthday": "1987-06-14",
        "region": "East",
        "province": "Shanghai",
        "city": "Shanghai",
        "segment": "retail",
        "preferred_channel": "email",
    },
    "CustomerProfileUpdated": {"phone": "+86 21 5555 0199", "segment": "vip"},
    "ConsentChanged": {"purpose": "marketing", "granted": True, "channel": "email"},
    "ContactLogged": {
        "channel": "phone",
        "direction": "inbound",
        "topic": "delivery date",
        "agent": "agent-17",
        "notes": "Customer asked when the sofa will arrive.",
        "duration_seconds": 312,
        "complaint_id": "CMP-501",
    },
    "PurchaseRecorded": {
        "order_id": "SO-7781",
        "amount": "1299.90",
        "currency": "CNY",
        "quantity": 2,
        "items": [
            {"sku": "SOFA-3", "name": "Three-seat sofa", "quantity": 1, "unit_price": "999.90"},
            {"sku": "CUSH-1", "name": "Cushion", "quantity": 2, "unit_price": "150.00"},
        ],
        "channel": "store",
        "store": "Shanghai Pudong",
        "reporting_amount": "165.43",
    },
    "PurchaseRefunded": {"order_id": "SO-7781", "amount": "150.00", "reason": "cushion damaged"},
    "ComplaintFiled": {
        "complaint_id": "CMP-501",
        "channel": "phone",
        "category": "delivery",
        "priority": "high",
        "summary": "Sofa delivered with a torn cushion.",
        "order_id": "SO-7781",
    },
    "ComplaintAcknowledged": {
        "complaint_id": "CMP-501",
        "agent": "agent-17",
        "note": "Apologised; photos requested.",
    },
    "ComplaintEscalated": {
        "complaint_id": "CMP-501",
        "agent": "agent-17",
        "to_team": "logistics",
        "reason": "carrier damage",
    },
    "ComplaintOnHold": {"complaint_id": "CMP-501", "reason": "waiting for photos"},
    "ComplaintResumed": {"complaint_id": "CMP-501", "note": "photos received"},
    "ComplaintResolved": {
        "complaint_id": "CMP-501",
        "resolution": "Replacement cushion shipped; partial refund issued.",
        "compensation": "150.00",
        "root_cause": "delivery",
    },
    "ComplaintReopened": {"complaint_id": "CMP-501", "reason": "replacement also damaged"},
    "ComplaintClosed": {"complaint_id": "CMP-501", "outcome": "resolved"},
    "SurveyAnswered": {
        "survey_id": "SV-2025-03",
        "kind": "nps",
        "score": 9,
        "comment": "Fixed quickly.",
        "complaint_id": "CMP-501",
    },
}

PERSONAL_FIELDS = {"name", "email", "phone", "address", "birthday"}


def _event(type_: str, data: dict[str, Any] | None = None, **envelope: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": type_,
        "customer_id": "C-1001",
        "occurred_at": AT,
        "source_event_id": f"crm-{type_}",
        "source": "crm",
        "actor": "agent-17",
        "data": EXAMPLES[type_] if data is None else data,
    }
    body.update(envelope)
    return body


def _purchase(amount: Any) -> dict[str, Any]:
    return _event("PurchaseRecorded", {"order_id": "SO-1", "amount": amount, "currency": "EUR"})


def _errors(payload: dict[str, Any] | str) -> list[tuple[str, str]]:
    """(dotted location without the union tag, error type) of every problem."""
    with pytest.raises(ValidationError) as caught:
        if isinstance(payload, str):
            INCOMING.validate_json(payload)
        else:
            INCOMING.validate_python(payload)
    return [(".".join(str(p) for p in e["loc"][1:]), e["type"]) for e in caught.value.errors()]


# --- every type ----------------------------------------------------------------------------


def test_the_examples_cover_the_whole_catalogue() -> None:
    assert len(EVENT_TYPES) == 15
    assert set(EXAMPLES) == set(EVENT_TYPES)
    assert [m.__name__ for m in EVENT_MODELS] == list(EVENT_TYPES)


@pytest.mark.parametrize("type_", EVENT_TYPES)
def test_every_type_validates_a_realistic_example(type_: str) -> None:
    model = next(m for m in EVENT_MODELS if m.__name__ == type_)
    parsed = INCOMING.validate_python(_event(type_))
    assert type(parsed) is model
    assert parsed.type == type_
    assert parsed.customer_id == "C-1001"
    assert parsed.source_event_id == f"crm-{type_}"
    # Every field given comes back unchanged in the public JSON form.
    dumped = parsed.model_dump(mode="json", exclude_none=True)
    for name, value in EXAMPLES[type_].items():
        assert dumped["data"][name] == value, name


@pytest.mark.parametrize("type_", EVENT_TYPES)
def test_every_type_survives_a_json_round_trip(type_: str) -> None:
    parsed = INCOMING.validate_python(_event(type_))
    again = INCOMING.validate_json(parsed.model_dump_json())
    assert again == parsed


def test_registration_needs_no_profile_data() -> None:
    parsed = INCOMING.validate_python(
        {"type": "CustomerRegistered", "customer_id": "C-1", "occurred_at": AT}
    )
    assert isinstance(parsed, CustomerRegistered)
    assert parsed.data.model_dump(exclude_none=True) == {}


def test_events_are_immutable() -> None:
    parsed = INCOMING.validate_python(_event("PurchaseRecorded"))
    with pytest.raises(ValidationError):
        parsed.customer_id = "C-2"
    with pytest.raises(ValidationError):
        parsed.data.amount = Decimal("1")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (_event("ContactLogged", {**EXAMPLES["ContactLogged"], "channel": "fax"}), "enum"),
        (_event("ContactLogged", {**EXAMPLES["ContactLogged"], "direction": "up"}), "enum"),
        (_event("ComplaintFiled", {**EXAMPLES["ComplaintFiled"], "priority": "p1"}), "enum"),
        (_event("ComplaintClosed", {"complaint_id": "K", "outcome": "fixed"}), "literal_error"),
        (
            _event("ContactLogged", {**EXAMPLES["ContactLogged"], "duration_seconds": -1}),
            "greater_than_equal",
        ),
        (
            _event("ContactLogged", {**EXAMPLES["ContactLogged"], "duration_seconds": 86_401}),
            "less_than_equal",
        ),
        (_event("ConsentChanged", {"purpose": "marketing"}), "missing"),
        (_event("CustomerRegistered", {"email": "not-an-address"}), "value_error"),
        (_event("CustomerRegistered", {"birthday": "1987-02-30"}), "date_from_datetime_parsing"),
    ],
)
def test_field_types_are_enforced(payload: dict[str, Any], expected: str) -> None:
    assert [kind for _, kind in _errors(payload)] == [expected]


def test_unknown_fields_are_refused_in_the_envelope_and_in_data() -> None:
    assert _errors(_event("ConsentChanged", colour="red")) == [("colour", "extra_forbidden")]
    data = {**EXAMPLES["ConsentChanged"], "colour": "red"}
    assert _errors(_event("ConsentChanged", data)) == [("data.colour", "extra_forbidden")]


# --- money ---------------------------------------------------------------------------------


def test_money_is_decimal_and_adds_up_exactly() -> None:
    first = INCOMING.validate_python(_purchase("0.1"))
    second = INCOMING.validate_python(_purchase("0.2"))
    assert isinstance(first, PurchaseRecorded)
    assert isinstance(second, PurchaseRecorded)
    assert type(first.data.amount) is Decimal
    assert first.data.amount + second.data.amount == Decimal("0.3")
    assert 0.1 + 0.2 != 0.3  # what a float would have done


def test_a_json_number_becomes_the_decimal_it_spells_not_a_binary_float() -> None:
    line = json.dumps(_purchase("X")).replace('"X"', "0.1")
    parsed = INCOMING.validate_json(line)
    assert isinstance(parsed, PurchaseRecorded)
    assert parsed.data.amount == Decimal("0.1")
    assert parsed.data.amount.as_tuple() == Decimal("0.1").as_tuple()  # no float digits
    assert parsed.data.amount != Decimal.from_float(0.1)  # the binary float's exact value


def test_a_float_artefact_is_refused_not_rounded() -> None:
    line = json.dumps(_purchase("X")).replace('"X"', "0.30000000000000004")
    assert _errors(line) == [("data.amount", "float_money")]  # refused, never rounded


def test_money_keeps_its_exact_digits_in_the_public_json_form() -> None:
    parsed = INCOMING.validate_python(_event("PurchaseRecorded"))
    dumped = parsed.model_dump(mode="json", exclude_none=True)
    assert dumped["data"]["amount"] == "1299.90"
    assert dumped["data"]["items"][0]["unit_price"] == "999.90"
    assert isinstance(parsed, PurchaseRecorded)
    assert parsed.data.reporting_amount == Decimal("165.43")


@pytest.mark.parametrize(
    ("amount", "error"),
    [
        ("0", "greater_than"),
        ("-5.00", "greater_than"),
        ("1.00001", "decimal_max_places"),
        ("1234567890123456789", "decimal_max_digits"),
        ("ten euros", "decimal_parsing"),
        ("NaN", "finite_number"),
    ],
)
def test_purchase_amounts_must_be_positive_finite_decimals(amount: str, error: str) -> None:
    assert _errors(_purchase(amount)) == [("data.amount", error)]


@pytest.mark.parametrize("amount", ["0.0001", "99999999999999.9999", "12", "12.5"])
def test_purchase_amounts_within_the_limits_are_kept(amount: str) -> None:
    parsed = INCOMING.validate_python(_purchase(amount))
    assert isinstance(parsed, PurchaseRecorded)
    assert parsed.data.amount == Decimal(amount)


def test_refunds_are_positive_and_compensation_may_be_zero() -> None:
    refund = _event("PurchaseRefunded", {"order_id": "SO-1", "amount": "0"})
    assert _errors(refund) == [("data.amount", "greater_than")]
    parsed = INCOMING.validate_python(
        _event("PurchaseRefunded", {"order_id": "SO-1", "amount": "0.01"})
    )
    assert isinstance(parsed, PurchaseRefunded)
    assert parsed.data.amount == Decimal("0.01")
    resolved = {**EXAMPLES["ComplaintResolved"], "compensation": "0"}
    assert INCOMING.validate_python(_event("ComplaintResolved", resolved)) is not None
    resolved["compensation"] = "-1"
    assert _errors(_event("ComplaintResolved", resolved)) == [
        ("data.compensation", "greater_than_equal")
    ]


def test_currency_is_an_iso_4217_code() -> None:
    data = {"order_id": "SO-1", "amount": "1", "currency": "EURO"}
    assert [loc for loc, _ in _errors(_event("PurchaseRecorded", data))] == ["data.currency"]
    data["currency"] = "JPY"
    parsed = INCOMING.validate_python(_event("PurchaseRecorded", data))
    assert isinstance(parsed, PurchaseRecorded)
    assert parsed.data.currency == "JPY"


# --- business time -------------------------------------------------------------------------


@pytest.mark.parametrize("naive", ["2025-03-01T09:30:00", "2025-03-01 09:30", "2025-03-01"])
def test_occurred_at_must_carry_an_offset(naive: str) -> None:
    assert _errors(_event("ConsentChanged", occurred_at=naive)) == [
        ("occurred_at", "timezone_aware")
    ]


def test_occurred_at_keeps_the_offset_it_was_given() -> None:
    parsed = INCOMING.validate_python(_event("ConsentChanged"))
    assert parsed.occurred_at.utcoffset() == timedelta(hours=8)
    utc = INCOMING.validate_python(_event("ConsentChanged", occurred_at="2025-03-01T01:30:00Z"))
    assert utc.occurred_at.utcoffset() == timedelta(0)
    assert utc.occurred_at == parsed.occurred_at  # the same instant
    assert parsed.occurred_at.astimezone(UTC).hour == 1


def test_occurred_at_must_be_a_date_time() -> None:
    assert _errors(_event("ConsentChanged", occurred_at="last Tuesday")) == [
        ("occurred_at", "datetime_from_date_parsing")
    ]


# --- JSON Schema ---------------------------------------------------------------------------


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    resolved: dict[str, Any] = schema["$defs"][ref.rsplit("/", 1)[-1]]
    return resolved


def test_the_json_schema_names_all_fifteen_types() -> None:
    schema = INCOMING.json_schema()
    mapping = schema["discriminator"]["mapping"]
    assert schema["discriminator"]["propertyName"] == "type"
    assert set(mapping) == set(EVENT_TYPES)
    assert len(schema["oneOf"]) == 15
    for type_ in EVENT_TYPES:
        definition = _resolve(schema, {"$ref": mapping[type_]})
        assert definition["properties"]["type"]["const"] == type_
        assert {"customer_id", "occurred_at", "data"} <= set(definition["properties"])
        assert definition["additionalProperties"] is False


def test_the_json_schema_marks_exactly_the_personal_fields() -> None:
    schema = INCOMING.json_schema()
    personal: dict[str, set[str]] = {}
    for type_ in EVENT_TYPES:
        definition = _resolve(schema, {"$ref": schema["discriminator"]["mapping"][type_]})
        for envelope_field in definition["properties"].values():
            assert "x-personal" not in envelope_field
        data = _resolve(schema, definition["properties"]["data"])
        marked = {
            name for name, prop in data.get("properties", {}).items() if prop.get("x-personal")
        }
        if marked:
            personal[type_] = marked
    assert personal == {
        "CustomerRegistered": PERSONAL_FIELDS,
        "CustomerProfileUpdated": PERSONAL_FIELDS,
    }


def test_subscribers_schema_takes_fields_added_later_producers_schema_does_not() -> None:
    """Fields are only ever added: a subscriber validating with today's `ledger schema`
    must take tomorrow's events (`additionalProperties: false` everywhere refused the
    first event with a new field). A producer's unknown field is still refused."""
    recorded, ingest = contract_schema(), contract_schema(ingest=True)

    def valid(schema: dict[str, Any], document: dict[str, Any]) -> bool:
        return jsonschema.Draft202012Validator(schema).is_valid(json.loads(json.dumps(document)))

    event = _event("PurchaseRecorded")
    fact = dict(to_fact(INCOMING.validate_python(event), "2025-03-01T02:00:00+00:00"))
    later = {**fact, "channel_of_sale": "web", "data": {**fact["data"], "voucher": "V-1"}}
    assert valid(recorded, fact) and valid(recorded, later)
    assert not valid(recorded, {k: v for k, v in fact.items() if k != "event_id"})
    assert not valid(recorded, {**fact, "data": {**fact["data"], "amount": "abc"}})
    assert valid(ingest, event)
    assert not valid(ingest, {**event, "data": {**event["data"], "voucher": "V-1"}})
    # one type's schema (`ledger schema TYPE`) says the same
    assert valid(type_schema("PurchaseRecorded"), later)
    assert not valid(
        type_schema("PurchaseRecorded", ingest=True),
        {**event, "data": {**event["data"], "voucher": "V-1"}},
    )


def test_the_json_schema_says_what_an_amount_is_to_any_validator() -> None:
    """Subscribers and producers validate with `ledger schema` and a JSON Schema library,
    which ignores pydantic's own keywords (`gt`, `decimal_places`): the limits must be in
    standard ones, or "abc" passes as an amount."""
    schema = INCOMING.json_schema()
    assert schema["$defs"]["PurchaseData"]["properties"]["currency"]["maxLength"] == 3

    def valid(type_: str, **data: Any) -> bool:
        event = _event(type_, {**EXAMPLES[type_], **data})
        return jsonschema.Draft202012Validator(schema).is_valid(json.loads(json.dumps(event)))

    for amount in ("12.50", "0.0001", "12", ".5", "1E+3", 12.5, 7):
        assert valid("PurchaseRecorded", amount=amount), amount
    for amount in ("abc", "-3.5", "0", "0.000", "", "12,50", -3.5, 0, None):
        assert not valid("PurchaseRecorded", amount=amount), amount
    assert valid("ComplaintResolved", compensation="0")
    assert valid("ComplaintResolved", compensation=20)
    assert not valid("ComplaintResolved", compensation="-1")
    assert not valid("ComplaintResolved", compensation=-1)

    # written out, the schema counts digits as the catalogue does: both say the same
    def accepted(event: dict[str, Any]) -> bool:
        try:
            INCOMING.validate_python(event)
        except ValidationError:
            return False
        return True

    for type_, field in [("PurchaseRecorded", "amount"), ("PurchaseRefunded", "amount"),
                         ("ComplaintResolved", "compensation")]:  # fmt: skip
        for amount in ("3.1234", "3.12345", "3.12340", "3.1234000000", "0.00001", ".12345",
                       ".1000", "12345678901234", "123456789012345", "99999999999999.9999",
                       "000000000000000012345678901234.5", "-0.0001", "+7.", "0.0000",
                       "-0", "-0.00", "-.0", "-0E+2", "-0.01",
                       1e14, 99999999999999.5, -1e14):  # fmt: skip
            said = accepted(_event(type_, {**EXAMPLES[type_], field: amount}))
            assert valid(type_, **{field: amount}) == said, (type_, amount, said)


# --- surveys -------------------------------------------------------------------------------


def _survey(kind: str, score: Any) -> dict[str, Any]:
    return _event("SurveyAnswered", {"survey_id": "SV-1", "kind": kind, "score": score})


def test_every_survey_kind_has_a_scale() -> None:
    assert set(SURVEY_SCALES) == set(SurveyKind)
    assert SURVEY_SCALES == {
        SurveyKind.CSAT: (1, 5),
        SurveyKind.NPS: (0, 10),
        SurveyKind.CES: (1, 7),
        SurveyKind.CALLBACK: (1, 5),
    }


@pytest.mark.parametrize("kind", list(SurveyKind))
def test_survey_scores_on_the_scale_are_accepted(kind: SurveyKind) -> None:
    low, high = SURVEY_SCALES[kind]
    for score in range(low, high + 1):
        parsed = INCOMING.validate_python(_survey(kind.value, score))
        assert parsed.data.score == score  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", list(SurveyKind))
def test_survey_scores_off_the_scale_are_refused(kind: SurveyKind) -> None:
    low, high = SURVEY_SCALES[kind]
    for score in (low - 1, high + 1):
        assert _errors(_survey(kind.value, score)) == [("data", "value_error")]


def test_survey_scores_are_whole_numbers_and_kinds_are_known() -> None:
    assert _errors(_survey("nps", 7.5)) == [("data.score", "int_from_float")]
    assert _errors(_survey("stars", 3)) == [("data.kind", "enum")]


# --- text ----------------------------------------------------------------------------------


def test_ids_and_labels_are_stripped() -> None:
    parsed = INCOMING.validate_python(
        _event(
            "ComplaintFiled",
            {"complaint_id": "  CMP-9\t", "channel": "chat", "category": " billing "},
            customer_id="  C-1001 ",
            source_event_id=" crm-9 ",
            source=" crm\n",
            actor="  agent-17  ",
        )
    )
    assert parsed.customer_id == "C-1001"
    assert parsed.source_event_id == "crm-9"
    assert parsed.source == "crm"
    assert parsed.actor == "agent-17"
    assert parsed.data.complaint_id == "CMP-9"  # type: ignore[union-attr]
    assert parsed.data.category == "billing"  # type: ignore[union-attr]


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_blank_ids_are_refused(blank: str) -> None:
    assert _errors(_event("ConsentChanged", customer_id=blank)) == [
        ("customer_id", "string_too_short")
    ]


@pytest.mark.parametrize(
    ("field", "limit"), [("customer_id", 128), ("source_event_id", 128), ("source", 200)]
)
def test_envelope_strings_are_length_limited(field: str, limit: int) -> None:
    at_limit = INCOMING.validate_python(_event("ConsentChanged", None, **{field: "x" * limit}))
    assert getattr(at_limit, field) == "x" * limit
    # Surrounding spaces are stripped before the length is checked.
    padded = INCOMING.validate_python(
        _event("ConsentChanged", None, **{field: f"  {'x' * limit}  "})
    )
    assert getattr(padded, field) == "x" * limit
    assert _errors(_event("ConsentChanged", None, **{field: "x" * (limit + 1)})) == [
        (field, "string_too_long")
    ]


@pytest.mark.parametrize(
    ("type_", "field", "limit"),
    [
        ("ContactLogged", "notes", 10_000),
        ("ContactLogged", "topic", 200),
        ("CustomerProfileUpdated", "phone", 40),
        ("CustomerProfileUpdated", "address", 500),
        ("CustomerProfileUpdated", "name", 200),
        ("ComplaintResolved", "resolution", 10_000),
    ],
)
def test_data_strings_are_length_limited(type_: str, field: str, limit: int) -> None:
    base = {k: v for k, v in EXAMPLES[type_].items() if k != field}
    ok = INCOMING.validate_python(_event(type_, {**base, field: "y" * limit}))
    assert getattr(ok.data, field) == "y" * limit
    assert _errors(_event(type_, {**base, field: "y" * (limit + 1)})) == [
        (f"data.{field}", "string_too_long")
    ]


def test_line_items_are_limited_to_a_thousand() -> None:
    data = {**EXAMPLES["PurchaseRecorded"], "items": [{"sku": f"S{i}"} for i in range(1000)]}
    parsed = INCOMING.validate_python(_event("PurchaseRecorded", data))
    assert isinstance(parsed, PurchaseRecorded)
    assert parsed.data.items is not None
    assert len(parsed.data.items) == 1000
    data["items"] = [{"sku": f"S{i}"} for i in range(1001)]
    assert _errors(_event("PurchaseRecorded", data)) == [("data.items", "too_long")]
