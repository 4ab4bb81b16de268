"""The online writer's choice of rows within a batch, with no broker or Redis."""

from __future__ import annotations

from pathlib import Path

import orjson

from streams.loop import HeldRecord
from streams.online_writer import WriterStats, latest_rows

T0 = 1795341600000  # 2026-11-22T10:00:00Z


def test_latest_rows_of_a_batch():
    """No broker: within a batch the newest row wins, of equal times the later record; late and
    malformed records are skipped and counted."""
    from features.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "pipelines" / "fraud.yaml")

    def row(card, t, n, late=False):
        return orjson.dumps({"event_id": f"{card}-{n}", "card_id": card, "event_time": t, "late": late,
                             "features": {"txn_count_1m": n}})

    values = [row("a", "2026-11-22T10:00:01.000Z", 1), row("b", "2026-11-22T10:00:00.500Z", 1),
              row("a", "2026-11-22T10:00:01.000Z", 2), row("a", "2026-11-22T10:00:00.999Z", 3),
              row("b", "2026-11-22T10:00:09.000Z", 2, late=True), b"not json", b'{"card_id": "c"}',
              row("b", "2026-11-22T10:00:00.501Z", 3)]
    stats = WriterStats()
    latest = latest_rows(spec, [HeldRecord(v, None, "features", 0, i) for i, v in enumerate(values)], stats)
    assert latest.keys == ["a", "b"]
    assert latest.event_ms == [T0 + 1000, T0 + 501]
    assert [f["txn_count_1m"] for f in latest.features] == [2, 3]
    assert (stats.late, stats.bad, stats.superseded) == (1, 2, 3)
