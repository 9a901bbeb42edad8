"""Malformed LEDGER_* settings are refused when read (the CLI's usage error, exit 2),
not later as a traceback or a silently wrong connection; the development broker refuses
a port that is taken instead of taking whatever listens there for itself."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
from conftest import children_of, running
from eventsourcing.cryptography import AESCipher

from bootstrap import ConfigError, Settings
from consumers.kafka import DevBroker, KafkaSettings, PortInUse, free_port


def refused(**env: str) -> str:
    """The one-line ConfigError message `Settings.from_env` raises for `env`."""
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env=env)
    message = str(raised.value)
    assert "\n" not in message
    return message


BROKER = {"LEDGER_KAFKA_BOOTSTRAP": "127.0.0.1:9092"}


@pytest.mark.parametrize(
    "bootstrap",
    ["127.0.0.1:notaport", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1", "a:9092,,b:9092",
     "a:9092,b:x", "::1:9092", ":9092"],
)  # fmt: skip
def test_a_malformed_bootstrap_is_a_config_error(bootstrap: str) -> None:
    with pytest.raises(ValueError, match="LEDGER_KAFKA_BOOTSTRAP"):
        KafkaSettings.from_env({"LEDGER_KAFKA_BOOTSTRAP": bootstrap})
    message = refused(LEDGER_KAFKA_BOOTSTRAP=bootstrap)
    assert f"LEDGER_KAFKA_BOOTSTRAP={bootstrap!r}" in message and "host:port" in message


def test_valid_bootstraps_still_parse() -> None:
    for bootstrap in ["127.0.0.1:9092", "k1.example:9093, k2.example:1,[::1]:65535"]:
        settings = KafkaSettings.from_env({"LEDGER_KAFKA_BOOTSTRAP": bootstrap})
        assert settings is not None and settings.bootstrap == bootstrap
    assert KafkaSettings.from_env({}) is None, "no broker: the embedded path"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LEDGER_KAFKA_SECURITY_PROTOCOL", "SASL_SSLX"),
        ("LEDGER_KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),  # kafka-python compares as written
        ("LEDGER_KAFKA_SASL_MECHANISM", "SCRAM-SHA-1"),
        ("LEDGER_KAFKA_SASL_MECHANISM", "plain"),
    ],
)
def test_an_unknown_security_protocol_or_mechanism_is_a_config_error(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        KafkaSettings.from_env({**BROKER, name: value})
    message = refused(**BROKER, **{name: value})
    assert f"{name}={value!r}: expected one of" in message
    assert ("SASL_SSL" if "PROTOCOL" in name else "SCRAM-SHA-512") in message


def test_personal_data_on_kafka_is_withheld_unless_included() -> None:
    assert KafkaSettings.from_env(BROKER).personal_data is False  # type: ignore[union-attr]
    for value, included in [("omit", False), ("include", True)]:
        chosen = KafkaSettings.from_env({**BROKER, "LEDGER_KAFKA_PERSONAL_DATA": value})
        assert chosen is not None and chosen.personal_data is included
    message = refused(**BROKER, LEDGER_KAFKA_PERSONAL_DATA="yes")
    assert "LEDGER_KAFKA_PERSONAL_DATA='yes'" in message and "omit, include" in message


def test_supported_security_settings_still_parse() -> None:
    settings = KafkaSettings.from_env(
        {
            **BROKER,
            "LEDGER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "LEDGER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "LEDGER_KAFKA_SASL_USERNAME": "ledger",
        }
    )
    assert settings is not None
    assert settings.security == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "ledger",
    }


@pytest.mark.parametrize("lag", ["-5", "1.5", "5m", "²", "99999999999999"])
def test_a_clock_lag_that_is_no_whole_number_of_seconds_is_a_config_error(lag: str) -> None:
    message = refused(LEDGER_CLOCK_LAG_SECONDS=lag)
    assert f"LEDGER_CLOCK_LAG_SECONDS={lag!r}" in message and "seconds" in message


def test_the_clock_lag_and_the_watermark_interval_parse() -> None:
    assert Settings.from_env(env={}).clock_lag == timedelta(seconds=300)
    assert Settings.from_env(env={"LEDGER_CLOCK_LAG_SECONDS": "0"}).clock_lag == timedelta(0)
    kafka = Settings.from_env(env={**BROKER, "LEDGER_RELAY_WATERMARK_SECONDS": "0"}).kafka
    assert kafka is not None and kafka.watermark_seconds == 0
    assert "LEDGER_RELAY_WATERMARK_SECONDS" in refused(
        **BROKER, LEDGER_RELAY_WATERMARK_SECONDS="soon"
    )


@pytest.mark.parametrize("currency", ["XYZ", "abc"])  # three letters, but no currency
def test_a_currency_outside_iso_4217_is_a_config_error(currency: str) -> None:
    message = refused(LEDGER_REPORTING_CURRENCY=currency)
    assert f"LEDGER_REPORTING_CURRENCY={currency.upper()!r}" in message
    assert "ISO 4217" in message


@pytest.mark.parametrize("key", ["notbase64!", "c2hvcnQ=", "YWJjZGVmZ2hpamtsbW5vcHE="])
def test_a_malformed_cipher_key_is_a_config_error(key: str) -> None:
    """Not base64, or not 16, 24 or 32 bytes (5 and 17 here): it was found only when the
    store was opened, as if the store were unavailable (exit 3, not 2)."""
    message = refused(LEDGER_CIPHER_KEY=key)
    assert "LEDGER_CIPHER_KEY is not an AES key in base64" in message
    assert key not in message, "the key is not printed"


def test_a_cipher_key_made_by_the_library_parses() -> None:
    key = AESCipher.create_key(32)
    assert Settings.from_env(env={"LEDGER_CIPHER_KEY": key}).cipher_key == key


@pytest.mark.parametrize("url", ["mysql://x@y/z", "postgresql://host"])
def test_an_event_store_that_is_no_postgresql_url_is_a_config_error(url: str) -> None:
    assert f"LEDGER_EVENT_STORE={url!r} is not a PostgreSQL URL" in refused(LEDGER_EVENT_STORE=url)


def test_iso_4217_currencies_still_parse() -> None:
    assert Settings.from_env(env={}).reporting_currency == "EUR"
    assert Settings.from_env(env={"LEDGER_REPORTING_CURRENCY": "chf"}).reporting_currency == "CHF"


# --- the development broker ----------------------------------------------------------------


def test_the_dev_broker_refuses_a_port_another_broker_holds() -> None:
    """Before: the second Tansu failed to bind, the wait connected to the first one and
    took it for its own (`ledger dev-broker` said "broker on ..." and exited 0)."""
    first = DevBroker(free_port())
    first.start()
    try:
        before = children_of(os.getpid())  # the first broker, and a session broker
        second = DevBroker(first.port)
        started = time.monotonic()
        try:
            with pytest.raises(PortInUse, match=f"port {first.port} on 127.0.0.1 is in use"):
                second.start()
        finally:
            second.stop()
        assert time.monotonic() - started < 2
        assert isinstance(PortInUse("x"), RuntimeError), "`ledger dev-broker` reports it, exit 3"
        assert second.process is None, "no Tansu process is started"
        assert not any(running(pid) for pid in children_of(os.getpid()) - before)
    finally:
        first.stop()
