"""The native engine's state across restarts, through the real broker and Redis: a worker stopped
twice mid-stream and started again continues from what it wrote (the changelog alone, or a replay
of the source since the oldest change not written) and gives the naive reference's rows, exactly
once, on the stream with every awkward case (out of order, late, duplicates, invalid)."""

from __future__ import annotations

import orjson
import pytest
import redis

from streams.engines.config import EngineConfig
from streams.engines.native_engine import build_native
from tests.integration.test_flink_engine import PIPELINES
from tests.kafka_helpers import read_committed
from tests.parity import check_engine_output, parity_case, same_features

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


@pytest.mark.parametrize("checkpoint_s, replays", [(0.0, False), (3600.0, True)],
                         ids=["states-written-each-batch", "states-never-written-all-replayed"])
def test_a_restarted_worker_continues_from_its_checkpoint(settings, tmp_path, checkpoint_s, replays):
    case = parity_case(settings, PIPELINES / "fraud.yaml", tmp_path / "spec.yaml")
    config = EngineConfig(kafka=settings.kafka, spec=case.spec, redis_url=settings.redis_url, data_dir=tmp_path,
                          partitions=3, batch_size=25, batch_wait_s=0.05, commit_interval_s=0.0)
    client = redis.Redis.from_url(settings.redis_url)
    total, consumed, runs = len(case.stream), 0, []
    for stop_at in (total // 3, 2 * total // 3, total):
        step, loop = build_native(config, client, checkpoint_s=checkpoint_s)
        before = consumed
        loop.run(step, lambda loop=loop, before=before, stop_at=stop_at: before + loop.stats.consumed >= stop_at)
        consumed += loop.stats.consumed
        runs.append(step)

    assert consumed == total  # each record consumed once over the three workers: commits carried over
    check_engine_output(settings, case.spec, case.expected, case.delivered, case.invalid)
    first, second, third = (run.restore_report for run in runs)
    assert (first.changelog_records, first.replayed) == (0, 0)
    if replays:  # only markers were written, at the first change: each start replays from the beginning
        assert second.changelog_records <= 3 and third.changelog_records <= 3  # markers, one per partition used
        assert second.replayed >= total // 3 and third.replayed >= 2 * total // 3
    else:
        assert 3 < second.changelog_records < third.changelog_records
        assert second.replayed == third.replayed == 0


def test_offsets_moved_back_by_hand_rebuild_the_state_from_the_first_record(settings, tmp_path):
    """An operator resets the group to the start: the checkpoint (which covers later offsets) is not
    trusted, the state is rebuilt, and the stream is computed again to the same rows."""
    from confluent_kafka import Consumer, TopicPartition

    case = parity_case(settings, PIPELINES / "fraud.yaml", tmp_path / "spec.yaml")
    config = EngineConfig(kafka=settings.kafka, spec=case.spec, redis_url=settings.redis_url, data_dir=tmp_path,
                          partitions=3, batch_size=50, batch_wait_s=0.05, commit_interval_s=0.0)
    client = redis.Redis.from_url(settings.redis_url)
    step, loop = build_native(config, client, checkpoint_s=0.0)
    loop.run(step, lambda: loop.stats.consumed >= len(case.stream))
    check_engine_output(settings, case.spec, case.expected, case.delivered, case.invalid)

    reset = Consumer(settings.kafka.client(**{"group.id": config.app_id, "enable.auto.commit": False}))
    reset.commit(offsets=[TopicPartition(case.spec.topics.source, p, 0) for p in range(3)], asynchronous=False)
    first_ends = {p: reset.get_watermark_offsets(TopicPartition(case.spec.topics.features, p), timeout=10)[1]
                  for p in range(3)}
    reset.close()
    again, loop = build_native(config, client, checkpoint_s=0.0)
    loop.run(again, lambda: loop.stats.consumed >= len(case.stream))
    assert again.restore_report.replayed == 0  # nothing replayed: everything is processed anew
    rows = read_committed(settings.kafka, case.spec.topics.features, 2 * len(case.expected), timeout_s=30, idle_s=1.0)
    second = {}
    for msg in rows:
        if msg.offset() >= first_ends[msg.partition()]:  # written by the second worker
            value = orjson.loads(msg.value())
            assert value["event_id"] not in second
            second[value["event_id"]] = value
    assert second.keys() == case.expected.keys()
    for event_id, (features, is_late) in case.expected.items():
        assert second[event_id]["late"] is is_late
        if not is_late:
            assert same_features(second[event_id]["features"], features), event_id
