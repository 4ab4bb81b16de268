"""The cards and merchants of the synthetic world: where they are, and each card's habits
(usual merchants, amounts, channels, daily rhythm), drawn once from a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHANNELS = ("online", "pos", "atm")
ONLINE, POS, ATM = 0, 1, 2
MAX_USUAL = 10

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
N_COUNTRIES = len(_COUNTRIES)
COUNTRY_CODES = np.array([c[0] for c in _COUNTRIES], dtype=object)
CURRENCIES = np.array([_HOME_CURRENCY.get(c[0], "") for c in _COUNTRIES], dtype=object)
CHANNEL_NAMES = np.array(CHANNELS, dtype=object)
_TZ = np.array([c[1] for c in _COUNTRIES])
_W_HOME, _W_TRAVEL, W_TAKEOVER = (np.array([c[k] for c in _COUNTRIES], dtype=float) for k in (2, 3, 4))


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


def cdf(p: np.ndarray) -> np.ndarray:
    """Cumulative distribution along the last axis, ending at exactly 1.0."""
    c = np.cumsum(p, axis=-1)
    return c / c[..., -1:]


def _pick(u: np.ndarray, segment: np.ndarray, cdf_flat: np.ndarray) -> np.ndarray:
    """Index into cdf_flat, whose segment k holds 2k + a cumulative distribution; zero-width
    entries are never chosen and the result never leaves its segment."""
    return np.searchsorted(cdf_flat, 2 * segment + np.minimum(u, 1 - 1e-9), side="right")


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


class Population:
    """Per-card and per-merchant columns, and the vectorised draws that read them."""

    def __init__(self, cards: int, merchants: int, rng: np.random.Generator) -> None:
        self.cards, self.merchants = cards, merchants
        self._place_merchants(rng)
        home = np.searchsorted(cdf(_W_HOME), rng.random(cards), side="right")
        travel_cdf = cdf(_W_TRAVEL)
        t1, t2 = (np.searchsorted(travel_cdf, rng.random(cards), side="right") for _ in range(2))
        us, gb = list(COUNTRY_CODES).index("US"), list(COUNTRY_CODES).index("GB")
        self.home = home
        self.travel = np.where(t1 != home, t1, np.where(t2 != home, t2, np.where(home == us, gb, us)))

        self.n_usual = rng.integers(3, MAX_USUAL + 1, cards)
        usual = self.merchant_in(home[:, None], rng.random((cards, MAX_USUAL)))
        # Past n_usual the fixed-width matrix repeats the favourite, so it holds only real ones.
        self.usual = np.where(np.arange(MAX_USUAL)[None, :] < self.n_usual[:, None], usual, usual[:, :1])
        self.p_usual = rng.uniform(0.6, 0.92, cards)
        self.p_travel = rng.uniform(0.0, 0.03, cards)

        self.mu = np.log(25.0) + 0.7 * rng.standard_normal(cards)
        self.sigma = rng.uniform(0.5, 1.0, cards)
        self.p_tiny = rng.uniform(0.0, 0.06, cards)
        self.p_big = rng.uniform(0.0, 0.012, cards)
        self.channel_mix = rng.dirichlet([2.0, 3.0, 0.5], cards)
        self.channel_cdf = np.cumsum(self.channel_mix, axis=1)[:, :2]
        self._build_rhythms(rng)

        self.card_ids = np.array([f"c-{i}" for i in range(cards)], dtype=object)
        self.card_keys = np.array([s.encode() for s in self.card_ids], dtype=object)
        self.merchant_ids = np.array([f"m-{i}" for i in range(merchants)], dtype=object)

    def _place_merchants(self, rng: np.random.Generator) -> None:
        # At least one per country, the rest by where cards spend; ids shuffled so that a
        # merchant's number says nothing about its country.
        w = 0.8 * _W_HOME / _W_HOME.sum() + 0.15 * _W_TRAVEL / _W_TRAVEL.sum() + 0.05 * W_TAKEOVER / W_TAKEOVER.sum()
        extra = np.searchsorted(cdf(w), rng.random(self.merchants - N_COUNTRIES), side="right")
        country_by_pos = np.sort(np.concatenate([np.arange(N_COUNTRIES), extra]))
        self._merch_start = np.searchsorted(country_by_pos, np.arange(N_COUNTRIES))
        self._merch_count = np.bincount(country_by_pos, minlength=N_COUNTRIES)
        self._merch_by_pos = rng.permutation(self.merchants)
        self.merchant_country = np.empty(self.merchants, dtype=np.int64)
        self.merchant_country[self._merch_by_pos] = country_by_pos

    def _build_rhythms(self, rng: np.random.Generator) -> None:
        # An archetype in local time, moved by the home time zone and a personal hour. Cards
        # sharing both form a group, so choosing the card of an event is two table look-ups.
        cards = self.cards
        archetype = rng.integers(0, len(_ARCHETYPES), cards)
        shift = _TZ[self.home] + rng.integers(-1, 2, cards)
        lo, n_shift = int(_TZ.min()) - 1, int(_TZ.max() - _TZ.min()) + 3
        group = archetype * n_shift + (shift - lo)
        n_groups = len(_ARCHETYPES) * n_shift
        activity = rng.lognormal(0.0, 0.7, cards)
        total = np.bincount(group, activity, n_groups)

        g = np.arange(n_groups)
        local = (np.arange(24)[:, None] + (g % n_shift + lo)[None, :]) % 24
        weight = _ARCHETYPES[(g // n_shift)[None, :], local] * total[None, :]
        self._group_cdf = (2 * np.arange(24)[:, None] + cdf(weight)).ravel()

        order = np.argsort(group, kind="stable")
        sorted_group = group[order]
        running = np.cumsum(activity[order])
        before = np.concatenate([[0.0], running])[np.searchsorted(sorted_group, g)]
        frac = (running - before[sorted_group]) / np.where(total > 0, total, 1.0)[sorted_group]
        frac[np.r_[sorted_group[1:] != sorted_group[:-1], True]] = 1.0
        self._card_cdf = 2 * sorted_group + frac
        self._card_by_pos = order
        self._n_groups = n_groups
        self._archetype, self._shift = archetype, shift

    def card_at(self, hour: np.ndarray, u_group: np.ndarray, u_card: np.ndarray) -> np.ndarray:
        """The card of each event: a group by its weight at this UTC hour, then a card of the
        group by its activity."""
        group = _pick(u_group, hour, self._group_cdf) - hour * self._n_groups
        pos = np.minimum(_pick(u_card, group, self._card_cdf), self.cards - 1)
        return self._card_by_pos[pos]

    def merchant_in(self, country: np.ndarray, u: np.ndarray) -> np.ndarray:
        # u**2 skews towards the first merchants of a country: a few popular, many rare.
        pos = self._merch_start[country] + (u * u * self._merch_count[country]).astype(np.int64)
        return self._merch_by_pos[pos]

    def profile(self, card_id: str) -> CardProfile:
        c = int(card_id.removeprefix("c-"))
        if not 0 <= c < self.cards:
            raise ValueError(f"no card {card_id!r}: ids run from c-0 to c-{self.cards - 1}")
        home = int(self.home[c])
        weights = _ARCHETYPES[self._archetype[c], (np.arange(24) + self._shift[c]) % 24]
        mix = self.channel_mix[c]
        return CardProfile(
            card_id=card_id,
            home_country=COUNTRY_CODES[home],
            currency=CURRENCIES[home],
            travel_country=COUNTRY_CODES[self.travel[c]],
            usual_merchants=tuple(self.merchant_ids[self.usual[c, : self.n_usual[c]]].tolist()),
            median_amount=float(np.exp(self.mu[c])),
            amount_sigma=float(self.sigma[c]),
            channel_mix=(float(mix[0]), float(mix[1]), float(mix[2])),
            hourly_weights=tuple(float(x) for x in weights),
        )
