"""The native engine's state across restarts, through the real broker and Redis: a worker stopped
twice mid-stream and started again continues from its checkpoint (the changelog alone, or the
changelog plus a replay of the source since the checkpoint) and gives the naive reference's rows,
exactly once, on the stream with every awkward case (out of order, late, duplicates, invalid)."""

from __future__ import annotations

import pytest
import redis

from streams.engines.config import EngineConfig
from streams.engines.native_engine import build_native
from tests.integration.test_flink_engine import PIPELINES
from tests.parity import check_engine_output, parity_case

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


@pytest.mark.parametrize("checkpoint_s, replays", [(0.0, False), (3600.0, True)],
                         ids=["checkpoint-every-batch", "checkpoint-once-then-replay"])
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
    assert second.changelog_records > 0 and third.changelog_records > second.changelog_records
    if replays:  # each run checkpoints at its first batch only: what follows it is replayed at the next start
        assert second.replayed > 25 and third.replayed > 25
    else:
        assert second.replayed == third.replayed == 0
