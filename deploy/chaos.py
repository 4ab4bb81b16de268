"""`eddy chaos`: the running stack under load while faults fall on it at random, then the checker.

A live stream (`eddy produce --rate`) runs for the soak's minutes. Meanwhile, after a random pause
around `every` seconds, one fault drawn from the chosen kinds falls on a real process of the stack:
SIGKILL of the feature engine, the online writer, a scorer, the broker or Redis, or SIGSTOP of Redis
past the clients' timeouts. For each the soak measures the restart time (the fault to the part up
again as a new process; for a pause, to its end) and the recovery time (the fault to every stage's
lag under one second of traffic, after the part is back, and staying there for 15 s), and waits for
that recovery before the next fault. When the stream ends and every stage has caught up,
deploy/checker.py holds the topics to an uninterrupted run: nothing lost, doubled or different.

Run it on a fresh stack (`eddy up`): the checker reads every topic whole."""

from __future__ import annotations

import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from deploy import stack
from deploy.checker import Verdict, check
from deploy.environment import child_environment
from deploy.settings import Settings
from features.errors import ConfigError, EddyError
from features.spec import PipelineSpec
from features.waiting import poll
from streams.kafka import group_lag

log = logging.getLogger(__name__)
PAUSE_S = 12.0             # a pause past the clients' 5 s socket timeouts, twice
BACK_TIMEOUT_S = 300.0     # a part not back by then is reported, and the soak goes on
STAGES = ("features", "online-writer", "scorer")
STEADY_S = 15.0            # recovered: every stage's lag under a second of traffic for this long


