"""The publish policy (the spec's `model.publish`): checked by the publisher before anything reaches
the model-updates topic. A refusal is one line naming the bound, and nothing is published.

- `publish` (a retrained version, or the first step of its rollout): every bound: holdout PR-AUC and
  rows, the drop against the champion scored on the same holdout, the signer.
- `promote` (by hand, or at the end of a rollout) and `rollout` (`eddy rollout start`): the holdout
  bounds and the signer; the champion comparison is the operator's or the judge's.
- `rollback`: the signer only (it brings back what served before).

Every action checks that the artifact was trained for this spec."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from features.errors import EddyError
from features.spec import PipelineSpec
from models.manifest import Manifest
from models.signing import SigningKey

ACTIONS = ("publish", "promote", "rollout", "rollback")


class PublishRefused(EddyError):
    """The publish policy refused an update; the message says which bound."""


def check_publish(spec: PipelineSpec, manifest: Manifest, signer: SigningKey, action: str,
                  champion_metrics: Mapping[str, Any] | None = None) -> None:
    """PublishRefused unless the policy lets `signer` take `action` with this artifact."""
    if action not in ACTIONS:
        raise ValueError(f"action {action!r} is not one of {ACTIONS}")
    policy = spec.model.publish
    what = f"{action} of {manifest.version} refused by model.publish"
    if manifest.spec_hash != spec.spec_hash:
        raise PublishRefused(f"{what}: trained for spec {manifest.spec_hash[:12]}, not this one")
    if policy.signers and signer.id not in policy.signers:
        raise PublishRefused(f"{what}.signers: key {signer.id} is not among {', '.join(policy.signers)}")
    if action == "rollback":
        return
    metrics = manifest.metrics or {}
    pr_auc, rows = metrics.get("pr_auc"), metrics.get("holdout_rows")
    if policy.min_pr_auc is not None and (pr_auc is None or pr_auc < policy.min_pr_auc):
        raise PublishRefused(f"{what}.min_pr_auc: holdout PR-AUC {_figure(pr_auc)} is below {policy.min_pr_auc:.3f}")
    if policy.min_holdout_rows is not None and (rows is None or rows < policy.min_holdout_rows):
        raise PublishRefused(f"{what}.min_holdout_rows: {rows if rows is not None else 'no'} holdout rows, "
                             f"fewer than {policy.min_holdout_rows:,}")
    if action == "publish" and policy.max_drop is not None and champion_metrics:
        champion = champion_metrics.get("pr_auc")
        if champion is not None and (pr_auc is None or pr_auc < champion - policy.max_drop):
            raise PublishRefused(f"{what}.max_drop: holdout PR-AUC {_figure(pr_auc)} is more than "
                                 f"{policy.max_drop:.3f} below the champion's {champion:.3f} on the same holdout")


def _figure(value: Any) -> str:
    return "none" if value is None else f"{value:.3f}"
