"""The event catalogue: the public contract of customer-ledger.

Every fact about a customer is one of the event types below. Producers send them to
`ledger ingest` as JSON Lines (or CSV with `data.`-prefixed columns); subscribers receive
the same shape on Kafka with the ledger's own fields added (`event_id`, `recorded_at`).

The envelope, shared by every type::

    {"type": "PurchaseRecorded",          # one of EVENT_TYPES
     "customer_id": "C-1001",             # your id for the customer
     "occurred_at": "2025-03-01T09:30:00+08:00",  # business time, offset required
     "source_event_id": "pos-7781",       # optional idempotency key
     "source": "pos", "actor": "agent-17",  # optional: system and person
     "data": {...}}                       # the type's own fields, below

Rules that hold for every version of this contract (schema_version 1):
- fields are only ever added, optional, never renamed or retyped;
- money is a decimal string or number, never rounded through binary floats;
- fields marked `x-personal` in the JSON Schema are personal data: the analytics copy
  (DuckDB) never holds them; only the event store does.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal, Self, Union
from uuid import UUID

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_extra_types.currency_code import ISO4217

SCHEMA_VERSION = 1

# Short free text (names, ids) and long free text (notes) have hard limits so that one
# runaway field cannot bloat the store or a Kafka record.
Id = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]
Label = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Text = Annotated[str, StringConstraints(max_length=10_000)]


def _exact_money(value: object) -> object:
    """JSON numbers arrive as binary floats: take one only while its shortest decimal form
    is exact (up to 15 significant digits); a longer one raises `float_money`, and JSON
    readers then parse the line again with exact decimals (domain.intake)."""
    if isinstance(value, float):
        text = repr(value)
        digits = text.lstrip("-").replace(".", "").lstrip("0")
        if "e" in text or "n" in text or len(digits) > 15:
            raise PydanticCustomError(
                "float_money",
                "a JSON number with more than 15 significant digits cannot be read exactly "
                "as a float; write it as a string",
            )
        return Decimal(text)
    return value


MONEY_PLACES = 4
MONEY_WHOLE_DIGITS = 14
"""An amount's limits: 18 digits, 4 of them after the point (DECIMAL(18,4))."""


def _money_schema(lowest: Literal["above 0", "0", None]) -> dict[str, Any]:
    """The JSON Schema of an amount, in keywords any validator knows (pydantic would write
    its own `gt`, `max_digits` and `decimal_places`, which JSON Schema validators ignore):
    a decimal as a string (how the ledger publishes it: exact) or a JSON number.

    Written out, the string's digits are counted as the ledger counts them (leading zeros
    and trailing zeros after the point do not count); with an exponent ("1E+3", how the
    ledger publishes an amount it received so) only its shape is checked, and a JSON
    number only its range (JSON Schema's `multipleOf` is unreliable on binary floats)."""
    places = rf"[0-9]{{0,{MONEY_PLACES}}}0*"
    written_out = rf"0*[0-9]{{1,{MONEY_WHOLE_DIGITS}}}(\.{places})?|\.(?=[0-9]){places}"
    exponent = r"([0-9]+\.?[0-9]*|\.[0-9]+)[eE][+-]?[0-9]+"
    digits = f"({written_out}|{exponent})"
    bound = 10**MONEY_WHOLE_DIGITS
    number: dict[str, Any] = {"type": "number", "exclusiveMaximum": bound}
    if lowest == "above 0":
        text, number["exclusiveMinimum"] = rf"^\+?(?=[0-9.]*[1-9]){digits}$", 0
    elif lowest == "0":  # a negative zero is zero (Decimal("-0") >= 0), and stays as sent
        negative_zero = r"-(0+\.?0*|\.0+)([eE][+-]?[0-9]+)?"
        text, number["minimum"] = rf"^(\+?{digits}|{negative_zero})$", 0
    else:
        text, number["exclusiveMinimum"] = rf"^[+-]?{digits}$", -bound
    limits = f"at most {MONEY_WHOLE_DIGITS} digits before the point and {MONEY_PLACES} after it" + (
        f", from {lowest}" if lowest else ""
    )
    return {
        "anyOf": [{"type": "string", "pattern": text}, number],
        "description": f"a decimal amount, {limits}",
    }


