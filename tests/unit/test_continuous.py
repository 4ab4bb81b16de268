"""The continuous-retraining policy and its settings."""

from __future__ import annotations

import pytest

from features.errors import ConfigError
from models.continuous import RetrainPolicy


def test_due_after_enough_new_labels_counted_from_the_first_look():
    policy = RetrainPolicy(every_labels=1000)
    assert not policy.due(5000, 0.0)           # the first call only sets the starting point
    assert not policy.due(5999, 10.0)
    assert policy.due(6000, 20.0)
    policy.done(6000, 20.0)
    assert not policy.due(6500, 30.0)
    assert policy.due(7000, 40.0)


def test_due_after_enough_time_whatever_the_labels():
    policy = RetrainPolicy(every_s=60.0)
    assert not policy.due(0, 100.0)
    assert not policy.due(0, 159.9)
    assert policy.due(0, 160.0)
    policy.done(0, 160.0)
    assert not policy.due(10**6, 200.0)


def test_either_trigger_fires():
    policy = RetrainPolicy(every_labels=10, every_s=3600.0)
    policy.due(0, 0.0)
    assert policy.due(10, 1.0)
    assert RetrainPolicy(every_labels=10**9, every_s=1.0).due(0, 0.0) is False


@pytest.mark.parametrize("labels, seconds", [(None, None), (0, None), (None, 0.0), (-5, 10.0)])
def test_a_policy_needs_a_positive_trigger(labels, seconds):
    with pytest.raises(ConfigError):
        RetrainPolicy(labels, seconds)


def test_settings_read_the_retraining_and_ingestion_variables(tmp_path):
    from deploy.components import wanted
    from deploy.settings import load_settings

    base = {"EDDY_HOME": str(tmp_path)}
    plain = load_settings(environ=base)
    assert plain.ingest and plain.retrain_every_labels is None and plain.retrain_every_s is None
    assert "lakehouse" in [c.name for c in wanted(plain)] and "retrainer" not in [c.name for c in wanted(plain)]
    on = load_settings(environ={**base, "EDDY_RETRAIN_EVERY_LABELS": "5000", "EDDY_RETRAIN_EVERY": "30m",
                                "EDDY_INGEST_TRIGGER": "500ms"})
    assert (on.retrain_every_labels, on.retrain_every_s, on.ingest_trigger_s) == (5000, 1800.0, 0.5)
    assert "retrainer" in [c.name for c in wanted(on)]
    off = load_settings(environ={**base, "EDDY_INGEST": "off", "EDDY_RETRAIN_EVERY": "30m"})
    assert not {"lakehouse", "retrainer"} & {c.name for c in wanted(off)}
    for name, value in [("EDDY_RETRAIN_EVERY_LABELS", "many"), ("EDDY_RETRAIN_EVERY", "soon"),
                        ("EDDY_INGEST_TRIGGER", "0s"), ("EDDY_INGEST", "maybe")]:
        with pytest.raises(ConfigError, match=name):
            load_settings(environ={**base, name: value})


def test_a_second_writer_on_one_checkpoint_is_named_however_spark_or_delta_refuses_it():
    from lakehouse.ingest import CONCURRENT_WRITER, failure_reason

    refusals = ["[DELTA_CONCURRENT_TRANSACTION] ConcurrentTransactionException: This error occurs when\nmore",
                "[CONCURRENT_STREAM_LOG_UPDATE] Concurrent update to the log. Multiple streaming jobs detected for 7",
                "Multiple streaming queries are concurrently using file:/lake/_checkpoints/ingest/bronze/dlq/offsets."]
    for message in refusals:
        reason = failure_reason(message)
        assert reason.startswith(CONCURRENT_WRITER) and "\n" not in reason and message.split("\n")[0] in reason
    assert failure_reason("[DELTA_SCHEMA_CHANGED] the schema changed\nat ...") == "[DELTA_SCHEMA_CHANGED] the schema changed"
