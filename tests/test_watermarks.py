"""The as-of clock without events: on the embedded path `project --follow --as-of now`
keeps it at the wall clock; through Kafka, `consume --as-of` moves it with the relay's
watermarks, and only once the member has read what each one vouches for.

A complaint nobody touches must breach on time, not when some other event comes by. The
Kafka tests run against the real broker (the session's); nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from conftest import (
    PROJECT_ROOT,
    FollowingMember,
    accept,
    differences,
    event,
    read_topic,
    tables,
    wait_until,
)
from kafka import KafkaAdminClient, TopicPartition

from bootstrap import Settings, open_ledger
from consumers import kafka_projection, relay, watermarks
from consumers.cloudevents import Watermark
from consumers.kafka import KafkaSettings, ensure_topics, producer, watched
from consumers.kafka_decoding import stream
from consumers.status import pipeline_status
from consumers.store_follower import catch_up
from domain.ledger import Ledger
from projections.projector import LiveClock
from projections.schema import connect, stored_clock

LIVE = LiveClock()


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def untouched_complaint(ledger: Ledger, filed_at: datetime, customer: str = "C-1") -> None:
    """An urgent complaint (first response due in 1 h, warned at 45 min) that nobody
    answers, and no other event after it."""
    accept(ledger, [
        event("CustomerRegistered", customer, iso(filed_at - timedelta(hours=1))),
        event("ComplaintFiled", customer, iso(filed_at), {"complaint_id": "c1",
              "channel": "email", "category": "billing", "priority": "urgent"}),
    ])  # fmt: skip


def first_response(path: Path) -> tuple[str, datetime | None]:
    """The complaint's first-response status, and the projections' clock."""
    con = connect(path, read_only=True)
    try:
        (status,) = con.execute("SELECT first_response_status FROM complaint_sla").fetchone() or ()
        return str(status), stored_clock(con)
    finally:
        con.close()


def sla_sent(kafka: KafkaSettings) -> list[str]:
    return [fact["type"] for fact in derived_sent(kafka) if fact["type"].startswith("Sla")]


# --- the embedded path ----------------------------------------------------------------------


def test_a_follower_kept_at_now_breaches_a_complaint_nobody_touches_on_time(
    ledger: Ledger, settings: Settings
) -> None:
    """The first response falls due a few seconds after `project --follow --as-of now`
    starts, and no event comes: the follower's clock moves with the wall clock, so the
    breach shows anyway. A clock fixed at the start (`--as-of` a moment) leaves it
    pending."""
    due = datetime.now(UTC) + timedelta(seconds=3)
    untouched_complaint(ledger, due - timedelta(hours=1))
    path = settings.projections_path
    catch_up(ledger, path, as_of=datetime.now(UTC))
    assert first_response(path)[0] == "pending"

    environment = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    environment["LEDGER_CLOCK_LAG_SECONDS"] = "0"  # events are recorded as they happen
    command = [sys.executable, "-m", "cli", "--data-dir", str(settings.data_dir),
               "project", "--follow", "--as-of", "now"]  # fmt: skip
    follower = subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=environment, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: unless_busy(first_response, path) == "breached", 60,
                   "the breach did not show")  # fmt: skip
    finally:
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err[-2000:]
    status, clock = first_response(path)
    assert status == "breached" and clock is not None and clock >= due


def unless_busy(read: Callable[[Path], tuple[str, Any]], path: Path) -> str | None:
    """What `read` says of the file, or None while the follower holds it."""
    try:
        return read(path)[0]
    except duckdb.IOException:  # the lock: try again
        return None


# --- through Kafka: a catch-up --------------------------------------------------------------


@pytest.mark.kafka
def test_a_catch_up_following_the_watermarks_breaches_what_no_event_would(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """The complaint was filed 3 h ago; nothing came since. Without `as_of` the clock
    stays at the filing and nothing is due; with it, the clock moves to the watermark
    the relay sent when it found nothing new, and the warning and the breach go out."""
    untouched_complaint(ledger, datetime.now(UTC) - timedelta(hours=3))
    relay.run(ledger, kafka_settings, tmp_path / "relay.json")
    path = settings.projections_path

    kafka_projection.consume(path, kafka_settings)
    assert first_response(path)[0] == "pending"
    assert sla_sent(kafka_settings) == []

    report = kafka_projection.consume(path, kafka_settings, as_of=LiveClock())
    latest = watermarks.latest(kafka_settings)
    assert latest is not None and report.watermark == latest.complete_until
    assert report.clock == latest.complete_until
    assert first_response(path) == ("breached", latest.complete_until)
    assert sla_sent(kafka_settings) == ["SlaWarning", "SlaBreached"]


@pytest.mark.kafka
def test_a_catch_up_goes_no_further_than_the_moment_asked_for(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """`--as-of` a moment 50 min after the filing: past the warning (45 min), before the
    breach (60 min); the watermark vouches for later, the clock stops at the moment."""
    filed = datetime.now(UTC) - timedelta(hours=3)
    untouched_complaint(ledger, filed)
    relay.run(ledger, kafka_settings, tmp_path / "relay.json")
    path = settings.projections_path
    moment = filed + timedelta(minutes=50)

    report = kafka_projection.consume(path, kafka_settings, as_of=moment)
    assert report.clock == moment
    assert first_response(path) == ("pending", moment)
    assert sla_sent(kafka_settings) == ["SlaWarning"]


@pytest.mark.kafka
def test_without_a_watermark_the_clock_moves_with_the_events_only(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """A relay told to send none (LEDGER_RELAY_WATERMARK_SECONDS=0): nothing vouches
    for later than the events, and the report says there was no watermark."""
    filed = datetime.now(UTC) - timedelta(hours=3)
    untouched_complaint(ledger, filed)
    relay.run(ledger, silent(kafka_settings), tmp_path / "relay.json")
    assert watermarks.latest(kafka_settings) is None
    path = settings.projections_path

    report = kafka_projection.consume(path, kafka_settings, as_of=LiveClock())
    assert report.watermark is None and report.clock is None
    assert first_response(path) == ("pending", filed)
    assert sla_sent(kafka_settings) == []


@pytest.mark.kafka
def test_a_watermark_ahead_of_this_hosts_time_moves_the_clock_no_further_than_now(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """A relay host whose clock runs 3 h fast vouches for 3 h ahead; the clock never goes
    back, so trusting it would breach a complaint due in 50 min for good (a review's
    finding). The clock stops at the consumer's own time."""
    filed = datetime.now(UTC) - timedelta(minutes=10)
    untouched_complaint(ledger, filed)
    state = relay.run(ledger, silent(kafka_settings), tmp_path / "relay.json")
    send_watermark(kafka_settings, datetime.now(UTC) + timedelta(hours=3), state)

    path = settings.projections_path
    before = datetime.now(UTC)
    report = kafka_projection.consume(path, kafka_settings, as_of=LIVE)
    status, clock = first_response(path)
    assert report.clock is not None and before <= report.clock <= datetime.now(UTC)
    assert (status, clock) == ("pending", report.clock)
    assert sla_sent(kafka_settings) == []


