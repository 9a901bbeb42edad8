"""The DuckDB schema of the projections, and opening the file.

Tables are created here once; each projection family fills its own tables. Reference
tables (`sla_targets`, `response_alarm_channels`, `survey_scales`, `loyalty_stages`) copy
the domain's rules so SQL can join them and analysts can read them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

from domain.events import SURVEY_SCALES
from domain.policy import STAGES, LadderPolicy, ResponsePolicy, SlaPolicy

log = logging.getLogger(__name__)

DDL = """
-- round(a / b, 4), half up, in exact integer arithmetic: DuckDB's DECIMAL division
-- returns a DOUBLE, and money must never pass through binary floats.
CREATE OR REPLACE MACRO money_div(a, b) AS CAST(CAST(
    (CAST(CAST(a AS DECIMAL(38, 8)) * 100000000 AS HUGEINT) * 2
     + CAST(CAST(b AS DECIMAL(38, 4)) * 10000 AS HUGEINT))
    // (2 * CAST(CAST(b AS DECIMAL(38, 4)) * 10000 AS HUGEINT))
    AS DECIMAL(38, 0)) * 0.0001 AS DECIMAL(38, 4));

-- An event's place in business time, (occurred_at, position), as one orderable number.
CREATE OR REPLACE MACRO event_key(t, position) AS
    epoch_us(t)::HUGEINT * 10000000000000 + position;

