"""The transaction stream: global event times, legitimate events drawn from card habits, fraud
episodes placed into it, and the (key, value) bytes the producer sends."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import orjson

from features.errors import ConfigError
from features.validation import iso_ms
from streams.generator.episodes import (
    EPISODE_WIDTH,
    MAX_AMOUNT,
    MEAN_EPISODE_LEN,
    PATTERNS,
    SHAPE_WIDTH,
    FraudQueue,
    build,
    pattern_of,
    prehistory,
    shapes,
)
from streams.generator.population import (
    ATM,
    CHANNEL_NAMES,
    COUNTRY_CODES,
    CURRENCIES,
    N_COUNTRIES,
    CardProfile,
    Population,
)

_NS_MS = 1_000_000
_NS_HOUR = 3_600 * 1_000_000_000
_MAX_MS = 9_000_000_000_000
_PATTERN_NAMES = np.array((None, *PATTERNS), dtype=object)
# Columns of the per-slot uniform draws. One fixed-width row per slot keeps the stream the same
# however the caller cuts it into batches.
(_U_GAP, _U_GROUP, _U_CARD, _U_USUAL, _U_MERCHANT, _U_TRAVEL, _U_CHANNEL, _U_Z1, _U_Z2,
 _U_SPECIAL, _U_SIZE, _U_EPISODE, _U_EPOCH) = range(13)
_U_WIDTH = 13


@dataclass(frozen=True)
class GeneratorConfig:
    seed: int = 0
    fraud_rate: float = 0.01
    cards: int = 10_000
    merchants: int = 2_000
    start_ms: int = 1_795_000_000_000  # event time of the first event (epoch ms)
    mean_gap_ms: float = 1.0  # mean time between consecutive events of the whole stream
    epoch_ms_fraction: float = 0.0  # share of events whose event_time is integer epoch ms
    id_prefix: str = "t"  # event ids are "<id_prefix>-<n>", n from 1
    amount_scale: float = 1.0  # every amount times this (a shifted profile, to try drift)


@dataclass(frozen=True)
class Batch:
    """The next events in event-time order; element i of every field describes event i."""

    keys: list[bytes]
    values: list[bytes]
    event_time_ms: np.ndarray
    event_ids: list[str]
    is_fraud: np.ndarray
    patterns: list[str | None]



def label_record(event_id: str, is_fraud: bool, label_time_ms: int) -> bytes:
    """The value of a record on the labels topic (its key is the event_id)."""
    return orjson.dumps({"event_id": event_id, "is_fraud": bool(is_fraud), "label_time": iso_ms(label_time_ms)})


def _validate(c: GeneratorConfig) -> None:
    if c.cards < 1:
        raise ConfigError(f"cards must be at least 1, got {c.cards}")
    if c.merchants < N_COUNTRIES:
        raise ConfigError(f"merchants must be at least {N_COUNTRIES} (one per country), got {c.merchants}")
    if not 0.0 <= c.fraud_rate <= 0.5:
        raise ConfigError(f"fraud_rate must lie in [0, 0.5], got {c.fraud_rate}")
    if not 0.0 <= c.epoch_ms_fraction <= 1.0:
        raise ConfigError(f"epoch_ms_fraction must lie in [0, 1], got {c.epoch_ms_fraction}")
    if not c.mean_gap_ms > 0:
        raise ConfigError(f"mean_gap_ms must be positive, got {c.mean_gap_ms}")
    if not 0.001 <= c.amount_scale <= 1000:
        raise ConfigError(f"amount_scale must lie in [0.001, 1000], got {c.amount_scale}")
    _check_time(c.start_ms)
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", c.id_prefix):
        raise ConfigError(f"id_prefix may hold letters, digits and _.:- only, got {c.id_prefix!r}")


def _check_time(epoch_ms: int) -> None:
    # Event times are kept in int64 nanoseconds, which end in 2262.
    if not 0 <= epoch_ms < _MAX_MS:
        raise ConfigError(f"event times must lie between 1970 and 2255 (epoch ms below {_MAX_MS}), got {epoch_ms}")


class TransactionGenerator:
    """Cards with personal habits, a global stream in event-time order, and fraud episodes
    scheduled into it. Every random draw comes from generators seeded once from config.seed;
    nothing reads the wall clock."""

    def __init__(self, config: GeneratorConfig) -> None:
        _validate(config)
        self.config = config
        population_rng, self._slots_rng, self._episodes_rng, self._history_rng = (
            np.random.Generator(np.random.PCG64(s)) for s in np.random.SeedSequence(config.seed).spawn(4)
        )
        self._pop = Population(config.cards, config.merchants, population_rng)
        self._next_ns = int(config.start_ms) * _NS_MS
        self._last_ns = self._next_ns
        self._gap_ns = float(config.mean_gap_ms) * _NS_MS
        self._seq = 1
        # Fraud events take slots of the stream, so starting episodes at this rate per slot
        # makes fraud_rate the share of fraud events.
        self._episode_p = config.fraud_rate / MEAN_EPISODE_LEN
        self._queue = FraudQueue()
        prehistory(self._pop, self._history_rng, self._episode_p / self._gap_ns, self._next_ns, self._queue)
        self._flight_gap_ns = self._gap_ns  # the pace the episodes in flight were drawn for
        self.amount_scale = config.amount_scale  # may change between batches: the profile shifts from then on

    def profile(self, card_id: str) -> CardProfile:
        """The habits of card `card_id` ("c-<n>"), for tests and for explaining a stream."""
        return self._pop.profile(card_id)

    def set_clock(self, now_ms: int, mean_gap_ms: float) -> None:
        """Continue the stream from now_ms (never before an event already emitted) with this mean
        gap, which should be the pace the caller really keeps (1000 / events per second); cheap
        enough to call before every batch. Fraud episodes in progress keep their event times (what
        falls into a skipped stretch comes right after it), and are added or thinned when the
        pace changes so that the fraud share stays right."""
        if not mean_gap_ms > 0:
            raise ConfigError(f"mean_gap_ms must be positive, got {mean_gap_ms}")
        _check_time(now_ms)
        next_ns = max(int(now_ms) * _NS_MS, self._last_ns)
        self._next_ns = next_ns
        self._gap_ns = gap = float(mean_gap_ms) * _NS_MS
        # A caller passing a measured pace changes it a little every time; re-balancing the
        # episodes in flight only on a real change keeps that from adding noise.
        built = self._flight_gap_ns
        if not 0.8 < gap / built < 1.25:
            if gap < built:
                prehistory(self._pop, self._history_rng, self._episode_p * (1 / gap - 1 / built), next_ns, self._queue)
            else:
                self._queue.thin(self._history_rng, built / gap)
            self._flight_gap_ns = gap

    def batch(self, n: int) -> Batch:
        """The next n events in event-time order. However the stream is cut into batches, it
        holds the same events."""
        u = self._slots_rng.random((n, _U_WIDTH))
        # Integer nanoseconds keep the running sum exact, whatever the batch boundaries.
        gaps = np.rint(-np.log1p(-u[:, _U_GAP]) * self._gap_ns).astype(np.int64)
        t = self._next_ns + np.cumsum(gaps) - gaps
        if n:
            self._next_ns = int(t[-1] + gaps[-1])
            self._last_ns = int(t[-1])

        card, merchant, amount, country, channel = self._legit(u, t)
        pattern = np.full(n, -1, dtype=np.int64)
        starts = np.flatnonzero(u[:, _U_EPISODE] < self._episode_p)
        if starts.size:
            rows = self._episodes_rng.random((starts.size, EPISODE_WIDTH))
            kind = pattern_of(rows[:, 0])
            length, offsets = shapes(kind, rows[:, 1: 1 + SHAPE_WIDTH])
            seq0, ep0 = self._queue.reserve(int(length.sum()), starts.size)
            body = rows[:, 1 + SHAPE_WIDTH:]
            self._queue.add(build(self._pop, kind, length, offsets, t[starts], body, seq0, ep0))
        slots, due = self._queue.take_due(t)
        if slots.size:
            card[slots], merchant[slots], amount[slots] = due["card"], due["merchant"], due["amount"]
            country[slots], channel[slots], pattern[slots] = due["country"], due["channel"], due["pattern"]
        if self.amount_scale != 1.0:
            amount = np.clip(np.round(amount * self.amount_scale, 2), 0.01, MAX_AMOUNT)
        return self._serialise(u, t, card, merchant, amount, country, channel, pattern)

    def _legit(self, u: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, ...]:
        pop = self._pop
        card = pop.card_at((t // _NS_HOUR) % 24, u[:, _U_GROUP], u[:, _U_CARD])
        travelling = u[:, _U_TRAVEL] < pop.p_travel[card]
        country = np.where(travelling, pop.travel[card], pop.home[card])
        um = u[:, _U_MERCHANT]
        usual = pop.usual[card, (um * um * pop.n_usual[card]).astype(np.int64)]
        at_usual = ~travelling & (u[:, _U_USUAL] < pop.p_usual[card])
        merchant = np.where(at_usual, usual, pop.merchant_in(country, um))
        cu = u[:, _U_CHANNEL]
        channel = (cu > pop.channel_cdf[card, 0]).astype(np.int64) + (cu > pop.channel_cdf[card, 1])

        z = np.sqrt(-2.0 * np.log1p(-u[:, _U_Z1])) * np.cos(2.0 * np.pi * u[:, _U_Z2])
        amount = np.exp(pop.mu[card] + pop.sigma[card] * z)
        # Legitimate outliers on both sides, so amount alone does not separate fraud.
        special, size = u[:, _U_SPECIAL], u[:, _U_SIZE]
        big = special < pop.p_big[card]
        tiny = ~big & (special < pop.p_big[card] + pop.p_tiny[card])
        amount = np.where(big, amount * np.exp(np.log(6.0) + size * np.log(40.0 / 6.0)), amount)
        amount = np.where(tiny, 0.2 + 1.8 * size, amount)
        atm = channel == ATM
        amount[atm] = np.clip(np.round(amount[atm] / 20.0) * 20.0, 20.0, 1000.0)
        return card, merchant, np.clip(np.round(amount, 2), 0.01, MAX_AMOUNT), country, channel

    def _serialise(
        self, u: np.ndarray, t: np.ndarray, card: np.ndarray, merchant: np.ndarray, amount: np.ndarray,
        country: np.ndarray, channel: np.ndarray, pattern: np.ndarray,
    ) -> Batch:
        n, pop = t.size, self._pop
        ms = t // _NS_MS
        times = np.datetime_as_string(ms.astype("datetime64[ms]"), unit="ms", timezone="UTC").tolist()
        if self.config.epoch_ms_fraction > 0:
            ms_list = ms.tolist()
            for i in np.flatnonzero(u[:, _U_EPOCH] < self.config.epoch_ms_fraction).tolist():
                times[i] = ms_list[i]
        first, self._seq = self._seq, self._seq + n
        ids = list(map(f"{self.config.id_prefix}-%d".__mod__, range(first, first + n)))
        rows = [
            {"event_id": e, "event_time": ts, "card_id": c, "merchant_id": m, "amount": a,
             "currency": cur, "country": co, "channel": ch}
            for e, ts, c, m, a, cur, co, ch in zip(
                ids, times, pop.card_ids[card].tolist(), pop.merchant_ids[merchant].tolist(), amount.tolist(),
                CURRENCIES[pop.home[card]].tolist(), COUNTRY_CODES[country].tolist(),
                CHANNEL_NAMES[channel].tolist(), strict=True,
            )
        ]
        return Batch(
            keys=pop.card_keys[card].tolist(), values=_dumps_each(rows), event_time_ms=ms, event_ids=ids,
            is_fraud=pattern >= 0, patterns=_PATTERN_NAMES[pattern + 1].tolist(),
        )


def _dumps_each(rows: list[dict]) -> list[bytes]:
    """orjson bytes of each row. One dumps of the whole list, cut at the row boundaries, is about
    four times faster than a dumps per row, whose many kept 1 KiB buffers the allocator handles
    badly. No value holds "},{" (ids are checked), and the count check guards it anyway."""
    if not rows:
        return []
    parts = orjson.dumps(rows)[2:-2].split(b"},{")
    if len(parts) != len(rows):
        return [orjson.dumps(r) for r in rows]
    return [b"{%b}" % p for p in parts]
