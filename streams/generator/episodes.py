"""Fraud patterns: an episode is a short run of events on one card, scheduled in event time,
drawn vectorised from one fixed-width row of uniforms, and queued until the stream reaches it."""

from __future__ import annotations

import numpy as np

from streams.generator.population import MAX_USUAL, N_COUNTRIES, ONLINE, POS, W_TAKEOVER, Population, cdf

PATTERNS = ("card_testing", "account_takeover", "velocity_attack")
_CT, _ATO, _VA = 0, 1, 2
# Share of episodes per pattern, events per episode in [lo, hi), and the seconds between its
# events (mean, min, max). With these each pattern carries about a third of the fraud events.
MIX = np.array([0.35, 0.45, 0.20])
_LENGTH = np.array([[5, 13], [3, 9], [10, 26]])
_GAP_S = np.array([[9.0, 1.0, 30.0], [60.0, 10.0, 300.0], [10.0, 1.0, 40.0]])
_CT_SPAN_S = 100.0
MAX_AMOUNT = 20_000.0
_L = int(_LENGTH[:, 1].max()) - 1
MEAN_EPISODE_LEN = float(MIX @ (_LENGTH.sum(axis=1) - 1) / 2)
MAX_SPAN_NS = (np.minimum((_LENGTH[:, 1] - 2) * _GAP_S[:, 2], [_CT_SPAN_S, np.inf, np.inf]) * 1e9).astype(np.int64)

SHAPE_WIDTH = _L  # length, then the gaps
BODY_WIDTH = 2 + 6 * _L  # card, takeover origin, then six blocks of one uniform per event
EPISODE_WIDTH = 1 + SHAPE_WIDTH + BODY_WIDTH  # pattern first
_ORIGIN_CDF = np.stack([cdf(np.where(np.arange(N_COUNTRIES) == h, 0.0, W_TAKEOVER)) for h in range(N_COUNTRIES)])
_COLUMNS = ("t", "seq", "ep", "card", "merchant", "country", "channel", "pattern", "amount")


def pattern_of(u: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(np.cumsum(MIX), u, side="right"), len(PATTERNS) - 1)


