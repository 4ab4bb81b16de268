"""`eddy bench`: the whole path against this machine's own Kafka ceiling, in one process run.

It starts a private stack (fresh EDDY_HOME, free loopback ports) so that nothing else competes,
then measures: (a) a raw confluent-kafka consume->produce passthrough, the ceiling; (b) the drain rate
of a backlog through features, scoring and predictions, with per-stage rates; (c) latency at fixed
loads, from each transaction's Kafka timestamp to its prediction's; (d) the scoring stage, micro-batched
against per-event. Everything lands in one JSON document (docs/contract.md, "eddy bench")."""

from __future__ import annotations

import gc
import platform
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Producer

from deploy import stack
from deploy.environment import export_store_environment
from deploy.home_records import distributed_flags, local_store_flags
from deploy.measure import (
    LOAD_LINGER_MS,
    fill_backlog,
    percentiles,
    reader,
    settle,
    timed_load,
    timestamps,
)
from deploy.settings import Settings
from features.spec import PipelineSpec, load_spec
from features.waiting import poll
from streams.generator import GeneratorConfig, TransactionGenerator
from streams.kafka import KafkaConfig, ensure_topics
from streams.loop import YOUNG_GC_THRESHOLD, HeldRecord
from streams.metrics import read_metrics


def kafka_passthrough(kafka: KafkaConfig, count: int, partitions: int) -> float:
    """events/s of a plain batched consume -> produce loop over the same broker and partition count."""
    source, sink = f"bench-in-{uuid.uuid4().hex[:6]}", f"bench-out-{uuid.uuid4().hex[:6]}"
    ensure_topics(kafka, [source, sink], partitions)
    fill_backlog(kafka, source, count, seed=1, start_ms=int(time.time() * 1000) - 3_600_000, span_ms=3_600_000)
    consumer = reader(kafka, [source])
    producer = Producer(kafka.client(**{"linger.ms": 5, "batch.num.messages": 10000, "compression.type": "lz4",
                                        "queue.buffering.max.messages": 1_000_000}))
    seen, started = 0, None
    while seen < count:
        msgs = consumer.consume(5000, 1.0)
        if started is None and msgs:
            started = time.perf_counter()
        for m in msgs:
            if m.error() is None:
                producer.produce(sink, m.value(), m.key())
                seen += 1
        producer.poll(0)
    producer.flush(60)
    took = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    return count / took


def _stage_rates(settings: Settings, spec: PipelineSpec) -> dict[str, float]:
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    out = {}
    for stage in ("features", "scorer", "online-writer"):
        beats = read_metrics(client, spec.name, stage)
        out[stage] = round(sum(b.get("events_per_s", 0) for b in beats), 1)
    return out


def drain(settings: Settings, spec: PipelineSpec, count: int, on_progress) -> dict[str, Any]:
    """Produce a backlog as fast as possible and time it until every prediction is committed."""
    started = time.time()
    peaks: dict[str, float] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            for stage, rate in _stage_rates(settings, spec).items():
                peaks[stage] = max(peaks.get(stage, 0.0), rate)

    sampler = threading.Thread(target=sample, daemon=True)
    cpu_before = _cpu_seconds(settings)
    sampler.start()
    fill_backlog(settings.kafka, spec.topics.source, count, seed=2, start_ms=int(started * 1000) - 7_200_000,
          span_ms=7_200_000)
    produced_s = time.time() - started
    on_progress(f"backlog of {count:,} produced in {produced_s:.1f}s; draining")
    predictions = timestamps(settings.kafka, spec.topics.predictions, None, count, timeout_s=1800)
    elapsed = (max(predictions.values()) / 1000 if predictions else time.time()) - started
    stop.set()
    cpu_after = _cpu_seconds(settings)
    cpu_us = {part: round((cpu_after[part] - cpu_before[part]) / max(1, len(predictions)) * 1e6, 1)
              for part in cpu_before.keys() & cpu_after.keys()}
    return {"events": count, "predicted": len(predictions), "seconds": round(elapsed, 2),
            "events_per_s": round(len(predictions) / elapsed, 1), "per_stage_peak_events_per_s": peaks,
            "cpu_us_per_event": dict(sorted(cpu_us.items(), key=lambda kv: -kv[1]))}


