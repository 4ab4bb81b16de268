"""The publish policy (spec `model.publish`, models.policy): parsed with one-line errors, outside the
spec hash, and each bound applied to the actions it governs."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from deploy.settings import REPO_ROOT
from features.errors import SpecError
from features.spec import load_spec, parse_spec
from models.manifest import Manifest
from models.policy import PublishRefused, check_publish
from models.signing import SigningKey

KEY, OTHER = SigningKey.from_hex("44" * 32), SigningKey.from_hex("55" * 32)
BASE = yaml.safe_load((REPO_ROOT / "pipelines" / "fraud.yaml").read_text())


def spec(**publish):
    return parse_spec({**BASE, "model": {**BASE["model"], "publish": publish}})


def manifest(spec_, pr_auc=0.7, rows=5_000):
    fields = {f.name: None for f in dataclasses.fields(Manifest)}
    return dataclasses.replace(Manifest(**fields), version="v9", spec_hash=spec_.spec_hash,
                               metrics={"pr_auc": pr_auc, "holdout_rows": rows})


def test_the_policy_is_parsed_and_leaves_the_spec_hash_alone():
    plain = load_spec(REPO_ROOT / "pipelines" / "fraud.yaml")
    strict = spec(min_pr_auc=0.4, min_holdout_rows=500, max_drop=0.02, signers=[KEY.id])
    assert strict.spec_hash == plain.spec_hash
    assert (strict.model.publish.min_pr_auc, strict.model.publish.min_holdout_rows, strict.model.publish.max_drop,
            strict.model.publish.signers) == (0.4, 500, 0.02, (KEY.id,))


@pytest.mark.parametrize(("publish", "message"), [
    ({"min_pr_auc": 1.5}, "model.publish.min_pr_auc: expected a number from 0 to 1"),
    ({"min_holdout_rows": -1}, "model.publish.min_holdout_rows: expected a whole number"),
    ({"signers": ["not-an-id"]}, "model.publish.signers: expected a list of key ids"),
    ({"min_prauc": 0.5}, "model.publish.min_prauc: unknown key"),
])
def test_a_bad_policy_is_one_line_naming_the_key(publish, message):
    with pytest.raises(SpecError, match=message):
        spec(**publish)


def test_each_bound_refuses_what_it_governs():
    strict = spec(min_pr_auc=0.5, min_holdout_rows=1000, max_drop=0.05, signers=[KEY.id])
    check_publish(strict, manifest(strict), KEY, "publish", {"pr_auc": 0.72})  # every bound met
    refusals = [
        (manifest(strict, pr_auc=0.3), KEY, "publish", None, "min_pr_auc: holdout PR-AUC 0.300 is below 0.500"),
        (manifest(strict, rows=200), KEY, "promote", None, "min_holdout_rows: 200 holdout rows, fewer than 1,000"),
        (manifest(strict, pr_auc=0.6), KEY, "publish", {"pr_auc": 0.7},
         "max_drop: holdout PR-AUC 0.600 is more than 0.050 below the champion's 0.700"),
        (manifest(strict), OTHER, "rollback", None, f"signers: key {OTHER.id} is not among {KEY.id}"),
        (manifest(load_spec(REPO_ROOT / "pipelines" / "sensors.yaml")),
         KEY, "rollback", None, "trained for spec"),
    ]
    for m, signer, action, champion, reason in refusals:
        with pytest.raises(PublishRefused, match=reason.replace("(", r"\(")):
            check_publish(strict, m, signer, action, champion)
    # the champion comparison is for publishes only; a rollback checks only the spec and the signer
    check_publish(strict, manifest(strict, pr_auc=0.6), KEY, "promote", {"pr_auc": 0.7})
    check_publish(strict, manifest(strict, pr_auc=0.1, rows=1), KEY, "rollback")
    # no policy: anything trained for this spec goes
    check_publish(spec(), manifest(spec(), pr_auc=None, rows=None), OTHER, "publish", {"pr_auc": 0.9})
