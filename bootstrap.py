"""Wiring: read the configuration once and build the ledger and the projection paths.

Entrypoints (cli.py, tests, benchmarks) call `Settings.from_env()` and `open_ledger()`;
nothing else reads the environment. Every variable is documented in the README.
"""

from __future__ import annotations

import base64
import binascii
import os
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from eventsourcing.persistence import DatabaseError
from pydantic import TypeAdapter, ValidationError
from pydantic_extra_types.currency_code import ISO4217

from consumers.kafka import KafkaSettings
from domain.ledger import Ledger


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable and the fix."""


_CURRENCY: TypeAdapter[ISO4217] = TypeAdapter(ISO4217)
"""The event catalogue's currency validator: a reporting currency it would refuse in
every purchase (XYZ) is refused here, at start-up."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("ledger-data")
    event_store: str | None = None  # postgresql://user:pass@host:port/db?schema=s
    reporting_currency: str = "EUR"
    cipher_key: str | None = None
    kafka: KafkaSettings | None = None
    # how late events may be recorded after they happened: `--as-of now` keeps the clock
    # that far behind the time (`projections.projector.LiveClock`)
    clock_lag: timedelta = timedelta(seconds=300)
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(
        cls, data_dir: Path | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        """From `env` (default: the process environment); raises ConfigError naming the
        variable that is malformed."""
        env = os.environ if env is None else env
        text = env.get("LEDGER_REPORTING_CURRENCY", "EUR").upper()
        try:
            currency = str(_CURRENCY.validate_python(text))
        except ValidationError:
            raise ConfigError(
                f"LEDGER_REPORTING_CURRENCY={text!r}: expected an ISO 4217 currency code "
                "such as EUR"
            ) from None
        try:
            kafka = KafkaSettings.from_env(env)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        event_store = env.get("LEDGER_EVENT_STORE") or None
        if event_store:
            _postgres_env(event_store)  # raises ConfigError for what is no PostgreSQL URL
        cipher_key = env.get("LEDGER_CIPHER_KEY") or None
        if cipher_key:
            _check_cipher_key(cipher_key)
        return cls(
            data_dir=data_dir or Path(env.get("LEDGER_DATA_DIR", "ledger-data")),
            event_store=event_store,
            reporting_currency=currency,
            cipher_key=cipher_key,
            kafka=kafka,
            clock_lag=_seconds(env, "LEDGER_CLOCK_LAG_SECONDS", 300),
        )

    @property
    def projections_path(self) -> Path:
        return self.data_dir / "projections.duckdb"

    @property
    def relay_state_path(self) -> Path:
        return self.data_dir / "relay-position.json"

    @property
    def rejects_dir(self) -> Path:
        return self.data_dir / "rejects"

    @property
    def sqlite_path(self) -> Path:
        """The embedded store's file (used when no LEDGER_EVENT_STORE is set)."""
        return self.data_dir / "events.sqlite3"

    def holds_a_ledger(self) -> bool:
        """Whether a ledger was made here: a PostgreSQL store is taken to be there (it
        says so itself when it is not); an embedded one, when its file is."""
        return self.event_store is not None or self.sqlite_path.is_file()

    @property
    def event_store_label(self) -> str:
        if self.event_store:
            url = urlparse(self.event_store)
            return f"postgresql://{url.hostname}:{url.port or 5432}{url.path}"
        return f"sqlite:{self.sqlite_path}"

    def ledger_env(self) -> dict[str, str]:
        """The `eventsourcing` environment for this configuration."""
        env: dict[str, str] = {}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.event_store:
            env.update(_postgres_env(self.event_store))
        else:
            env.update(
                PERSISTENCE_MODULE="eventsourcing.sqlite",
                SQLITE_DBNAME=str(self.sqlite_path),
                SQLITE_LOCK_TIMEOUT="30",
            )
        if self.cipher_key:
            env.update(
                CIPHER_TOPIC="eventsourcing.cryptography:AESCipher", CIPHER_KEY=self.cipher_key
            )
        env.update(self.extra_env)
        return env


def _seconds(env: Mapping[str, str], name: str, default: int) -> timedelta:
    """A whole number of seconds from 0 to a year; ConfigError naming the variable
    otherwise."""
    text = env.get(name)
    if not text:
        return timedelta(seconds=default)
    if not (text.isascii() and text.isdigit() and int(text) <= YEAR_SECONDS):
        raise ConfigError(
            f"{name}={text!r}: expected a whole number of seconds from 0 to {YEAR_SECONDS}"
        )
    return timedelta(seconds=int(text))


YEAR_SECONDS = 366 * 24 * 3600


def _check_cipher_key(key: str) -> None:
    """An AES key in base64, as `AESCipher.create_key` makes it (16, 24 or 32 bytes): a
    malformed one is a usage error at start-up, not a store that cannot be opened."""
    try:
        size = len(base64.b64decode(key, validate=True))
    except binascii.Error:
        size = -1
    if size not in (16, 24, 32):
        raise ConfigError(
            "LEDGER_CIPHER_KEY is not an AES key in base64 (16, 24 or 32 bytes); make one "
            "with: python -c 'from eventsourcing.cryptography import AESCipher; "
            "print(AESCipher.create_key(16))'"
        )


def _postgres_env(dsn: str) -> dict[str, str]:
    url = urlparse(dsn)
    if url.scheme not in ("postgresql", "postgres") or not url.path.strip("/"):
        raise ConfigError(
            f"LEDGER_EVENT_STORE={dsn!r} is not a PostgreSQL URL; expected "
            "postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME[?schema=SCHEMA]"
        )
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": unquote(url.path.strip("/")),
        "POSTGRES_HOST": url.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": unquote(url.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(url.password or ""),
    }
    schema = parse_qs(url.query).get("schema")
    if schema:
        env["POSTGRES_SCHEMA"] = schema[0]
    return env


def open_ledger(settings: Settings, wait_seconds: float = 30.0) -> Ledger:
    """The ledger on the configured store. Processes opening the store at once race to
    create its tables and functions (SQLite: 'database is locked'; PostgreSQL: 'tuple
    concurrently updated', a duplicate key in a pg_ catalog index, or 'already exists'):
    the losers wait and retry."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return Ledger(env=settings.ledger_env(), reporting_currency=settings.reporting_currency)
        except (DatabaseError, sqlite3.OperationalError) as error:
            if not any(m in str(error) for m in _OPEN_RACES) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


#: What a store says when another process creates its schema at the same moment.
_OPEN_RACES = ("locked", "tuple concurrently updated", 'unique constraint "pg_', "already exists")