Money = Annotated[
    Decimal,
    BeforeValidator(_exact_money),
    Field(max_digits=MONEY_WHOLE_DIGITS + MONEY_PLACES, decimal_places=MONEY_PLACES),
    WithJsonSchema(_money_schema(None)),
]
PositiveMoney = Annotated[
    Decimal,
    BeforeValidator(_exact_money),
    Field(gt=0, max_digits=MONEY_WHOLE_DIGITS + MONEY_PLACES, decimal_places=MONEY_PLACES),
    WithJsonSchema(_money_schema("above 0")),
]
NonNegativeMoney = Annotated[
    Decimal,
    BeforeValidator(_exact_money),
    Field(ge=0, max_digits=MONEY_WHOLE_DIGITS + MONEY_PLACES, decimal_places=MONEY_PLACES),
    WithJsonSchema(_money_schema("0")),
]


def _not_a_number(value: object) -> object:
    """Epoch numbers carry no offset: business time must be written out with one."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError("must be an ISO-8601 date-time with offset, not a number")
    return value


BusinessTime = Annotated[AwareDatetime, BeforeValidator(_not_a_number)]


def personal(**kwargs: Any) -> Any:
    """A field holding personal data: kept in the event store, never copied to analytics."""
    return Field(default=None, json_schema_extra={"x-personal": True}, **kwargs)


class Channel(StrEnum):
    """Touch points of the unified customer record."""

    PHONE = "phone"
    EMAIL = "email"
    SMS = "sms"
    CHAT = "chat"
    WEB = "web"
    STORE = "store"
    VISIT = "visit"
    LETTER = "letter"
    SOCIAL = "social"
    CALL_CENTER = "call_center"


class Direction(StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


class Priority(StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    URGENT = "urgent"


class SurveyKind(StrEnum):
    """Survey instruments and their score scales (see SURVEY_SCALES)."""

    CSAT = "csat"
    NPS = "nps"
    CES = "ces"
    CALLBACK = "callback"


#: Inclusive (lowest, highest) score of each survey kind; highest is always best.
SURVEY_SCALES: dict[SurveyKind, tuple[int, int]] = {
    SurveyKind.CSAT: (1, 5),
    SurveyKind.NPS: (0, 10),
    SurveyKind.CES: (1, 7),
    SurveyKind.CALLBACK: (1, 5),
}


class RootCause(StrEnum):
    """Where a resolved complaint is fed back: product issues to R&D, process to management."""

    PRODUCT = "product"
    PROCESS = "process"
    SERVICE = "service"
    DELIVERY = "delivery"
    BILLING = "billing"
    OTHER = "other"


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Event(BaseModel):
    """The envelope every event type shares; subclasses add `type` and `data`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    customer_id: Id
    occurred_at: BusinessTime
    source_event_id: Id | None = Field(
        default=None, description="idempotency key: the same key twice is recorded once"
    )
    source: Label | None = Field(default=None, description="the system that sent it")
    actor: Label | None = Field(default=None, description="the person who recorded it")


# --- customers -------------------------------------------------------------------------


class ProfileData(_Data):
    name: Label | None = personal()
    email: EmailStr | None = personal()
    phone: Annotated[str, StringConstraints(max_length=40)] | None = personal()
    address: Annotated[str, StringConstraints(max_length=500)] | None = personal()
    birthday: date | None = personal()
    region: Label | None = None
    province: Label | None = None
    city: Label | None = None
    segment: Label | None = Field(default=None, description="e.g. retail, fleet, vip")
    preferred_channel: Channel | None = None


