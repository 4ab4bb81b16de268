"""`eddy produce` and `eddy consume` against the real broker."""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from itertools import pairwise

import orjson
import pytest
import yaml

from streams.kafka import ensure_topics
from tests.conftest import run_eddy
from tests.kafka_helpers import read_committed

pytestmark = pytest.mark.kafka


@pytest.fixture
def private_pipeline(settings, stack_env, tmp_path):
    """The fraud spec on topics of this test's own, as a YAML file EDDY_PIPELINE can name."""
    data = yaml.safe_load(settings.pipeline.read_text())
    suffix = uuid.uuid4().hex[:8]
    data["source"]["topic"] = f"tx-{suffix}"
    data["labels"]["topic"] = f"labels-{suffix}"
    data["topics"] = {"features": f"f-{suffix}", "predictions": f"p-{suffix}", "model_updates": f"m-{suffix}"}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    ensure_topics(settings.kafka, [data["source"]["topic"], data["labels"]["topic"]], partitions=3)
    return {**stack_env, "EDDY_PIPELINE": str(path)}, data


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def test_backfill_with_labels_is_complete_and_replays_byte_for_byte(settings, private_pipeline):
    env, data = private_pipeline
    args = ["produce", "--count", "5000", "--seed", "4", "--start", "2026-11-20T00:00:00Z", "--backfill", "1h",
            "--label-delay", "30", "--fraud-rate", "0.05"]
    first = run_eddy(args, env)
    assert first.returncode == 0, first.stderr
    assert "produced 5000 events" in first.stdout and "5000 labels" in first.stdout

    events = read_committed(settings.kafka, data["source"]["topic"], 5000, idle_s=1.0)
    labels = read_committed(settings.kafka, data["labels"]["topic"], 5000, idle_s=1.0)
    assert len(events) == 5000 and len(labels) == 5000
    by_id = {orjson.loads(m.value())["event_id"]: m for m in events}
    assert len(by_id) == 5000
    frauds = 0
    for msg in labels:
        label = orjson.loads(msg.value())
        event = orjson.loads(by_id[label["event_id"]].value())
        assert msg.key().decode() == label["event_id"]
        assert _ms(label["label_time"]) - _ms(event["event_time"]) == 30_000
        frauds += label["is_fraud"]
    assert f"({frauds} fraudulent)" in first.stdout
    assert 0.03 < frauds / 5000 < 0.07
    times = [_ms(orjson.loads(m.value())["event_time"]) for m in events]
    assert _ms("2026-11-20T00:00:00Z") <= min(times) and max(times) <= _ms("2026-11-20T01:00:00Z")
    for m in events:
        assert m.key().decode() == orjson.loads(m.value())["card_id"]

    second = run_eddy(args, env)
    assert second.returncode == 0, second.stderr
    both = read_committed(settings.kafka, data["source"]["topic"], 10_000, idle_s=1.0)
    per_partition: dict[int, list[bytes]] = {}
    for m in sorted(both, key=lambda m: (m.partition(), m.offset())):
        per_partition.setdefault(m.partition(), []).append(m.value())
    for values in per_partition.values():
        half = len(values) // 2
        assert values[:half] == values[half:]  # the same seed and start: the same bytes, in the same order


def test_paced_run_uses_wall_clock_event_times(settings, private_pipeline):
    env, data = private_pipeline
    started = time.time()
    result = run_eddy(["produce", "--count", "1500", "--rate", "1000", "--label-delay", "0"], env)
    took = time.time() - started
    assert result.returncode == 0, result.stderr
    assert took >= 1.4  # 1,500 events at 1,000/s cannot take less than about 1.5 s
    events = read_committed(settings.kafka, data["source"]["topic"], 1500, idle_s=0.5)
    assert len(events) == 1500
    for m in events:
        event_ms = _ms(orjson.loads(m.value())["event_time"])
        assert abs(event_ms - m.timestamp()[1]) < 2_000  # event time is the wall clock at produce time


def test_consume_prints_json_records_and_bad_flags_get_one_line(settings, private_pipeline):
    env, data = private_pipeline
    run_eddy(["produce", "--count", "20", "--backfill", "1m", "--label-delay", "0"], env)
    out = run_eddy(["consume", data["source"]["topic"], "--from-beginning", "--count", "20", "--json"], env)
    assert out.returncode == 0, out.stderr
    records = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert len(records) == 20
    assert all(r["topic"] == data["source"]["topic"] and r["value"]["card_id"] == r["key"] for r in records)

    for args, message, code in (  # a bad flag or argument is status 2
        (["produce", "--fraud-rate", "2"], "--fraud-rate must be between 0 and 0.5", 2),
        (["produce", "--backfill", "soon"], "soon", 2),
        (["consume", "no-such-topic", "--count", "1"], "topic 'no-such-topic' does not exist", 2),
    ):
        bad = run_eddy(args, env)
        assert bad.returncode == code and "Traceback" not in bad.stderr, bad.stderr
        assert bad.stderr.startswith("eddy: error:") and message in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_default_run_is_a_backfill_ending_now_at_the_cards_rhythm(settings, private_pipeline):
    env, data = private_pipeline
    before = time.time() * 1000
    result = run_eddy(["produce", "--count", "3000", "--cards", "1000", "--label-delay", "0"], env)
    assert result.returncode == 0, result.stderr
    assert "note:" not in result.stdout  # a realistic run gets no crowding notice
    events = [orjson.loads(m.value()) for m in read_committed(settings.kafka, data["source"]["topic"], 3000, idle_s=1.0)]
    assert len(events) == 3000
    times = sorted(_ms(e["event_time"]) for e in events)
    # 3,000 events over 1,000 cards at 3 a day: one day of history, ending at the run.
    assert before - 86_400_000 - 60_000 <= times[0] < before - 20 * 3_600_000
    assert before - 3_600_000 <= times[-1] <= time.time() * 1000
    per_card: dict[str, list[int]] = {}
    for e in events:
        per_card.setdefault(e["card_id"], []).append(_ms(e["event_time"]))
    gaps = sorted(b - a for ts in per_card.values() for a, b in pairwise(sorted(ts)))
    assert gaps[len(gaps) // 2] > 3_600_000  # the median card waits hours between payments, not milliseconds


def test_compressed_run_packs_events_and_says_so(settings, private_pipeline):
    env, data = private_pipeline
    result = run_eddy(["produce", "--count", "2000", "--cards", "100", "--label-delay", "0", "--compressed"], env)
    assert result.returncode == 0, result.stderr
    notice = " ".join(result.stdout.split())
    assert "100 cards at 1,000 events/s is an event per card every 0.1s" in notice and "--cards 600,000" in notice
    times = [_ms(orjson.loads(m.value())["event_time"])
             for m in read_committed(settings.kafka, data["source"]["topic"], 2000, idle_s=1.0)]
    assert len(times) == 2000 and max(times) - min(times) < 10_000  # about 1 ms apart

    bad = run_eddy(["produce", "--compressed", "--rate", "10"], env)
    assert bad.returncode == 2 and bad.stderr.startswith("eddy: error: --compressed is its own timing")
    assert len(bad.stderr.strip().splitlines()) == 1