@pytest.mark.kafka
@pytest.mark.parametrize("position_file", ["current", "without ends"])
def test_a_watermark_vouches_for_nothing_once_the_events_topic_lost_its_records(
    ledger: Ledger,
    settings: Settings,
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    position_file: str,
) -> None:
    """The acknowledgement in time was relayed, and a watermark vouched for it; then the
    events topic is re-created empty (before the republish the README prescribes). The
    old watermark's per-partition ends lie beyond the new topic's: it is ignored, and the
    complaint is not breached for want of an event the topic lost (a review's finding).
    So also when the relay's position file was written before it kept partition ends:
    the watermark names, for every partition, the end the relay's topic check found
    (with no ends it vouched for the empty topic: the second review's finding)."""
    filed = datetime.now(UTC) - timedelta(hours=3)
    untouched_complaint(ledger, filed)
    state_path = tmp_path / "relay.json"
    relay.run(ledger, silent(kafka_settings), state_path)
    path = settings.projections_path
    kafka_projection.consume(path, kafka_settings)
    accept(ledger, [event("ComplaintAcknowledged", "C-1", iso(filed + timedelta(minutes=10)),
                          {"complaint_id": "c1"})])  # fmt: skip
    relay.run(ledger, silent(kafka_settings), state_path)
    if position_file == "without ends":
        written = orjson.loads(state_path.read_bytes())
        del written["ends"]  # as a version before watermarks wrote it
        state_path.write_bytes(orjson.dumps(written))
    relay.run(ledger, kafka_settings, state_path)  # nothing new: a watermark
    mark = watermarks.latest(kafka_settings)
    assert mark is not None and set(mark.ends) == set(range(kafka_settings.partitions))
    assert sum(mark.ends.values()) == 3

    admin = KafkaAdminClient(**kafka_settings.client_options(), **watched())
    try:
        admin.delete_topics([kafka_settings.topic])
    finally:
        admin.close()
    wait_until(lambda: recreated(kafka_settings), 30, "the topic was not re-created")
    found = pipeline_status(ledger, event_store=settings.event_store_label,
                            projections_path=path, relay_state_path=state_path,
                            kafka=kafka_settings)  # fmt: skip
    assert found.relay_watermark is None  # it vouches for nothing now

    report = kafka_projection.consume(path, kafka_settings, as_of=LIVE)
    assert report.watermark is None and report.clock is None
    assert first_response(path) == ("pending", filed)
    assert sla_sent(kafka_settings) == []