-- ISO-8601 in UTC with microseconds, as the JSON of derived events carries times.
CREATE OR REPLACE MACRO iso(t) AS strftime(t AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S.%fZ');

-- The large tables do not declare their keys (`KEYS` in projections/schema.py): a PRIMARY
-- KEY is an ART index, which DuckDB writes out whole at every checkpoint, and a writer
-- checkpoints each time it hands the file to readers (at a million events, a sixth of a
-- rebuild's time). The writers keep the keys unique: the projector deletes and inserts,
-- or updates, the rows of what a batch touches by their keys, the mirror appends only
-- event ids it does not hold (in the batch's transaction, one writer per file), and the
-- publisher writes one `derived_published` row per event. The tests check every key
-- wherever they compare projections.
CREATE TABLE IF NOT EXISTS events (
    position        BIGINT NOT NULL,          -- the event store's position
    event_id        UUID NOT NULL,
    type            VARCHAR NOT NULL,
    schema_version  INTEGER NOT NULL,
    customer_id     VARCHAR NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL,     -- business time
    recorded_at     TIMESTAMPTZ NOT NULL,     -- when the ledger stored it
    source          VARCHAR,
    actor           VARCHAR,
    source_event_id VARCHAR,
    data            JSON NOT NULL             -- the type's fields, personal data removed
);

CREATE TABLE IF NOT EXISTS customer_profiles (
    customer_id         VARCHAR NOT NULL,
    registered_at       TIMESTAMPTZ,
    region              VARCHAR,
    province            VARCHAR,
    city                VARCHAR,
    segment             VARCHAR,
    first_seen_at       TIMESTAMPTZ NOT NULL,
    last_seen_at        TIMESTAMPTZ NOT NULL,
    event_count         BIGINT NOT NULL,
    first_contact_at    TIMESTAMPTZ,
    last_contact_at     TIMESTAMPTZ,
    contact_count       BIGINT NOT NULL,
    inbound_contacts    BIGINT NOT NULL,
    outbound_contacts   BIGINT NOT NULL,
    purchase_count      BIGINT NOT NULL,
    gross_spend         DECIMAL(38, 4) NOT NULL,
    refunded            DECIMAL(38, 4) NOT NULL,
    total_spend         DECIMAL(38, 4) NOT NULL,  -- gross minus refunds, reporting currency
    avg_order_value     DECIMAL(38, 4),
    first_purchase_at   TIMESTAMPTZ,
    last_purchase_at    TIMESTAMPTZ,
    complaint_count     BIGINT NOT NULL,
    open_complaints     BIGINT NOT NULL,
    survey_count        BIGINT NOT NULL,
    avg_satisfaction    DECIMAL(6, 4),            -- mean survey score on a 0..1 scale
    last_satisfaction   DECIMAL(6, 4),
    marketing_consent   BOOLEAN,
    abc_class           VARCHAR,                  -- A: first 80 % of spend, B: to 95 %, C: rest
    loyalty_stage       VARCHAR NOT NULL
);

CREATE TABLE IF NOT EXISTS loyalty_stage_history (
    customer_id       VARCHAR NOT NULL,
    stage             VARCHAR NOT NULL,
    entered_at        TIMESTAMPTZ NOT NULL,
    exited_at         TIMESTAMPTZ,               -- NULL: the current stage
    previous_stage    VARCHAR,
    reason            VARCHAR NOT NULL,
    trigger_event_id  UUID NOT NULL
);

CREATE TABLE IF NOT EXISTS complaint_sla (
    customer_id                  VARCHAR NOT NULL,
    complaint_id                 VARCHAR NOT NULL,
    priority                     VARCHAR NOT NULL,
    category                     VARCHAR NOT NULL,
    channel                      VARCHAR NOT NULL,
    status                       VARCHAR NOT NULL,  -- open | on_hold | resolved | closed
    filed_at                     TIMESTAMPTZ NOT NULL,
    first_response_due           TIMESTAMPTZ NOT NULL,
    first_response_warning_at    TIMESTAMPTZ NOT NULL,
    first_response_at            TIMESTAMPTZ,
    first_response_status        VARCHAR NOT NULL,  -- pending | met | breached
    paused_hours                 DECIMAL(12, 4) NOT NULL,
    resolution_due               TIMESTAMPTZ NOT NULL,
    resolution_warning_at        TIMESTAMPTZ NOT NULL,
    resolved_at                  TIMESTAMPTZ,
    resolution_status            VARCHAR NOT NULL,  -- pending | met | breached
    escalations                  BIGINT NOT NULL,
    reopened                     BIGINT NOT NULL,
    closed_at                    TIMESTAMPTZ,
    root_cause                   VARCHAR,
    compensation                 DECIMAL(38, 4)
);

-- Waits for an answer (domain.policy.ResponsePolicy): from an inbound contact on an alarm
-- channel that concerns no complaint, to the next outbound contact to the customer.
CREATE TABLE IF NOT EXISTS response_waits (
    customer_id        VARCHAR NOT NULL,
    started_at         TIMESTAMPTZ NOT NULL,      -- the wait's first inbound contact
    started_by         UUID NOT NULL,             -- its event id
    channel            VARCHAR NOT NULL,          -- its channel
    contacts           BIGINT NOT NULL,           -- inbound contacts of the wait (alarm channels)
    alarm_at           TIMESTAMPTZ NOT NULL,      -- started_at + the channel's alarm hours
    answered_at        TIMESTAMPTZ,               -- the next outbound contact (NULL: none yet)
    answered_by        UUID,
    status             VARCHAR NOT NULL           -- waiting | overdue | answered | answered_late
);

CREATE TABLE IF NOT EXISTS derived_events (
    event_id     UUID NOT NULL,                   -- stable: the MD5 of what changed
    type         VARCHAR NOT NULL,                -- a type of the derived catalogue
    customer_id  VARCHAR NOT NULL,
    occurred_at  TIMESTAMPTZ NOT NULL,            -- when the transition happened
    data         JSON NOT NULL
);

-- The derived events handed to the derived topic's producer, with what a withdrawal needs
-- once a late event takes one back (NULL: published before schema version 5). Written
-- before sending, so a crash before the acknowledgement is known still knows what
-- subscribers may hold.
CREATE TABLE IF NOT EXISTS derived_published (
    event_id      UUID NOT NULL,
    type          VARCHAR,
    customer_id   VARCHAR,
    occurred_at   TIMESTAMPTZ,
    standing      BOOLEAN NOT NULL DEFAULT TRUE,  -- the last word sent on it is the event
                                                  -- (FALSE: a withdrawal)
    acknowledged  BOOLEAN NOT NULL DEFAULT TRUE,  -- the broker acknowledged that last word
    withdrawals   INTEGER NOT NULL DEFAULT 0      -- withdrawals sent for it, the last included
);

-- A withdrawal's id: what it withdraws, and which withdrawal of it this is (a transition
-- may hold again after a late event, and be withdrawn again).
CREATE OR REPLACE MACRO withdrawal_id(withdrawn, ordinal) AS
    md5('derived|withdrawn|' || withdrawn::VARCHAR || '|' || ordinal)::UUID;

CREATE TABLE IF NOT EXISTS projection_clock (
    singleton  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    as_of      TIMESTAMPTZ NOT NULL             -- the clock time-dependent values use
);

-- The domain's rules (domain/policy.py), for joins and for reading.
CREATE TABLE IF NOT EXISTS sla_targets (
    priority              VARCHAR PRIMARY KEY,
    first_response_hours  INTEGER NOT NULL,
    resolution_hours      INTEGER NOT NULL,
    warning_fraction      DECIMAL(4, 2) NOT NULL
);

CREATE TABLE IF NOT EXISTS response_alarm_channels (
    channel            VARCHAR PRIMARY KEY,
    alarm_after_hours  INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS survey_scales (
    kind     VARCHAR PRIMARY KEY,
    lowest   INTEGER NOT NULL,
    highest  INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS loyalty_stages (
    stage  VARCHAR PRIMARY KEY,
    rank   INTEGER NOT NULL,
    rule   VARCHAR NOT NULL
);

CREATE TABLE IF NOT EXISTS projection_meta (
    singleton       BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    schema_version  INTEGER NOT NULL            -- see SCHEMA_VERSION in projections/schema.py
);

CREATE TABLE IF NOT EXISTS projection_checkpoints (
    source     VARCHAR NOT NULL,                -- 'event-store', 'kafka:<group>', or
                                                -- 'kafka-relayed' (see RELAYED)
    stream     VARCHAR NOT NULL,                -- '', '<topic>:<partition>', or '<topic>'
    position   BIGINT NOT NULL,                 -- last store position / next Kafka offset
    PRIMARY KEY (source, stream)
);

-- What the projections carry from batch to batch, so each batch reads only its own
-- events (see the modules that fill them). Not for analysts: schema `internal`.
CREATE SCHEMA IF NOT EXISTS internal;

-- Per-customer running totals; customer_profiles is computed from them. A `*_key` is the
-- event_key of the event the value beside it came from (the latest wins).
CREATE TABLE IF NOT EXISTS internal.profile_totals (
    customer_id             VARCHAR NOT NULL,
    registered_at           TIMESTAMPTZ,
    region                  VARCHAR,
    region_key              HUGEINT,
    province                VARCHAR,
    province_key            HUGEINT,
    city                    VARCHAR,
    city_key                HUGEINT,
    segment                 VARCHAR,
    segment_key             HUGEINT,
    first_seen_at           TIMESTAMPTZ NOT NULL,
    last_seen_at            TIMESTAMPTZ NOT NULL,
    event_count             BIGINT NOT NULL,
    first_contact_at        TIMESTAMPTZ,
    last_contact_at         TIMESTAMPTZ,
    contact_count           BIGINT NOT NULL,
    inbound_contacts        BIGINT NOT NULL,
    outbound_contacts       BIGINT NOT NULL,
    purchase_count          BIGINT NOT NULL,
    gross_spend             DECIMAL(38, 4) NOT NULL,
    refunded                DECIMAL(38, 4) NOT NULL,
    first_purchase_at       TIMESTAMPTZ,
    last_purchase_at        TIMESTAMPTZ,
    survey_count            BIGINT NOT NULL,
    satisfaction_sum        DECIMAL(18, 4) NOT NULL,
    last_satisfaction       DECIMAL(6, 4),
    last_satisfaction_key   HUGEINT,
    marketing_consent       BOOLEAN,
    marketing_consent_key   HUGEINT
);

-- Every order's amount, its amount in the reporting currency, and what was refunded of
-- it: refunds convert at the order's rate, all of them together (so a refund in full
-- cancels the order's spend exactly, however many parts it came in).
CREATE TABLE IF NOT EXISTS internal.orders (
    customer_id  VARCHAR NOT NULL,
    order_id     VARCHAR NOT NULL,
    amount       DECIMAL(18, 4) NOT NULL,
    spend        DECIMAL(18, 4) NOT NULL,
    refunded     DECIMAL(38, 4) NOT NULL   -- in the order's currency, all refunds so far
);

-- The events that move a customer on the ladder: purchases and surveys.
CREATE TABLE IF NOT EXISTS internal.ladder_facts (
    customer_id   VARCHAR NOT NULL,
    event_id      UUID NOT NULL,
    type          VARCHAR NOT NULL,
    occurred_at   TIMESTAMPTZ NOT NULL,
    key           HUGEINT NOT NULL,
    satisfaction  DECIMAL(6, 4)
);

-- Where each customer stands on the ladder after the latest of its ladder facts.
CREATE TABLE IF NOT EXISTS internal.ladder_positions (
    customer_id        VARCHAR NOT NULL,
    first_event_id     UUID NOT NULL,           -- the customer's first event of any type
    first_type         VARCHAR NOT NULL,
    first_at           TIMESTAMPTZ NOT NULL,
    first_key          HUGEINT NOT NULL,
    last_key           HUGEINT NOT NULL,        -- the latest fact (or first event) applied
    purchases          BIGINT NOT NULL,
    first_purchase     TIMESTAMPTZ,
    last_purchase      TIMESTAMPTZ,
    last_satisfaction  DECIMAL(6, 4),
    stage              VARCHAR NOT NULL
);

-- Every complaint event, typed: a complaint's SLA clocks are recomputed from its steps.
CREATE TABLE IF NOT EXISTS internal.complaint_steps (
    customer_id   VARCHAR NOT NULL,
    complaint_id  VARCHAR NOT NULL,
    type          VARCHAR NOT NULL,
    occurred_at   TIMESTAMPTZ NOT NULL,
    position      BIGINT NOT NULL,
    priority      VARCHAR,
    category      VARCHAR,
    channel       VARCHAR,
    root_cause    VARCHAR,
    compensation  DECIMAL(18, 4)
);

-- Contacts that start or end a wait for an answer: inbound ones that concern no
-- complaint (any channel: the policy's channels are applied when waits are computed) and
-- every outbound one.
CREATE TABLE IF NOT EXISTS internal.contact_turns (
    customer_id  VARCHAR NOT NULL,
    event_id     UUID NOT NULL,
    occurred_at  TIMESTAMPTZ NOT NULL,
    position     BIGINT NOT NULL,
    direction    VARCHAR NOT NULL,
    channel      VARCHAR NOT NULL
);
"""

#: Bumped whenever the DDL, a table's meaning or the carried state changes: a file built by another
#: version must be rebuilt (`ledger rebuild`), not updated in place.
SCHEMA_VERSION = 6

KEYS: dict[str, tuple[str, ...]] = {
    "events": ("event_id",),
    "customer_profiles": ("customer_id",),
    "loyalty_stage_history": ("customer_id", "trigger_event_id"),
    "complaint_sla": ("customer_id", "complaint_id"),
    "response_waits": ("customer_id", "started_by"),
    "derived_events": ("event_id",),
    "derived_published": ("event_id",),
}
"""What identifies a row of each table the projections fill: unique, though not declared
(see the DDL). The small tables declare theirs."""


def _reference_rows(
    sla: SlaPolicy, ladder: LadderPolicy, response: ResponsePolicy
) -> dict[str, list[tuple[Any, ...]]]:
    """The rows the reference tables must hold for these policies."""
    return {
        "sla_targets": [
            (p.value, t.first_response_hours, t.resolution_hours, sla.warning_fraction)
            for p, t in sla.targets.items()
        ],
        "response_alarm_channels": [
            (channel.value, response.alarm_after_hours) for channel in response.channels
        ],
        "survey_scales": [(kind.value, low, high) for kind, (low, high) in SURVEY_SCALES.items()],
        "loyalty_stages": [
            (stage, rank, _RULES[stage](ladder)) for rank, stage in enumerate(STAGES)
        ],
    }


def _refresh_reference_tables(
    con: duckdb.DuckDBPyConnection,
    sla: SlaPolicy,
    ladder: LadderPolicy,
    response: ResponsePolicy,
) -> None:
    """Rewrite a reference table only when the policy changed (an unchanged file stays
    unchanged: nothing to fold into it when the writer lets go)."""
    for table, rows in _reference_rows(sla, ladder, response).items():
        stored = con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
        if sorted(map(_text, stored)) != sorted(map(_text, rows)):
            run(con, f"DELETE FROM {table}")
            if not rows:
                continue
            row = f"({', '.join('?' * len(rows[0]))})"
            run(
                con,
                f"INSERT INTO {table} VALUES {', '.join([row] * len(rows))}",
                [value for values in rows for value in values],
            )


def _text(row: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(value) for value in row)


_RULES: dict[str, Callable[[LadderPolicy], str]] = {
    "potential": lambda p: "known to the ledger, nothing bought yet",
    "new": lambda p: "at least one purchase",
    "satisfied": lambda p: f"a purchase and latest survey >= {p.positive_satisfaction}",
    "retained": lambda p: (
        f"a purchase {p.repeat_after_days}+ days after the first; latest survey (if any) "
        f">= {p.content_satisfaction}"
    ),
    "loyal": lambda p: (
        f"{p.loyal_purchases}+ purchases over {p.loyal_span_days}+ days; latest survey "
        f"(if any) >= {p.content_satisfaction}"
    ),
}


def run(con: duckdb.DuckDBPyConnection, sql: str, params: object = None) -> None:
    """Execute statements and drain the result: DuckDB wants it finished before more work."""
    con.execute(sql, params).fetchall()


def one(con: duckdb.DuckDBPyConnection, sql: str, params: object = None) -> tuple[Any, ...] | None:
    """The first row of a query (drained, like `run`), or None."""
    rows = con.execute(sql, params).fetchall()
    return rows[0] if rows else None


class ProjectionsUnavailable(RuntimeError):
    """The projections file cannot be used now; the message says what to do."""


class ProjectionsBusy(ProjectionsUnavailable):
    """Another process holds the projections file for writing."""


class ProjectionsOutdated(ProjectionsUnavailable):
    """The projections file was built by another version of the projections."""


LOCKED_SAY_EVERY_SECONDS = 30.0


def connect(
    path: Path | str, *, read_only: bool = False, wait_seconds: float | None = 30.0
) -> duckdb.DuckDBPyConnection:
    """Open the projections file; waits while another process holds the lock, at most
    `wait_seconds` (None: as long as it takes, saying so every
    `LOCKED_SAY_EVERY_SECONDS`: for a follower, which has nothing better to do)."""
    started = time.monotonic()
    said = started
    if not read_only:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as error:
            if "lock" not in str(error).lower():
                raise
            now = time.monotonic()
            if wait_seconds is not None and now - started > wait_seconds:
                raise ProjectionsBusy(
                    f"{path} is locked by another process (a writer such as `ledger consume "
                    "--follow`, `project --follow` or ingest, or a reader holding it open); "
                    f"try again when it is idle: {error}"
                ) from error
            if wait_seconds is None and now - said > LOCKED_SAY_EVERY_SECONDS:
                log.warning("waiting %.0f s so far for %s: another process holds it",
                            now - started, path)  # fmt: skip
                said = now
            time.sleep(0.01)
    run(con, "SET TimeZone = 'UTC'")
    return con


def stored_clock(con: duckdb.DuckDBPyConnection) -> datetime | None:
    """The as-of clock a projections file was computed at (None for a new file)."""
    try:
        row = one(con, "SELECT as_of FROM projection_clock")
    except duckdb.CatalogException:
        return None
    return row[0] if row else None


RELAYED = "kafka-relayed"
"""The checkpoint source (stream: the events topic) holding the highest `ce_ledgerrelayed`
among the records applied: every event up to that store position was on the topic."""


def relayed_until(con: duckdb.DuckDBPyConnection, topic: str) -> datetime | None:
    """The latest business time among the events applied at or below the `RELAYED` position
    of `topic` (None: none known). Every event up to there was on the topic: a consumer
    that has read its partitions to their ends since has read all of its customers' ones,
    and events recorded later happened later (a backfill aside)."""
    try:
        row = one(
            con,
            """
            SELECT max(occurred_at) FROM events
            WHERE position <= (SELECT position FROM projection_checkpoints
                               WHERE source = ? AND stream = ?)
            """,
            [RELAYED, topic],
        )
    except duckdb.CatalogException:  # a new file
        return None
    return row[0] if row else None


def stored_checkpoints(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, int]]:
    """Where each source stands in a projections file: (source, stream, next position)."""
    try:
        rows = con.execute(
            "SELECT source, stream, position FROM projection_checkpoints ORDER BY ALL"
        ).fetchall()
    except duckdb.CatalogException:
        return []
    return [(source, stream, int(position)) for source, stream, position in rows]


def create_schema(
    con: duckdb.DuckDBPyConnection,
    sla: SlaPolicy | None = None,
    ladder: LadderPolicy | None = None,
    response: ResponsePolicy | None = None,
) -> None:
    """Create what is missing, in one transaction (a process killed meanwhile leaves the
    file as it was); a file of another schema version is refused untouched."""
    version = check_version(con)
    con.begin()
    try:
        if version is None:
            run(con, DDL)
            run(con, "INSERT INTO projection_meta VALUES (TRUE, ?)", [SCHEMA_VERSION])
        _refresh_reference_tables(
            con, sla or SlaPolicy(), ladder or LadderPolicy(), response or ResponsePolicy()
        )
        con.commit()
    except BaseException:
        con.rollback()
        raise


def check_version(con: duckdb.DuckDBPyConnection) -> int | None:
    """The file's schema version (None: a new file); `ProjectionsOutdated` when it is
    another than this ledger's."""
    version = _stored_version(con)
    if version is not None and version != SCHEMA_VERSION:
        raise ProjectionsOutdated(
            f"the projections file holds schema version {version}, this ledger writes "
            f"version {SCHEMA_VERSION}: run `ledger rebuild` to rebuild it from the events"
        )
    return version


def _stored_version(con: duckdb.DuckDBPyConnection) -> int | None:
    """The file's schema version; None for a new file; 1 for files from before
    `projection_meta` existed."""
    if not _has_table(con, "projection_checkpoints"):
        return None
    if not _has_table(con, "projection_meta"):
        return 1
    row = one(con, "SELECT schema_version FROM projection_meta")
    return int(row[0]) if row else 1


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    row = one(
        con,
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = 'main' AND table_name = ?",
        [name],
    )
    return bool(row and row[0])