class CustomerRegistered(Event):
    """A customer file was opened. Every field is optional: collect only what they give."""

    type: Literal["CustomerRegistered"]
    data: ProfileData = ProfileData()


class ProfileUpdate(ProfileData):
    @model_validator(mode="after")
    def _something_changes(self) -> Self:
        if not self.model_fields_set:
            raise ValueError("a profile update must change at least one field")
        return self


class CustomerProfileUpdated(Event):
    """Some profile fields changed; fields not named keep their value."""

    type: Literal["CustomerProfileUpdated"]
    data: ProfileUpdate


class ConsentData(_Data):
    purpose: Label = Field(description="e.g. marketing, analytics, profiling, contact_email")
    granted: bool
    channel: Channel | None = None


class ConsentChanged(Event):
    """The customer granted or withdrew consent for one purpose."""

    type: Literal["ConsentChanged"]
    data: ConsentData


# --- contacts --------------------------------------------------------------------------


class ContactData(_Data):
    channel: Channel
    direction: Direction
    topic: Label | None = None
    agent: Label | None = None
    notes: Text | None = None
    duration_seconds: Annotated[int, Field(ge=0, le=86_400)] | None = None
    complaint_id: Id | None = Field(default=None, description="the complaint it concerns")


class ContactLogged(Event):
    """Any touch: a call, email, chat, visit or letter, in either direction."""

    type: Literal["ContactLogged"]
    data: ContactData


# --- purchases -------------------------------------------------------------------------


class LineItem(_Data):
    sku: Id
    name: Label | None = None
    quantity: Annotated[int, Field(ge=1)] = 1
    unit_price: Money | None = None


class PurchaseData(_Data):
    order_id: Id
    amount: PositiveMoney
    currency: ISO4217
    quantity: Annotated[int, Field(ge=1)] = 1
    items: list[LineItem] | None = Field(default=None, max_length=1000)
    channel: Channel | None = None
    store: Label | None = Field(default=None, description="store, branch or dealer")
    reporting_amount: PositiveMoney | None = Field(
        default=None,
        description="amount in the ledger's reporting currency, when `currency` differs",
    )


class PurchaseRecorded(Event):
    """The customer bought something; `order_id` is unique per customer."""

    type: Literal["PurchaseRecorded"]
    data: PurchaseData


class RefundData(_Data):
    order_id: Id
    amount: PositiveMoney
    reason: Label | None = None


class PurchaseRefunded(Event):
    """Money went back for a recorded order; refunds never exceed the order's amount."""

    type: Literal["PurchaseRefunded"]
    data: RefundData


# --- complaints ------------------------------------------------------------------------


class ComplaintFiledData(_Data):
    complaint_id: Id
    channel: Channel
    category: Label
    priority: Priority = Priority.NORMAL
    summary: Text | None = None
    order_id: Id | None = None


class ComplaintFiled(Event):
    """A complaint arrived (greet, listen). Starts the first-response and resolution clocks."""

    type: Literal["ComplaintFiled"]
    data: ComplaintFiledData


class ComplaintStep(_Data):
    complaint_id: Id
    agent: Label | None = None
    note: Text | None = None


class ComplaintAcknowledged(Event):
    """The first response to the customer (calm): stops the first-response clock."""

    type: Literal["ComplaintAcknowledged"]
    data: ComplaintStep


class EscalationData(ComplaintStep):
    to_team: Label | None = None
    reason: Label | None = None


class ComplaintEscalated(Event):
    """Handed to a higher level or another team; the SLA targets stay those of filing."""

    type: Literal["ComplaintEscalated"]
    data: EscalationData


class HoldData(ComplaintStep):
    reason: Label | None = None


class ComplaintOnHold(Event):
    """Waiting on the customer: the resolution clock pauses until resumed."""

    type: Literal["ComplaintOnHold"]
    data: HoldData


class ComplaintResumed(Event):
    """The customer answered; the resolution clock runs again."""

    type: Literal["ComplaintResumed"]
    data: ComplaintStep


