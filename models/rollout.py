"""Progressive delivery inside the stream: a challenger version beside the champion, in shadow (it
scores every event, its predictions go to the shadow topic only) or as a canary (a fixed share of
entities, chosen by a hash of the entity key, is served by it), stepped forward by a policy judged on
live labelled predictions, and rolled back when a bound breaks.

The rollout's state travels on the model-updates topic as signed messages (action `rollout`: this
step's mode and weight; action `rollout_end`: promoted, rolled back or aborted), so every scorer
replica applies the same state between two batches, in topic order, and a restarted scorer replays it.
Each batch is one transaction and each record is routed once, by the state at the batch's start: no
event is scored twice or skipped when a weight changes."""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from features.errors import ConfigError
from features.spec import PipelineSpec
from models.artifacts import model_update_message
from models.manifest import Manifest
from models.signing import SigningKey
from models.store import ObjectStore
from streams.kafka import KafkaConfig

BUCKETS = 10_000                      # a weight is applied in steps of 0.01%
ROLES = ("champion", "canary", "shadow")
OUTCOMES = ("promoted", "rolled_back", "aborted")
DEFAULT_STEPS = (10, 30, 100)         # percent of entities served by the challenger; 0 is shadow


def canary_mask(keys: Sequence[bytes | None], weight: float) -> np.ndarray:
    """Which records a canary at `weight` (0..1) serves: crc32 of the entity key in BUCKETS buckets,
    the lowest weight * BUCKETS of them. An entity keeps its version for a given weight, and one that
    the canary serves at a weight it also serves at any larger one (the buckets only grow)."""
    buckets = np.fromiter((zlib.crc32(k or b"") % BUCKETS for k in keys), dtype=np.int64, count=len(keys))
    return buckets < round(weight * BUCKETS)


@dataclass(frozen=True)
class Policy:
    """What judges a rollout (docs/operations.md has an example file). Each step waits for its minimum
    evidence (labelled predictions of the challenger and positives among them, since the step began,
    and a minimum duration), then advances when no bound is broken. A bound broken with at least
    `min_labelled` labelled predictions rolls the rollout back at once, whatever the step."""

    steps: tuple[int, ...] = DEFAULT_STEPS       # percent served by the challenger per step; 0: shadow
    min_labelled: int = 500
    min_positives: int = 10
    min_step_s: float = 60.0
    max_pr_auc_drop: float = 0.05                # challenger PR-AUC below the champion's by more: rollback
    max_precision_drop: float = 0.10             # precision at the serving threshold, the same way
    max_score_psi: float = 1.0                   # the challenger's score distribution against the champion's
    max_dlq_rate: float = 0.01                   # the challenger's rows refused (dead-lettered) per row scored
    max_latency_ratio: float = 3.0               # the challenger's model time per row against the champion's

    def __post_init__(self) -> None:
        steps = self.steps
        if not steps or any(not isinstance(s, int) or not 0 <= s <= 100 for s in steps):
            raise ConfigError(f"rollout steps {list(steps)}: give percentages from 0 (shadow) to 100, e.g. 10,30,100")
        if list(steps) != sorted(set(steps)) or steps[-1] != 100:
            raise ConfigError(f"rollout steps {list(steps)}: they must rise and end at 100, e.g. 10,30,100")
        for name in ("min_labelled", "min_positives", "min_step_s", "max_pr_auc_drop", "max_precision_drop",
                     "max_score_psi", "max_dlq_rate", "max_latency_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"rollout policy {name}: {value!r} is not a number >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "steps": list(self.steps)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "the rollout policy") -> Policy:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping of policy settings")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(data)
        if "steps" in values:
            values["steps"] = parse_steps(values["steps"])
        return cls(**values)


def parse_steps(value: Any) -> tuple[int, ...]:
    """Steps as given on a command line (`0,10,30,100`) or in a file (a list of numbers)."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        return tuple(int(str(s).strip()) for s in items)
    except (TypeError, ValueError):
        raise ConfigError(f"rollout steps {value!r}: give percentages, e.g. 10,30,100") from None


def load_policy(path: str | Path | None, steps: str | None = None, shadow: bool = False) -> Policy:
    """The policy of a YAML file (None: the defaults), with `--steps` and `--shadow` applied over it."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"--policy {path}: cannot read it ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--policy {path}: not YAML ({str(exc).splitlines()[0]})") from None
    policy = Policy.from_dict(data, f"--policy {path}" if path else "the rollout policy")
    if steps is not None:
        policy = Policy(**{**policy.to_dict(), "steps": parse_steps(steps)})
    if shadow and policy.steps[0] != 0:
        policy = Policy(**{**policy.to_dict(), "steps": (0, *policy.steps)})
    return policy


