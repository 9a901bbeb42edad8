"""Turning the phases' measurements into figures with targets, a table and two charts.

Each ledger figure is set beside the raw limit of the layer under it (the same store,
broker or database doing the least possible work on the same data), so a ratio says how
much of what the machine can do the ledger gets, whatever the machine.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GB = 1e9
REBUILD_SECONDS_AT_1M = 20.0
KAFKA_RATE_AT_100K = 50_000.0  # issue 3: 100k events project through Kafka at 50k/s or more
FLAT_BATCH_RATIO = 1.5  # "roughly flat": the last batches at most 1.5x the first ones
SizeResults = dict[str, Any]


@dataclass
class Figure:
    """One line of the table: a measured value and, when there is one, its target."""

    name: str
    value: float | None
    unit: str
    ratio: float | None = None  # to the matching raw limit (or as the target defines it)
    target: str = ""
    ok: bool | None = None  # None: no target, or not measured
    note: str = ""
    phase: str = ""  # the ledger phase measured, for choosing what to profile

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        return {True: "pass", False: "FAIL", None: ""}[self.ok]


def _rate(results: SizeResults, phase: str) -> float | None:
    value = results.get(phase, {}).get("rate")
    return float(value) if value is not None else None


def _ratio(value: float | None, limit: float | None) -> float | None:
    return value / limit if value is not None and limit else None


def _at_least(ratio: float | None, minimum: float) -> bool | None:
    return None if ratio is None else ratio >= minimum


def raw_figures(results: SizeResults) -> list[Figure]:
    """The limits of the layers under the ledger, on the same data."""
    headed, plain = _rate(results, "raw_consume"), _rate(results, "raw_consume_headerless")
    return [
        Figure("raw: eventsourcing batched save (SQLite)", _rate(results, "raw_save"), "events/s"),
        Figure("raw: kafka-python produce, acks=all", _rate(results, "raw_produce"), "msgs/s"),
        Figure("raw: kafka-python consume loop", headed, "msgs/s"),
        Figure("raw: … same records, no headers", plain, "msgs/s", _ratio(plain, headed),
               note="ratio: to the loop over the relayed topic, nine CloudEvents headers each"),
        Figure("raw: DuckDB Arrow bulk append", _rate(results, "raw_duckdb"), "rows/s"),
    ]  # fmt: skip


def throughput_figures(size: int, results: SizeResults) -> list[Figure]:
    """The ledger's phases, each against its raw limit."""
    ingest, relay = _rate(results, "ingest"), _rate(results, "relay")
    kafka, embedded = _rate(results, "kafka_projection"), _rate(results, "catch_up")
    ingest_ratio = _ratio(ingest, _rate(results, "raw_save"))
    kafka_ratio = _ratio(kafka, _rate(results, "raw_consume"))
    projection = results.get("kafka_projection", {})
    join = projection.get("join_seconds")
    from_first = projection.get("rate_from_first_record")
    return [
        Figure("ingest (file→validated→stored)", ingest, "events/s", ingest_ratio,
               ">= 0.7 x raw save", _at_least(ingest_ratio, 0.7), phase="ingest"),
        Figure("relay (store→Kafka)", relay, "events/s",
               _ratio(relay, _rate(results, "raw_produce")), phase="relay"),
        Figure("projection via Kafka", kafka, "events/s", kafka_ratio,
               ">= 0.6 x raw consume", _at_least(kafka_ratio, 0.6),
               "timed from the call, decoder processes' start-up included" + (
                   f"; a group join took {join:.1f} s before it" if join else ""),
               phase="kafka_projection"),
        Figure("projection via Kafka, absolute", kafka, "events/s",
               _ratio(kafka, KAFKA_RATE_AT_100K), f">= {KAFKA_RATE_AT_100K:,.0f} at 100k",
               None if size != 100_000 else _at_least(_ratio(kafka, KAFKA_RATE_AT_100K), 1.0),
               "issue 3's target, whatever the machine; ratio: to it"),
        Figure("projection via Kafka, from 1st record", from_first, "events/s",
               _ratio(from_first, _rate(results, "raw_consume")),
               note="timed from the first records reaching the projector"),
        Figure("projection embedded (catch_up)", embedded, "events/s",
               _ratio(embedded, _rate(results, "raw_duckdb")), phase="catch_up",
               note=f"batches of {results.get('catch_up', {}).get('batch_size', '?'):,}"),
    ]  # fmt: skip


def rebuild_figure(size: int, results: SizeResults) -> Figure:
    """Full rebuild time; the target is 20 s at 1M events (pro rata above 1M). Below 1M
    fixed costs dominate, so there is no verdict, only the linear extrapolation to 1M."""
    seconds = results.get("rebuild", {}).get("seconds")
    name = "full rebuild (store_follower.rebuild)"
    if size >= 1_000_000:
        limit = REBUILD_SECONDS_AT_1M * size / 1_000_000
        ok = None if seconds is None else seconds < limit
        return Figure(name, seconds, "s", target=f"< {limit:.0f} s", ok=ok)
    note = f"linear extrapolation to 1M: {seconds * 1_000_000 / size:.0f} s" if seconds else ""
    return Figure(name, seconds, "s", target="< 20 s at 1M only", note=note)


