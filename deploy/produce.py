"""Wiring for `eddy produce`: flags -> generator config -> SyntheticProducer, with a progress bar."""

from __future__ import annotations

import hashlib
import time
from datetime import datetime

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from deploy.settings import Settings
from features.errors import ConfigError, SpecError
from features.spec import load_spec, parse_duration
from streams.generator import GeneratorConfig, TransactionGenerator
from streams.producer import ProduceReport, SyntheticProducer

# The fields every generated event carries (docs/contract.md, "Topics"); a spec needing others cannot use it.
EVENT_FIELDS = ("event_id", "event_time", "card_id", "merchant_id", "amount", "currency", "country", "channel")
# A card's own rhythm: the average card pays this many times a day. The default run is a backfill ending
# now at that pace, so a window holds what it would hold in real life; `--compressed` packs events 1 ms apart.
CARD_EVENTS_PER_DAY = 3.0
DAY_MS = 86_400_000
# A paced or compressed run whose average card pays more often than this gets a notice: its windows hold
# far more of a card's history than a real stream's, and a model trained on one misjudges the other.
CROWDED_CARD_GAP_S = 600.0
COMPRESSED_RATE = 1000.0  # events/s of event time in a --compressed run (GeneratorConfig's 1 ms gap)


def _check_flags(rate, count, fraud_rate, label_delay_s, cards, compressed, backfill, start) -> None:
    if compressed and (rate is not None or backfill is not None or start is not None):
        raise ConfigError("--compressed is its own timing: leave out --rate, --backfill and --start with it")
    if count < 1:
        raise ConfigError("--count must be at least 1")
    if rate is not None and rate <= 0:
        raise ConfigError("--rate must be positive (leave it out for as fast as possible)")
    if not 0.0 <= fraud_rate <= 0.5:
        raise ConfigError("--fraud-rate must be between 0 and 0.5, e.g. 0.01")
    if label_delay_s < 0:
        raise ConfigError("--label-delay must be zero or more seconds")
    if cards < 10:
        raise ConfigError("--cards must be at least 10")


def rhythm_span_ms(count: int, cards: int) -> int:
    """The event-time span of `count` events over `cards` cards at the cards' own rhythm."""
    return max(1, round(count * DAY_MS / (cards * CARD_EVENTS_PER_DAY)))


def _notice_crowded_cards(console: Console, cards: int, rate: float) -> None:
    """Say so when live or compressed events come far faster per card than a real card pays."""
    gap_s = cards / rate
    if gap_s < CROWDED_CARD_GAP_S:
        needed = int(rate * CROWDED_CARD_GAP_S)
        console.print(f"note: {cards:,} cards at {rate:,.0f} events/s is an event per card every {gap_s:,.1f}s "
                      f"(a real card pays about every {24 / CARD_EVENTS_PER_DAY:.0f}h): windows will hold more of each "
                      f"card's history than a real stream's; --cards {needed:,} gives one every "
                      f"{CROWDED_CARD_GAP_S / 60:.0f} min", markup=False, highlight=False)


def run_produce(settings: Settings, console: Console, *, rate: float | None, count: int, seed: int,
                fraud_rate: float, label_delay_s: float, backfill: str | None, start: str | None,
                cards: int, amount_scale: float = 1.0, compressed: bool = False) -> ProduceReport:
    _check_flags(rate, count, fraud_rate, label_delay_s, cards, compressed, backfill, start)
    spec = load_spec(settings.pipeline)
    missing = set(spec.field_types) - set(EVENT_FIELDS)
    if missing:
        raise ConfigError(
            f"the built-in generator makes card transactions, but spec {spec.name!r} needs {sorted(missing)}: "
            f"produce your own events to topic {spec.topics.source!r}"
        )
    now_ms = int(time.time() * 1000)
    # Event ids are unique per run unless --start pins the run, which then replays byte for byte: then
    # the prefix is a digest of every flag that changes the events, so different events never share an id.
    pinned = (seed, fraud_rate, cards, start, backfill, count, amount_scale)
    prefix = (f"t{hashlib.sha256(repr(pinned).encode()).hexdigest()[:10]}" if start is not None else f"t{now_ms}")
    config = GeneratorConfig(seed=seed, fraud_rate=fraud_rate, cards=cards, start_ms=now_ms, id_prefix=prefix,
                             amount_scale=amount_scale)
    # Historical event times unless the events are live (--rate alone) or --compressed.
    historical = not compressed and (rate is None or backfill is not None or start is not None)
    if not historical:
        _notice_crowded_cards(console, cards, rate if rate is not None else COMPRESSED_RATE)
    if historical:
        try:
            span_ms = parse_duration(backfill) if backfill is not None else rhythm_span_ms(count, cards)
        except SpecError as exc:
            raise ConfigError(f"--backfill: {exc}") from None
        if start is not None:
            try:
                start_ms = int(datetime.fromisoformat(start).timestamp() * 1000)
            except ValueError:
                raise ConfigError(f"--start: {start!r} is not ISO-8601, e.g. 2026-11-22T00:00:00Z") from None
        else:
            start_ms = now_ms - span_ms
        config = GeneratorConfig(seed=seed, fraud_rate=fraud_rate, cards=cards, start_ms=start_ms,
                                 mean_gap_ms=max(span_ms, 1) / count, id_prefix=prefix, amount_scale=amount_scale)
    generator = TransactionGenerator(config)
    producer = SyntheticProducer(settings.kafka, spec.topics.source, spec.labels.topic if spec.labels else None,
                                 generator, label_delay_ms=int(label_delay_s * 1000))
    with Progress(TextColumn("[bold]produce"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("events", total=count, detail="")

        def show(report: ProduceReport) -> None:
            rate_now = report.events / max(1e-9, time.time() - started)
            progress.update(task, completed=report.events,
                            detail=f"{rate_now:,.0f} ev/s, {report.labels} labels, {len(producer.pending)} labels due later")

        started = time.time()
        report = producer.run(count, rate, backfill=historical, on_progress=show)
    if producer.errors:
        raise ConfigError(f"{len(producer.errors)}+ records were not delivered: {producer.errors[0]}")
    return report