@dataclass(frozen=True)
class Route:
    """The rollout state a scorer applies: which version challenges, in which mode, at what weight."""

    rollout_id: str
    champion: str
    challenger: str
    step: int
    steps: tuple[int, ...]
    started_at: float
    step_started_at: float
    policy: dict[str, Any] = field(default_factory=dict)

    @property
    def percent(self) -> int:
        return self.steps[self.step]

    @property
    def mode(self) -> str:
        return "shadow" if self.percent == 0 else "canary"

    @property
    def weight(self) -> float:
        """The share of entities the challenger serves (0 in shadow)."""
        return self.percent / 100

    def weights(self) -> dict[str, float]:
        return {self.champion: round(1 - self.weight, 4), self.challenger: self.weight}

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.rollout_id, "champion": self.champion, "challenger": self.challenger,
                "step": self.step, "steps": list(self.steps), "mode": self.mode, "weight": self.weight,
                "started_at": self.started_at, "step_started_at": self.step_started_at, "policy": self.policy}

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> Route:
        r = message["rollout"]
        return cls(str(r["id"]), str(r["champion"]), str(message["version"]), int(r["step"]),
                   tuple(int(s) for s in r["steps"]), float(r["started_at"]), float(r["step_started_at"]),
                   dict(r.get("policy") or {}))

    def next_step(self, now: float) -> Route | None:
        """The route one step on, None after the last (the challenger then becomes the champion)."""
        if self.step + 1 >= len(self.steps):
            return None
        return Route(self.rollout_id, self.champion, self.challenger, self.step + 1, self.steps, self.started_at,
                     now, self.policy)


def start_route(champion: str, challenger: str, policy: Policy, now: float | None = None) -> Route:
    now = time.time() if now is None else now
    return Route(f"r-{uuid.uuid4().hex[:12]}", champion, challenger, 0, policy.steps, now, now, policy.to_dict())


def rollout_message(manifest: Manifest, uri: str, key: SigningKey, route: Route) -> dict[str, Any]:
    """The signed model-updates record of a rollout step (action `rollout`), naming the challenger's artifact."""
    return model_update_message(manifest, uri, key, action="rollout", extra={"rollout": route.to_dict()})