@dataclass
class Fault:
    """One kind of fault: which part it falls on, and what is done to that part's process."""

    name: str
    what: str
    part: Callable[[dict[str, Any], random.Random], str | None]  # the part's name in `eddy status`
    inject: Callable[[int], None]                                 # given the part's pid
    restarts: bool = True   # the part comes back as a new process (a pause ends with the same one)


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def _pause(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(PAUSE_S)
    finally:
        os.kill(pid, signal.SIGCONT)


def _named(prefix: str) -> Callable[[dict[str, Any], random.Random], str | None]:
    def pick(parts: dict[str, Any], rng: random.Random) -> str | None:
        names = sorted(n for n, p in parts.items() if n.startswith(prefix) and p.get("pid"))
        return rng.choice(names) if names else None
    return pick


FAULTS = {f.name: f for f in (
    Fault("engine", "SIGKILL of the feature engine", _named("features-"), _kill),
    Fault("writer", "SIGKILL of the online writer", _named("online-writer"), _kill),
    Fault("scorer", "SIGKILL of a scorer", _named("scorer-"), _kill),
    Fault("broker", "SIGKILL of the broker", _named("broker"), _kill),
    Fault("controller", "SIGKILL of the lone broker's controller", _named("controller"), _kill),
    Fault("redis", "SIGKILL of Redis", _named("redis"), _kill),
    Fault("redis-pause", f"SIGSTOP of Redis for {PAUSE_S:.0f} s", _named("redis"), _pause, restarts=False),
)}


@dataclass
class Injection:
    """One fault that fell, and how the stack came back from it."""

    at_s: float                  # since the soak began
    fault: str
    part: str
    restart_s: float | None      # the fault to the part up again (a new process; a pause: its end)
    recovery_s: float | None     # the fault to every stage's lag under one second of traffic, for good


@dataclass
class SoakReport:
    minutes: float
    rate: int
    seed: int
    injections: list[Injection] = field(default_factory=list)
    verdict: Verdict | None = None
    caught_up_s: float | None = None   # the stream's end to every stage at lag 0

    @property
    def ok(self) -> bool:
        return (self.verdict is not None and self.verdict.ok and self.caught_up_s is not None
                and all(i.recovery_s is not None for i in self.injections))

    def by_fault(self) -> dict[str, dict[str, Any]]:
        """Per kind of fault: how often, and the median and longest restart and recovery times."""
        table: dict[str, dict[str, Any]] = {}
        for name in sorted({i.fault for i in self.injections}):
            done = [i for i in self.injections if i.fault == name]
            table[name] = {"count": len(done), **_spread("restart_s", [i.restart_s for i in done]),
                           **_spread("recovery_s", [i.recovery_s for i in done])}
        return table

    def public(self) -> dict[str, Any]:
        return {"minutes": self.minutes, "rate": self.rate, "seed": self.seed, "ok": self.ok,
                "caught_up_s": self.caught_up_s, "faults": len(self.injections), "by_fault": self.by_fault(),
                "injections": [asdict(i) for i in self.injections],
                "verdict": self.verdict.public() if self.verdict else None}


def _spread(name: str, values: list[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    return {f"{name}_median": round(statistics.median(known), 1) if known else None,
            f"{name}_max": round(max(known), 1) if known else None}


def parse_faults(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown or not names:
        raise ConfigError(f"--faults: {', '.join(unknown) or 'none given'} is not a fault; choose from "
                          f"{', '.join(FAULTS)}")
    return names


def soak(settings: Settings, minutes: float, rate: int, every_s: float, faults: list[str], seed: int,
         say: Callable[[str], None]) -> SoakReport:
    """Run the soak (see the module's docstring); `say` shows progress, a line per fault."""
    if minutes <= 0 or rate <= 0 or every_s <= 0:
        raise ConfigError("--minutes, --rate and --every must be positive, e.g. --minutes 30 --rate 500 --every 60")
    spec = settings.pipeline_spec()
    parts = stack.status(settings)["parts"]
    down = [n for n, p in parts.items() if p.get("state") != "up" and p.get("managed", True)]
    if down:
        raise EddyError(f"the stack is not all up ({', '.join(down)}): run `eddy up` first, and see `eddy status`")
    absent = [f for f in faults if FAULTS[f].part(parts, random.Random(0)) is None]
    if absent:  # the fused stage has no online writer or scorer of its own
        say(f"no part in this stack for: {', '.join(absent)}; those faults are left out")
        faults = [f for f in faults if f not in absent]
        if not faults:
            raise ConfigError("--faults: none of them has a part in this stack; see `eddy status`")
    report = SoakReport(minutes=minutes, rate=rate, seed=seed)
    rng = random.Random(seed)
    count = int(minutes * 60 * rate)
    producer = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "produce", "--rate", str(rate), "--count", str(count),
         "--seed", str(seed), "--label-delay", "0"],
        env=child_environment(settings), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    began = time.monotonic()
    say(f"producing {count:,} events at {rate}/s for {minutes:g} min; a fault about every {every_s:g} s "
        f"from: {', '.join(faults)}")
    try:
        while producer.poll() is None:
            if _sleep_unless(producer, rng.uniform(every_s / 2, every_s * 1.5)):
                break
            injection = _inject(settings, spec, FAULTS[rng.choice(faults)], rng, rate, began)
            if injection is not None:
                report.injections.append(injection)
                say(_line(injection))
        _, errors = producer.communicate()
        if producer.returncode != 0:
            raise EddyError(f"the soak's producer failed: {(errors or '').strip().splitlines()[-1:]}")
    finally:
        if producer.poll() is None:
            producer.terminate()
            producer.wait(30)
    say("the stream ended; waiting for every stage to catch up")
    stream_end = time.monotonic()
    if poll(lambda: _lag(settings, spec) == 0, BACK_TIMEOUT_S, every_s=1.0):
        report.caught_up_s = round(time.monotonic() - stream_end, 1)
    say("checking every event against an uninterrupted run")
    report.verdict = check(settings.kafka, spec)
    return report


def _sleep_unless(producer: subprocess.Popen, seconds: float) -> bool:
    """Sleep, unless the producer ends first (then True)."""
    try:
        producer.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def _inject(settings: Settings, spec: PipelineSpec, fault: Fault, rng: random.Random, rate: int,
            began: float) -> Injection | None:
    parts = stack.status(settings)["parts"]
    name = fault.part(parts, rng)
    if name is None:
        log.warning("no part for fault %s in this stack; skipped", fault.name)
        return None
    pid = parts[name]["pid"]
    log.info("injecting %s: %s (pid %s)", fault.name, fault.what, pid)
    at = time.monotonic()
    fault.inject(pid)
    back = poll(lambda: not fault.restarts or _back(settings, name, pid), BACK_TIMEOUT_S, every_s=0.5)
    restart_s = round(time.monotonic() - at, 1) if back else None
    recovery_s = _recovery(settings, spec, rate, at) if back else None
    log.info("%s: back after %s s, recovered after %s s", fault.name, restart_s, recovery_s)
    return Injection(round(at - began, 1), fault.name, name, restart_s, recovery_s)


def _back(settings: Settings, name: str, old_pid: int) -> bool:
    """The part is up again, as a new process."""
    part = stack.status(settings)["parts"].get(name, {})
    return part.get("state") == "up" and part.get("pid") not in (None, old_pid)


def _recovery(settings: Settings, spec: PipelineSpec, bound: int, fault_at: float) -> float | None:
    """Seconds from the fault to the start of the first STEADY_S in which every stage's lag stayed at
    most `bound` (a stage that falls behind again soon after does not count as recovered); None if
    that did not happen within BACK_TIMEOUT_S."""
    since: float | None = None

    def steady() -> bool:
        nonlocal since
        lag = _lag(settings, spec)
        now = time.monotonic()
        if lag is None or lag > bound:
            since = None
            return False
        since = since or now
        return now - since >= STEADY_S

    return round(since - fault_at, 1) if poll(steady, BACK_TIMEOUT_S + STEADY_S, every_s=0.5) and since else None


def _lag(settings: Settings, spec: PipelineSpec) -> int | None:
    """The largest lag of the stages' consumer groups; None while the broker cannot say."""
    try:
        lags = group_lag(settings.kafka, timeout_s=5)
    except Exception:  # noqa: BLE001 - the broker may be the part that is down
        return None
    return max(sum(lags.get(spec.stage_id(stage), {}).values()) for stage in STAGES)


def _line(i: Injection) -> str:
    back = f"back in {i.restart_s} s" if i.restart_s is not None else f"not back in {BACK_TIMEOUT_S:.0f} s"
    caught = f"caught up in {i.recovery_s} s" if i.recovery_s is not None else "did not catch up"
    return f"[{i.at_s:7.1f} s] {FAULTS[i.fault].what} ({i.part}): {back}, {caught}"
