"""The Customer aggregate: one stream per customer, guarding the ledger's invariants.

Every catalogue event about a customer is stored in that customer's stream, so the
stream's version number orders them and makes concurrent writers collide (optimistic
concurrency) instead of silently interleaving. The aggregate keeps only the state the
invariants need: which orders and complaints exist, and which event ids it has seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.events import IncomingEvent, PurchaseRecorded, PurchaseRefunded

LEDGER_NAMESPACE = uuid5(NAMESPACE_URL, "urn:customer-ledger")

AHEAD_OF_RECORDING = timedelta(hours=1)
"""How far an event's business time may lie after the moment it is recorded (clocks of
producers drift). Further ahead it is a mistake (a typo in the year, a wrong offset), and
a costly one: the projections' clock is the latest business time and never goes back, so
one such event would mark every complaint breached for good."""


def recorded_ahead(occurred_at: datetime, recorded_at: datetime) -> str | None:
    """Why an event cannot be recorded, when its business time lies further than
    `AHEAD_OF_RECORDING` after its recording. (The consumers do not judge it: a store
    holding one from before the rule, rebuilt through Kafka, must still equal the live
    projections.)"""
    if occurred_at <= recorded_at + AHEAD_OF_RECORDING:
        return None
    return (
        f"occurred_at {occurred_at.isoformat()} lies after the time of recording "
        f"({recorded_at.isoformat(timespec='seconds')}) by more than {AHEAD_OF_RECORDING}: "
        "an event is recorded once it has happened (check the year and the UTC offset)"
    )


@lru_cache(maxsize=65_536)
def customer_stream_id(customer_id: str) -> UUID:
    """The stream (aggregate) id of a customer: stable, derived from their id."""
    return uuid5(LEDGER_NAMESPACE, f"customer:{customer_id}")


class InvariantViolation(ValueError):
    """The event contradicts what the customer's history says; the message says why."""


@dataclass
class ComplaintState:
    filed_at: datetime
    status: str  # open | on_hold | resolved | closed


@dataclass
class OrderState:
    refundable: Decimal


