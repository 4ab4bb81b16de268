"""Synthetic card transactions for the fraud pipeline: per-card profiles, injected fraud episodes,
and the serialised (key, value) batches the producer sends, deterministic under a seed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson

from features.errors import ConfigError

CHANNELS = ("online", "pos", "atm")
PATTERNS = ("card_testing", "account_takeover", "velocity_attack")

# code, UTC offset in hours (November), weight as a home country, as a travel destination,
# as the origin of an account takeover. Takeover origins overlap with travel destinations so
# that a foreign country alone does not give the fraud away.
_COUNTRIES = (
    ("DE", 1, 22, 4, 1), ("FR", 1, 15, 8, 1), ("ES", 1, 9, 10, 1), ("IT", 1, 9, 9, 1),
    ("NL", 1, 6, 4, 1), ("BE", 1, 3, 2, 0), ("AT", 1, 3, 4, 0), ("IE", 0, 2, 2, 0),
    ("PT", 0, 2, 6, 0), ("FI", 2, 1, 1, 0), ("GB", 0, 12, 8, 3), ("US", -5, 8, 8, 4),
    ("CH", 1, 3, 4, 0), ("CA", -5, 3, 2, 1),
    ("TH", 7, 0, 5, 3), ("MX", -6, 0, 3, 3), ("TR", 3, 0, 4, 4), ("AE", 4, 0, 3, 2),
    ("JP", 9, 0, 3, 1), ("BR", -3, 0, 2, 6), ("NG", 1, 0, 0, 8), ("RU", 3, 0, 0, 8),
    ("CN", 8, 0, 1, 6), ("IN", 5, 0, 1, 6), ("ID", 7, 0, 1, 5), ("RO", 2, 0, 1, 6),
    ("UA", 2, 0, 0, 5), ("VN", 7, 0, 1, 5), ("PH", 8, 0, 1, 5),
)
# Amounts are in the card's billing currency; every home currency is worth roughly one euro,
# so amount features mean the same thing for every card.
_HOME_CURRENCY = {
    "DE": "EUR", "FR": "EUR", "ES": "EUR", "IT": "EUR", "NL": "EUR", "BE": "EUR", "AT": "EUR",
    "IE": "EUR", "PT": "EUR", "FI": "EUR", "GB": "GBP", "US": "USD", "CH": "CHF", "CA": "CAD",
}
_CODES = np.array([c[0] for c in _COUNTRIES], dtype=object)
_TZ = np.array([c[1] for c in _COUNTRIES])
_W_HOME, _W_TRAVEL, _W_TAKEOVER = (np.array([c[k] for c in _COUNTRIES], dtype=float) for k in (2, 3, 4))
_CHANNEL_OBJ = np.array(CHANNELS, dtype=object)
_PATTERN_OBJ = np.array((None, *PATTERNS), dtype=object)
_ONLINE, _POS, _ATM = 0, 1, 2
_CT, _ATO, _VA = 0, 1, 2
_NS_MS = 1_000_000
_NS_HOUR = 3_600 * 1_000_000_000
_MAX_USUAL = 10

# Share of episodes per pattern and (low, high) of its event count, high exclusive; with these
# the three patterns carry roughly a third of the fraud events each.
_EPISODE_MIX = np.array([0.35, 0.45, 0.20])
_EPISODE_LEN = ((5, 13), (3, 9), (10, 26))
_MEAN_EPISODE_LEN = float(sum(p * (lo + hi - 1) / 2 for p, (lo, hi) in zip(_EPISODE_MIX, _EPISODE_LEN, strict=True)))

# Columns of the per-slot uniform draws. One fixed-width row per slot keeps the stream the same
# however the caller cuts it into batches.
(_U_GAP, _U_GROUP, _U_CARD, _U_USUAL, _U_MERCHANT, _U_TRAVEL, _U_CHANNEL, _U_Z1, _U_Z2,
 _U_SPECIAL, _U_SIZE, _U_EPISODE, _U_EPOCH) = range(13)
_U_WIDTH = 13


def _rhythm(*peaks: tuple[float, float, float]) -> np.ndarray:
    """Activity weight per local hour: a low floor plus circular bumps (hour, width, height)."""
    hours = np.arange(24.0)
    w = np.full(24, 0.03)
    for centre, width, height in peaks:
        d = np.abs(hours - centre)
        d = np.minimum(d, 24 - d)
        w += height * np.exp(-0.5 * (d / width) ** 2)
    return w / w.sum()


_ARCHETYPES = np.stack([
    _rhythm((8, 1.0, 0.4), (12.5, 1.5, 1.0), (18, 1.5, 0.8)),   # office hours
    _rhythm((11, 3.0, 1.0), (16, 2.5, 0.8)),                   # daytime
    _rhythm((13, 2.0, 0.4), (20, 2.0, 1.0)),                   # evening
    _rhythm((15, 3.0, 0.5), (23, 2.5, 1.0)),                   # night owl
])


@dataclass(frozen=True)
class GeneratorConfig:
    seed: int = 0
    fraud_rate: float = 0.01
    cards: int = 10_000
    merchants: int = 2_000
    start_ms: int = 1_795_000_000_000
    mean_gap_ms: float = 1.0
    epoch_ms_fraction: float = 0.0
    id_prefix: str = "t"


@dataclass(frozen=True)
class Batch:
    """The next events in event-time order; element i of every field describes event i."""

    keys: list[bytes]
    values: list[bytes]
    event_time_ms: np.ndarray
    event_ids: list[str]
    is_fraud: np.ndarray
    patterns: list[str | None]


@dataclass(frozen=True)
class CardProfile:
    """What a card's legitimate behaviour is drawn from; hourly_weights are per UTC hour."""

    card_id: str
    home_country: str
    currency: str
    travel_country: str
    usual_merchants: tuple[str, ...]
    median_amount: float
    amount_sigma: float
    channel_mix: tuple[float, float, float]
    hourly_weights: tuple[float, ...]


