"""Rollouts as the stack runs them: `eddy rollout start|status|promote|abort`, and the rollout judge (`eddy
run rollouts`), which evaluates the policy on live labelled predictions and the scorers' counts, steps the
rollout forward, promotes it or rolls it back, and records each decision in gold.rollouts."""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import UTC, datetime
from typing import Any

from deploy.settings import Settings
from features.errors import EddyError
from features.spec import PipelineSpec
from models.rollout import Decision, Route, current_rollout, judge, load_policy, publish_end, publish_step, start_route

log = logging.getLogger("eddy.rollouts")
JUDGE_COMPONENT = "rollouts"
HOLD_RECORD_S = 60.0  # a "hold" decision is recorded at most this often (every other decision always)


def _updates(settings: Settings, spec: PipelineSpec) -> list[dict]:
    from models.updates import read_updates

    return read_updates(settings.kafka, spec, settings.trusted_keys(), settings.object_store)


def record(settings: Settings, route: Route, decision: str, reason: str, metrics: dict[str, Any] | None = None) -> None:
    """One row of gold.rollouts, and the same in the log."""
    from lakehouse.registry import append_rollout

    log.info("rollout %s (%s vs %s) step %s%%: %s: %s", route.rollout_id, route.challenger, route.champion,
             route.percent, decision, reason)
    append_rollout(settings.lakehouse, {
        "decided_at": datetime.now(UTC), "rollout_id": route.rollout_id, "champion": route.champion,
        "challenger": route.challenger, "step": route.step, "percent": route.percent, "mode": route.mode,
        "decision": decision, "reason": reason, "metrics": metrics or {}})


def start(settings: Settings, spec: PipelineSpec, version: str, shadow: bool = False, steps: str | None = None,
          policy_file: str | None = None) -> Route:
    """Start a rollout of an existing version against the one serving; EddyError when one is in progress,
    the version is unknown or already serves."""
    from models.artifacts import verify_artifact
    from models.policy import check_publish
    from models.updates import serving_update

    policy = load_policy(policy_file, steps, shadow)
    updates = _updates(settings, spec)
    running = current_rollout(updates)
    if running is not None:
        raise EddyError(f"rollout {running[0].rollout_id} of {running[0].challenger} is in progress: "
                        "`eddy rollout abort` or `eddy rollout promote` first")
    serving = serving_update(updates)
    if serving is None:
        raise EddyError("no model serves yet: `eddy up` publishes the baseline")
    if serving["version"] == version:
        raise EddyError(f"{version} already serves; roll out another version")
    directory = settings.artifacts.existing(spec.name, version)
    key = settings.signing_key()
    check_publish(spec, verify_artifact(directory, key, spec.spec_hash, list(spec.model_inputs)), key, "rollout")
    route = start_route(serving["version"], version, policy)
    publish_step(settings.kafka, spec, key, {"uri": settings.artifacts.publish(directory)}, route, settings.object_store)
    record(settings, route, "start", f"steps {list(route.steps)} ({'shadow first' if route.percent == 0 else 'canary'})",
           {"policy": route.policy})
    return route


def _running(settings: Settings, spec: PipelineSpec) -> tuple[Route, dict]:
    running = current_rollout(_updates(settings, spec))
    if running is None:
        raise EddyError("no rollout is in progress: `eddy rollout start VERSION` begins one")
    return running


def end(settings: Settings, spec: PipelineSpec, outcome: str, reason: str) -> Route:
    """Promote (the challenger serves everything) or abort (the champion serves alone) the rollout in progress."""
    route, message = _running(settings, spec)
    publish_end(settings.kafka, spec, settings.signing_key(), message, route, outcome, reason, settings.object_store)
    record(settings, route, {"promoted": "promote", "aborted": "abort"}.get(outcome, outcome), reason)
    return route


def scorer_counts(client, spec: PipelineSpec) -> dict[str, dict[str, float]]:
    """Rows scored, rows refused and model seconds per version, summed over the scorer replicas' heartbeats
    (each replica's totals since it started)."""
    from streams.metrics import read_metrics

    out: dict[str, dict[str, float]] = {}
    for beat in read_metrics(client, spec.name, "scorer", max_age_s=30):
        for version, counts in (beat.get("by_version") or {}).items():
            mine = out.setdefault(version, {"rows": 0, "refused": 0, "model_s": 0.0})
            for name in mine:
                mine[name] += counts.get(name, 0)
    return out