def shapes(kind: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Event count and offsets from the start (ns, shape (m, _L); past the count unused)."""
    lo, hi = _LENGTH[kind].T
    n = lo + (u[:, 0] * (hi - lo)).astype(np.int64)
    mean, least, most = (c[:, None] for c in _GAP_S[kind].T)
    offsets = np.zeros((kind.size, _L))
    offsets[:, 1:] = np.cumsum(np.clip(-np.log1p(-u[:, 1:]) * mean, least, most), axis=1)
    # Card testing is squeezed into a burst of at most _CT_SPAN_S.
    span = offsets[np.arange(kind.size), n - 1]
    squeeze = np.where((kind == _CT) & (span > _CT_SPAN_S), _CT_SPAN_S / np.maximum(span, 1e-9), 1.0)
    return n, np.rint(offsets * squeeze[:, None] * 1e9).astype(np.int64)


def build(
    pop: Population, kind: np.ndarray, n: np.ndarray, offsets: np.ndarray, start_ns: np.ndarray,
    u: np.ndarray, seq0: int, ep0: int,
) -> dict[str, np.ndarray]:
    """The events of m episodes as queue columns, episode by episode, from their shapes and one
    body row of uniforms each."""
    m = kind.size
    card = (u[:, 0] * pop.cards).astype(np.int64)
    home = pop.home[card]
    origin = np.minimum((_ORIGIN_CDF[home] <= u[:, 1:2]).sum(axis=1), N_COUNTRIES - 1)
    m1, m2, z1, z2, c1, c2 = (u[:, 2 + b * _L: 2 + (b + 1) * _L] for b in range(6))
    k = kind[:, None]
    c_, h_ = card[:, None], home[:, None]

    # Card testing: merchants from anywhere that the card never uses.
    tested = (m1 * pop.merchants).astype(np.int64)
    usual = pop.usual[card]
    for _ in range(MAX_USUAL + 1):
        clash = (tested[:, :, None] == usual[:, None, :]).any(axis=2)
        if not clash.any():
            break
        tested = np.where(clash, (tested + 1) % pop.merchants, tested)
    # Takeover: a foreign country's merchants. Velocity: the home country, some usual merchants.
    country = np.where(k == _ATO, origin[:, None], h_)
    own = pop.usual[c_, (m2 * pop.n_usual[c_]).astype(np.int64)]
    elsewhere = pop.merchant_in(country, m1)
    merchant = np.where(k == _CT, tested, np.where((k == _VA) & (c1 < 0.3), own, elsewhere))
    country = np.where(k == _CT, pop.merchant_country[merchant], country)

    z = np.sqrt(-2.0 * np.log1p(-z1)) * np.cos(2.0 * np.pi * z2)
    amount = np.where(
        k == _CT, 0.1 + 1.89 * z1,
        np.where(k == _ATO, np.clip(np.exp(np.log(350.0) + 0.6 * z), 60.0, 5000.0),
                 np.exp(pop.mu[c_] + pop.sigma[c_] * z)),
    )
    online, pos = pop.channel_mix[c_, ONLINE], pop.channel_mix[c_, POS]
    channel = np.where((k == _VA) & (c2 * (online + pos) >= online), POS, ONLINE)

    valid = np.arange(_L)[None, :] < n[:, None]
    total = int(n.sum())
    full = np.broadcast_to
    return {
        "t": (start_ns[:, None] + offsets)[valid],
        "seq": np.arange(seq0, seq0 + total, dtype=np.int64),
        "ep": full(ep0 + np.arange(m)[:, None], (m, _L))[valid],
        "card": full(c_, (m, _L))[valid],
        "merchant": merchant[valid],
        "country": country[valid],
        "channel": channel[valid].astype(np.int64),
        "pattern": full(k, (m, _L))[valid].astype(np.int64),
        "amount": np.clip(np.round(amount[valid], 2), 0.01, MAX_AMOUNT),
    }


def no_events() -> dict[str, np.ndarray]:
    queue = {c: np.empty(0, dtype=np.int64) for c in _COLUMNS}
    queue["amount"] = np.empty(0, dtype=np.float64)
    return queue


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {c: np.concatenate([p[c] for p in parts]) for c in _COLUMNS}


def _take(events: dict[str, np.ndarray], idx: np.ndarray | slice) -> dict[str, np.ndarray]:
    return {c: v[idx] for c, v in events.items()}


class FraudQueue:
    """Fraud events scheduled but not yet in the stream: a part sorted by time, and new arrivals
    merged into it once they are many, so taking what is due stays cheap however long it is."""

    def __init__(self) -> None:
        self._sorted = no_events()
        self._new: list[dict[str, np.ndarray]] = []
        self._new_size = 0
        self._seq = 0
        self._ep = 0

    def __len__(self) -> int:
        return self._sorted["t"].size + self._new_size

    def reserve(self, events: int, episodes: int) -> tuple[int, int]:
        """The first event seq and episode id for new episodes; seq orders events of equal time."""
        first = self._seq, self._ep
        self._seq += events
        self._ep += episodes
        return first

    def add(self, events: dict[str, np.ndarray]) -> None:
        self._new.append(events)
        self._new_size += events["t"].size
        if self._new_size > max(4096, self._sorted["t"].size // 4):
            self._merge()

    def _merge(self) -> None:
        merged = _concat([self._sorted, *self._new])
        self._sorted = _take(merged, np.lexsort((merged["seq"], merged["t"])))
        self._new, self._new_size = [], 0

    def thin(self, rng: np.random.Generator, keep: float) -> None:
        """Keep each queued episode, all its events together, with probability keep."""
        self._merge()
        episodes, idx = np.unique(self._sorted["ep"], return_inverse=True)
        self._sorted = _take(self._sorted, (rng.random(episodes.size) < keep)[idx])

    def take_due(self, t: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Give each event due by the end of this batch (slot times t) the first free slot at or
        after its time, in (time, seq) order; those pushed past the batch stay queued. The rule
        only looks forward, so any cut of the stream into batches gives every event the same slot."""
        if not len(self) or not t.size:
            return np.empty(0, dtype=np.int64), no_events()
        cut = int(np.searchsorted(self._sorted["t"], t[-1], side="right"))
        new = _concat(self._new) if self._new else no_events()
        due_new = new["t"] <= t[-1]
        due = _concat([_take(self._sorted, slice(0, cut)), _take(new, due_new)])
        self._sorted = _take(self._sorted, slice(cut, None))
        due = _take(due, np.lexsort((due["seq"], due["t"])))
        wanted = np.searchsorted(t, due["t"], side="left")
        k = np.arange(wanted.size)
        slots = k + np.maximum.accumulate(wanted - k)
        fits = slots < t.size
        self._new = [r for r in (_take(new, ~due_new), _take(due, ~fits)) if r["t"].size]
        self._new_size = sum(r["t"].size for r in self._new)
        return slots[fits], _take(due, fits)


def prehistory(
    pop: Population, rng: np.random.Generator, starts_per_ns: float, now_ns: int, queue: FraudQueue
) -> None:
    """Queue what is left after now_ns of the episodes a stream running at this start rate would
    have begun before now_ns, so the fraud share is right from the first event. No episode lasts
    longer than MAX_SPAN_NS, so looking back that far is exact."""
    for kind in range(len(PATTERNS)):
        window = int(MAX_SPAN_NS[kind])
        left = int(rng.poisson(starts_per_ns * MIX[kind] * window))
        while left:
            m = min(left, 100_000)
            left -= m
            start = now_ns - 1 - (rng.random(m) * window).astype(np.int64)
            kinds = np.full(m, kind)
            n, offsets = shapes(kinds, rng.random((m, SHAPE_WIDTH)))
            alive = start + offsets[np.arange(m), n - 1] >= now_ns
            body = rng.random((int(alive.sum()), BODY_WIDTH))
            seq0, ep0 = queue.reserve(int(n[alive].sum()), int(alive.sum()))
            events = build(pop, kinds[alive], n[alive], offsets[alive], start[alive], body, seq0, ep0)
            queue.add(_take(events, events["t"] >= now_ns))