def iso_ms(epoch_ms: int) -> str:
    """ISO-8601 UTC with milliseconds and a Z, the form batch() writes."""
    t = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=int(epoch_ms))
    return f"{t:%Y-%m-%dT%H:%M:%S}.{t.microsecond // 1000:03d}Z"


def label_record(event_id: str, is_fraud: bool, label_time_ms: int) -> bytes:
    """The value of a record on the labels topic (its key is the event_id)."""
    return orjson.dumps({"event_id": event_id, "is_fraud": bool(is_fraud), "label_time": iso_ms(label_time_ms)})


def _validate(c: GeneratorConfig) -> None:
    if c.cards < 1:
        raise ConfigError(f"cards must be at least 1, got {c.cards}")
    if c.merchants < len(_COUNTRIES):
        raise ConfigError(f"merchants must be at least {len(_COUNTRIES)} (one per country), got {c.merchants}")
    if not 0.0 <= c.fraud_rate <= 0.5:
        raise ConfigError(f"fraud_rate must lie in [0, 0.5], got {c.fraud_rate}")
    if not 0.0 <= c.epoch_ms_fraction <= 1.0:
        raise ConfigError(f"epoch_ms_fraction must lie in [0, 1], got {c.epoch_ms_fraction}")
    if not c.mean_gap_ms > 0:
        raise ConfigError(f"mean_gap_ms must be positive, got {c.mean_gap_ms}")


def _cdf(p: np.ndarray) -> np.ndarray:
    c = np.cumsum(p, axis=-1)
    return c / c[..., -1:]


def _pick(u: np.ndarray, offsets: np.ndarray, cdf_flat: np.ndarray) -> np.ndarray:
    """Index into cdf_flat, whose segment k holds 2k + a cumulative distribution; zero-width
    entries are never chosen and the result never leaves segment `offsets`."""
    return np.searchsorted(cdf_flat, 2 * offsets + np.minimum(u, 1 - 1e-9), side="right")