def evaluate(settings: Settings, spec: PipelineSpec, client, route: Route, now: float) -> Decision:
    """The judge's decision on the rollout now, from the lakehouse (both versions' labelled predictions of
    the same events since the step began) and the scorers' counts."""
    from models.live import rollout_figures

    figures = rollout_figures(settings.lakehouse, spec, route.champion, route.challenger, route.step_started_at)
    counts = scorer_counts(client, spec)
    champion = {**figures["champion"], **counts.get(route.champion, {})}
    challenger = {**figures["challenger"], **counts.get(route.challenger, {})}
    return judge(route, champion, challenger, now)


def act(settings: Settings, spec: PipelineSpec, route: Route, message: dict, decision: Decision, now: float) -> None:
    """Carry out a decision: the next step, the promotion or the rollback, published and recorded."""
    key = settings.signing_key()
    if decision.action == "advance":
        following = route.next_step(now)
        assert following is not None
        publish_step(settings.kafka, spec, key, message, following, settings.object_store)
    elif decision.action == "promote":
        publish_end(settings.kafka, spec, key, message, route, "promoted", decision.reason, settings.object_store)
    elif decision.action == "rollback":
        publish_end(settings.kafka, spec, key, message, route, "rolled_back", decision.reason, settings.object_store)
    record(settings, route, decision.action, decision.reason, decision.metrics)


def run_judge_component(settings: Settings, spec: PipelineSpec) -> None:
    """`eddy run rollouts`: judge the rollout in progress every EDDY_ROLLOUT_EVERY until SIGTERM."""
    from streams.metrics import Heartbeat
    from streams.stores import redis_client

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client = redis_client(settings.redis_url)
    heartbeat = Heartbeat(client, spec.name, JUDGE_COMPONENT)
    state: dict[str, Any] = {"decisions": 0, "rollout": None, "last_decision": None, "last_error": None}
    held: dict[str, float] = {}  # rollout step -> when its last hold was recorded
    while not stop.is_set():
        heartbeat.beat(state["decisions"], force=True, **state)
        try:
            running = current_rollout(_updates(settings, spec))
            state["rollout"] = running[0].to_dict() if running else None
            if running is not None:
                route, message = running
                now = time.time()
                decision = evaluate(settings, spec, client, route, now)
                state["last_decision"] = f"{decision.action}: {decision.reason}"
                step = f"{route.rollout_id}/{route.step}"
                if decision.action != "hold":
                    act(settings, spec, route, message, decision, now)
                    state["decisions"] += 1
                elif now - held.get(step, 0.0) >= HOLD_RECORD_S:
                    record(settings, route, "hold", decision.reason, decision.metrics)
                    held[step] = now
            state["last_error"] = None
        except Exception as exc:  # noqa: BLE001 - a failed look (a table mid-write, the broker away) waits for the next
            state["last_error"] = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            log.warning("rollout judge: %s", state["last_error"])
        stop.wait(settings.rollout_every_s)


def status(settings: Settings, spec: PipelineSpec, client) -> dict[str, Any]:
    """`eddy rollout status --json`: champion, challenger, mode, weights, step, both versions' figures since
    the step began, and the decisions so far."""
    from lakehouse.registry import rollout_history
    from models.updates import serving_update

    updates = _updates(settings, spec)
    serving = serving_update(updates)
    running = current_rollout(updates)
    if running is None:
        last = rollout_history(settings.lakehouse)
        return {"champion": serving["version"] if serving else None, "challenger": None, "mode": "none",
                "weights": {serving["version"]: 1.0} if serving else {}, "decisions": last[-20:]}
    route, _ = running
    decision = evaluate(settings, spec, client, route, time.time())
    return {"champion": route.champion, "challenger": route.challenger, "mode": route.mode,
            "weights": route.weights(), "rollout": route.to_dict(), "step": route.step, "steps": list(route.steps),
            "metrics": decision.metrics, "next": {"action": decision.action, "reason": decision.reason},
            "decisions": rollout_history(settings.lakehouse, route.rollout_id)}