class ResolutionData(ComplaintStep):
    resolution: Text
    compensation: NonNegativeMoney | None = None
    root_cause: RootCause | None = None


class ComplaintResolved(Event):
    """A resolution was given (resolve): stops the resolution clock."""

    type: Literal["ComplaintResolved"]
    data: ResolutionData


class ReopenData(ComplaintStep):
    reason: Label | None = None


class ComplaintReopened(Event):
    """The customer was not satisfied with the resolution; the complaint is open again."""

    type: Literal["ComplaintReopened"]
    data: ReopenData


class ClosingData(ComplaintStep):
    outcome: Literal["resolved", "withdrawn", "rejected", "unreachable"] = "resolved"


class ComplaintClosed(Event):
    """The complaint is closed (close); only a reopening may follow."""

    type: Literal["ComplaintClosed"]
    data: ClosingData


# --- surveys ---------------------------------------------------------------------------


class SurveyData(_Data):
    survey_id: Id
    kind: SurveyKind
    score: int
    comment: Text | None = None
    order_id: Id | None = None
    complaint_id: Id | None = None

    @model_validator(mode="after")
    def _score_on_scale(self) -> Self:
        low, high = SURVEY_SCALES[self.kind]
        if not low <= self.score <= high:
            raise ValueError(f"a {self.kind.value} score must be from {low} to {high}")
        return self


class SurveyAnswered(Event):
    """A survey or satisfaction callback answer; highest score is always best."""

    type: Literal["SurveyAnswered"]
    data: SurveyData


# --- the envelope ----------------------------------------------------------------------

EVENT_MODELS: tuple[type[Event], ...] = (
    CustomerRegistered,
    CustomerProfileUpdated,
    ConsentChanged,
    ContactLogged,
    PurchaseRecorded,
    PurchaseRefunded,
    ComplaintFiled,
    ComplaintAcknowledged,
    ComplaintEscalated,
    ComplaintOnHold,
    ComplaintResumed,
    ComplaintResolved,
    ComplaintReopened,
    ComplaintClosed,
    SurveyAnswered,
)
EVENT_TYPES: tuple[str, ...] = tuple(m.__name__ for m in EVENT_MODELS)


def _personal_fields(model: type[Event]) -> frozenset[str]:
    fields = getattr(model.model_fields["data"].annotation, "model_fields", {})
    return frozenset(
        name
        for name, info in fields.items()
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("x-personal")
    )


#: Personal data fields per event type: the catalogue's `x-personal` marks.
PERSONAL_FIELDS: dict[str, frozenset[str]] = {
    model.__name__: marked for model in EVENT_MODELS if (marked := _personal_fields(model))
}


def without_personal_data(fact: dict[str, Any]) -> dict[str, Any] | None:
    """`fact` (recorded shape) without its personal fields; None when it holds none."""
    marked = PERSONAL_FIELDS.get(fact["type"])
    data = fact.get("data") or {}
    if not marked or marked.isdisjoint(data):
        return None
    return {**fact, "data": {name: value for name, value in data.items() if name not in marked}}


COMPLAINT_EVENT_TYPES = frozenset(t for t in EVENT_TYPES if t.startswith("Complaint"))


# --- derived events (published on `<topic>.derived`, never ingested) ---------------------


class StageChange(_Data):
    from_stage: Literal["potential", "new", "satisfied", "retained", "loyal"] | None
    to_stage: Literal["potential", "new", "satisfied", "retained", "loyal"]
    reason: str
    trigger_event_id: str


EVENT_ID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
"""A derived event's id: a 128-bit hash written as a UUID is."""


class _Derived(BaseModel):
    """What every derived event carries: a conclusion of the ledger's, not a recorded fact."""

    model_config = ConfigDict(extra="forbid")

    event_id: str = Field(
        pattern=EVENT_ID_PATTERN,
        description="stable: a 128-bit hash of the transition written as a UUID is (not an "
        "RFC 4122 UUID: no version bits), the same on rebuild",
    )
    schema_version: Literal[1]
    customer_id: Id
    occurred_at: AwareDatetime = Field(description="business time of the transition")
    source: Literal["customer-ledger"]