class TransactionGenerator:
    """Cards with personal habits, a global stream in event-time order, and fraud episodes
    scheduled into it. Every random draw comes from generators seeded once from config.seed."""

    def __init__(self, config: GeneratorConfig) -> None:
        _validate(config)
        self.config = config
        profiles_ss, slots_ss, episodes_ss = np.random.SeedSequence(config.seed).spawn(3)
        self._slots_rng = np.random.Generator(np.random.PCG64(slots_ss))
        self._episodes_rng = np.random.Generator(np.random.PCG64(episodes_ss))
        self._build(np.random.Generator(np.random.PCG64(profiles_ss)))
        self._next_ns = int(config.start_ms) * _NS_MS
        self._last_ns = self._next_ns
        self._gap_ns = float(config.mean_gap_ms) * _NS_MS
        self._seq = 1
        self._fraud_seq = 0
        self._episode_p = config.fraud_rate / _MEAN_EPISODE_LEN
        # Scheduled fraud events not yet placed in a slot, as columns.
        self._pending = _empty_pending()

    # -- profiles -------------------------------------------------------------------------------
    def _build(self, rng: np.random.Generator) -> None:
        n_cards, n_merch, n_countries = self.config.cards, self.config.merchants, len(_COUNTRIES)

        # Merchants: at least one per country, the rest by where cards spend; ids shuffled so
        # that a merchant's number says nothing about its country.
        w_merch = _W_HOME / _W_HOME.sum() * 0.8 + _W_TRAVEL / _W_TRAVEL.sum() * 0.15 + _W_TAKEOVER / _W_TAKEOVER.sum() * 0.05
        extra = np.searchsorted(_cdf(w_merch), rng.random(n_merch - n_countries), side="right")
        country_by_pos = np.sort(np.concatenate([np.arange(n_countries), extra]))
        self._merch_start = np.searchsorted(country_by_pos, np.arange(n_countries))
        self._merch_count = np.bincount(country_by_pos, minlength=n_countries)
        self._merch_by_pos = rng.permutation(n_merch)
        self._merch_country = np.empty(n_merch, dtype=np.int64)
        self._merch_country[self._merch_by_pos] = country_by_pos

        home = np.searchsorted(_cdf(_W_HOME), rng.random(n_cards), side="right")
        travel_cdf = _cdf(_W_TRAVEL)
        t1, t2 = (np.searchsorted(travel_cdf, rng.random(n_cards), side="right") for _ in range(2))
        us, gb = list(_CODES).index("US"), list(_CODES).index("GB")
        travel = np.where(t1 != home, t1, np.where(t2 != home, t2, np.where(home == us, gb, us)))
        self._home, self._travel = home, travel
        self._currency_obj = np.array([_HOME_CURRENCY.get(c, "EUR") for c in _CODES], dtype=object)

        n_usual = rng.integers(3, _MAX_USUAL + 1, n_cards)
        usual_u = rng.random((n_cards, _MAX_USUAL))
        self._usual = self._merchant_in(home[:, None], usual_u)
        # Pad past n_usual with the favourite so the fixed-width matrix holds only real merchants.
        self._usual = np.where(np.arange(_MAX_USUAL)[None, :] < n_usual[:, None], self._usual, self._usual[:, :1])
        self._n_usual = n_usual
        self._p_usual = rng.uniform(0.6, 0.92, n_cards)
        self._p_travel = rng.uniform(0.0, 0.03, n_cards)

        self._mu = np.log(25.0) + 0.7 * rng.standard_normal(n_cards)
        self._sigma = rng.uniform(0.5, 1.0, n_cards)
        self._p_tiny = rng.uniform(0.0, 0.06, n_cards)
        self._p_big = rng.uniform(0.0, 0.012, n_cards)
        mix = rng.dirichlet([2.0, 3.0, 0.5], n_cards)
        self._channel_mix = mix
        self._channel_cdf = np.cumsum(mix, axis=1)[:, :2]

        # Rhythm: an archetype in local time, moved by the home time zone and a personal hour.
        archetype = rng.integers(0, len(_ARCHETYPES), n_cards)
        shift = _TZ[home] + rng.integers(-1, 2, n_cards)
        lo, n_shift = int(_TZ.min()) - 1, int(_TZ.max() - _TZ.min()) + 3
        group = archetype * n_shift + (shift - lo)
        n_groups = len(_ARCHETYPES) * n_shift
        self._archetype, self._shift = archetype, shift
        activity = rng.lognormal(0.0, 0.7, n_cards)

        g_arch = np.arange(n_groups) // n_shift
        g_shift = np.arange(n_groups) % n_shift + lo
        local = (np.arange(24)[:, None] + g_shift[None, :]) % 24
        g_weight = _ARCHETYPES[g_arch[None, :], local] * np.bincount(group, activity, n_groups)[None, :]
        self._group_cdf = (2 * np.arange(24)[:, None] + _cdf(g_weight)).ravel()
        self._n_groups = n_groups

        order = np.argsort(group, kind="stable")
        sorted_group = group[order]
        within = np.cumsum(activity[order])
        starts = np.searchsorted(sorted_group, np.arange(n_groups))
        base = np.concatenate([[0.0], within])[starts]
        total = np.bincount(group, activity, n_groups)
        frac = (within - base[sorted_group]) / np.where(total > 0, total, 1.0)[sorted_group]
        frac[np.r_[sorted_group[1:] != sorted_group[:-1], True]] = 1.0
        self._card_cdf = 2 * sorted_group + frac
        self._card_by_pos = order

        self._card_ids = np.array([f"c-{i}" for i in range(n_cards)], dtype=object)
        self._card_keys = np.array([s.encode() for s in self._card_ids], dtype=object)
        self._merch_ids = np.array([f"m-{i}" for i in range(n_merch)], dtype=object)

    def _merchant_in(self, country: np.ndarray, u: np.ndarray) -> np.ndarray:
        # u**2 skews towards the first merchants of a country: a few popular, many rare.
        pos = self._merch_start[country] + (u * u * self._merch_count[country]).astype(np.int64)
        return self._merch_by_pos[pos]

    def profile(self, card_id: str) -> CardProfile:
        """The habits of card `card_id` ("c-<n>"), for tests and for explaining a stream."""
        c = int(card_id.removeprefix("c-"))
        home = int(self._home[c])
        weights = _ARCHETYPES[self._archetype[c], (np.arange(24) + self._shift[c]) % 24]
        return CardProfile(
            card_id=card_id,
            home_country=_CODES[home],
            currency=self._currency_obj[home],
            travel_country=_CODES[self._travel[c]],
            usual_merchants=tuple(self._merch_ids[self._usual[c, : self._n_usual[c]]].tolist()),
            median_amount=float(np.exp(self._mu[c])),
            amount_sigma=float(self._sigma[c]),
            channel_mix=tuple(float(x) for x in self._channel_mix[c]),
            hourly_weights=tuple(float(x) for x in weights),
        )

    # -- the stream -----------------------------------------------------------------------------
    def set_clock(self, now_ms: int, mean_gap_ms: float) -> None:
        """Continue the stream from now_ms (never before an event already emitted) with this mean
        gap; fraud episodes in progress move along so they keep their own timing."""
        if not mean_gap_ms > 0:
            raise ConfigError(f"mean_gap_ms must be positive, got {mean_gap_ms}")
        new_next = max(int(now_ms) * _NS_MS, self._last_ns)
        self._pending["t"] += new_next - self._next_ns
        self._next_ns = new_next
        self._gap_ns = float(mean_gap_ms) * _NS_MS

    def batch(self, n: int) -> Batch:
        """The next n events in event-time order. Cutting a stream into batches differently
        gives the same events."""
        u = self._slots_rng.random((n, _U_WIDTH))
        gaps = np.rint(-np.log1p(-u[:, _U_GAP]) * self._gap_ns).astype(np.int64)
        t = self._next_ns + np.cumsum(gaps) - gaps
        if n:
            self._next_ns = int(t[-1] + gaps[-1])
            self._last_ns = int(t[-1])

        card, merchant, amount, country, channel = self._legit(u, t)

        starts = np.flatnonzero(u[:, _U_EPISODE] < self._episode_p)
        if starts.size:
            self._schedule(t[starts])
        slots, due = self._place(t)
        pattern = np.full(n, -1, dtype=np.int64)
        if slots.size:
            card[slots] = due["card"]
            merchant[slots] = due["merchant"]
            amount[slots] = due["amount"]
            country[slots] = due["country"]
            channel[slots] = due["channel"]
            pattern[slots] = due["pattern"]
        return self._serialise(u, t, card, merchant, amount, country, channel, pattern)

    def _legit(self, u: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, ...]:
        hour = (t // _NS_HOUR) % 24
        group = _pick(u[:, _U_GROUP], hour, self._group_cdf) - hour * self._n_groups
        pos = np.minimum(_pick(u[:, _U_CARD], group, self._card_cdf), len(self._card_by_pos) - 1)
        card = self._card_by_pos[pos]

        travelling = u[:, _U_TRAVEL] < self._p_travel[card]
        country = np.where(travelling, self._travel[card], self._home[card])
        um = u[:, _U_MERCHANT]
        usual = self._usual[card, (um * um * self._n_usual[card]).astype(np.int64)]
        merchant = np.where(
            ~travelling & (u[:, _U_USUAL] < self._p_usual[card]), usual, self._merchant_in(country, um)
        )
        cu = u[:, _U_CHANNEL]
        channel = (cu > self._channel_cdf[card, 0]).astype(np.int64) + (cu > self._channel_cdf[card, 1])

        z = np.sqrt(-2.0 * np.log1p(-u[:, _U_Z1])) * np.cos(2.0 * np.pi * u[:, _U_Z2])
        amount = np.exp(self._mu[card] + self._sigma[card] * z)
        # Legitimate outliers on both sides, so amount alone does not separate fraud.
        special, size = u[:, _U_SPECIAL], u[:, _U_SIZE]
        big = special < self._p_big[card]
        tiny = ~big & (special < self._p_big[card] + self._p_tiny[card])
        amount = np.where(big, amount * np.exp(np.log(6.0) + size * np.log(40.0 / 6.0)), amount)
        amount = np.where(tiny, 0.2 + 1.8 * size, amount)
        atm = channel == _ATM
        amount[atm] = np.clip(np.round(amount[atm] / 20.0) * 20.0, 20.0, 1000.0)
        return card, merchant, np.maximum(np.round(amount, 2), 0.01), country, channel

    def _schedule(self, start_ns: np.ndarray) -> None:
        parts = [self._pending]
        for t0 in start_ns.tolist():
            parts.append(self._episode(int(t0)))
        self._pending = {k: np.concatenate([p[k] for p in parts]) for k in self._pending}

    def _place(self, t: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Give each due fraud event the first free slot at or after its scheduled time; those
        pushed past the batch wait for the next one."""
        p = self._pending
        if not p["t"].size or not t.size:
            return np.empty(0, dtype=np.int64), {}
        is_due = p["t"] <= t[-1]
        idx = np.flatnonzero(is_due)
        idx = idx[np.lexsort((p["seq"][idx], p["t"][idx]))]
        wanted = np.searchsorted(t, p["t"][idx], side="left")
        k = np.arange(idx.size)
        slots = k + np.maximum.accumulate(wanted - k)
        fits = slots < t.size
        placed, slots = idx[fits], slots[fits]
        keep = np.ones(p["t"].size, dtype=bool)
        keep[placed] = False
        due = {key: col[placed] for key, col in p.items()}
        self._pending = {key: col[keep] for key, col in p.items()}
        return slots, due

    def _episode(self, t0: int) -> dict[str, np.ndarray]:
        rng = self._episodes_rng
        kind = int(np.searchsorted(np.cumsum(_EPISODE_MIX), rng.random(), side="right"))
        kind = min(kind, len(PATTERNS) - 1)
        card = int(rng.integers(0, self.config.cards))
        lo, hi = _EPISODE_LEN[kind]
        n = int(rng.integers(lo, hi))
        home = int(self._home[card])
        if kind == _CT:
            # A burst of tiny online charges at merchants the card never uses, within two minutes.
            offsets = np.concatenate([[0.0], np.cumsum(np.clip(rng.exponential(9.0, n - 1), 1.0, 30.0))])
            if offsets[-1] > 100.0:
                offsets *= 100.0 / offsets[-1]
            pool = rng.choice(self.config.merchants, size=min(self.config.merchants, n + _MAX_USUAL), replace=False)
            merchant = pool[~np.isin(pool, self._usual[card])][:n]
            amount = np.round(rng.uniform(0.1, 1.99, n), 2)
            country = self._merch_country[merchant]
            channel = np.full(n, _ONLINE)
        elif kind == _ATO:
            # Large online purchases from a foreign country at new merchants, over a few minutes.
            offsets = np.concatenate([[0.0], np.cumsum(np.clip(rng.exponential(100.0, n - 1), 10.0, 600.0))])
            w = _W_TAKEOVER.copy()
            w[home] = 0.0
            origin = int(np.searchsorted(_cdf(w), rng.random(), side="right"))
            country = np.full(n, origin)
            merchant = self._merchant_in(country, rng.random(n))
            amount = np.round(np.clip(np.exp(np.log(350.0) + 0.6 * rng.standard_normal(n)), 60.0, 5000.0), 2)
            channel = np.full(n, _ONLINE)
        else:
            # Many ordinary-looking purchases, the card's own amounts, in a few minutes.
            offsets = np.concatenate([[0.0], np.cumsum(np.clip(rng.exponential(10.0, n - 1), 1.0, 40.0))])
            country = np.full(n, home)
            usual = self._usual[card, rng.integers(0, self._n_usual[card], n)]
            merchant = np.where(rng.random(n) < 0.3, usual, self._merchant_in(country, rng.random(n)))
            amount = np.maximum(np.round(np.exp(self._mu[card] + self._sigma[card] * rng.standard_normal(n)), 2), 0.01)
            mix = self._channel_mix[card]
            channel = np.where(rng.random(n) * (mix[_ONLINE] + mix[_POS]) < mix[_ONLINE], _ONLINE, _POS)
        seq = np.arange(self._fraud_seq, self._fraud_seq + n)
        self._fraud_seq += n
        return {
            "t": t0 + np.rint(offsets * 1e9).astype(np.int64), "seq": seq, "card": np.full(n, card),
            "merchant": merchant.astype(np.int64), "amount": amount, "country": country.astype(np.int64),
            "channel": channel.astype(np.int64), "pattern": np.full(n, kind),
        }

    def _serialise(
        self, u: np.ndarray, t: np.ndarray, card: np.ndarray, merchant: np.ndarray, amount: np.ndarray,
        country: np.ndarray, channel: np.ndarray, pattern: np.ndarray,
    ) -> Batch:
        n = t.size
        ms = t // _NS_MS
        times = np.datetime_as_string(ms.astype("datetime64[ms]"), unit="ms", timezone="UTC").tolist()
        if self.config.epoch_ms_fraction > 0:
            ms_list = ms.tolist()
            for i in np.flatnonzero(u[:, _U_EPOCH] < self.config.epoch_ms_fraction).tolist():
                times[i] = ms_list[i]
        first = self._seq
        self._seq += n
        ids = list(map(f"{self.config.id_prefix}-%d".__mod__, range(first, first + n)))
        card_ids = self._card_ids[card].tolist()
        dumps = orjson.dumps
        values = [
            dumps({"event_id": e, "event_time": ts, "card_id": c, "merchant_id": m, "amount": a,
                   "currency": cur, "country": co, "channel": ch})
            for e, ts, c, m, a, cur, co, ch in zip(
                ids, times, card_ids, self._merch_ids[merchant].tolist(), amount.tolist(),
                self._currency_obj[self._home[card]].tolist(), _CODES[country].tolist(),
                _CHANNEL_OBJ[channel].tolist(), strict=True,
            )
        ]
        return Batch(
            keys=self._card_keys[card].tolist(), values=values, event_time_ms=ms, event_ids=ids,
            is_fraud=pattern >= 0, patterns=_PATTERN_OBJ[pattern + 1].tolist(),
        )


def _empty_pending() -> dict[str, np.ndarray]:
    cols = ("t", "seq", "card", "merchant", "country", "channel", "pattern")
    pending = {k: np.empty(0, dtype=np.int64) for k in cols}
    pending["amount"] = np.empty(0, dtype=np.float64)
    return pending
