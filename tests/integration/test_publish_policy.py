"""The spec's publish policy on a real broker: a promotion below a bound, or by a key the policy does
not name, is refused in one line (by the library and by `eddy promote`) and nothing reaches the
model-updates topic; one that meets every bound is published."""

from __future__ import annotations

import pytest
import yaml

from deploy.settings import REPO_ROOT
from features.spec import parse_spec
from models.policy import PublishRefused
from models.registry import promote
from models.signing import SigningKey
from models.store import Artifacts
from tests.conftest import run_eddy
from tests.kafka_helpers import count_committed

pytestmark = [pytest.mark.kafka]


def spec_with(topic: str, publish: dict):
    data = yaml.safe_load((REPO_ROOT / "pipelines" / "fraud.yaml").read_text())
    data["topics"]["model_updates"] = topic
    data["model"]["publish"] = publish
    return data, parse_spec(data)


def saved(spec, root, key, version: str, pr_auc: float) -> None:
    from models.artifacts import save_artifact
    from models.baseline import baseline_model

    model, normaliser = baseline_model(spec)
    save_artifact(root / spec.name / version, model, normaliser,
                  {"version": version, "spec_hash": spec.spec_hash,
                   "metrics": {"pr_auc": pr_auc, "holdout_rows": 2_000}}, key)


def test_the_policy_keeps_what_it_refuses_off_the_topic(settings, stack_env, fresh_topic, tmp_path):
    key = settings.signing_key()
    data, spec = spec_with(fresh_topic, {"min_pr_auc": 0.5, "min_holdout_rows": 1000, "signers": [key.id]})
    root = tmp_path / "lake" / "models"
    saved(spec, root, key, "v-weak", 0.2)
    saved(spec, root, key, "v-good", 0.8)

    with pytest.raises(PublishRefused, match=r"promote of v-weak refused by model.publish.min_pr_auc: "
                                             r"holdout PR-AUC 0.200 is below 0.500"):
        promote(settings.kafka, spec, Artifacts(root), key, "v-weak")
    assert count_committed(settings.kafka, fresh_topic, idle_s=1) == 0

    # the same refusal from the CLI: one line, status 1, nothing published
    path = tmp_path / "fraud-policy.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**stack_env, "EDDY_PIPELINE": str(path), "EDDY_LAKEHOUSE": str(tmp_path / "lake")}
    cli = run_eddy(["promote", "v-weak"], env)
    assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr
    assert cli.stderr.strip().splitlines() == [
        "eddy: error: promote of v-weak refused by model.publish.min_pr_auc: holdout PR-AUC 0.200 is below 0.500"]
    assert count_committed(settings.kafka, fresh_topic, idle_s=1) == 0

    promote(settings.kafka, spec, Artifacts(root), key, "v-good")
    assert count_committed(settings.kafka, fresh_topic, idle_s=1) == 1

    # a key the policy does not name may not promote
    stranger = SigningKey.generate()
    _, strict = spec_with(fresh_topic, {"signers": ["0123456789abcdef"]})
    saved(strict, root, stranger, "v-other", 0.9)
    with pytest.raises(PublishRefused, match=f"signers: key {stranger.id} is not among 0123456789abcdef"):
        promote(settings.kafka, strict, Artifacts(root), stranger, "v-other")
    assert count_committed(settings.kafka, fresh_topic, idle_s=1) == 1
