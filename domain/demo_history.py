"""A made-up but realistic two-year CRM history, for demos, load tests and exploration.

The business is a car dealership group (4S stores) in a handful of Chinese cities: it sells
a few vehicles, much service, repairs and accessories, and keeps in touch over every channel.
The history follows the practice in the domain brief so that every projection has something
to show: customers climb the ladder potential → new → satisfied → retained → loyal (or never
buy), a minority brings most of the revenue (ABC classes A, B and C all populated), purchases
peak in spring and before the year end, complaints go greet → listen → calm → resolve →
close → follow up, fast and slow, and purchases are followed by satisfaction callbacks.

The generator is pure: one `random.Random(seed)` drives everything, there is no wall clock
and no I/O, so the same arguments always give the same events. Every event validates with
`domain.events.INCOMING` and the history respects the ledger's invariants when recorded in
the returned order. Personal fields hold obviously fake values.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from operator import itemgetter
from random import Random
from typing import Any, Final, Generic, TypeVar

from domain.events import Priority
from domain.policy import SlaPolicy

__all__ = ["generate_history"]

T = TypeVar("T")
Data = dict[str, Any]

TZ: Final = timezone(timedelta(hours=8))
MINUTE: Final = 60
HOUR: Final = 3_600
DAY: Final = 86_400

# --- the world: places, stores, staff, products ----------------------------------------


@dataclass(frozen=True)
class _Place:
    region: str
    province: str
    city: str
    stores: tuple[str, ...]


PLACES: Final[tuple[_Place, ...]] = (
    _Place("East", "Shanghai", "Shanghai", ("Shanghai Pudong 4S", "Shanghai Minhang 4S")),
    _Place("East", "Zhejiang", "Hangzhou", ("Hangzhou Xihu 4S",)),
    _Place("East", "Jiangsu", "Nanjing", ("Nanjing Jianye 4S",)),
    _Place("North", "Beijing", "Beijing", ("Beijing Chaoyang 4S", "Beijing Haidian 4S")),
    _Place("North", "Tianjin", "Tianjin", ("Tianjin Hexi 4S",)),
    _Place("South", "Guangdong", "Guangzhou", ("Guangzhou Tianhe 4S",)),
    _Place("South", "Guangdong", "Shenzhen", ("Shenzhen Nanshan 4S",)),
    _Place("Southwest", "Sichuan", "Chengdu", ("Chengdu Wuhou 4S",)),
    _Place("Southwest", "Chongqing", "Chongqing", ("Chongqing Yubei 4S",)),
    _Place("Central", "Hubei", "Wuhan", ("Wuhan Hongshan 4S",)),
)
# Big cities have more customers.
PLACE_WEIGHTS: Final = (24, 10, 8, 20, 6, 10, 10, 6, 4, 5)

STAFF: Final = tuple(f"agent-{n:02d}" for n in range(1, 19))
CALL_CENTER: Final = tuple(f"cc-{n:02d}" for n in range(1, 13))

#: The system each channel's records come from (the ledger's `source`).
SOURCE_OF: Final[dict[str, str]] = {
    "phone": "call-center",
    "call_center": "call-center",
    "chat": "call-center",
    "sms": "call-center",
    "email": "crm",
    "letter": "crm",
    "visit": "crm",
    "store": "crm",
    "social": "crm",
    "web": "webshop",
}


@dataclass(frozen=True)
class _Product:
    sku: str
    name: str
    cents: int


def _products(*rows: tuple[str, str, int]) -> tuple[_Product, ...]:
    return tuple(_Product(*row) for row in rows)


ACCESSORIES: Final = _products(
    ("ACC-MAT", "All-weather floor mats", 3_990),
    ("ACC-HOLDER", "Phone holder", 1_990),
    ("ACC-CAM", "Dash camera", 12_900),
    ("ACC-COVER", "Seat covers", 8_900),
    ("ACC-CHILD", "Child seat", 29_900),
    ("ACC-ROOF", "Roof box", 45_900),
)
SERVICES: Final = _products(
    ("SVC-OIL", "Oil change", 5_990),
    ("SVC-ANNUAL", "Annual maintenance", 18_900),
    ("SVC-MAJOR", "Major service", 44_900),
    ("SVC-BRAKE", "Brake pads replacement", 21_900),
    ("SVC-AC", "Air-con recharge", 7_900),
    ("SVC-TYRES", "Tyre set (4)", 52_900),
    ("SVC-DETAIL", "Detailing", 12_000),
)
REPAIRS: Final = _products(
    ("REP-BODY", "Bodywork repair", 89_900),
    ("REP-GLASS", "Windscreen replacement", 34_900),
    ("REP-ENGINE", "Engine repair", 189_000),
)
WARRANTIES: Final = _products(
    ("WAR-EXT3", "Extended warranty (3 years)", 129_000),
    ("WAR-ROAD", "Roadside assistance (1 year)", 9_900),
)
VEHICLES: Final = _products(
    ("VEH-CITY", "City hatchback", 1_890_000),
    ("VEH-SEDAN", "Family sedan", 2_790_000),
    ("VEH-SUV", "Compact SUV", 3_490_000),
    ("VEH-EV", "Electric SUV", 4_690_000),
)
BASKET_GROUPS: Final = (SERVICES, ACCESSORIES, REPAIRS, WARRANTIES)
BASKET_WEIGHTS: Final = (55, 25, 12, 8)

# --- customer kinds ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    """How much a kind of customer buys: purchases (min, max) and vehicle chance."""

    name: str
    weight: int
    purchases: tuple[int, int]
    vehicle_chance: float
    needs_days: int  # regulars and VIPs need time to become loyal


KINDS: Final = (
    _Kind("potential", 20, (0, 0), 0.0, 0),
    _Kind("one-off", 28, (1, 1), 0.02, 0),
    _Kind("occasional", 27, (2, 3), 0.03, 0),
    _Kind("regular", 17, (4, 7), 0.08, 240),
    _Kind("vip", 8, (7, 16), 0.35, 240),
)
KIND_WEIGHTS: Final = tuple(k.weight for k in KINDS)
OCCASIONAL: Final = KINDS[2]

# --- contacts ----------------------------------------------------------------------------

# (channel, topic, weight) of routine touches, by direction.
INBOUND_TOPICS: Final = (
    ("phone", "service booking", 12),
    ("phone", "price quote", 6),
    ("call_center", "order status", 6),
    ("call_center", "warranty question", 5),
    ("email", "invoice request", 4),
    ("email", "product enquiry", 5),
    ("chat", "product enquiry", 6),
    ("chat", "order status", 4),
    ("web", "service booking", 8),
    ("web", "test drive request", 3),
    ("store", "product enquiry", 6),
    ("visit", "test drive", 3),
    ("letter", "document request", 1),
    ("social", "product enquiry", 3),
    ("sms", "appointment confirmation", 4),
)
OUTBOUND_TOPICS: Final = (
    ("sms", "service reminder", 10),
    ("phone", "service reminder", 5),
    ("phone", "follow-up on quote", 4),
    ("email", "inspection reminder", 4),
    ("letter", "annual inspection reminder", 2),
    ("call_center", "insurance renewal", 3),
)
PROSPECT_TOPICS: Final = (
    ("store", "product enquiry", 6),
    ("visit", "test drive", 4),
    ("phone", "price quote", 5),
    ("web", "test drive request", 4),
    ("chat", "product enquiry", 4),
    ("social", "product enquiry", 3),
    ("email", "brochure request", 2),
)
# Marketing campaigns (month, day, topic): spring service, the 618 and Singles' Day shopping
# festivals, and year-end offers. Sent only to customers whose marketing consent holds.
CAMPAIGNS: Final = (
    (3, 10, "campaign: spring service check"),
    (6, 1, "campaign: 618 summer offers"),
    (10, 28, "campaign: Singles' Day preview"),
    (12, 5, "campaign: year-end offers"),
)
# Shares of routine inbound emails answered late (after 13-48 h) and never; the rest are
# answered within 1-10 h, so the response alarm (12 h) has both quiet and loud cases.
REPLY_LATE: Final = 0.10
REPLY_NEVER: Final = 0.05
DURATIONS: Final[dict[str, tuple[int, int]]] = {
    "phone": (60, 900),
    "call_center": (90, 1_200),
    "chat": (120, 1_500),
    "store": (600, 3_600),
    "visit": (900, 5_400),
}

# --- complaints ---------------------------------------------------------------------------

# category -> (root cause, concerns an order, summary)
CATEGORIES: Final[dict[str, tuple[str, bool, str]]] = {
    "product defect": ("product", True, "Part failed shortly after purchase"),
    "delivery delay": ("delivery", True, "Order arrived much later than promised"),
    "billing": ("billing", True, "Charged twice / wrong amount on invoice"),
    "repair quality": ("service", True, "Same fault back after the repair"),
    "staff attitude": ("service", False, "Staff were rude at the service desk"),
    "waiting time": ("process", False, "Waited hours without news of the car"),
}
COMPLAINT_CHANNELS: Final = ("call_center", "phone", "email", "store", "letter", "social", "web")
COMPLAINT_CHANNEL_WEIGHTS: Final = (30, 20, 18, 14, 4, 8, 6)
SLA_TARGETS: Final = SlaPolicy().targets
PRIORITY_DECK: Final = ("low", "normal", "normal", "high", "high", "urgent")
# One buyer in seven complains (the brief: 1 purchase in 4 disappoints, few complain).
COMPLAINER_DECK: Final = (True, False, False, False, False, False, False)


@dataclass(frozen=True)
class _Handling:
    """How one complaint is handled; the scenarios below mix good and bad service."""

    acknowledge: str  # on_time | late | never
    resolve: str  # on_time | late | first_contact | never
    close: str  # resolved | withdrawn | rejected | "" (stays open)
    escalate: bool = False
    hold: bool = False
    reopen: str = ""  # "" | after_resolve | after_close


HANDLING_DECK: Final = (
    _Handling("on_time", "on_time", "resolved"),
    _Handling("never", "first_contact", "resolved"),
    _Handling("late", "on_time", "resolved"),
    _Handling("on_time", "late", "resolved", escalate=True),
    _Handling("on_time", "on_time", "resolved", hold=True),
    _Handling("on_time", "on_time", "resolved", reopen="after_close"),
    _Handling("late", "on_time", "resolved", escalate=True, reopen="after_resolve"),
    _Handling("never", "never", ""),
    _Handling("on_time", "never", "withdrawn"),
    _Handling("late", "never", "rejected"),
)


class _Deck(Generic[T]):
    """Draws without replacement, reshuffling when empty: even a small history gets every
    priority and handling scenario, while the order stays random."""

    def __init__(self, rng: Random, cards: Sequence[T]) -> None:
        self._rng, self._cards = rng, list(cards)
        self._pile: list[T] = []

    def draw(self) -> T:
        if not self._pile:
            self._pile = self._cards[:]
            self._rng.shuffle(self._pile)
        return self._pile.pop()


@dataclass(frozen=True)
class _Decks:
    """The decks shared by all customers: who complains, with what priority, how handled."""

    complainers: _Deck[bool]
    priorities: _Deck[str]
    handlings: _Deck[_Handling]

    @classmethod
    def of(cls, rng: Random) -> _Decks:
        return cls(
            _Deck(rng, COMPLAINER_DECK), _Deck(rng, PRIORITY_DECK), _Deck(rng, HANDLING_DECK)
        )


# --- helpers -----------------------------------------------------------------------------


def _money(cents: int) -> str:
    """Money as a decimal string with two places: never a float."""
    return f"{cents // 100}.{cents % 100:02d}"


def _weighted(rng: Random, rows: tuple[tuple[str, str, int], ...]) -> tuple[str, str]:
    """A (channel, topic) drawn by weight."""
    channel, topic, _ = rng.choices(rows, cum_weights=_cumulative(rows))[0]
    return channel, topic


@functools.cache
def _cumulative(rows: tuple[tuple[str, str, int], ...]) -> list[int]:
    return list(itertools.accumulate(w for *_, w in rows))


def _season(day: date) -> float:
    """Relative purchase intensity: spring and the run-up to the year end are busy."""
    m, d = day.month, day.day
    if m in (3, 4, 5):
        return 1.6
    if m == 6 and d <= 18:  # the 618 shopping festival
        return 1.5
    if m == 11 and d <= 11:  # Singles' Day
        return 2.2
    if m in (11, 12):
        return 1.8
    if m == 2:  # Spring Festival: stores are quiet
        return 0.6
    if m in (7, 8):
        return 0.8
    return 1.0


@dataclass(frozen=True)
class _Calendar:
    """The period: seasonal weights per day, for fast sampling of purchase days."""

    start: date
    days: int
    cumulative: tuple[float, ...]  # cumulative[d] = total weight of days before d

    @classmethod
    def of(cls, start: date, days: int) -> _Calendar:
        weights = (_season(start + timedelta(days=d)) for d in range(days))
        return cls(start, days, (0.0, *itertools.accumulate(weights)))

    @property
    def end(self) -> int:
        return self.days * DAY

    def seasonal_day(self, rng: Random, first: int, last: int) -> int:
        """A day in [first, last) drawn in proportion to the season's intensity."""
        low, high = self.cumulative[first], self.cumulative[last]
        return min(bisect.bisect_right(self.cumulative, rng.uniform(low, high)) - 1, last - 1)

    def date_at(self, t: int) -> date:
        return self.start + timedelta(days=t // DAY)

    def at(self, year_offset: int, month: int, day: int) -> int | None:
        """Seconds since the start of a calendar date, or None outside the period."""
        when = date(self.start.year + year_offset, month, day)
        offset = (when - self.start).days
        return offset * DAY if 0 <= offset < self.days else None


def _daytime(rng: Random, day: int, opens: int = 9, closes: int = 20) -> int:
    """A moment during opening hours of a day (seconds since the start)."""
    return day * DAY + rng.randrange(opens * HOUR, closes * HOUR)


# --- one customer's story ------------------------------------------------------------------


@dataclass
class _Order:
    order_id: str
    at: int
    cents: int
    lines: list[tuple[_Product, int]]
    source: str
    refunded: int = 0

    @property
    def refundable(self) -> int:
        return self.cents - self.refunded


Row = tuple[int, int, int, str, str, str | None, Data]


@dataclass
class _Story:
    """One customer's events while they are made up; holds what later events depend on."""

    rng: Random
    calendar: _Calendar
    no: int
    kind: _Kind
    registered: int
    active_until: int
    place: _Place
    mood: float  # 0..1, how happy this customer tends to be
    rows: list[Row] = field(default_factory=list)
    orders: list[_Order] = field(default_factory=list)
    consent: list[tuple[int, bool]] = field(default_factory=list)
    marketing_channel: str = "sms"
    surveys: int = 0
    birthday: date | None = None

    def add(self, at: int, kind: str, source: str, actor: str | None, data: Data) -> bool:
        """Keep an event unless it falls after the period (the history stops there)."""
        if at >= self.calendar.end:
            return False
        self.rows.append((at, self.no, len(self.rows), kind, source, actor, data))
        return True

    def contact(
        self,
        at: int,
        channel: str,
        direction: str,
        topic: str,
        agent: str | None = None,
        **extra: Any,
    ) -> bool:
        """ContactLogged; its source follows from the channel (call center, CRM, webshop)."""
        data: Data = {"channel": channel, "direction": direction, "topic": topic}
        if agent is not None:
            data["agent"] = agent
        if channel in DURATIONS:
            data["duration_seconds"] = self.rng.randint(*DURATIONS[channel])
        data.update(extra)
        return self.add(at, "ContactLogged", SOURCE_OF[channel], agent, data)

    def survey(self, at: int, kind: str, score: int, actor: str | None = None, **ref: str) -> None:
        """SurveyAnswered with a survey id unique to this customer; `ref` names what it rates."""
        self.surveys += 1
        survey_id = f"S{self.no:05d}-{self.surveys:03d}"
        data: Data = {"survey_id": survey_id, "kind": kind, "score": score, **ref}
        self.add(at, "SurveyAnswered", "survey-tool", actor, data)

    def score(self, low: int, high: int, shift: float = 0.0) -> int:
        """A survey score on [low, high] that follows the customer's mood."""
        x = min(1.0, max(0.0, self.mood + shift + self.rng.gauss(0, 0.15)))
        return low + round(x * (high - low))

    def consents_at(self, at: int) -> bool:
        """Whether marketing consent holds at `at`: campaigns must respect it."""
        granted = False
        for when, value in self.consent:
            if when > at:
                break
            granted = value
        return granted


def _new_story(rng: Random, calendar: _Calendar, no: int) -> _Story:
    """Who the customer is: when they arrive, what kind of buyer, where, how content."""
    day = int((calendar.days - 1) * rng.random() ** 1.6)  # more customers early on
    kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
    left = calendar.days - day
    if kind.needs_days > left:
        kind = OCCASIONAL
    active_until = calendar.end
    if kind.purchases[0] > 0 and rng.random() < 0.2 and left > 60:  # some drift away
        keep = max(kind.needs_days, int(left * rng.uniform(0.3, 0.8)))
        active_until = min(calendar.end, (day + keep) * DAY)
    mood = rng.betavariate(6, 2) if kind.needs_days else rng.betavariate(5, 2)
    place = rng.choices(PLACES, weights=PLACE_WEIGHTS)[0]
    return _Story(rng, calendar, no, kind, _daytime(rng, day), active_until, place, mood)


def _register(story: _Story) -> None:
    """CustomerRegistered: collect only what the customer gives (often not everything)."""
    rng, n = story.rng, story.no
    online = rng.random() < 0.3
    preferred = rng.choice(("phone", "sms", "email", "social", "store"))
    data: Data = {
        "name": f"Customer {n:04d}",
        "region": story.place.region,
        "province": story.place.province,
        "city": story.place.city,
        "segment": "fleet" if rng.random() < 0.04 else "retail",
        "preferred_channel": preferred,
    }
    if online or rng.random() < 0.6:
        data["email"] = f"c{n:04d}@example.com"
    if not online or rng.random() < 0.5:
        data["phone"] = f"+86 100 0000 {n % 10_000:04d}"
    if rng.random() < 0.55:  # "the most important part", when they share it
        story.birthday = date(rng.randint(1958, 2004), rng.randint(1, 12), rng.randint(1, 28))
        data["birthday"] = story.birthday.isoformat()
    if rng.random() < 0.3:
        data["address"] = f"{rng.randint(1, 999)} Demo Road, {story.place.city}"
    source, actor = ("webshop", None) if online else ("crm", rng.choice(STAFF))
    story.add(story.registered, "CustomerRegistered", source, actor, data)


def _consent(story: _Story) -> None:
    """ConsentChanged for marketing: granted at sign-up or later, sometimes withdrawn."""
    rng = story.rng
    channel = story.marketing_channel = rng.choice(("email", "sms", "social"))
    granted_at: int | None = None
    if rng.random() < 0.55:
        granted_at = story.registered + rng.randint(1, 10) * MINUTE
    elif rng.random() < 0.15:
        granted_at = story.registered + rng.randint(7, 200) * DAY
    if granted_at is None or granted_at >= story.calendar.end:
        return
    data = {"purpose": "marketing", "granted": True, "channel": channel}
    story.add(granted_at, "ConsentChanged", "crm", None, data)
    story.consent.append((granted_at, True))
    if rng.random() < 0.12:
        withdrawn_at = granted_at + rng.randint(20, 400) * DAY + rng.randint(0, DAY)
        data = {"purpose": "marketing", "granted": False, "channel": channel}
        if story.add(withdrawn_at, "ConsentChanged", "crm", None, data):
            story.consent.append((withdrawn_at, False))


def _profile_updates(story: _Story) -> None:
    """CustomerProfileUpdated: some move, change phone or email; big spenders become VIPs."""
    rng = story.rng
    if rng.random() < 0.1:
        at = story.registered + rng.randint(30, 500) * DAY + rng.randint(0, DAY)
        change = rng.random()
        data: Data
        if change < 0.4:
            place = rng.choice([p for p in PLACES if p is not story.place])
            data = {"region": place.region, "province": place.province, "city": place.city}
        elif change < 0.7:
            data = {"phone": f"+86 100 0001 {story.no % 10_000:04d}"}
        elif change < 0.9:
            data = {"email": f"c{story.no:04d}.new@example.com"}
        else:
            data = {"preferred_channel": rng.choice(("email", "sms", "social"))}
        story.add(at, "CustomerProfileUpdated", "crm", rng.choice(STAFF), data)
    if story.kind.name == "vip" and len(story.orders) >= 3:
        at = story.orders[2].at + rng.randint(1, 5) * DAY
        story.add(at, "CustomerProfileUpdated", "crm", rng.choice(STAFF), {"segment": "vip"})


def _purchase_days(story: _Story) -> list[int]:
    """Purchase days: the first soon after sign-up, the rest follow the season.

    Regulars and VIPs get a purchase 180+ days after their first, so they can reach
    'loyal' (4+ purchases spanning 180+ days).
    """
    rng, calendar = story.rng, story.calendar
    low, high = story.kind.purchases
    count = rng.randint(low, high)
    if count == 0:
        return []
    first = story.registered // DAY + (0 if rng.random() < 0.6 else rng.randint(1, 14))
    if first >= calendar.days:
        return []
    last = max(first + 1, -(-story.active_until // DAY))
    days = [first]
    if story.kind.needs_days and last > first + 181:
        days.append(calendar.seasonal_day(rng, first + 180, last))
    while len(days) < count:
        days.append(calendar.seasonal_day(rng, min(first + 7, last - 1), last))
    return sorted(days)


def _basket(rng: Random, vehicle: bool) -> list[tuple[_Product, int]]:
    """The order's lines: a vehicle (with warranty), or service, repair or accessories."""
    if vehicle:
        lines = [(rng.choice(VEHICLES), 1)]
        if rng.random() < 0.5:
            lines.append((WARRANTIES[0], 1))
    else:
        group = rng.choices(BASKET_GROUPS, weights=BASKET_WEIGHTS)[0]
        lines = [(rng.choice(group), 1)]
    if rng.random() < 0.3:
        accessory = rng.choice(ACCESSORIES)
        if accessory is not lines[0][0]:
            lines.append((accessory, 1 if rng.random() < 0.8 else 2))
    return lines


def _purchases(story: _Story) -> None:
    """PurchaseRecorded with its touches: confirmations, delivery notes, reminders."""
    rng = story.rng
    for n, day in enumerate(_purchase_days(story), start=1):
        vehicle = n == 1 and rng.random() < story.kind.vehicle_chance
        channel = "store" if vehicle else rng.choices(("store", "web", "phone"), (60, 30, 10))[0]
        if n == 1 and day == story.registered // DAY:
            at = story.registered + rng.randint(10, 90) * MINUTE
        elif channel == "web":
            at = _daytime(rng, day, 7, 24)
        else:
            at = _daytime(rng, day)
        at = max(at, story.registered + 5 * MINUTE)
        lines = _basket(rng, vehicle)
        order = _Order(
            order_id=f"O{story.no:05d}-{n:03d}",
            at=at,
            cents=sum(p.cents * q for p, q in lines),
            lines=lines,
            source={"store": "pos", "web": "webshop", "phone": "call-center"}[channel],
        )
        data: Data = {
            "order_id": order.order_id,
            "amount": _money(order.cents),
            "currency": "EUR",
            "quantity": sum(q for _, q in lines),
            "items": [
                {"sku": p.sku, "name": p.name, "quantity": q, "unit_price": _money(p.cents)}
                for p, q in lines
            ],
            "channel": channel,
        }
        actor: str | None = None
        if channel == "store":
            data["store"] = rng.choice(story.place.stores)
            actor = rng.choice(STAFF)
        elif channel == "phone":
            actor = rng.choice(CALL_CENTER)
        test_drive = at - rng.randint(3, 20) * DAY
        if vehicle and test_drive > story.registered:
            story.contact(test_drive, "visit", "inbound", "test drive", rng.choice(STAFF))
        elif channel == "store" and rng.random() < 0.3 and at - DAY > story.registered:
            story.contact(at - DAY, "sms", "outbound", "appointment reminder")
        if not story.add(at, "PurchaseRecorded", order.source, actor, data):
            return
        story.orders.append(order)
        if channel == "web":
            story.contact(at + MINUTE, "email", "outbound", "order confirmation")
            story.contact(at + rng.randint(1, 3) * DAY, "sms", "outbound", "delivery notice")
        _callback(story, order)
        _refund(story, order)


def _refund(story: _Story, order: _Order) -> None:
    """PurchaseRefunded on a few orders: a returned item or a price adjustment."""
    rng = story.rng
    if rng.random() >= (0.01 if order.cents > 1_000_000 else 0.07):
        return
    at = order.at + rng.randint(1, 20) * DAY + rng.randint(0, 8 * HOUR)
    if len(order.lines) > 1 and rng.random() < 0.6:
        product, quantity = order.lines[-1]
        cents, reason = product.cents * quantity, "returned item"
    else:
        cents = max(100, order.cents * rng.randint(5, 15) // 100)
        reason = rng.choice(("price adjustment", "promotion applied late", "goodwill"))
    cents = min(cents, order.refundable)
    data = {"order_id": order.order_id, "amount": _money(cents), "reason": reason}
    if story.add(at, "PurchaseRefunded", order.source, None, data):
        order.refunded += cents


def _callback(story: _Story, order: _Order) -> None:
    """The satisfaction callback a few days after a purchase (the 'accountable' level)."""
    rng = story.rng
    if rng.random() >= 0.55:
        return
    at = _daytime(rng, order.at // DAY + rng.randint(2, 5), 10, 19)
    agent = rng.choice(CALL_CENTER)
    if rng.random() < 0.2:
        story.contact(at, "phone", "outbound", "satisfaction callback", agent, notes="no answer")
        return
    story.contact(at, "phone", "outbound", "satisfaction callback", agent)
    story.survey(at + 5 * MINUTE, "callback", story.score(1, 5), agent, order_id=order.order_id)


def _contacts(story: _Story) -> None:
    """Routine touches over every channel, in and out, while the customer is active."""
    rng = story.rng
    start, until = story.registered + HOUR, story.active_until
    if not story.orders:  # a prospect: enquiries and test drives, then it fades out
        for _ in range(rng.randint(1, 5)):
            day = (start + rng.randint(0, 90) * DAY) // DAY
            channel, topic = _weighted(rng, PROSPECT_TOPICS)
            _inbound(story, _daytime(rng, day), channel, topic)
        if rng.random() < 0.6:
            at = _daytime(rng, start // DAY + rng.randint(2, 20))
            story.contact(at, "phone", "outbound", "follow-up on quote", rng.choice(STAFF))
        return
    span_days = max(1, (until - start) // DAY)
    count = span_days // rng.randint(14, 36)
    for _ in range(count):
        at = _daytime(rng, start // DAY + rng.randrange(span_days) + 1, 8, 21)
        if rng.random() < 0.65:
            channel, topic = _weighted(rng, INBOUND_TOPICS)
            _inbound(story, at, channel, topic)
            if channel in ("chat", "web") and rng.random() < 0.1:
                story.survey(at + 10 * MINUTE, "ces", story.score(1, 7))
        else:
            channel, topic = _weighted(rng, OUTBOUND_TOPICS)
            story.contact(at, channel, "outbound", topic, _agent(rng, channel))
    if until < story.calendar.end and rng.random() < 0.5:  # a lapsed customer
        at = _daytime(rng, until // DAY + rng.randint(60, 120))
        story.contact(at, "phone", "outbound", "win-back call", rng.choice(CALL_CENTER))


def _inbound(story: _Story, at: int, channel: str, topic: str) -> None:
    """A routine inbound touch; an email also gets its staff reply (see `_email_reply`)."""
    agent = _agent(story.rng, channel)
    if story.contact(at, channel, "inbound", topic, agent) and channel == "email":
        _email_reply(story, at, topic)


def _email_reply(story: _Story, received: int, topic: str) -> None:
    """Staff answer a routine email: most within hours, some late, a few never.

    Customers expect an email answer within a day and the response alarm fires on an email
    unanswered after 12 h, so the history needs all three cases: about 85 % answered 1-10 h
    later, 10 % after 13-48 h, 5 % never. Emails about a complaint are not answered here:
    the complaint's own steps and its SLA cover them.
    """
    rng = story.rng
    draw = rng.random()
    if draw < REPLY_NEVER:
        return
    low, high = (13 * HOUR, 48 * HOUR) if draw < REPLY_NEVER + REPLY_LATE else (HOUR, 10 * HOUR)
    at = received + rng.randint(low, high)
    if at < story.calendar.end:  # the history stops at the period's end
        story.contact(at, "email", "outbound", f"re: {topic}", rng.choice(STAFF))


def _agent(rng: Random, channel: str) -> str | None:
    """Who handled a touch: call-center staff, store staff, or nobody (self-service)."""
    if channel in ("phone", "call_center", "chat"):
        return rng.choice(CALL_CENTER)
    if channel in ("store", "visit", "letter", "email"):
        return rng.choice(STAFF)
    return None


def _marketing(story: _Story) -> None:
    """Campaigns and birthday greetings, only while marketing consent is granted."""
    rng, calendar = story.rng, story.calendar
    if not story.consent:
        return
    channel = story.marketing_channel
    for year in range(calendar.days // 365 + 2):
        for month, day, topic in CAMPAIGNS:
            at = calendar.at(year, month, day)
            if at is None or at <= story.registered:
                continue
            at += rng.randint(9 * HOUR, 11 * HOUR)
            if story.consents_at(at) and rng.random() < 0.85:
                story.contact(at, channel, "outbound", topic)
    if story.birthday is None:
        return
    month, day = story.birthday.month, story.birthday.day
    for year in range(calendar.days // 365 + 2):
        at = calendar.at(year, month, day)
        if at is not None and at > story.registered:
            at += 9 * HOUR
            if story.consents_at(at):
                story.contact(at, "sms", "outbound", "birthday greeting")


def _nps(story: _Story) -> None:
    """The half-yearly NPS survey wave; a sample of buyers answers (0-10)."""
    rng, calendar = story.rng, story.calendar
    for year in range(calendar.days // 365 + 2):
        for month in (1, 7):
            at = calendar.at(year, month, 15)
            if at is None or not any(o.at < at for o in story.orders) or rng.random() >= 0.18:
                continue
            story.survey(at + rng.randint(8 * HOUR, 22 * HOUR), "nps", story.score(0, 10))


# --- complaints -------------------------------------------------------------------------------


class _Steps:
    """A complaint's handling steps, kept strictly after the filing and after each other."""

    def __init__(self, story: _Story, complaint_id: str, filed_at: int) -> None:
        self.story, self.complaint_id = story, complaint_id
        self.filed_at = self.last = filed_at
        self.open = True  # False once a step fell after the period: nothing more happens

    def step(self, at: int, kind: str, actor: str | None, **data: Any) -> int:
        """Record a step at `at` (or just after the previous one); returns when it happened."""
        at = max(at, self.last + MINUTE)
        if self.open:
            body = {"complaint_id": self.complaint_id, "agent": actor} | data
            self.open = self.story.add(at, kind, "crm", actor, body)
        self.last = at
        return at


def _complaints(story: _Story, decks: _Decks) -> None:
    """One buyer in seven complains (some twice), a prospect now and then."""
    rng = story.rng
    if not (decks.complainers.draw() if story.orders else rng.random() < 0.05):
        return
    for n in range(1, 2 if rng.random() < 0.85 else 3):
        _complaint(story, f"K{story.no:05d}-{n}", decks)


def _complaint(story: _Story, complaint_id: str, decks: _Decks) -> None:
    """One complaint, greet → listen → calm → resolve → close → follow up."""
    rng = story.rng
    categories = list(CATEGORIES) if story.orders else ["staff attitude", "waiting time"]
    category = rng.choice(categories)
    root_cause, about_order, summary = CATEGORIES[category]
    order = rng.choice(story.orders) if about_order else None
    if order is not None:
        filed_at = order.at + rng.randint(HOUR, 30 * DAY)
    else:
        window = max(DAY, story.active_until - story.registered)
        filed_at = story.registered + rng.randint(HOUR, window)
    if filed_at >= story.calendar.end:
        return
    priority, how = decks.priorities.draw(), decks.handlings.draw()
    channel = rng.choices(COMPLAINT_CHANNELS, weights=COMPLAINT_CHANNEL_WEIGHTS)[0]
    agent = rng.choice(CALL_CENTER if SOURCE_OF[channel] == "call-center" else STAFF)
    # greet, listen: the customer's contact and the filing
    if not story.contact(
        filed_at, channel, "inbound", "complaint", agent, complaint_id=complaint_id
    ):
        return
    data: Data = {
        "complaint_id": complaint_id,
        "channel": channel,
        "category": category,
        "priority": priority,
        "summary": summary,
    }
    if order is not None:
        data["order_id"] = order.order_id
    story.add(filed_at, "ComplaintFiled", SOURCE_OF[channel], agent, data)
    target = SLA_TARGETS[Priority(priority)]
    first_response, resolution = target.first_response_hours * HOUR, target.resolution_hours * HOUR
    steps = _Steps(story, complaint_id, filed_at)
    # calm: the first response, on time or late (or never)
    if how.acknowledge != "never":
        factor = rng.uniform(0.1, 0.9) if how.acknowledge == "on_time" else rng.uniform(1.3, 6)
        at = steps.step(
            filed_at + int(first_response * factor),
            "ComplaintAcknowledged",
            agent,
            note="apologised and explained the next steps",
        )
        if steps.open:
            story.contact(at, "phone", "outbound", "complaint", agent, complaint_id=complaint_id)
    if how.escalate:
        steps.step(
            steps.last + rng.randint(10 * MINUTE, 6 * HOUR),
            "ComplaintEscalated",
            agent,
            to_team=rng.choice(("quality team", "regional manager", "after-sales lead")),
            reason="needs a decision above the front desk",
        )
    paused = 0
    if how.hold:
        at = steps.step(
            steps.last + rng.randint(HOUR, DAY),
            "ComplaintOnHold",
            agent,
            reason="waiting for photos and the receipt from the customer",
        )
        paused = rng.randint(1, 6) * DAY + rng.randint(0, 8 * HOUR)
        steps.step(at + paused, "ComplaintResumed", agent, note="customer sent the documents")
    if how.resolve != "never":
        _resolve(story, steps, how.resolve, resolution, paused, root_cause, order, agent)
        if how.reopen == "after_resolve":
            _reopen_and_resolve(story, steps, resolution, root_cause, agent)
    if how.close:
        _close(story, steps, how.close, agent)
        if how.reopen == "after_close":
            _reopen_and_resolve(story, steps, resolution, root_cause, agent)
            _close(story, steps, "resolved", agent)


def _resolve(
    story: _Story,
    steps: _Steps,
    speed: str,
    resolution: int,
    paused: int,
    root_cause: str,
    order: _Order | None,
    agent: str,
) -> None:
    """Resolve: sometimes with compensation or a refund; then ask how it went (CSAT)."""
    rng = story.rng
    if speed == "first_contact":
        due = steps.filed_at + rng.randint(5, 30) * MINUTE
    else:
        factor = rng.uniform(0.2, 0.9) if speed == "on_time" else rng.uniform(1.2, 3)
        due = steps.filed_at + int(resolution * factor) + paused
    extra: Data = {"root_cause": root_cause}
    refund = 0
    if order is not None and order.refundable > 0 and rng.random() < 0.3:
        refund = min(order.refundable, max(100, order.cents * rng.randint(10, 30) // 100))
        resolution_text = f"refunded {_money(refund)} on order {order.order_id}"
    elif rng.random() < 0.4:
        extra["compensation"] = _money(rng.randint(2, 40) * 500)
        resolution_text = "apologised and gave a service voucher"
    else:
        resolution_text = "fixed the problem and explained the cause"
    at = steps.step(due, "ComplaintResolved", agent, resolution=resolution_text, **extra)
    if not steps.open:
        return
    if refund and order is not None:
        data = {"order_id": order.order_id, "amount": _money(refund), "reason": "complaint"}
        if story.add(at + MINUTE, "PurchaseRefunded", order.source, agent, data):
            order.refunded += refund
    if rng.random() < 0.65:
        shift = 0.1 if speed != "late" else -0.3
        story.survey(
            at + rng.randint(1, 2) * DAY,
            "csat",
            story.score(1, 5, shift),
            complaint_id=steps.complaint_id,
        )


def _reopen_and_resolve(
    story: _Story, steps: _Steps, resolution: int, root_cause: str, agent: str
) -> None:
    """The customer was not satisfied: reopen, look again, resolve again."""
    rng = story.rng
    steps.step(
        steps.last + rng.randint(1, 10) * DAY,
        "ComplaintReopened",
        agent,
        reason=rng.choice(("problem came back", "compensation not received")),
    )
    if rng.random() < 0.5:
        steps.step(steps.last + rng.randint(1, 4) * HOUR, "ComplaintAcknowledged", agent)
    due = steps.last + int(resolution * rng.uniform(0.2, 0.8))
    steps.step(
        due,
        "ComplaintResolved",
        agent,
        resolution="looked into it again and settled it with the customer",
        root_cause=root_cause,
    )


def _close(story: _Story, steps: _Steps, outcome: str, agent: str) -> None:
    """Close the complaint, then follow up with the customer a few days later."""
    rng = story.rng
    at = steps.step(
        steps.last + rng.randint(HOUR, 5 * DAY), "ComplaintClosed", agent, outcome=outcome
    )
    if steps.open and outcome == "resolved" and rng.random() < 0.7:
        follow_up = _daytime(rng, at // DAY + rng.randint(3, 10), 10, 19)
        story.contact(
            follow_up,
            "phone",
            "outbound",
            "complaint follow-up",
            agent,
            complaint_id=steps.complaint_id,
        )


# --- the whole history -------------------------------------------------------------------------


def _customer(story: _Story, decks: _Decks) -> None:
    """All activities of one customer; the order of the calls matters for the random draws."""
    _register(story)
    _consent(story)
    _purchases(story)
    _profile_updates(story)
    _contacts(story)
    _marketing(story)
    _nps(story)
    _complaints(story, decks)


def generate_history(
    customers: int = 500, seed: int = 7, start: date = date(2024, 1, 1), days: int = 730
) -> list[dict[str, Any]]:
    """Events as JSON-ready dicts (the ingest format), sorted by occurred_at."""
    if customers < 0 or days < 1:
        raise ValueError("customers must be >= 0 and days >= 1")
    rng = Random(seed)
    calendar = _Calendar.of(start, days)
    decks = _Decks.of(rng)
    rows: list[Row] = []
    for no in range(1, customers + 1):
        story = _new_story(rng, calendar, no)
        _customer(story, decks)
        rows.extend(story.rows)
    rows.sort(key=itemgetter(0, 1, 2))
    return _to_events(rows, calendar)


def _to_events(rows: list[Row], calendar: _Calendar) -> list[dict[str, Any]]:
    """The ingest format: envelope plus data, with ids numbered in business-time order."""
    days = [(calendar.start + timedelta(days=d)).isoformat() for d in range(calendar.days)]
    offset = datetime.combine(calendar.start, time(), TZ).isoformat()[19:]  # "+08:00"

    def stamp(t: int) -> str:
        # what datetime.isoformat() gives, several times faster on 50k+ events
        day, seconds = divmod(t, DAY)
        hours, seconds = divmod(seconds, HOUR)
        return f"{days[day]}T{hours:02d}:{seconds // MINUTE:02d}:{seconds % MINUTE:02d}{offset}"

    return [
        {
            "type": kind,
            "customer_id": f"C{no:05d}",
            "occurred_at": stamp(at),
            "source_event_id": f"demo-{seq}",
            "source": source,
            "actor": actor,
            "data": {k: v for k, v in data.items() if v is not None},
        }
        for seq, (at, no, _, kind, source, actor, data) in enumerate(rows, start=1)
    ]