def batch_figures(results: SizeResults) -> list[Figure]:
    """Per-batch projection cost at the start and the end of the history.

    The first and last three batches are each summarised by their median, so one slow
    batch (a checkpoint, another process's burst) does not decide the verdict. A batch
    is `batch_size` store positions (stream openings included, so fewer events); the
    partial last one is left out.
    """
    batches = results.get("catch_up", {}).get("batches") or []
    size = results.get("catch_up", {}).get("batch_size") or 0
    starts = [0, *(b["position"] for b in batches)]
    full = [b for b, start in zip(batches, starts, strict=False) if b["position"] - start == size]
    if len(full) < 2:
        return [Figure("projection batch time, start→end", None, "s")]
    k = min(3, len(full) // 2)
    first = statistics.median(b["seconds"] for b in full[:k])
    last = statistics.median(b["seconds"] for b in full[-k:])
    growth = last / first if first else None
    events = sum(b["events"] for b in full) / len(full)
    note = (
        f"median of the first/last {k} of {len(full)} full batches of {size:,} positions "
        f"(~{events:,.0f} events)"
    )
    figures = [
        Figure("projection batch time, first batches", first, "s", note=note),
        Figure("projection batch time, last batches", last, "s", growth,
               f"<= {FLAT_BATCH_RATIO} x first (flat)",
               None if growth is None else growth <= FLAT_BATCH_RATIO, phase="catch_up"),
    ]  # fmt: skip
    if all(b.get("customers") for b in full):
        # A batch rewrites the profile of every customer it touches; in a generated history
        # the customer base grows, so later batches touch more customers. Per customer
        # touched, the cost shows what history alone adds.
        def per_customer(chosen: list[dict[str, Any]]) -> float:
            return statistics.median(b["seconds"] / b["customers"] * 1000 for b in chosen)

        first_c, last_c = per_customer(full[:k]), per_customer(full[-k:])
        start, end = (
            statistics.median(b["customers"] for b in part) for part in (full[:k], full[-k:])
        )
        touched = f"customers touched per batch: {start:,.0f} → {end:,.0f}"
        figures += [
            Figure("batch time per customer touched, first", first_c, "ms", note=touched),
            Figure("batch time per customer touched, last", last_c, "ms", last_c / first_c,
                   f"<= {FLAT_BATCH_RATIO} x first (flat)", last_c / first_c <= FLAT_BATCH_RATIO,
                   phase="catch_up"),
        ]  # fmt: skip
    return figures


def latency_figures(results: SizeResults) -> list[Figure]:
    """p50/p95/p99 per rate; the target is p99 < 1 s at 2k events/s."""
    rates = results.get("latency", {}).get("rates", {})
    figures: list[Figure] = []
    for rate, measured in rates.items():
        achieved = measured.get("writer", {}).get("achieved_rate")
        label = f"latency @{int(rate) // 1000}k/s"
        for q in ("p50", "p95", "p99"):
            value = measured.get(q)
            target, ok = "", None
            if q == "p99" and rate == "2000":
                target, ok = "< 1 s", None if value is None else value < 1.0
            figures.append(Figure(f"{label} {q}", value, "s", target=target, ok=ok))
        projected = measured.get("projected", {}).get("p99")
        figures.append(
            Figure(f"{label} p99 recorded→projected", projected, "s",
                   note="DuckDB commit, before a reader gets the file")
        )  # fmt: skip
        figures.append(
            Figure(f"{label} achieved writer rate", achieved, "events/s",
                   _ratio(achieved, float(rate)), note="the writer's own pace"),
        )  # fmt: skip
    return figures


LEDGER_PROCESSES = {
    "ingest": "ingest",
    "relay": "relay",
    "kafka_projection": "Kafka projection",
    "catch_up": "embedded projection",
    "rebuild": "rebuild",
}


def memory_figures(results: SizeResults) -> list[Figure]:
    """Peak RSS of each ledger process; the target (< 1 GB at 1M) is applied at every size."""
    peaks = {
        label: results.get(p, {}).get("peak_rss_bytes") for p, label in LEDGER_PROCESSES.items()
    }
    peaks["Kafka decoder (largest)"] = results.get("kafka_projection", {}).get(
        "children_peak_rss_bytes"
    )
    latency = results.get("latency", {})
    peaks["latency projector"] = latency.get("projector", {}).get("peak_rss_bytes")
    writers = [w.get("writer", {}).get("peak_rss_bytes") for w in latency.get("rates", {}).values()]
    if any(writers):
        peaks["latency writer"] = max(w for w in writers if w)
    return [
        Figure(f"peak RSS {label}", None if peak is None else peak / 1e6, "MB",
               target="< 1 GB", ok=None if peak is None else peak < GB)
        for label, peak in peaks.items()
    ]  # fmt: skip


def figures_for(size: int, results: SizeResults) -> list[Figure]:
    return [
        *raw_figures(results),
        *throughput_figures(size, results),
        rebuild_figure(size, results),
        *batch_figures(results),
        *latency_figures(results),
        *memory_figures(results),
    ]


# --- the table ------------------------------------------------------------------------------


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def table(size: int, figures: list[Figure]) -> str:
    """A fixed-width text table: figure, value, unit, ratio, target, verdict, note."""
    header = ("figure", "value", "unit", "ratio", "target", "result")
    rows = [
        (f.name, _number(f.value), f.unit, "" if f.ratio is None else f"{f.ratio:.2f}",
         f.target, f.verdict + (f"  ({f.note})" if f.note else ""))
        for f in figures
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(5)]
    aligns: list[Callable[[str, int], str]] = [
        str.ljust,
        str.rjust,
        str.ljust,
        str.rjust,
        str.ljust,
    ]
    lines = [f"== {size:,} events =="]
    for row in (header, *rows):
        cells = [aligns[i](row[i], widths[i]) for i in range(5)]
        lines.append("  ".join(cells) + "  " + row[5])
    return "\n".join(lines)


def figures_as_json(figures: list[Figure]) -> list[dict[str, Any]]:
    return [{**asdict(f), "verdict": f.verdict} for f in figures]


# --- the charts ------------------------------------------------------------------------------

PAIRS = (  # (label, raw phase, ledger phase)
    ("store write", "raw_save", "ingest"),
    ("Kafka produce", "raw_produce", "relay"),
    ("Kafka consume", "raw_consume", "kafka_projection"),
    ("DuckDB append", "raw_duckdb", "catch_up"),
)


def plot_throughput(all_results: dict[int, SizeResults], path: Path) -> None:
    """Raw limit beside the ledger for each layer and size, and the per-batch projection
    cost along the history (a rising line would mean a batch costs more as history grows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(all_results)
    fig, axes = plt.subplots(1, len(sizes) + 1, figsize=(6 * (len(sizes) + 1), 5), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=False):
        results = all_results[size]
        x = range(len(PAIRS))
        raw = [_rate(results, raw_phase) or 0 for _, raw_phase, _ in PAIRS]
        ledger = [_rate(results, phase) or 0 for _, _, phase in PAIRS]
        ax.bar([i - 0.2 for i in x], raw, 0.4, label="raw limit", color="#9aa5b1")
        ax.bar([i + 0.2 for i in x], ledger, 0.4, label="ledger", color="#1f77b4")
        for i, (r, v) in enumerate(zip(raw, ledger, strict=True)):
            if r and v:
                ax.annotate(f"{v / r:.2f}x", (i + 0.2, v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), [label for label, _, _ in PAIRS], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("events (records, rows) per second")
        ax.set_title(f"{size:,} events")
        ax.legend(fontsize=8)
    ax = axes[0][-1]
    for size in sizes:
        catch_up = all_results[size].get("catch_up", {})
        batches = catch_up.get("batches") or []
        if batches:
            label = f"{size:,} events, batches of {catch_up.get('batch_size', 0):,}"
            ax.plot([b["position"] for b in batches], [b["seconds"] for b in batches],
                    marker=".", label=label)  # fmt: skip
    ax.set_xlabel("store position at the end of the batch")
    ax.set_ylabel("seconds per projection batch")
    ax.set_title("embedded projection: batch cost along the history")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(all_results: dict[int, SizeResults], path: Path) -> None:
    """Each batch's recorded→visible latency over the test, and the distribution (CDF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (timeline, cdf) = plt.subplots(1, 2, figsize=(13, 5))
    for size in sorted(all_results):
        for rate, measured in all_results[size].get("latency", {}).get("rates", {}).items():
            series = measured.get("series") or []
            if not series:
                continue
            label = f"{size:,} history, {int(rate):,}/s (p99 {measured['p99']:.2f} s)"
            timeline.plot([t for t, _ in series], [v for _, v in series], ".", ms=3, label=label)
            ordered = sorted(v for _, v in series)
            cdf.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    timeline.axhline(1.0, color="red", lw=0.8, ls="--", label="target p99 @2k/s")
    timeline.set_xlabel("seconds since the rate started")
    timeline.set_ylabel("recorded → visible (s)")
    timeline.set_title("end-to-end latency per batch (embedded path)")
    timeline.legend(fontsize=7)
    cdf.axvline(1.0, color="red", lw=0.8, ls="--")
    cdf.set_xlabel("recorded → visible (s)")
    cdf.set_ylabel("fraction of batches")
    cdf.set_title("latency distribution (per batch)")
    cdf.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