def recreated(kafka: KafkaSettings) -> bool:
    """`ledger kafka init` once the broker has let go of the deleted topic; whether the
    topic is there and empty."""
    try:
        ensure_topics(kafka)
        return read_topic(kafka, kafka.topic) == []
    except Exception:  # still being deleted
        return False


@pytest.mark.kafka
@pytest.mark.parametrize("lag_hours", [0, 2])
def test_the_live_clocks_lag_keeps_an_answer_recorded_late_from_raising_an_alarm(
    ledger: Ledger,
    settings: Settings,
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    lag_hours: int,
) -> None:
    """An urgent complaint filed 2 h ago was acknowledged in time (1 h 30 ago), but the
    acknowledgement is recorded only now (a file ingested late). With no lag, the clock
    had passed the deadline: the warning and breach went out, and are withdrawn once the
    answer comes. With a lag longer than the ingestion's delay, nothing goes out."""
    filed = datetime.now(UTC) - timedelta(hours=2)
    untouched_complaint(ledger, filed)
    state_path = tmp_path / "relay.json"
    path = settings.projections_path
    live = LiveClock(timedelta(hours=lag_hours))
    relay.run(ledger, kafka_settings, state_path)
    kafka_projection.consume(path, kafka_settings, as_of=live)

    accept(ledger, [event("ComplaintAcknowledged", "C-1", iso(filed + timedelta(minutes=30)),
                          {"complaint_id": "c1"})])  # fmt: skip
    relay.run(ledger, kafka_settings, state_path)
    kafka_projection.consume(path, kafka_settings, as_of=live)
    assert first_response(path)[0] == "met"
    sent = [fact["type"] for fact in derived_sent(kafka_settings)]
    alarms = ["SlaWarning", "SlaBreached", "DerivedEventWithdrawn", "DerivedEventWithdrawn"]
    assert [t for t in sent if t != "LoyaltyStageChanged"] == ([] if lag_hours else alarms)


