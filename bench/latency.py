"""End-to-end latency through the embedded path: recorded → visible to an analyst.

Three processes share the machine as they would in production: a writer recording
small batches at a steady rate, the projector following the store
(`catch_up(follow=True, poll_seconds=0.05)`), and a reader polling the newest position
visible in DuckDB's `events` table through a read-only connection. The writer logs when
each batch committed and its last store position; the reader logs when each new
position became visible. A batch's latency is the first time the reader saw a position
at or past the batch's last one, minus the time the batch committed; each event of the
batch counts once (so the percentiles are over events). The same is computed against
the projector's own log of committed batches ("projected"): the gap between the two
is the time the reader waited for the file while the projector held it.

The test runs on top of the size's stored history and projections, so the projector
works on a realistically large DuckDB file; its events are for customers of their own
(ids prefixed `L`), so they never collide with that history.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import runner


@dataclass(frozen=True)
class LatencySetup:
    data_dir: Path  # the event store the history was ingested into
    projections: Path  # its projections, caught up
    jsonl: Path  # the latency events (their own customers)
    scratch: Path
    seconds: float = 10.0


def run(setup: LatencySetup, rates: list[int]) -> dict[str, Any]:
    """Measure each rate in turn with one projector and one reader running throughout."""
    stop, ready = setup.scratch / "latency.stop", setup.scratch / "latency.ready"
    for leftover in (stop, ready):
        leftover.unlink(missing_ok=True)
    seen_path = setup.scratch / "latency-seen.json"
    common = {"data_dir": str(setup.data_dir), "projections": str(setup.projections)}
    projector_log = setup.scratch / "latency-projector.json"
    projector = runner.start(
        "lat_projector", {**common, "stop": str(stop), "out": str(projector_log)}, setup.scratch
    )
    reader = runner.start(
        "lat_reader",
        {**common, "stop": str(stop), "ready": str(ready), "out": str(seen_path)},
        setup.scratch,
    )
    writers: dict[int, dict[str, Any]] = {}
    logs: dict[int, list[list[float]]] = {}
    try:
        _wait_for(lambda: ready.exists(), 120, "the reader's first query")
        offset = 0
        for rate in rates:
            log_path = setup.scratch / f"latency-writer-{rate}.json"
            writers[rate] = runner.run(
                "lat_writer",
                {
                    "data_dir": str(setup.data_dir),
                    "jsonl": str(setup.jsonl),
                    "offset": offset,
                    "rate": rate,
                    "seconds": setup.seconds,
                    "out": str(log_path),
                },
                setup.scratch,
                timeout=setup.seconds * 10 + 120,
            )
            offset += int(rate * setup.seconds)
            logs[rate] = orjson.loads(log_path.read_bytes())
            final = int(logs[rate][-1][1]) if logs[rate] else 0
            _wait_for(lambda f=final: _visible(ready) >= f, 120, f"position {final} visible")
    finally:
        stop.write_text("stop")
        projector_result = _finish(projector, 120)
        reader_result = _finish(reader, 60)
    seen = orjson.loads(seen_path.read_bytes()) if seen_path.exists() else []
    committed = [
        [b["at"], b["position"]]
        for b in (orjson.loads(projector_log.read_bytes()) if projector_log.exists() else [])
    ]
    return {
        "rates": {
            str(rate): {
                **_percentiles(logs[rate], seen),
                "projected": _percentiles(logs[rate], committed),
                "writer": writers[rate],
            }
            for rate in rates
        },
        "projector": projector_result,
        "reader": reader_result,
        "seconds_per_rate": setup.seconds,
    }


def _visible(ready: Path) -> int:
    try:
        return int(ready.read_text() or 0)
    except (OSError, ValueError):
        return 0


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise runner.PhaseFailed(f"latency: timed out waiting for {what}")
        time.sleep(0.05)


def _finish(process: runner.Running, timeout: float) -> dict[str, Any]:
    """A helper process's result, or its failure as data (the rates may still be valid)."""
    try:
        return process.finish(timeout)
    except runner.PhaseFailed as error:
        return {"error": str(error)}


def _percentiles(log: list[list[float]], seen: list[list[float]]) -> dict[str, Any]:
    """p50/p95/p99/max over events, and each batch's (commit time, latency) for plotting."""
    samples: list[tuple[float, int]] = []  # (latency, events)
    series: list[tuple[float, float]] = []
    cursor = 0
    for committed, position, events in log:
        # Both logs only move forward, so one cursor walks the reader's log once.
        while cursor < len(seen) and seen[cursor][1] < position:
            cursor += 1
        if cursor == len(seen):
            break  # never seen: cannot happen after the final wait, but do not guess
        # The reader may see a batch before the writer logged its commit time: zero.
        latency = max(0.0, seen[cursor][0] - committed)
        samples.append((latency, int(events)))
        series.append((committed - log[0][0], latency))
    return {
        **{f"p{q}": _weighted_quantile(samples, q / 100) for q in (50, 95, 99)},
        "max": max((s for s, _ in samples), default=None),
        "events_measured": sum(n for _, n in samples),
        "series": series,
    }


def _weighted_quantile(samples: list[tuple[float, int]], q: float) -> float | None:
    """The q-quantile of latencies where each sample stands for `events` events."""
    if not samples:
        return None
    ordered = sorted(samples)
    total = sum(n for _, n in ordered)
    threshold, running = q * total, 0
    for latency, count in ordered:
        running += count
        if running >= threshold:
            return latency
    return ordered[-1][0]
