"""`eddy bench --peers` on a small backlog through a real broker: Quix Streams and Bytewax, running eddy's own
feature step, give eddy's native engine's rows, every one (contents, not counts)."""

from __future__ import annotations

import pytest

from tests.conftest import stack_environment

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]


def test_the_peers_rows_equal_eddys_for_every_event(tmp_path):
    from deploy.bench_peers import PEERS, peers_missing, run_peers
    from deploy.settings import load_settings

    missing = peers_missing()
    if missing:
        pytest.skip(missing)
    base = load_settings(environ=stack_environment(tmp_path / "base"))
    result = run_peers(base, events=2000, sample=0, on_progress=lambda line: None)

    engines = result["engines"]
    assert engines["eddy"]["rows"] == 2000
    for peer in PEERS:
        run = engines[peer.name]
        assert run["rows"] == 2000, peer.name
        assert run["rows_equal"] == {"sampled": 2000, "equal": 2000, "missing": 0, "different": 0,
                                     "examples": []}, peer.name
        assert run["peer"]["refused"] == 0 and run["cpu_s"] > 0, peer.name
