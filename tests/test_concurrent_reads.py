"""Analysts query the projections while projection keeps running (DuckDB: one writer).

Real processes: a following projector (embedded, or a Kafka consumer group) and `ledger
query` run side by side; every query must succeed and the projections catch up.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from conftest import PROJECT_ROOT, reader_holding

from consumers.kafka import KafkaSettings
from domain.demo_history import generate_history
from projections import schema
from projections.schema import connect


def ledger(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "cli", "--data-dir", str(data_dir), *args]


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def write_files(tmp_path: Path, parts: int) -> tuple[list[Path], int]:
    events = generate_history(customers=90, seed=5)
    size = len(events) // parts + 1
    files = []
    for index in range(parts):
        path = tmp_path / f"part-{index}.jsonl"
        path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events[index * size :][:size]))
        files.append(path)
    return files, len(events)


def count_events(data_dir: Path, env: dict[str, str]) -> int:
    done = run(
        ledger(data_dir, "query", "--format", "json", "SELECT count(*) AS n FROM events"), env
    )
    assert done.returncode == 0, done.stderr
    return int(orjson.loads(done.stdout)[0]["n"])


def query_while_following(
    tmp_path: Path, follower: list[str], feed: list[list[str]], expected: int, env: dict[str, str]
) -> None:
    """Start `follower`, run each `feed` command, querying between them; then wait for
    the projections to reach `expected` events, querying all along."""
    data_dir = tmp_path / "data"
    following = subprocess.Popen(
        follower, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        # the follower makes the file with its first batch (a group member joins first)
        deadline = time.monotonic() + 60
        while not (data_dir / "projections.duckdb").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        seen: list[int] = []
        for command in feed:
            done = run(command, env)
            assert done.returncode == 0, done.stderr
            seen.append(count_events(data_dir, env))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            seen.append(count_events(data_dir, env))
            if seen[-1] == expected:
                break
            time.sleep(0.3)
        assert seen[-1] == expected, seen
        assert seen == sorted(seen), "the projections never go backwards"
    finally:
        following.send_signal(signal.SIGINT)
        try:
            following.wait(timeout=20)
        except subprocess.TimeoutExpired:
            following.kill()
    assert following.returncode in (0, -signal.SIGINT), following.stderr


def test_queries_succeed_while_the_embedded_projector_follows(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    files, total = write_files(tmp_path, 3)
    data_dir = tmp_path / "data"
    assert run(ledger(data_dir, "ingest", "--no-project", str(files[0])), env).returncode == 0
    query_while_following(
        tmp_path,
        ledger(data_dir, "project", "--follow"),
        [ledger(data_dir, "ingest", "--no-project", str(f)) for f in files[1:]],
        total,
        env,
    )


@pytest.mark.kafka
def test_queries_succeed_while_a_consumer_group_follows(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env.update(
        LEDGER_KAFKA_BOOTSTRAP=kafka_settings.bootstrap,
        LEDGER_KAFKA_TOPIC=kafka_settings.topic,
        LEDGER_KAFKA_GROUP=kafka_settings.group,
        LEDGER_KAFKA_PARTITIONS=str(kafka_settings.partitions),
    )
    files, total = write_files(tmp_path, 3)
    data_dir = tmp_path / "data"
    assert run(ledger(data_dir, "ingest", str(files[0])), env).returncode == 0
    assert run(ledger(data_dir, "relay"), env).returncode == 0
    feed = []
    for path in files[1:]:
        feed += [ledger(data_dir, "ingest", str(path)), ledger(data_dir, "relay")]
    query_while_following(tmp_path, ledger(data_dir, "consume", "--follow"), feed, total, env)


def test_a_follower_outlasts_a_reader_holding_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An analyst's session may hold the file open for minutes: a follower's writer waits
    for it as long as it takes (saying so now and then) instead of failing after 30 s,
    which ended `consume --follow` with an error. A one-shot writer still gives up."""
    path = tmp_path / "projections.duckdb"
    connect(path).close()
    monkeypatch.setattr(schema, "LOCKED_SAY_EVERY_SECONDS", 0.3)
    with reader_holding(path, 2):
        opened = time.monotonic()
        with pytest.raises(schema.ProjectionsBusy, match="a reader holding it open"):
            connect(path, wait_seconds=0.5)
        with caplog.at_level(logging.WARNING, logger="projections.schema"):
            con = connect(path, wait_seconds=None)  # longer than the reader's 2 s
        con.close()
        assert time.monotonic() - opened > 1.5, "the writer opened the file while it was held"
        assert any("another process holds it" in r.getMessage() for r in caplog.records)
