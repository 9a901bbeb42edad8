"""Benchmark of customer-ledger against the raw limits of the layers it is built on.

    python bench/benchmark.py --sizes 100000,1000000 --out bench-results   # make bench
    python bench/benchmark.py --sizes 20000 --out bench-results            # make bench-quick

For each size, one realistic history (domain.demo_history, cached under --work) is
written as JSONL and every phase runs on that same data, each in its own process (so
peak RSS and CPU time are per process):

  raw limits   eventsourcing batched save on a SQLite file; kafka-python produce
               (acks=all) and consume loops on the same broker; DuckDB Arrow append
  ledger       ingest (ingest_stream, fresh Ledger) · relay.run to a fresh topic ·
               projection via Kafka (one-shot consume into a fresh DuckDB, decoder
               processes reading the partitions directly; timed from the call, and from
               the first records reaching the projector) ·
               embedded projection (catch_up, per-batch times) · full rebuild ·
               end-to-end latency at 2k and 5k events/s (writer, follower, reader) ·
               peak RSS of each ledger process
  profile      at the largest size, the slowest ledger phase and every phase missing
               its target, rerun under cProfile (plus per-statement SQL timings)

Throughput phases run twice up to 200k events (best kept, every attempt recorded):
the machine is shared, and a neighbour's burst only ever slows a run down.

The broker is LEDGER_KAFKA_BOOTSTRAP when set, else the bundled Tansu dev broker.
Prints a table per size, writes OUT/results.json, OUT/throughput.png, OUT/latency.png
and OUT/profile-*.txt.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import latency
import report
import runner

LATENCY_RATES = [2_000, 5_000]
LATENCY_SECONDS = 10.0
LEDGER_PHASES = ("ingest", "relay", "kafka_projection", "catch_up")
SEED = 7
GENERATOR = hashlib.sha256(
    (Path(__file__).resolve().parent.parent / "domain" / "demo_history.py").read_bytes()
).hexdigest()[:12]
"""Names the cached inputs: a changed history generator makes new ones, not stale reuse."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000", help="comma-separated event counts")
    parser.add_argument("--out", default="bench-results", type=Path, help="results directory")
    parser.add_argument("--skip-latency", action="store_true", help="skip the latency test")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "ledger-bench",
        help="scratch space: generated inputs are cached here, stores are removed after use",
    )
    parser.add_argument("--keep", action="store_true", help="keep each size's stores and files")
    parser.add_argument(
        "--profile",
        choices=("missed", "slowest", "none"),
        default="missed",
        help="at the largest size, rerun under cProfile the slowest ledger phase and "
        "(missed, the default) every phase that misses its target",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=0,
        help="attempts per throughput phase, best kept (default: 2 up to 200k events, else 1)",
    )
    args = parser.parse_args(argv)
    args.sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    return args


# --- the environment -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the numbers were measured on, and how busy the machine was at the start."""
    import psutil

    return {
        "cpu_count": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "python": sys.version,
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


def busy_processes(sample_seconds: float = 1.0) -> list[dict[str, Any]]:
    """Other processes using CPU right now: the benchmark shares a 2-core machine with
    test runs, and the report should say so rather than hide it."""
    import psutil

    me = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.pid != me]
    for p in procs:
        with suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(sample_seconds)
    busy = []
    for p in procs:
        try:
            share = p.cpu_percent(None)
        except psutil.Error:
            continue
        if share >= 10:
            command = " ".join(p.info["cmdline"] or [])[:100]
            busy.append({"pid": p.pid, "cpu_percent": share, "command": command})
    return sorted(busy, key=lambda b: -b["cpu_percent"])


@contextmanager
def kafka_bootstrap() -> Iterator[tuple[str, str]]:
    """(bootstrap, description): the configured broker, or the bundled one started here."""
    configured = os.environ.get("LEDGER_KAFKA_BOOTSTRAP")
    if configured:
        yield configured, f"LEDGER_KAFKA_BOOTSTRAP={configured}"
        return
    from consumers.kafka import dev_broker

    with dev_broker() as broker:
        yield broker.bootstrap, f"bundled Tansu dev broker (memory storage) on {broker.bootstrap}"


# --- one size --------------------------------------------------------------------------------