@pytest.mark.kafka
def test_a_rebuild_from_kafka_equals_projections_whose_clock_the_watermarks_moved(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """Deterministic projections: the rebuild keeps the clock the watermarks moved, and
    equals the live file table for table."""
    base = datetime.now(UTC) - timedelta(hours=6)
    state_path = tmp_path / "relay.json"
    path = settings.projections_path
    for n in range(3):
        untouched_complaint(ledger, base + timedelta(hours=n), customer=f"C-{n}")
        relay.run(ledger, kafka_settings, state_path)
        report = kafka_projection.consume(path, kafka_settings, as_of=LIVE)
        assert report.clock is not None
    live = tables(path)
    kafka_projection.rebuild_from_kafka(path, kafka_settings)
    assert differences(tables(path), live) == {}


def silent(kafka: KafkaSettings) -> KafkaSettings:
    """A relay's settings that send no watermark."""
    return dataclasses.replace(kafka, watermark_seconds=0)


def send_watermark(kafka: KafkaSettings, read_at: datetime, state: relay.RelayState) -> None:
    """What the relay sends, as if its host's clock read `read_at`: every partition named."""
    ends = {partition: state.ends.get(partition, 0) for partition in range(kafka.partitions)}
    sender = producer(kafka, **watched())
    try:
        watermarks.send(sender, kafka, watermarks.mark(read_at, state.position, ends))
    finally:
        sender.close()


def derived_sent(kafka: KafkaSettings) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in read_topic(kafka, kafka.derived_topic)]


# --- through Kafka: a group member following the topic --------------------------------------