class Customer(Aggregate):
    """A customer's ledger. `record()` checks an event against the history, then keeps it."""

    @staticmethod
    def create_id(customer_id: str) -> UUID:
        return customer_stream_id(customer_id)

    @event("Opened")
    def __init__(self, customer_id: str) -> None:
        self.customer_id = customer_id
        self.registered = False
        self.complaints: dict[str, ComplaintState] = {}
        self.orders: dict[str, OrderState] = {}
        self.event_ids: set[str] = set()

    def has_seen(self, event_id: str) -> bool:
        return event_id in self.event_ids

    def record(
        self, incoming: IncomingEvent, fact: dict[str, Any], reporting_currency: str
    ) -> None:
        """Check `incoming` against the invariants; keep `fact` (its stored form) if it holds."""
        ahead = recorded_ahead(incoming.occurred_at, datetime.fromisoformat(fact["recorded_at"]))
        if ahead:
            raise InvariantViolation(ahead)
        self._check(incoming, reporting_currency)
        self.trigger_event(self.Recorded, fact=fact)

    class Recorded(Aggregate.Event):
        """One catalogue event, stored in its public JSON form (see domain.ledger.to_fact)."""

        fact: dict[str, Any]

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Customer)
            aggregate._absorb(self.fact)

    def _absorb(self, fact: dict[str, Any]) -> None:
        """Applies one stored fact; also runs on replay, so it must not check anything."""
        self.event_ids.add(fact["event_id"])
        kind, data = fact["type"], fact["data"]
        if kind == "CustomerRegistered":
            self.registered = True
        elif kind == "PurchaseRecorded":
            self.orders[data["order_id"]] = OrderState(Decimal(data["amount"]))
        elif kind == "PurchaseRefunded":
            self.orders[data["order_id"]].refundable -= Decimal(data["amount"])
        elif kind == "ComplaintFiled":
            filed_at = datetime.fromisoformat(fact["occurred_at"])
            self.complaints[data["complaint_id"]] = ComplaintState(filed_at, "open")
        elif kind in _COMPLAINT_STATUS_AFTER:
            self.complaints[data["complaint_id"]].status = _COMPLAINT_STATUS_AFTER[kind]

    # --- invariants --------------------------------------------------------------------

    def _check(self, incoming: IncomingEvent, reporting_currency: str) -> None:
        if incoming.type == "CustomerRegistered" and self.registered:
            raise InvariantViolation(
                f"customer {self.customer_id} is already registered; "
                "send CustomerProfileUpdated to change the profile"
            )
        if isinstance(incoming, PurchaseRecorded):
            self._check_purchase(incoming, reporting_currency)
        elif isinstance(incoming, PurchaseRefunded):
            self._check_refund(incoming)
        elif incoming.type.startswith("Complaint"):
            self._check_complaint_step(incoming)

    def _check_purchase(self, purchase: PurchaseRecorded, reporting_currency: str) -> None:
        data = purchase.data
        if data.order_id in self.orders:
            raise InvariantViolation(
                f"order {data.order_id} is already recorded for customer {self.customer_id}"
            )
        if data.currency != reporting_currency and data.reporting_amount is None:
            raise InvariantViolation(
                f"data.amount is in {data.currency} but this ledger reports in "
                f"{reporting_currency}: add data.reporting_amount (the amount in "
                f"{reporting_currency})"
            )

    def _check_refund(self, refund: PurchaseRefunded) -> None:
        order = self.orders.get(refund.data.order_id)
        if order is None:
            raise InvariantViolation(
                f"order {refund.data.order_id} was never recorded for customer "
                f"{self.customer_id}; a refund must name a recorded order"
            )
        if refund.data.amount > order.refundable:
            raise InvariantViolation(
                f"refund {refund.data.amount} exceeds what remains refundable on order "
                f"{refund.data.order_id} ({order.refundable})"
            )

    def _check_complaint_step(self, step: IncomingEvent) -> None:
        complaint_id: str = step.data.complaint_id  # type: ignore[union-attr,assignment]
        complaint = self.complaints.get(complaint_id)
        if step.type == "ComplaintFiled":
            if complaint is not None:
                raise InvariantViolation(
                    f"complaint {complaint_id} was already filed (at "
                    f"{complaint.filed_at.isoformat()}); a complaint id is filed once"
                )
            return
        if complaint is None:
            raise InvariantViolation(
                f"complaint {complaint_id} was never filed for customer {self.customer_id}; "
                f"{step.type} must follow a ComplaintFiled"
            )
        if step.occurred_at < complaint.filed_at:
            raise InvariantViolation(
                f"{step.type} at {step.occurred_at.isoformat()} is before complaint "
                f"{complaint_id} was filed ({complaint.filed_at.isoformat()})"
            )
        allowed = _COMPLAINT_STEP_ALLOWED_FROM[step.type]
        if complaint.status not in allowed:
            raise InvariantViolation(
                f"complaint {complaint_id} is {complaint.status.replace('_', ' ')}; "
                f"{step.type} is only allowed when it is "
                + " or ".join(sorted(a.replace("_", " ") for a in allowed))
                + (
                    "; only ComplaintReopened may follow a close"
                    if complaint.status == "closed"
                    else ""
                )
            )


_OPEN = frozenset({"open", "on_hold"})
#: Which complaint statuses each step may follow (the complaint's state machine).
_COMPLAINT_STEP_ALLOWED_FROM: dict[str, frozenset[str]] = {
    "ComplaintAcknowledged": _OPEN | {"resolved"},
    "ComplaintEscalated": _OPEN,
    "ComplaintOnHold": frozenset({"open"}),
    "ComplaintResumed": frozenset({"on_hold"}),
    "ComplaintResolved": _OPEN,
    "ComplaintReopened": frozenset({"resolved", "closed"}),
    "ComplaintClosed": _OPEN | {"resolved"},
}
#: The status a complaint has after each step (steps not named leave it as it is).
_COMPLAINT_STATUS_AFTER: dict[str, str] = {
    "ComplaintOnHold": "on_hold",
    "ComplaintResumed": "open",
    "ComplaintResolved": "resolved",
    "ComplaintReopened": "open",
    "ComplaintClosed": "closed",
}