class SizeRun:
    """Every phase for one size, on the same generated data; failures are recorded as
    results (`{"error": ...}`) so one broken phase does not hide the others' numbers."""

    def __init__(
        self, size: int, work: Path, cache: Path, bootstrap: str, run_id: str, repeat: int
    ) -> None:
        self.size = size
        self.repeat = repeat
        self.dir = work / str(size)
        self.scratch = self.dir / "scratch"
        self.cache = cache
        self.bootstrap = bootstrap
        self.run_id = run_id
        self.results: dict[str, Any] = {}
        self.timeout = 300 + size * 0.004
        self.jsonl = cache / f"events-{size}-seed{SEED}-{GENERATOR}.jsonl"
        self.store = self.dir / "store"
        self.docs = self.dir / "facts.tsv"
        self.projections = self.dir / "projections.duckdb"

    def step(self, name: str, action: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        print(f"  [{self.size:,}] {name} ...", end="", flush=True)
        started = time.perf_counter()
        try:
            result = action()
        except Exception as error:  # a failed phase becomes a result, the run goes on
            result = {"error": f"{type(error).__name__}: {error}"}
        self.results[name] = result
        took = time.perf_counter() - started
        status = f" error: {result['error'][:300]}" if "error" in result else ""
        rate = f" {result['rate']:,.0f}/s" if "rate" in result else ""
        print(f" {took:.1f} s{rate}{status}", flush=True)
        return result

    def phase(self, name: str, **params: Any) -> dict[str, Any]:
        return runner.run(name, params, self.scratch, self.timeout)

    def topic(self, purpose: str) -> str:
        return f"bench-{self.run_id}-{self.size}-{purpose}"

    def data(self) -> dict[str, Any]:
        """The size's JSONL input, generated once and reused by later runs."""
        meta = self.jsonl.with_suffix(".meta.json")
        if self.jsonl.exists() and meta.exists():
            return {**json.loads(meta.read_text()), "cached": True}
        result = self.phase("generate", size=self.size, seed=SEED, path=str(self.jsonl))
        meta.write_text(json.dumps(result))
        return {**result, "cached": False}

    def path(self, attempt: int, name: str) -> Path:
        """Where attempt `attempt` of a phase writes `name`: attempt 0 leaves the files
        that later phases read; repeats write beside them."""
        return self.dir / (name if attempt == 0 else f"attempt{attempt}-{name}")

    def best_of(self, name: str, params_for: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
        """Run a throughput phase `repeat` times on fresh files and keep the fastest.

        On a shared 2-core machine a neighbour's burst only ever slows a run down, so the
        best attempt is the closest to what the code itself can do; every attempt's rate
        is kept, and the peak RSS is the largest of all attempts.
        """

        def attempts() -> dict[str, Any]:
            results = [self.phase(name, **params_for(i)) for i in range(self.repeat)]
            best = max(results, key=lambda r: float(r.get("rate") or 0))
            return {
                **best,
                "attempt_rates": [r.get("rate") for r in results],
                "peak_rss_bytes": max(int(r.get("peak_rss_bytes") or 0) for r in results),
            }

        return self.step(name, attempts)

    # fmt: off
    def measure(self) -> None:
        """Every measured phase, in an order where each finds what it needs."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.results["busy_processes_at_start"] = busy_processes()
        self.results["load_average_at_start"] = os.getloadavg()
        data = self.step("data", self.data)
        self.best_of("ingest", lambda i: {
            "jsonl": str(self.jsonl), "data_dir": str(self.path(i, "store"))})
        docs = self.step("export_docs", lambda: self.phase(
            "export_docs", data_dir=str(self.store), out=str(self.docs)))
        self.best_of("raw_save", lambda i: {
            "db": str(self.path(i, "raw-save.sqlite")), "events": self.size,
            "aggregates": data.get("customers", self.size // 28),
            "payload_bytes": int(docs.get("mean_fact_bytes", 400))})
        batch = min(20_000, max(1_000, self.size // 10))
        self.best_of("raw_duckdb", lambda i: {
            "docs": str(self.docs), "db": str(self.path(i, "raw.duckdb")), "batch_rows": batch})
        self.best_of("catch_up", lambda i: {
            "data_dir": str(self.store), "projections": str(self.path(i, "projections.duckdb")),
            "batch_size": batch})
        self.best_of("rebuild", lambda i: {
            "data_dir": str(self.store), "projections": str(self.projections)})
        self.best_of("raw_produce", lambda i: {
            "bootstrap": self.bootstrap, "topic": self.topic(f"raw{i}"), "docs": str(self.docs)})
        self.best_of("relay", lambda i: {
            "data_dir": str(self.store), "bootstrap": self.bootstrap,
            "topic": self.topic(f"events{i}"), "state": str(self.path(i, "relay.json"))})
        relayed = int(self.results["relay"].get("events") or self.size)
        self.best_of("raw_consume", lambda i: {
            "bootstrap": self.bootstrap, "topic": self.topic("events0"), "expected": relayed,
            "timeout": self.timeout})
        produced = int(self.results["raw_produce"].get("records") or self.size)
        self.best_of("raw_consume_headerless", lambda i: {
            "bootstrap": self.bootstrap, "topic": self.topic("raw0"), "expected": produced,
            "timeout": self.timeout})
        self.best_of("kafka_projection", lambda i: {
            "bootstrap": self.bootstrap, "topic": self.topic("events0"),
            "group": f"bench-{self.run_id}-{self.size}-{i}",
            "projections": str(self.path(i, "kafka.duckdb"))})
        self.results["load_average_at_end"] = os.getloadavg()
        self.results["repeat"] = self.repeat
    # fmt: on

    def slowest_ledger_phase(self) -> str | None:
        rates = {p: self.results.get(p, {}).get("rate") for p in LEDGER_PHASES}
        measured = {p: r for p, r in rates.items() if r}
        return min(measured, key=lambda p: measured[p]) if measured else None

    def phases_to_profile(self, mode: str) -> list[str]:
        """The slowest ledger phase, and with mode "missed" every phase missing a
        throughput or flatness target too (the latency test runs later: its projector
        is catch_up's code, profiled when catch_up misses)."""
        if mode == "none":
            return []
        chosen = [p for p in [self.slowest_ledger_phase()] if p]
        if mode == "missed":
            for figure in report.figures_for(self.size, self.results):
                if figure.ok is False and figure.phase and figure.phase not in chosen:
                    chosen.append(figure.phase)
        return chosen

    def profile(self, phase: str, out: Path) -> dict[str, Any]:
        """Rerun `phase` under cProfile on the same data, into fresh stores and topics."""
        target = out / f"profile-{self.size}-{phase}"
        fresh = self.dir / "profile"
        params: dict[str, Any] = {"_profile": str(target)}
        if phase == "ingest":
            params |= {"jsonl": str(self.jsonl), "data_dir": str(fresh / "store")}
        elif phase == "relay":
            params |= {
                "data_dir": str(self.store),
                "bootstrap": self.bootstrap,
                "topic": self.topic("profile"),
                "state": str(fresh / "relay.json"),
            }
        elif phase == "kafka_projection":
            params |= {
                "bootstrap": self.bootstrap,
                "topic": self.topic("events0"),
                "group": f"bench-{self.run_id}-profile",
                "projections": str(fresh / "kafka.duckdb"),
            }
        else:
            params |= {
                "data_dir": str(self.store),
                "projections": str(fresh / "p.duckdb"),
                "batch_size": self.results.get("catch_up", {}).get("batch_size", 20_000),
            }
        fresh.mkdir(parents=True, exist_ok=True)
        result = runner.run(phase, params, self.scratch, self.timeout * 3)
        return {"phase": phase, "rate_under_profiler": result.get("rate"),
                "report": str(target.with_suffix(".txt"))}  # fmt: skip

    def latency(self, latency_jsonl: Path) -> dict[str, Any]:
        setup = latency.LatencySetup(
            self.store, self.projections, latency_jsonl, self.scratch, LATENCY_SECONDS
        )
        return latency.run(setup, LATENCY_RATES)

    def clean(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def latency_data(cache: Path, scratch: Path) -> Path:
    """Events for the latency test: customers of their own (prefix L), enough for every
    rate (shared by all sizes and cached)."""
    events = int(sum(LATENCY_RATES) * LATENCY_SECONDS)
    path = cache / f"latency-{events}-seed{SEED + 1}-{GENERATOR}.jsonl"
    if not path.exists():
        runner.run(
            "generate",
            {"size": events, "seed": SEED + 1, "path": str(path), "customer_prefix": "L"},
            scratch,
            600,
        )
    return path


def context(results: dict[str, Any]) -> str:
    """How busy the machine was around this size's phases: numbers measured beside a
    test run are not the machine's best, and the table should say so."""
    start = results.get("load_average_at_start") or (0, 0, 0)
    end = results.get("load_average_at_end") or (0, 0, 0)
    busy = results.get("busy_processes_at_start") or []
    others = "; ".join(f"{b['cpu_percent']:.0f}% {b['command'][:70]}" for b in busy) or "none"
    shares = [
        f"{name} {(r['cpu_seconds'] + r.get('children_cpu_seconds', 0)) / r['phase_seconds']:.2f}"
        for name, r in results.items()
        if isinstance(r, dict) and r.get("phase_seconds") and "cpu_seconds" in r
    ]
    return (
        f"load average (1 min) {start[0]:.2f} at start, {end[0]:.2f} after the throughput "
        f"phases; other processes busy at start: {others}\n"
        f"CPU time / wall time per phase (its process and children): {', '.join(shares)}"
    )


# --- profile summary ---------------------------------------------------------------------------


def hotspots(profile_txt: Path, top: int = 10) -> str:
    """The head of each section of a profile report (see phases._profiled): SQL
    statements (projection phases), the project's functions by cumulative time, and
    all functions by own time (where the CPU went, libraries included)."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in profile_txt.read_text().splitlines():
        if line.startswith("=== "):
            current = sections.setdefault(line, [])
        elif line.strip() and not line.lstrip().startswith(("Ordered by", "List reduced")):
            current.append(line)
    shown = []
    for title, lines in sections.items():
        if "all functions by cumulative" in title:
            continue
        body = [line for line in lines if "function calls" not in line]
        shown += [title, *body[: top + 1]]
    return "\n".join(shown)


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    work = args.work / f"run-{run_id}"
    cache = args.work / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(),
        "machine": machine(),
        "sizes": {},
        "notes": NOTES,
    }
    all_results: dict[int, dict[str, Any]] = {}
    with kafka_bootstrap() as (bootstrap, broker):
        document["broker"] = broker
        print(f"broker: {broker}\nwork: {work}")
        for index, size in enumerate(args.sizes):
            repeat = args.repeat or (2 if size <= 200_000 else 1)
            run = SizeRun(size, work, cache, bootstrap, run_id, repeat)
            run.measure()
            if index == len(args.sizes) - 1:
                for phase in run.phases_to_profile(args.profile):
                    run.step(f"profile_{phase}", functools.partial(run.profile, phase, out))
            if not args.skip_latency:
                path = latency_data(cache, run.scratch)
                run.step("latency", functools.partial(run.latency, path))
            all_results[size] = run.results
            if not args.keep:
                run.clean()
    document["machine"]["load_average_at_end"] = os.getloadavg()
    for size, results in all_results.items():
        figures = report.figures_for(size, results)
        print()
        print(report.table(size, figures))
        print(context(results))
        document["sizes"][str(size)] = {"figures": report.figures_as_json(figures), **results}
    for size, results in all_results.items():
        for name, profiled in results.items():
            if name.startswith("profile_") and Path(profiled.get("report", "")).is_file():
                print(f"\ncProfile of {profiled['phase']} at {size:,} events "
                      f"(full listing: {profiled['report']}):")  # fmt: skip
                print(hotspots(Path(profiled["report"])))
    report.plot_throughput(all_results, out / "throughput.png")
    if not args.skip_latency:
        report.plot_latency(all_results, out / "latency.png")
    document["total_seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(document, indent=2, default=str))
    print(
        f"\nwrote {out}/results.json, throughput.png"
        f"{'' if args.skip_latency else ', latency.png'} in {document['total_seconds']:.0f} s"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    failed = failed_phases(all_results)
    if failed:
        print(f"failed phases (their figures are missing): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def failed_phases(all_results: dict[int, dict[str, Any]]) -> list[str]:
    """The phases that ended in an error, as "size:phase" (a failed phase becomes a result
    and the run goes on, so the other figures are still measured)."""
    return [
        f"{size}:{name}"
        for size, results in all_results.items()
        for name, result in results.items()
        if isinstance(result, dict) and "error" in result
    ]


NOTES = {
    "raw_save": "eventsourcing Application (library defaults: JSON transcoder, save()) on a "
    "SQLite file; one simple aggregate per ledger customer; payload as long as the mean "
    "fact JSON; 5,000 events per app.save(*aggregates) like the ingest batches",
    "raw_produce": "bare KafkaProducer: acks=all, linger 10 ms, 256 KiB batches, no "
    "compression/idempotence/headers; values are the stored fact JSON, keys customer ids; "
    "one flush at the end",
    "raw_consume": "bare KafkaConsumer on the relayed topic, assigned partitions (no group), "
    "the ledger consumer's fetch sizes; timed from the first poll to the last record",
    "raw_consume_headerless": "the raw_consume loop over raw_produce's topic: the same keys "
    "and values without the CloudEvents headers, uncompressed",
    "raw_duckdb": "INSERT INTO plain table SELECT * FROM Arrow table (typed, parsed outside "
    "the clock), one commit per batch of the embedded projection's size",
    "kafka_projection": "one-shot consume (decoder processes, no group join); rate: timed from "
    "the call to the last batch committed; rate_from_first_record: from the first records "
    "reaching the projector; the decoders' CPU is in children_cpu_seconds",
    "latency": "recorded (record() returned) to visible (a read-only DuckDB query of max(position) "
    "in events, polled every 20 ms); weighted per event; on top of the size's history",
    "rss": "peak RSS of each phase's own process (getrusage RUSAGE_SELF at its end)",
}


if __name__ == "__main__":
    sys.exit(main())