def rollout_end_message(manifest: Manifest, uri: str, key: SigningKey, route: Route, outcome: str,
                        reason: str) -> dict[str, Any]:
    """The signed record ending a rollout: `promoted` (the challenger serves everything from the next
    batch), `rolled_back` (a bound broke) or `aborted` (by hand); the champion serves alone otherwise."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome {outcome!r} is not one of {OUTCOMES}")
    return model_update_message(manifest, uri, key, action="rollout_end",
                                extra={"rollout": {**route.to_dict(), "outcome": outcome, "reason": reason}})


# -- judgment -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    """What the judge says of a rollout now: hold (wait for evidence), advance, promote or rollback."""

    action: str
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)


def judge(route: Route, champion: Mapping[str, Any], challenger: Mapping[str, Any], now: float) -> Decision:
    """Decide on a rollout from each version's live figures since the current step began.

    `champion` and `challenger` hold `labelled`, `positives`, `pr_auc`, `precision` (at the serving
    threshold), `scores` (the scores of their predictions, for the distribution shift), `rows`, `refused`
    and `model_s` (model call seconds over `rows`), any of them possibly None when not yet known."""
    policy = Policy.from_dict(route.policy)
    figures = {"champion": _public(champion), "challenger": _public(challenger)}
    labelled = challenger.get("labelled") or 0
    if labelled >= policy.min_labelled:
        broken = _broken(policy, champion, challenger, figures)
        if broken:
            return Decision("rollback", broken, figures)
    waited = now - route.step_started_at
    missing = []
    if labelled < policy.min_labelled:
        missing.append(f"{labelled}/{policy.min_labelled} labelled predictions")
    if (challenger.get("positives") or 0) < policy.min_positives:
        missing.append(f"{challenger.get('positives') or 0}/{policy.min_positives} positives")
    if waited < policy.min_step_s:
        missing.append(f"{waited:.0f}/{policy.min_step_s:.0f} s")
    if missing:
        return Decision("hold", "waiting for " + ", ".join(missing), figures)
    if route.next_step(now) is None:
        return Decision("promote", f"every step passed; the last at {route.percent}% for {waited:.0f} s", figures)
    return Decision("advance", f"step {route.percent}% passed on {labelled} labelled predictions in {waited:.0f} s; "
                               f"next {route.steps[route.step + 1]}%", figures)


def _public(figures: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if k != "scores"}


def _broken(policy: Policy, champion: Mapping[str, Any], challenger: Mapping[str, Any],
            figures: dict[str, Any]) -> str | None:
    """The first bound the challenger breaks, in one line, or None."""
    def drop(name: str) -> float | None:
        a, b = champion.get(name), challenger.get(name)
        return None if a is None or b is None else float(a) - float(b)

    pr = drop("pr_auc")
    if pr is not None and pr > policy.max_pr_auc_drop:
        return (f"PR-AUC {challenger['pr_auc']:.3f} is {pr:.3f} below the champion's {champion['pr_auc']:.3f} "
                f"(bound {policy.max_pr_auc_drop})")
    precision = drop("precision")
    if precision is not None and precision > policy.max_precision_drop:
        return (f"precision {challenger['precision']:.3f} is {precision:.3f} below the champion's "
                f"{champion['precision']:.3f} (bound {policy.max_precision_drop})")
    a, b = champion.get("scores"), challenger.get("scores")
    if a is not None and b is not None and len(a) and len(b):
        shift = score_psi(np.asarray(a), np.asarray(b))
        figures["score_psi"] = shift
        if shift > policy.max_score_psi:
            return f"score distribution shifted from the champion's by PSI {shift:.3f} (bound {policy.max_score_psi})"
    rows, refused = challenger.get("rows") or 0, challenger.get("refused") or 0
    if rows and refused / rows > policy.max_dlq_rate:
        return f"{refused} of {rows} rows refused ({refused / rows:.2%}, bound {policy.max_dlq_rate:.2%})"
    per_row = {who: (f.get("model_s") or 0) / f["rows"] for who, f in (("champion", champion),
                                                                      ("challenger", challenger)) if f.get("rows")}
    if len(per_row) == 2 and per_row["champion"] > 0 and per_row["challenger"] / per_row["champion"] > policy.max_latency_ratio:
        ratio = per_row["challenger"] / per_row["champion"]
        return f"model time per row {ratio:.1f}x the champion's (bound {policy.max_latency_ratio}x)"
    return None


def score_psi(reference: np.ndarray, live: np.ndarray, bins: int = 10) -> float:
    """PSI of `live` scores against `reference` scores over the reference's quantile bins."""
    from models.drift import psi

    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    expected = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=edges.size + 1) / reference.size
    counts = np.bincount(np.searchsorted(edges, live, side="right"), minlength=edges.size + 1)
    return psi(expected.tolist(), counts) or 0.0


# -- on the topic ----------------------------------------------------------------------------------------------

def current_rollout(updates: Sequence[Mapping[str, Any]]) -> tuple[Route, dict[str, Any]] | None:
    """The rollout in progress after these verified updates (topic order) and its latest step's
    message, or None when the last rollout ended (or none began)."""
    state: tuple[Route, dict[str, Any]] | None = None
    for message in updates:
        if message.get("action") == "rollout":
            state = (Route.from_message(message), dict(message))
        elif message.get("action") == "rollout_end":
            state = None
    return state


def _manifest_of(message: Mapping[str, Any], spec: PipelineSpec, key: SigningKey, store: ObjectStore | None) -> Manifest:
    from models.artifacts import verify_artifact
    from models.store import fetched

    with fetched(message["uri"], store) as directory:
        return verify_artifact(directory, key, spec.spec_hash, list(spec.model_inputs))


def publish_step(kafka: KafkaConfig, spec: PipelineSpec, key: SigningKey, message: Mapping[str, Any], route: Route,
                 store: ObjectStore | None = None) -> None:
    """Publish `route` (a next step, or the first) for the challenger of `message` (any update naming it);
    `store`: where an s3:// artifact is fetched from to check it."""
    from models.updates import publish_messages

    step = rollout_message(_manifest_of(message, spec, key, store), message["uri"], key, route)
    publish_messages(kafka, spec.topics.model_updates, [step], key, f"rollout step {route.percent}%")


def publish_end(kafka: KafkaConfig, spec: PipelineSpec, key: SigningKey, message: Mapping[str, Any], route: Route,
                outcome: str, reason: str, store: ObjectStore | None = None) -> None:
    """End the rollout: with `promoted`, the end and then a promote of the challenger (so the registry
    and a scorer that starts later see it as serving), in this order."""
    from models.updates import publish_messages, update_message

    manifest = _manifest_of(message, spec, key, store)
    messages = [rollout_end_message(manifest, message["uri"], key, route, outcome, reason)]
    if outcome == "promoted":
        messages.append(update_message(manifest, message["uri"], key, action="promote"))
    publish_messages(kafka, spec.topics.model_updates, messages, key, f"the end of rollout {route.rollout_id}")