class LoyaltyStageChanged(_Derived):
    """A customer entered a stage of the ladder; `occurred_at` is when (business time)."""

    type: Literal["LoyaltyStageChanged"]
    data: StageChange


class SlaClock(_Data):
    complaint_id: Id
    clock: Literal["first_response", "resolution"]
    priority: Priority
    category: Label
    due_at: AwareDatetime
    warning_at: AwareDatetime


class SlaWarning(_Derived):
    """75 % of a complaint's target elapsed with the clock running (at `warning_at`)."""

    type: Literal["SlaWarning"]
    data: SlaClock


class SlaBreached(_Derived):
    """A complaint's target was missed (at `due_at`)."""

    type: Literal["SlaBreached"]
    data: SlaClock


class ResponseWait(_Data):
    channel: Channel = Field(description="the channel of the contact that started the wait")
    waiting_since: AwareDatetime = Field(description="business time of that contact")
    contact_event_id: str = Field(description="the event id of that contact")
    alarm_after_hours: int = Field(ge=1, description="the alarm time of its channel")


class ResponseOverdue(_Derived):
    """A customer's inbound contact (an email, by default) concerning no complaint is still
    unanswered `alarm_after_hours` after it: no outbound contact to them since. Sent once
    per wait, dated at its alarm time; later inbound contacts before an answer join the
    wait. (An earlier contact recorded late restarts the wait under another id.)"""

    type: Literal["ResponseOverdue"]
    data: ResponseWait


class Withdrawal(_Data):
    withdrawn_event_id: str = Field(
        pattern=EVENT_ID_PATTERN, description="the `event_id` of the derived event withdrawn"
    )
    withdrawn_type: Literal["LoyaltyStageChanged", "SlaWarning", "SlaBreached", "ResponseOverdue"]


class DerivedEventWithdrawn(_Derived):
    """A derived event published earlier no longer holds: an event recorded late (a
    backfill, its business time before events already recorded) took it back, such as a
    resolution in time for a breach. `occurred_at` is the withdrawn event's. Should the
    transition hold again later, it is published again under its own id (a subscriber
    that deduplicates by id forgets a withdrawn id). It may name an id a subscriber never
    received (sent before it subscribed, past the topic's retention, or counted as sent
    by an upgrade): ignore it then."""

    type: Literal["DerivedEventWithdrawn"]
    occurred_at: AwareDatetime = Field(description="the withdrawn event's business time")
    data: Withdrawal


DERIVED_MODELS: tuple[type[BaseModel], ...] = (
    LoyaltyStageChanged,
    SlaWarning,
    SlaBreached,
    ResponseOverdue,
    DerivedEventWithdrawn,
)


IncomingEvent = Annotated[
    CustomerRegistered
    | CustomerProfileUpdated
    | ConsentChanged
    | ContactLogged
    | PurchaseRecorded
    | PurchaseRefunded
    | ComplaintFiled
    | ComplaintAcknowledged
    | ComplaintEscalated
    | ComplaintOnHold
    | ComplaintResumed
    | ComplaintResolved
    | ComplaintReopened
    | ComplaintClosed
    | SurveyAnswered,
    Field(discriminator="type"),
]

#: Validates one incoming event (JSON text or a dict) into its catalogue class.
INCOMING: TypeAdapter[IncomingEvent] = TypeAdapter(IncomingEvent)


class RecordedFields(BaseModel):
    """What the ledger adds to every event it records: the shape subscribers receive."""

    event_id: UUID = Field(description="stable: the same input always gets the same id")
    schema_version: Literal[1]
    recorded_at: AwareDatetime = Field(description="when the ledger stored the event")