def _cpu_seconds(settings: Settings) -> dict[str, float]:
    """User and system CPU seconds so far of each part of the stack (with its child processes), by name."""
    import psutil

    out = {}
    for record in stack.process_table(settings).all():
        try:
            proc = psutil.Process(record.pid)
            # a part's own children (a JVM it started) count; the supervisor's are the other parts
            tree = [proc] if record.name == "supervisor" else [proc, *proc.children(recursive=True)]
            out[record.name] = sum(t.user + t.system for t in (p.cpu_times() for p in tree))
        except psutil.NoSuchProcess:
            continue
    return out


def fixed_load(settings: Settings, spec: PipelineSpec, rate: int, seconds: float) -> dict[str, Any]:
    """Produce at `rate` with wall-clock event times; latency = prediction ts - transaction ts."""

    settle(settings)
    load = timed_load(settings, spec, spec.topics.predictions, rate, seconds)
    sources = load.sources
    featured = timestamps(settings.kafka, spec.topics.features, set(sources), len(sources), timeout_s=60)
    latencies = load.latency_ms()
    feature_stage = [featured[k] - sources[k] for k in sources if k in featured]
    return {"rate": rate, "seconds": seconds, "events": load.count, "predicted": len(latencies),
            "load_producer_linger_ms": LOAD_LINGER_MS,
            "latency_ms": percentiles(latencies), "visible_latency_ms": percentiles(load.visible_ms()),
            "feature_stage_latency_ms": percentiles(feature_stage)}


def swap_time(settings: Settings, spec: PipelineSpec, rate: int = 1000) -> dict[str, Any]:
    """Publish a new model while events flow at `rate`: seconds from publication to the first prediction
    by the new version (its Kafka timestamp)."""
    import torch

    from models.artifacts import save_artifact
    from models.baseline import baseline_model
    from models.updates import publish
    from streams.producer import SyntheticProducer

    settle(settings)
    model, normaliser = baseline_model(spec)
    with torch.no_grad():
        [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].bias.add_(0.1)
    version = f"bench-{uuid.uuid4().hex[:6]}"
    directory = settings.artifacts.directory(spec.name, version)
    manifest = save_artifact(directory, model, normaliser, {"version": version, "spec_hash": spec.spec_hash},
                             settings.signing_key())
    now_ms = int(time.time() * 1000)
    gen = TransactionGenerator(GeneratorConfig(seed=3, start_ms=now_ms, id_prefix=f"S{now_ms}"))
    producer = threading.Thread(target=SyntheticProducer(settings.kafka, spec.topics.source, None, gen).run,
                                args=(rate * 10, float(rate), False))
    producer.start()
    time.sleep(2)
    published = time.time()
    publish(settings.kafka, spec.topics.model_updates, manifest, settings.artifacts.publish(directory),
            settings.signing_key())
    latest: dict[str, Any] = {"auto.offset.reset": "latest"}
    consumer = reader(settings.kafka, [spec.topics.predictions], **latest)

    def first_prediction() -> int | None:
        """The Kafka timestamp of the new version's first prediction among those read now, if any."""
        for m in consumer.consume(2000, 0.2):
            value = m.value()
            if m.error() is None and value is not None and orjson.loads(value)["model_version"] == version:
                return m.timestamp()[1]
        return None

    first = poll(first_prediction, 60, every_s=0)
    consumer.close()
    producer.join()
    return {"version": version, "seconds": round(first / 1000 - published, 3) if first is not None else None}


class _Count:
    def __init__(self) -> None:
        self.records = 0

    def produce(self, *args, **kwargs) -> None:
        self.records += 1


