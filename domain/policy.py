"""Service-level and loyalty-ladder rules: the numbers the projections judge by.

They live in the domain, not in SQL, so that they are documented once, visible to
analysts (the projections copy them into tables) and testable by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from domain.events import Channel, Priority


@dataclass(frozen=True)
class SlaTarget:
    """Calendar hours allowed for the first response and for the resolution."""

    first_response_hours: int
    resolution_hours: int


def _default_targets() -> dict[Priority, SlaTarget]:
    return {
        Priority.URGENT: SlaTarget(first_response_hours=1, resolution_hours=24),
        Priority.HIGH: SlaTarget(first_response_hours=4, resolution_hours=72),
        Priority.NORMAL: SlaTarget(first_response_hours=12, resolution_hours=120),
        Priority.LOW: SlaTarget(first_response_hours=24, resolution_hours=240),
    }


@dataclass(frozen=True)
class SlaPolicy:
    """Complaint SLA targets by the priority a complaint was filed with.

    A warning is due when `warning_fraction` of a target has elapsed with the clock still
    running. Time on hold (waiting on the customer) does not count against resolution.
    """

    targets: dict[Priority, SlaTarget] = field(default_factory=_default_targets)
    warning_fraction: Decimal = Decimal("0.75")


@dataclass(frozen=True)
class ResponsePolicy:
    """The response alarm (founding documents: customers expect an email answer within a
    day, and staff are alerted when one is still unanswered after 12 hours).

    A customer waits from an inbound contact on one of `channels` that concerns no
    complaint (a complaint's own first-response clock covers those) until the next
    outbound contact to them, on any channel; further inbound contacts meanwhile join the
    same wait. The alarm is due `alarm_after_hours` into a wait still unanswered then.
    """

    alarm_after_hours: int = 12
    channels: tuple[Channel, ...] = (Channel.EMAIL,)


@dataclass(frozen=True)
class LadderPolicy:
    """The loyalty ladder potential → new → satisfied → retained → loyal (first version).

    Evaluated after every event in business-time order; the highest stage whose rule holds:
    - loyal: `loyal_purchases`+ purchases spanning `loyal_span_days`+ days, and the latest
      survey (if any) at least `content_satisfaction`;
    - retained: a purchase `repeat_after_days`+ days after the first, same survey rule;
    - satisfied: a purchase, and the latest survey at least `positive_satisfaction`;
    - new: a purchase;
    - potential: known to the ledger, nothing bought yet.
    Survey scores are normalised to 0..1 on their scale (highest is best).
    """

    positive_satisfaction: Decimal = Decimal("0.75")
    content_satisfaction: Decimal = Decimal("0.5")
    repeat_after_days: int = 7
    loyal_purchases: int = 4
    loyal_span_days: int = 180


STAGES: tuple[str, ...] = ("potential", "new", "satisfied", "retained", "loyal")
