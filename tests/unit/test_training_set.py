"""The topics' training set (`eddy retrain --source topics`): each features record joined with its
label by event id, oldest event first, however late the label came; labels whose event has no record
are counted, not silently dropped; poison on either topic is skipped."""

from __future__ import annotations

import orjson

from deploy.settings import REPO_ROOT
from features.spec import load_spec
from models import retrain

SPEC = load_spec(REPO_ROOT / "pipelines" / "fraud.yaml")
PICKLED = b"\x80\x04\x95\x0f\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x08event_id\x94\x8c\x02e1\x94s."  # a pickled dict


def test_labels_join_by_event_id_and_the_ones_without_a_record_are_counted(monkeypatch):
    features = [orjson.dumps({"event_id": eid, "event_time": t, "card_id": "c1", "features": {}, "late": False})
                for eid, t in (("e2", "2026-12-01T10:00:02+00:00"), ("e1", "2026-12-01T10:00:01+00:00"),
                               ("e3", "2026-12-01T10:00:03+00:00"))]
    labels = [orjson.dumps({"event_id": eid, "is_fraud": fraud})
              for eid, fraud in (("e9", True), ("e2", False), ("e1", True), ("e8", False))]  # e9, e8: no record
    poison = [PICKLED, b'{"event_id": "e1", "is_fraud": NaN}', b"[1, 2]", b'{"is_fraud": true}']
    topics = {SPEC.labels.topic: poison + labels, SPEC.topics.features: features + poison[:3]}
    monkeypatch.setattr(retrain, "_read_all", lambda kafka, topic: topics[topic])

    got = retrain.training_set(None, SPEC)

    assert [r["event_id"] for r in got.records] == ["e1", "e2"]  # e3 has no label yet: not a training row
    assert got.labels.tolist() == [1.0, 0.0]
    assert got.unjoined_labels == 2
