"""Fraud patterns: each episode is a short run of events on one card, scheduled in event time,
that waits in a queue until the stream reaches it."""

from __future__ import annotations

import numpy as np

from streams.generator.population import MAX_USUAL, ONLINE, POS, W_TAKEOVER, Population, cdf

PATTERNS = ("card_testing", "account_takeover", "velocity_attack")
_CT, _ATO, _VA = 0, 1, 2
# Share of episodes per pattern and (low, high) of its event count, high exclusive; with these
# the three patterns carry roughly a third of the fraud events each.
_MIX_CDF = np.cumsum([0.35, 0.45, 0.20])
_LENGTH = ((5, 13), (3, 9), (10, 26))
MEAN_EPISODE_LEN = float(sum(p * (lo + hi - 1) / 2 for p, (lo, hi) in zip(np.diff(_MIX_CDF, prepend=0.0), _LENGTH, strict=True)))

_INT_COLUMNS = ("t", "seq", "card", "merchant", "country", "channel", "pattern")


def no_events() -> dict[str, np.ndarray]:
    """An empty queue of scheduled fraud events (t in ns, seq orders equal times)."""
    queue = {k: np.empty(0, dtype=np.int64) for k in _INT_COLUMNS}
    queue["amount"] = np.empty(0, dtype=np.float64)
    return queue


def _offsets(rng: np.random.Generator, n: int, mean_s: float, lo_s: float, hi_s: float) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.clip(rng.exponential(mean_s, n - 1), lo_s, hi_s))])


def episode(rng: np.random.Generator, pop: Population, t0_ns: int, seq0: int) -> dict[str, np.ndarray]:
    """The events of one fraud episode starting at t0_ns, as queue columns."""
    kind = min(int(np.searchsorted(_MIX_CDF, rng.random(), side="right")), len(PATTERNS) - 1)
    card = int(rng.integers(0, pop.cards))
    n = int(rng.integers(*_LENGTH[kind]))
    home = int(pop.home[card])
    if kind == _CT:
        # A burst of tiny online charges at merchants the card never uses, within two minutes.
        offsets = _offsets(rng, n, 9.0, 1.0, 30.0)
        if offsets[-1] > 100.0:
            offsets *= 100.0 / offsets[-1]
        pool = rng.choice(pop.merchants, size=min(pop.merchants, n + MAX_USUAL), replace=False)
        merchant = pool[~np.isin(pool, pop.usual[card])][:n]
        country = pop.merchant_country[merchant]
        amount = np.round(rng.uniform(0.1, 1.99, n), 2)
        channel = np.full(n, ONLINE)
    elif kind == _ATO:
        # Large online purchases from a foreign country at new merchants, over a few minutes.
        offsets = _offsets(rng, n, 100.0, 10.0, 600.0)
        w = W_TAKEOVER.copy()
        w[home] = 0.0
        country = np.full(n, int(np.searchsorted(cdf(w), rng.random(), side="right")))
        merchant = pop.merchant_in(country, rng.random(n))
        amount = np.round(np.clip(np.exp(np.log(350.0) + 0.6 * rng.standard_normal(n)), 60.0, 5000.0), 2)
        channel = np.full(n, ONLINE)
    else:
        # Many ordinary-looking purchases, the card's own amounts, in a few minutes.
        offsets = _offsets(rng, n, 10.0, 1.0, 40.0)
        country = np.full(n, home)
        usual = pop.usual[card, rng.integers(0, pop.n_usual[card], n)]
        merchant = np.where(rng.random(n) < 0.3, usual, pop.merchant_in(country, rng.random(n)))
        amount = np.maximum(np.round(np.exp(pop.mu[card] + pop.sigma[card] * rng.standard_normal(n)), 2), 0.01)
        online, pos = pop.channel_mix[card, ONLINE], pop.channel_mix[card, POS]
        channel = np.where(rng.random(n) * (online + pos) < online, ONLINE, POS)
    return {
        "t": t0_ns + np.rint(offsets * 1e9).astype(np.int64),
        "seq": np.arange(seq0, seq0 + n),
        "card": np.full(n, card),
        "merchant": merchant.astype(np.int64),
        "country": country.astype(np.int64),
        "channel": channel.astype(np.int64),
        "pattern": np.full(n, kind),
        "amount": amount,
    }


def take_due(queue: dict[str, np.ndarray], t: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """Give each queued event due by the end of this batch the first free slot at or after its
    scheduled time, in (t, seq) order; those pushed past the batch stay queued. Returns the
    slots, the placed events, and the new queue. The rule only looks forward, so any cut of the
    stream into batches places every event in the same slot."""
    if not queue["t"].size or not t.size:
        return np.empty(0, dtype=np.int64), no_events(), queue
    idx = np.flatnonzero(queue["t"] <= t[-1])
    idx = idx[np.lexsort((queue["seq"][idx], queue["t"][idx]))]
    wanted = np.searchsorted(t, queue["t"][idx], side="left")
    k = np.arange(idx.size)
    slots = k + np.maximum.accumulate(wanted - k) if idx.size else k
    fits = slots < t.size
    placed = idx[fits]
    keep = np.ones(queue["t"].size, dtype=bool)
    keep[placed] = False
    return slots[fits], {c: v[placed] for c, v in queue.items()}, {c: v[keep] for c, v in queue.items()}
