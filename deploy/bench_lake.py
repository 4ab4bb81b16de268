"""`eddy bench --ingest`: the lakehouse's own figures on the bench's private stack.

Catch-up: with ingestion stopped, a backlog flows through the stream stages; ingestion then starts
and is timed from its first heartbeat until every table holds its topic's records (rows/s over all
tables). Freshness: while events flow at a fixed rate, delta-rs polls the tables and each new row's
wait from its Kafka timestamp to its first poll as part of a committed table version is recorded
(at the configured trigger, EDDY_INGEST_TRIGGER). Memory: the ingestion process and its JVM."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from deploy import components, stack
from deploy.environment import child_environment
from deploy.measure import fill_backlog, load_producer, percentiles, settle
from deploy.settings import Settings
from deploy.supervisor import holding
from features.spec import PipelineSpec
from features.waiting import poll
from lakehouse.ingest import join, row_count
from lakehouse.tables import ingested_tables
from models.store import object_key
from streams.generator import GeneratorConfig, TransactionGenerator
from streams.metrics import read_metrics

COMPONENT = "lakehouse"


def _rows(settings: Settings, spec: PipelineSpec) -> dict[str, int]:
    return {t.path: row_count(settings.lakehouse, t) for t in ingested_tables(spec)}


def catch_up(settings: Settings, spec: PipelineSpec, fill, events: int, on_progress) -> dict[str, Any]:
    """Rows/s of ingestion catching up with `events` transactions' worth of records in every topic."""
    table = stack.process_table(settings)
    with holding(settings.run_dir, COMPONENT):  # the supervisor adopts the one started here, starts none
        table.stop(COMPONENT)
        before = _rows(settings, spec)
        fill(events)
        settle(settings, 300, but="-lakehouse")  # the stream stages; ingestion is stopped
        on_progress(f"{events:,} events through the stream stages; starting ingestion")
        started = time.monotonic()
        record = table.start(COMPONENT, components.argv(COMPONENT), child_environment(settings))
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    table.wait_healthy(record, lambda: any(b.get("pid") == record.pid for b in read_metrics(client, spec.name, COMPONENT)),
                       180, COMPONENT)
    ready = time.monotonic()
    want = {t.path: before[t.path] for t in ingested_tables(spec)}
    for t in ingested_tables(spec):
        if t.topic in (spec.topics.source, spec.topics.features, spec.topics.predictions):
            want[t.path] += events
    rows = before

    def complete() -> bool:
        nonlocal rows
        rows = _rows(settings, spec)
        return all(rows[p] >= n for p, n in want.items())

    caught_up = poll(complete, 600, every_s=0.25)
    done = time.monotonic()
    ingested = sum(rows.values()) - sum(before.values())
    return {"rows": ingested, "seconds": round(done - ready, 2), "rows_per_s": round(ingested / max(done - ready, 1e-9), 1),
            "spark_start_s": round(ready - started, 2), "complete": caught_up}


class _Watcher:
    """Polls tables with delta-rs; each row seen in a new version: now - its Kafka timestamp."""

    def __init__(self, settings: Settings, paths: list[str], since_ms: int) -> None:
        self.root, self.paths, self.since_ms = settings.lakehouse, paths, since_ms
        self.store = settings.object_store  # the files of an object-store lakehouse are read through it
        self.freshness_ms: dict[str, list[float]] = {p: [] for p in paths}
        self._seen: dict[str, set[str]] = {p: set() for p in paths}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
        from deltalake import DeltaTable

        filesystem = self.store.filesystem() if self.store is not None else None
        while not self._stop.wait(0.2):
            for path in self.paths:
                location = join(self.root, path)
                try:
                    files = DeltaTable(location).get_add_actions(flatten=True).column("path").to_pylist()
                except Exception:  # noqa: BLE001 - not there yet
                    continue
                now_ms = time.time() * 1000
                for f in files:
                    if f in self._seen[path]:
                        continue
                    self._seen[path].add(f)
                    file = f"{object_key(location)}/{f}" if filesystem is not None else str(Path(location) / f)
                    ts = pq.read_table(file, columns=["kafka_timestamp"], filesystem=filesystem).column("kafka_timestamp")
                    ms = pc.cast(pc.cast(ts, pa.timestamp("ms")), pa.int64()).to_numpy()
                    self.freshness_ms[path].extend((now_ms - ms[ms >= self.since_ms]).tolist())

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


def freshness(settings: Settings, spec: PipelineSpec, produce_at, rate: int, seconds: float) -> dict[str, Any]:
    """Kafka timestamp -> visible in a committed Delta version, per table, at `rate` events/s."""
    paths = [t.path for t in ingested_tables(spec)
             if t.topic in (spec.topics.source, spec.topics.features, spec.topics.predictions)]
    watcher = _Watcher(settings, paths, since_ms=int(time.time() * 1000))
    watcher.thread.start()
    produce_at(rate, seconds)
    time.sleep(max(10.0, 4 * settings.ingest_trigger_s))  # the last rows land
    watcher.stop()
    per_table = {p: percentiles(v) for p, v in watcher.freshness_ms.items()}
    every = [x for v in watcher.freshness_ms.values() for x in v]
    return {"rate": rate, "seconds": seconds, "trigger_s": settings.ingest_trigger_s, "ms": percentiles(every),
            "per_table_ms": per_table}


def memory(settings: Settings) -> dict[str, Any]:
    part = stack.status(settings)["parts"].get(COMPONENT, {})
    return {"rss_mb": part.get("rss_mb")}


def lakehouse(settings: Settings, spec: PipelineSpec, events: int, on_progress) -> dict[str, Any]:
    def fill(n: int) -> None:
        fill_backlog(settings.kafka, spec.topics.source, n, seed=4, start_ms=int(time.time() * 1000) - 3_600_000,
              span_ms=3_600_000)

    def produce_at(rate: int, seconds: float) -> None:
        now_ms = int(time.time() * 1000)
        gen = TransactionGenerator(GeneratorConfig(seed=5, start_ms=now_ms, id_prefix=f"F{now_ms}"))
        load_producer(settings, spec, gen).run(int(rate * seconds), float(rate), backfill=False)

    on_progress(f"lakehouse: catch-up of {events:,} events' records with ingestion restarted")
    catch = catch_up(settings, spec, fill, events, on_progress)
    on_progress(f"lakehouse: {catch['rows_per_s']:,.0f} rows/s; freshness at 1,000 events/s for 30s")
    fresh = freshness(settings, spec, produce_at, 1000, 30.0)
    return {"catch_up": catch, "freshness": fresh, **memory(settings)}