def _recorded(model: type[Event]) -> type[BaseModel]:
    namespace: dict[str, Any] = {"__doc__": model.__doc__}
    if model is CustomerProfileUpdated:
        # published without its personal fields, an update may have none left to name
        namespace["__annotations__"] = {"data": ProfileData}
    return type(model.__name__, (model, RecordedFields), namespace)


RECORDED_MODELS: tuple[type[BaseModel], ...] = tuple(_recorded(m) for m in EVENT_MODELS)

#: Validates one recorded event (the value of a record on the events topic).
RECORDED: TypeAdapter[Any] = TypeAdapter(
    Annotated[Union[RECORDED_MODELS], Field(discriminator="type")]  # type: ignore[arg-type]  # noqa: UP007
)


SCHEMA_ID = "urn:customer-ledger:schema"
INGEST_SCHEMA_ID = "urn:customer-ledger:schema:ingest"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def type_schema_id(name: str, *, ingest: bool = False) -> str:
    """The `$id` of one type's schema; on Kafka its records name it in `ce_dataschema`."""
    return f"{INGEST_SCHEMA_ID if ingest else SCHEMA_ID}:{name}:v{SCHEMA_VERSION}"


"""The `$id` of the contract's JSON Schema document (`ledger schema`)."""


def contract_schema(*, ingest: bool = False) -> dict[str, Any]:
    """The contract as one JSON Schema document (Draft 2020-12).

    The document validates an event: its recorded shape, open to fields added later, or
    with `ingest` the shape producers send, closed. The derived events' schemas sit under
    `derived`, each whole (its own `$defs`, so it may be cut out) and with its definitions
    copied beside the events' in `$defs`, so a reference into the document resolves too
    (`urn:customer-ledger:schema#/derived/SlaWarning`).
    """
    document = (INCOMING if ingest else RECORDED).json_schema()
    definitions: dict[str, Any] = document.setdefault("$defs", {})
    derived: dict[str, Any] = {}
    for model in DERIVED_MODELS:
        schema = _open_to_added_fields(model.model_json_schema())  # published only
        for name, definition in schema.get("$defs", {}).items():
            if definitions.setdefault(name, definition) != definition:
                raise ValueError(f"the catalogue defines {name} twice, differently")
        derived[model.__name__] = schema
    shape = "ingest" if ingest else "recorded"
    whole = {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": INGEST_SCHEMA_ID if ingest else SCHEMA_ID,
        "title": f"customer-ledger events, {shape} shape (schema_version {SCHEMA_VERSION})",
        **document,
        "derived": derived,
    }
    return whole if ingest else _open_to_added_fields(whole)


def contract_types(*, ingest: bool = False) -> dict[str, type[BaseModel]]:
    """Every type of the contract by name: the events (recorded shape, or with `ingest`
    the shape producers send) and the derived events."""
    return {
        m.__name__: m for m in (*(EVENT_MODELS if ingest else RECORDED_MODELS), *DERIVED_MODELS)
    }


def type_schema(name: str, *, ingest: bool = False) -> dict[str, Any]:
    """One type's JSON Schema, whole: closed for what producers send, open to fields added
    later for what subscribers receive (as in `contract_schema`). Its `$id` is what the
    type's Kafka records name in `ce_dataschema`."""
    schema = contract_types(ingest=ingest)[name].model_json_schema()
    shaped = schema if ingest and name in EVENT_TYPES else _open_to_added_fields(schema)
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": type_schema_id(name, ingest=ingest), **shaped}


def _open_to_added_fields(schema: Any) -> Any:
    """`schema` without `additionalProperties: false`: fields are only ever added, so a
    subscriber validating with today's schema must take tomorrow's events. (Producers'
    events are still checked strictly: an unknown field there is most likely a typo.)"""
    if isinstance(schema, dict):
        return {
            key: _open_to_added_fields(value)
            for key, value in schema.items()
            if not (key == "additionalProperties" and value is False)
        }
    if isinstance(schema, list):
        return [_open_to_added_fields(item) for item in schema]
    return schema
