"""`eddy bench --peers` on a small backlog through a real broker: eddy at least once, Quix Streams and Bytewax
(the peers running eddy's own feature step) give eddy's exactly-once rows, every one (contents, not counts);
then each engine, still running, shows a row for every event of a short fixed load."""

from __future__ import annotations

import pytest

from tests.conftest import stack_environment

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]


def test_every_engines_rows_equal_eddys_and_each_sees_the_whole_load(tmp_path):
    from deploy.bench_peers import PEERS, peers_missing, run_peers
    from deploy.settings import load_settings

    missing = peers_missing()
    if missing:
        pytest.skip(missing)
    base = load_settings(environ=stack_environment(tmp_path / "base"))
    result = run_peers(base, events=2000, sample=0, load=(200, 3.0), on_progress=lambda line: None)

    engines = result["engines"]
    assert engines["eddy"]["rows"] == 2000
    for name in ("eddy_alo", *(peer.name for peer in PEERS)):
        run = engines[name]
        assert run["rows"] == 2000, name
        assert run["rows_equal"] == {"sampled": 2000, "equal": 2000, "missing": 0, "different": 0,
                                     "examples": []}, name
        assert run["cpu_s"] > 0, name
    assert engines["eddy_alo"]["guarantee"] == "at_least_once"
    for peer in PEERS:
        assert engines[peer.name]["peer"]["refused"] == 0, peer.name
    for name, run in engines.items():
        load = run["load"]
        assert (load["events"], load["seen"], load["late"]) == (600, 600, 0), name
        visible = load["visible_ms"]
        assert visible["count"] == 600 and 0 < visible["p50"] <= visible["p99"], name
    assert {goal["goal"] for goal in result["goals"]}  # the ratios are there; their values are the bench's
