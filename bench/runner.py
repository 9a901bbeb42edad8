"""Running one benchmark phase in a child process, and reading back what it measured.

Every heavy phase runs in its own interpreter so that its peak RSS and CPU time are its
own (the child reports `getrusage(RUSAGE_SELF)` when it ends), and so that one phase's
caches, imports and garbage cannot flatter or penalise the next one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PHASES_SCRIPT = BENCH_DIR / "phases.py"


class PhaseFailed(RuntimeError):
    """A child phase exited non-zero or timed out; the message carries its stderr tail."""


@dataclass
class Running:
    """A phase started in the background (the latency test runs three at once)."""

    name: str
    process: subprocess.Popen[bytes]
    result_path: Path
    log_path: Path
    started: float

    def finish(self, timeout: float) -> dict[str, Any]:
        """Wait for the child and return its result dict; raises PhaseFailed on failure."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise PhaseFailed(f"{self.name}: timed out after {timeout:.0f} s") from None
        if code != 0 or not self.result_path.exists():
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise PhaseFailed(f"{self.name}: exit status {code}\n{tail}")
        result: dict[str, Any] = json.loads(self.result_path.read_text())
        result["wall_seconds_with_startup"] = time.perf_counter() - self.started
        return result


def child_env() -> dict[str, str]:
    """The children import the project from the work tree, whatever the caller's cwd."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(BENCH_DIR), env.get("PYTHONPATH", "")) if p
    )
    return env


def start(name: str, params: dict[str, Any], scratch: Path) -> Running:
    """Start phase `name` of phases.py with `params`; its files go under `scratch`."""
    scratch.mkdir(parents=True, exist_ok=True)
    stamp = f"{name}-{time.monotonic_ns()}"
    params_path = scratch / f"{stamp}.params.json"
    result_path = scratch / f"{stamp}.result.json"
    log_path = scratch / f"{stamp}.log"
    params_path.write_text(json.dumps(params))
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(PHASES_SCRIPT), name, str(params_path), str(result_path)],
            cwd=ROOT,
            env=child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Running(name, process, result_path, log_path, time.perf_counter())


def run(name: str, params: dict[str, Any], scratch: Path, timeout: float) -> dict[str, Any]:
    """Run phase `name` to completion in a child process and return its result."""
    return start(name, params, scratch).finish(timeout)
