"""The benchmark still runs: every phase of `make bench` on a small history, twice where
the real run repeats, against the test broker. No figure is judged here (speed belongs in
the benchmark itself); a phase that fails leaves its figures out of the report, which
would otherwise be seen only at the next full run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = 3_000


def test_every_benchmark_phase_runs_and_repeats(kafka_bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "benchmark.py"),
            f"--sizes={SMALL}",
            "--repeat=2",  # a repeat runs on fresh files beside the first attempt's
            "--skip-latency",
            "--profile=slowest",
            f"--out={out}",
            f"--work={tmp_path / 'work'}",
        ],
        env={**os.environ, "LEDGER_KAFKA_BOOTSTRAP": kafka_bootstrap},
        capture_output=True,
        text=True,
        timeout=580,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["sizes"][str(SMALL)]
    failed = {
        name: r["error"] for name, r in results.items() if isinstance(r, dict) and "error" in r
    }
    assert failed == {}
    for phase in ("ingest", "relay", "kafka_projection", "catch_up", "raw_consume"):
        rates = results[phase]["attempt_rates"]
        assert len(rates) == 2 and all(rate and rate > 0 for rate in rates), (phase, rates)
    assert results["kafka_projection"]["events"] == results["relay"]["events"] > 0
    assert (out / "throughput.png").stat().st_size > 0