@contextmanager
def relaying(settings: Settings, kafka: KafkaSettings, state: Path) -> Iterator[None]:
    """A relay following the store (its own ledger handle), sending a watermark every
    second while it has nothing new."""
    ledger = open_ledger(settings)
    stop = threading.Event()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            relay.run(ledger, dataclasses.replace(kafka, watermark_seconds=1), state,
                      follow=True, poll_seconds=0.05, should_stop=stop.is_set)  # fmt: skip
        except BaseException as error:  # handed to the test
            failure.append(error)

    thread = threading.Thread(target=work, name="relay", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not failure, failure


@pytest.mark.kafka
def test_a_following_member_breaches_a_complaint_nobody_touches_with_the_watermarks(
    ledger: Ledger, settings: Settings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """A member following the topic and the clock (`consume --follow --as-of now`), a
    relay with nothing new after the complaint: while idle, the member reads the latest
    watermark, finds its partitions read to their ends, moves the clock and publishes
    the warning and the breach, with no further event."""
    untouched_complaint(ledger, datetime.now(UTC) - timedelta(hours=3))
    path = settings.projections_path
    with (
        relaying(settings, kafka_settings, tmp_path / "relay.json"),
        FollowingMember(path, kafka_settings, kafka_settings.group, as_of=LiveClock()) as member,
    ):
        wait_until(lambda: member.has_projected(2), 60, "the member did not project")
        wait_until(lambda: sla_sent(kafka_settings) == ["SlaWarning", "SlaBreached"], 60,
                   "the member did not publish the breach")  # fmt: skip
    status, clock = first_response(path)
    assert status == "breached"
    assert clock is not None and clock > datetime.now(UTC) - timedelta(minutes=5)


# --- the quiet check's order ----------------------------------------------------------------


class _Answers:
    """A member's feed as the quiet check sees it: the watermark and the ends it answers,
    and the order it was asked in."""

    topic = "t"

    def __init__(self, watermark: Watermark, ends: dict[TopicPartition, int]) -> None:
        self._watermark, self._ends, self.asked = watermark, ends, []

    def watermark(self) -> Future[Watermark | None]:
        self.asked.append("watermark")
        return _done(self._watermark)

    def ends(self) -> Future[dict[TopicPartition, int] | None]:
        self.asked.append("ends")
        return _done(dict(self._ends))

    def read_to(self, ends: dict[TopicPartition, int], handed: dict[str, int]) -> bool:
        return all(handed.get(stream(tp)) == end for tp, end in ends.items())


def _done(value: Any) -> Future[Any]:
    done: Future[Any] = Future()
    done.set_result(value)
    return done


def checked(answers: _Answers, handed: dict[str, int], as_of: Any = LIVE) -> Any:
    """Run a quiet check to its end; what it vouched for."""
    check = kafka_projection._QuietCheck(0.0, as_of)
    for _ in range(10):
        found = check.step(True, False, None, answers, handed)  # type: ignore[arg-type]
        if found is not None:
            return found
    return None


def test_a_member_moves_the_clock_only_once_read_to_the_ends_asked_after_the_watermark() -> None:
    """The ends are asked for after the watermark was read: a partition read short of
    them may lack events the watermark vouches for, so the clock stays."""
    tp = TopicPartition("t", 0)
    mark = Watermark(datetime(2026, 1, 1, 12, tzinfo=UTC), 40, {0: 5})
    short = _Answers(mark, {tp: 5})
    assert checked(short, {stream(tp): 4}) is None
    assert len(short.asked) >= 2  # checked again and again, each time in that order
    assert short.asked == (["watermark", "ends"] * len(short.asked))[: len(short.asked)]

    read = _Answers(mark, {tp: 5})
    found = checked(read, {stream(tp): 5})
    assert found is not None and found.clock == mark.complete_until and found.publish
    assert read.asked == ["watermark", "ends"]

    capped = checked(_Answers(mark, {tp: 5}), {stream(tp): 5}, datetime(2026, 1, 1, 9, tzinfo=UTC))
    assert capped.clock == datetime(2026, 1, 1, 9, tzinfo=UTC)
    lagging = checked(_Answers(mark, {tp: 5}), {stream(tp): 5}, LiveClock(timedelta(hours=1)))
    assert lagging.clock == datetime(2026, 1, 1, 11, tzinfo=UTC)

    # the topic ends before the watermark's own end: it lost data since (re-created)
    lost = _Answers(mark, {tp: 3})
    assert checked(lost, {stream(tp): 3}) is None


class _Bound:
    """The projector thread as a sharing member's quiet check uses it: the file's bound."""

    def __init__(self, bound: datetime | None) -> None:
        self.bound = bound

    def submit(self, function: Callable[[Any], Any]) -> Future[Any]:
        return _done(function(self))

    def relayed_until(self, topic: str) -> datetime | None:
        return self.bound


def test_a_sharing_member_trusts_a_watermark_from_the_future_no_further_than_now() -> None:
    """The relay's host runs 3 h fast, then the relay stops. A publishing member sharing
    the topic moves the clock no further than its own time, and publishes no further:
    each later check, moving the clock on, publishes what that reveals (publishing up to
    the watermark's future time, it published nothing more after the first: a review's
    finding)."""
    tp = TopicPartition("t", 0)
    ahead = Watermark(datetime.now(UTC) + timedelta(hours=3), 40, {0: 5})
    answers = _Answers(ahead, {tp: 5})
    check = kafka_projection._QuietCheck(0.0, LIVE)
    projector = _Bound(datetime.now(UTC) - timedelta(hours=1))

    def vouched() -> Any:
        for _ in range(10):
            found = check.step(True, True, projector, answers, {stream(tp): 5})  # type: ignore[arg-type]
            if found is not None:
                return found
        return None

    first = vouched()
    assert first is not None and first.publish and first.clock == first.publish_until
    assert first.publish_until <= datetime.now(UTC)
    time.sleep(0.05)
    second = vouched()
    assert second is not None and second.publish and second.clock > first.clock
    assert second.publish_until == second.clock


def test_a_quiet_member_asks_the_broker_for_its_ends_only_when_there_is_news() -> None:
    """Once the clock moved to a watermark, the same watermark again asks for no ends (a
    probe of the broker every few seconds, for nothing)."""
    tp = TopicPartition("t", 0)
    answers = _Answers(Watermark(datetime(2026, 1, 1, 12, tzinfo=UTC), 40, {0: 5}), {tp: 5})
    check = kafka_projection._QuietCheck(0.0, LIVE)

    def step() -> Any:
        return check.step(True, False, None, answers, {stream(tp): 5})  # type: ignore[arg-type]

    assert next(filter(None, (step() for _ in range(10))), None) is not None
    answers.asked.clear()
    assert [step() for _ in range(10)] == [None] * 10
    assert answers.asked and set(answers.asked) == {"watermark"}