def scoring_stage(spec: PipelineSpec, device_setting: str, rows: int = 200_000, batch: int = 4096) -> dict[str, Any]:
    """The scorer's own per-batch step (Scorer.process: parse, one model call, predictions out) on
    batches of `batch` records against batches of one, and the model call alone at several sizes."""
    import torch

    from models.baseline import baseline_model
    from models.rollout import Policy, start_route
    from models.scorer import Scorer, ScorerConfig
    from models.scoring import LoadedModel
    from models.signing import SigningKey

    torch.set_num_threads(1)
    scorer = Scorer(ScorerConfig(KafkaConfig("127.0.0.1:1"), spec, "redis://127.0.0.1:1/0", device_setting,
                                 SigningKey.generate().public()),
                    redis_client=None)
    device = scorer.device
    model, normaliser = baseline_model(spec)
    scorer.serving = loaded = LoadedModel(model, normaliser, SimpleNamespace(version="baseline-1"), device=device)
    loaded.warm_up((1, 64, 1024, batch))
    rng = np.random.default_rng(0)
    names = spec.model_inputs
    records = [HeldRecord(orjson.dumps({"event_id": f"e{i}", spec.key: f"c{i % 997}",
                                        "event_time": "2026-11-22T10:00:00.000Z", "late": False,
                                        "features": {n: float(rng.gamma(2.0, 10.0)) for n in names}}),
                          f"c{i % 997}".encode(), "features", 0, i)
               for i in range(batch)]

    def stage(size: int, total: int, outputs_per_event: int = 1) -> float:
        out = _Count()
        gc.freeze()  # as the scorer's loop does once a second, at its collector threshold
        threshold = gc.get_threshold()
        gc.set_threshold(YOUNG_GC_THRESHOLD, *threshold[1:])
        try:
            started = time.perf_counter()
            for done in range(0, total, size):
                first = done % len(records)
                scorer.process(records[first:first + size], out)
            elapsed = time.perf_counter() - started
        finally:
            gc.set_threshold(*threshold)
        assert out.records >= total * outputs_per_event
        return out.records / outputs_per_event / elapsed

    def model_only(size: int) -> float:
        x = np.abs(rng.normal(size=(size, len(names)))) * 10
        loaded.score(x)
        reps = max(3, 2_000_000 // size // 50)
        started = time.perf_counter()
        for _ in range(reps):
            loaded.score(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return size * reps / (time.perf_counter() - started)

    batched, single = stage(batch, rows), stage(1, min(rows, 20_000))
    # A rollout's cost on the same step: a challenger in shadow and as a 30% canary; both make a second model
    # call per batch and a shadow prediction per event (as a canary, the version not serving an event scores it).
    challenger = LoadedModel(*baseline_model(spec), SimpleNamespace(version="challenger-1"), device=device)
    challenger.warm_up((1, 64, 1024, batch))
    scorer.challenger = challenger
    scorer.route = start_route("baseline-1", "challenger-1", Policy(steps=(0, 30, 100)))
    shadow = stage(batch, rows, outputs_per_event=2)
    scorer.route = scorer.route.next_step(time.time())
    canary = stage(batch, rows, outputs_per_event=2)
    scorer.challenger = scorer.route = None
    return {"device": str(device), "batch": batch, "micro_batched_events_per_s": round(batched, 1),
            "per_event_events_per_s": round(single, 1), "ratio": round(batched / single, 1),
            "shadow_events_per_s": round(shadow, 1), "shadow_ratio": round(shadow / batched, 3),
            "canary_30_events_per_s": round(canary, 1), "canary_30_ratio": round(canary / batched, 3),
            "model_rows_per_s": {str(b): round(model_only(b), 1) for b in (1, 64, 1024, batch)}}


# What `eddy bench --compare` runs, one private stack each, in this order: today's two hops, the fused
# stage, and the fused stage at least once (name: the settings it changes).
COMPARED: dict[str, dict[str, Any]] = {"split": {"engine": "native", "stages": "split", "guarantee": "exactly_once"},
            "fused": {"engine": "native", "stages": "fused", "guarantee": "exactly_once"},
            "fused_at_least_once": {"engine": "native", "stages": "fused", "guarantee": "at_least_once"},
            # the fused stage as two workers over the partitions, a process (and so a core) each
            "fused_2_workers": {"engine": "native", "stages": "fused", "guarantee": "exactly_once", "engine_workers": 2}}


def run_compare(base: Settings, *, events: int, loads: list[int], load_seconds: float,
                on_progress) -> dict[str, Any]:
    """The shapes of COMPARED measured one after the other in this process, each on a stack of its own
    (the scoring stage, the same for all, once), with each one's ratio to the split stages."""
    runs: dict[str, dict[str, Any]] = {}
    for i, (name, changes) in enumerate(COMPARED.items()):
        on_progress(f"== {name} ({i + 1} of {len(COMPARED)})")
        runs[name] = run_bench(base.model_copy(update=changes), events=events, loads=loads,
                               load_seconds=load_seconds, engine=changes["engine"], on_progress=on_progress,
                               with_scoring=i == 0)
    split = runs["split"]["events_per_s"]
    return {"configs": runs, "ratio_to_split": {n: round(r["events_per_s"] / split, 2) for n, r in runs.items()}}


def run_bench(base: Settings, *, events: int, loads: list[int], load_seconds: float, engine: str,
              on_progress, keep: bool = False, ingest: bool = False, with_scoring: bool = True,
              distributed: bool = False, object_store: bool = False) -> dict[str, Any]:
    """The stack measured is broker, Redis, feature engine, online writer and scorers; with
    ingest, lakehouse ingestion (Spark) runs beside them too; distributed: as `eddy up --distributed`;
    object_store: the lake and the models on the local object store only."""
    home = Path(tempfile.mkdtemp(prefix="eddy-bench-"))
    settings = stack.private_settings(base, home, engine=engine, ingest=ingest)
    if distributed or object_store:
        settings = settings.with_overrides(**(distributed_flags(home, settings.brokers, settings.engine, settings.engine_workers) if distributed else local_store_flags(home)))
        export_store_environment(settings)  # the bench reads the lake's tables with delta-rs
    spec = load_spec(settings.pipeline)
    result: dict[str, Any] = {"machine": {"cpus": _cpus(), "python": platform.python_version(),
                                          "platform": platform.platform()}, "engine": engine,
                              "stages": "fused" if settings.fused else "split",
                              "guarantee": settings.guarantee or spec.guarantee,
                              "lakehouse_ingestion": ingest, "scorers": settings.scorers,
                              "engine_workers": settings.engine_workers,
                              "commit_interval_s": settings.commit_interval_s, "metrics": settings.metrics,
                              "distributed": distributed, "lake_root": settings.lakehouse}
    try:
        on_progress(f"starting a private stack in {home}")
        settings = stack.up(settings, spec, spark_cluster=distributed,
                            flink_cluster=distributed and bool(settings.flink_cluster)).settings or settings
        on_progress("measuring the Kafka passthrough ceiling")
        ceiling = kafka_passthrough(settings.kafka, events, settings.partitions)
        on_progress(f"ceiling {ceiling:,.0f} events/s; draining a backlog of {events:,} through eddy")
        whole = drain(settings, spec, events, on_progress)
        result_loads: dict[str, dict[str, Any]] = {}
        for rate in loads:
            on_progress(f"fixed load {rate:,} events/s for {load_seconds:.0f}s")
            result_loads[str(rate)] = fixed_load(settings, spec, rate, load_seconds)
        on_progress("hot swap under a 1,000 events/s load")
        swap = swap_time(settings, spec)
        if ingest:
            from deploy import bench_lake

            result["lakehouse"] = bench_lake.lakehouse(settings, spec, events, on_progress)
    finally:
        if not keep:
            stack.down(settings)
    main_load: dict[str, Any] = result_loads.get("5000") or next(iter(result_loads.values()), {"latency_ms": {}})
    result.update({
        "events_per_s": whole["events_per_s"],
        "ratio_to_ceiling": round(whole["events_per_s"] / ceiling, 3),
        "latency_ms": main_load["latency_ms"],
        "loads": result_loads,
        "per_stage_events_per_s": whole["per_stage_peak_events_per_s"],
        "device": settings.device,
        "drain": whole,
        "swap_to_first_prediction_s": swap["seconds"],
        "baselines": {"kafka_passthrough_events_per_s": round(ceiling, 1)},
    })
    if with_scoring:
        # The scorer's step alone, both ways in this process with the stack stopped: its idle polling
        # would otherwise take a changing share of the two cores from one side or the other.
        on_progress("scoring stage: micro-batched against per-event")
        scoring = scoring_stage(spec, settings.device)
        result.update(scoring_rows_per_s=scoring["model_rows_per_s"][str(scoring["batch"])], scoring=scoring,
                      device=scoring["device"])
        result["baselines"]["per_event_scoring_events_per_s"] = scoring["per_event_events_per_s"]
    return result


def _cpus() -> int:
    import os

    return os.cpu_count() or 0
