"""The synthetic transaction generator: determinism, event format, fraud mix and patterns."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from functools import cache

import numpy as np
import orjson
import pytest

from features.errors import ConfigError
from streams.generator import (
    CHANNELS,
    PATTERNS,
    Batch,
    GeneratorConfig,
    TransactionGenerator,
    iso_ms,
    label_record,
)

DAY_MS = 86_400_000
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FIELDS = {"event_id", "event_time", "card_id", "merchant_id", "amount", "currency", "country", "channel"}
# A day of history in 100k events: the backfill shape, where per-card rates are realistic.
BACKFILL = GeneratorConfig(seed=7, mean_gap_ms=DAY_MS / 100_000)


def concat(batches: list[Batch]) -> Batch:
    return Batch(
        keys=[k for b in batches for k in b.keys],
        values=[v for b in batches for v in b.values],
        event_time_ms=np.concatenate([b.event_time_ms for b in batches]),
        event_ids=[e for b in batches for e in b.event_ids],
        is_fraud=np.concatenate([b.is_fraud for b in batches]),
        patterns=[p for b in batches for p in b.patterns],
    )


@cache
def stream(fraud_rate: float) -> tuple[TransactionGenerator, Batch, list[dict]]:
    gen = TransactionGenerator(replace(BACKFILL, fraud_rate=fraud_rate))
    b = concat([gen.batch(10_000) for _ in range(10)])
    return gen, b, [orjson.loads(v) for v in b.values]


def same(a: Batch, b: Batch) -> bool:
    return (
        a.keys == b.keys and a.values == b.values and a.event_ids == b.event_ids and a.patterns == b.patterns
        and np.array_equal(a.event_time_ms, b.event_time_ms) and np.array_equal(a.is_fraud, b.is_fraud)
    )


def count_within(events: list[dict], times: np.ndarray, window_ms: int) -> np.ndarray:
    """For each event, how many events of its card lie in (t - window, t] (itself included)."""
    card = np.array([int(e["card_id"][2:]) for e in events], dtype=np.int64)
    key = card * 10**15 + (times - times.min())
    order = np.argsort(key, kind="stable")
    sk = key[order]
    counts = np.empty(len(events), dtype=np.int64)
    counts[order] = np.searchsorted(sk, sk, side="right") - np.searchsorted(sk, sk - window_ms, side="right")
    return counts


def test_same_seed_and_start_give_identical_bytes_and_another_seed_differs() -> None:
    cfg = GeneratorConfig(seed=3, fraud_rate=0.05, mean_gap_ms=500.0, epoch_ms_fraction=0.2)
    a, b = TransactionGenerator(cfg), TransactionGenerator(cfg)
    for n in (5_000, 1, 7_000):
        assert same(a.batch(n), b.batch(n))
    other = TransactionGenerator(replace(cfg, seed=4)).batch(5_000)
    assert other.values != TransactionGenerator(cfg).batch(5_000).values
    later = TransactionGenerator(replace(cfg, start_ms=cfg.start_ms + 1)).batch(5_000)
    assert later.values != TransactionGenerator(cfg).batch(5_000).values


def test_how_the_stream_is_cut_into_batches_does_not_change_it() -> None:
    # Fraud episodes here span many batches, so the pending queue is exercised across cuts.
    cfg = GeneratorConfig(seed=11, fraud_rate=0.05, mean_gap_ms=50.0)
    whole = TransactionGenerator(cfg).batch(30_000)
    gen = TransactionGenerator(cfg)
    cut = concat([gen.batch(n) for n in (1, 999, 0, 4_000, 12_345, 12_655)])
    assert same(whole, cut)
    assert whole.is_fraud.sum() > 500


def test_every_event_has_exactly_the_eight_fields_with_their_types() -> None:
    gen, b, events = stream(0.01)
    currencies = {"EUR", "GBP", "USD", "CHF", "CAD"}
    for key, e, eid, ms in zip(b.keys, events, b.event_ids, b.event_time_ms.tolist(), strict=True):
        assert set(e) == FIELDS
        assert isinstance(e["amount"], float) and 0.01 <= e["amount"] < 100_000
        assert all(isinstance(e[f], str) for f in FIELDS - {"amount"})
        assert ISO.match(e["event_time"]) and e["event_time"] == iso_ms(ms)
        assert e["event_id"] == eid and key == e["card_id"].encode()
        assert re.fullmatch(r"c-\d+", e["card_id"]) and re.fullmatch(r"m-\d+", e["merchant_id"])
        assert e["currency"] in currencies and e["channel"] in CHANNELS and re.fullmatch(r"[A-Z]{2}", e["country"])
    assert len(set(b.event_ids)) == len(b.event_ids)
    assert b.event_ids[:2] == ["t-1", "t-2"]
    assert b.event_time_ms.dtype == np.int64 and b.is_fraud.dtype == bool
    assert all(e["currency"] == gen.profile(e["card_id"]).currency for e in events[:10_000])


def test_event_times_start_at_start_ms_never_decrease_and_keep_the_mean_gap() -> None:
    _, b, _ = stream(0.01)
    t = b.event_time_ms
    assert t[0] == BACKFILL.start_ms
    assert np.all(np.diff(t) >= 0)
    assert np.mean(np.diff(t)) == pytest.approx(BACKFILL.mean_gap_ms, rel=0.02)


def test_a_fraction_of_event_times_are_epoch_milliseconds() -> None:
    b = TransactionGenerator(GeneratorConfig(seed=1, epoch_ms_fraction=0.3)).batch(20_000)
    times = [orjson.loads(v)["event_time"] for v in b.values]
    as_int = np.array([isinstance(x, int) for x in times])
    assert as_int.mean() == pytest.approx(0.3, abs=0.02)
    assert all(x == ms if isinstance(x, int) else x == iso_ms(ms) for x, ms in zip(times, b.event_time_ms.tolist(), strict=True))


@pytest.mark.parametrize("rate", [0.01, 0.05])
def test_fraud_rate_is_close_to_the_configured_one(rate: float) -> None:
    _, b, _ = stream(rate)
    assert b.is_fraud.mean() == pytest.approx(rate, rel=0.2)
    assert [p is not None for p in b.patterns] == b.is_fraud.tolist()


@pytest.mark.parametrize("rate", [0.01, 0.05])
def test_every_pattern_carries_a_fair_share_of_fraud_events(rate: float) -> None:
    _, b, _ = stream(rate)
    mix = Counter(p for p in b.patterns if p is not None)
    assert set(mix) == set(PATTERNS)
    assert all(mix[p] / b.is_fraud.sum() >= 0.1 for p in PATTERNS), mix


def test_card_testing_is_a_burst_of_tiny_amounts_at_new_merchants() -> None:
    gen, b, events = stream(0.05)
    ct = [i for i, p in enumerate(b.patterns) if p == "card_testing"]
    assert len(ct) > 300
    burst = count_within([events[i] for i in ct], b.event_time_ms[ct], 120_000)
    for i in ct:
        e = events[i]
        assert e["amount"] < 2.0 and e["channel"] == "online"
        assert e["merchant_id"] not in gen.profile(e["card_id"]).usual_merchants
    # Every charge of a burst has its fellows within two minutes; episodes hold 5 to 12 charges.
    assert np.mean(burst >= 5) > 0.5 and burst.min() >= 1


def test_account_takeover_is_foreign_large_and_online() -> None:
    gen, b, events = stream(0.05)
    ato = [events[i] for i, p in enumerate(b.patterns) if p == "account_takeover"]
    assert len(ato) > 300
    for e in ato:
        prof = gen.profile(e["card_id"])
        assert e["country"] != prof.home_country and e["channel"] == "online"
        assert e["amount"] >= 60.0 and e["merchant_id"] not in prof.usual_merchants


def test_velocity_attack_is_many_ordinary_amounts_in_a_few_minutes() -> None:
    gen, b, events = stream(0.05)
    va = [i for i, p in enumerate(b.patterns) if p == "velocity_attack"]
    burst = count_within([events[i] for i in va], b.event_time_ms[va], 5 * 60_000)
    assert np.median(burst) >= 8
    legit = np.array([e["amount"] for e, f in zip(events, b.is_fraud, strict=True) if not f])
    va_amounts = np.array([events[i]["amount"] for i in va])
    assert 0.5 < np.median(va_amounts) / np.median(legit) < 2.0
    assert all(events[i]["country"] == gen.profile(events[i]["card_id"]).home_country for i in va)


def test_legit_amounts_overlap_fraud_amounts_on_both_ends() -> None:
    _, b, events = stream(0.01)
    legit = np.array([e["amount"] for e, f in zip(events, b.is_fraud, strict=True) if not f])
    assert (legit < 2.0).sum() > 500
    assert (legit > 350.0).sum() > 500


def test_windowed_features_separate_the_patterns_from_legit_traffic() -> None:
    _, b, events = stream(0.01)
    count_1m = count_within(events, b.event_time_ms, 60_000)
    pat = np.array([p or "legit" for p in b.patterns])
    assert np.mean(count_1m[pat == "legit"]) < 1.3
    assert np.mean(count_1m[pat == "card_testing"]) > 3.0
    assert np.mean(count_1m[pat == "velocity_attack"]) > 3.0
    amounts = np.array([e["amount"] for e in events])
    assert np.median(amounts[pat == "account_takeover"]) > 5 * np.median(amounts[pat == "legit"])


def test_cards_follow_their_daily_rhythm() -> None:
    gen, b, events = stream(0.01)
    hours = (b.event_time_ms // 3_600_000) % 24
    weight = [gen.profile(e["card_id"]).hourly_weights[h] for e, h in zip(events[:20_000], hours[:20_000].tolist(), strict=True)]
    # Uniform activity would give a mean weight of 1/24 at the hour of each event.
    assert np.mean(weight) * 24 > 1.5


def test_fraud_share_is_right_from_the_first_event_at_a_live_rate() -> None:
    # 50k events at 10k/s are 5 s of event time, far shorter than a takeover; the episodes
    # already in flight when the stream starts make up the share.
    b = TransactionGenerator(GeneratorConfig(seed=8, fraud_rate=0.05, mean_gap_ms=0.1)).batch(50_000)
    assert b.is_fraud.mean() == pytest.approx(0.05, rel=0.2)
    assert Counter(p for p in b.patterns if p)["account_takeover"] > 0.1 * b.is_fraud.sum()


def test_fraud_share_holds_when_set_clock_changes_the_rate() -> None:
    gen = TransactionGenerator(GeneratorConfig(seed=9, fraud_rate=0.02, mean_gap_ms=DAY_MS / 50_000))
    backfill = concat([gen.batch(10_000) for _ in range(5)])
    assert backfill.is_fraud.mean() == pytest.approx(0.02, rel=0.25)
    end = int(backfill.event_time_ms[-1])
    gen.set_clock(end + 1_000, 0.1)
    faster = gen.batch(50_000)
    assert faster.is_fraud.mean() == pytest.approx(0.02, rel=0.25)
    gen.set_clock(end + 3_600_000, 20.0)
    slower = gen.batch(50_000)
    assert slower.is_fraud.mean() == pytest.approx(0.02, rel=0.25)


def test_live_mode_with_set_clock_before_every_batch_keeps_share_and_bursts() -> None:
    # As a producer drives it: wall clock and measured pace (1.5 ms, jittery) before each batch.
    gen = TransactionGenerator(GeneratorConfig(seed=12, fraud_rate=0.05, start_ms=BACKFILL.start_ms))
    now, batches = BACKFILL.start_ms, []
    jitter = np.random.default_rng(0).uniform(-50, 50, 300).round().astype(int)
    for dt in jitter.tolist():
        gen.set_clock(now, (300 + dt) / 200)
        batches.append(gen.batch(200))
        now += 300 + dt
    b = concat(batches)
    assert np.all(np.diff(b.event_time_ms) >= 0)
    assert b.is_fraud.mean() == pytest.approx(0.05, rel=0.25)
    events = [orjson.loads(v) for v in b.values]
    ct = [i for i, p in enumerate(b.patterns) if p == "card_testing"]
    by_card: dict[str, list[int]] = {}
    for i in ct:
        by_card.setdefault(events[i]["card_id"], []).append(int(b.event_time_ms[i]))
    assert max(max(ts) - min(ts) for ts in by_card.values()) <= 101_000


def test_set_clock_continues_from_now_with_the_new_gap() -> None:
    gen = TransactionGenerator(GeneratorConfig(seed=2, fraud_rate=0.05))
    first = gen.batch(1_000)
    now = int(first.event_time_ms[-1]) + 3_600_000
    gen.set_clock(now, 20.0)
    live = gen.batch(5_000)
    assert live.event_time_ms[0] == now
    assert np.mean(np.diff(live.event_time_ms)) == pytest.approx(20.0, rel=0.1)
    assert live.event_ids[0] == "t-1001"
    gen.set_clock(now - DAY_MS, 20.0)
    back = gen.batch(100)
    assert back.event_time_ms[0] >= live.event_time_ms[-1]


def test_labels_round_trip() -> None:
    rec = orjson.loads(label_record("t-9", True, 1_795_000_000_123))
    assert rec == {"event_id": "t-9", "is_fraud": True, "label_time": "2026-11-18T11:06:40.123Z"}
    assert orjson.loads(label_record("t-1", np.bool_(False), 0))["is_fraud"] is False
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"


def test_profiles_describe_the_card() -> None:
    gen = TransactionGenerator(GeneratorConfig(seed=5, cards=50))
    prof = gen.profile("c-3")
    assert 3 <= len(prof.usual_merchants) <= 10 and prof.home_country != prof.travel_country
    assert sum(prof.hourly_weights) == pytest.approx(1.0) and sum(prof.channel_mix) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ({"cards": 0}, "cards"), ({"merchants": 5}, "merchants"), ({"fraud_rate": 0.9}, "fraud_rate"),
        ({"mean_gap_ms": 0.0}, "mean_gap_ms"), ({"epoch_ms_fraction": 1.5}, "epoch_ms_fraction"),
        ({"id_prefix": "t},{"}, "id_prefix"), ({"start_ms": 10**13}, "epoch ms"),
    ],
)
def test_an_invalid_config_says_what_to_fix(bad: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        TransactionGenerator(replace(GeneratorConfig(), **bad))
