"""The feature logic of docs/contract.md ("Feature semantics") as pure code: per-entity state plus one event in, a
feature row out. The Faust agent, the Flink function and the Spark backfill all call this."""

from __future__ import annotations

import hashlib
import math
import operator
from bisect import bisect_right
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from features.errors import SpecError
from features.spec import PipelineSpec

Value = float | int | None
_time = operator.itemgetter(0)
_PY_TYPES: dict[str, type[Any]] = {"double": float, "float": float, "long": int, "int": int, "string": str,
                                   "boolean": bool}


@dataclass(slots=True)
class FeatureRow:
    features: dict[str, Value]
    late: bool


class EntityState:
    """What one entity's features remember. FeatureLogic.update mutates it in place.

    `events` holds the retained events as [time, value of each aggregated field...], sorted by
    (event time, arrival); entries before `start` are evicted and wait for compaction."""

    __slots__ = ("max_seen", "evicted_max", "events", "start", "wins", "lasts")

    def __init__(self, wins: list[_Win], n_lasts: int) -> None:
        self.max_seen: int | None = None  # latest event time that entered the state
        self.evicted_max: int | None = None  # latest time dropped, for time_since_last
        self.events: list[list] = []
        self.start = 0
        self.wins = wins
        self.lasts: list[list | None] = [None] * n_lasts  # per field: [time, value] of the latest

    def __len__(self) -> int:
        """The number of retained events."""
        return len(self.events) - self.start


class _Win:
    """The events of one window length ending at max_seen: events[lo:] and their aggregates."""

    __slots__ = ("ms", "lo", "aggs")

    def __init__(self, ms: int, lo: int, aggs: list[_Agg]) -> None:
        self.ms, self.lo, self.aggs = ms, lo, aggs


class _Agg:
    """Running aggregates of one field over one window; parts a feature does not need are None.

    Sums are exact: s1 / 2**b1 and s2 / 2**b2 as integers, so sum, avg and stddev are rounded
    once, do not drift as events slide out, and do not depend on the order events came in."""

    __slots__ = ("col", "n", "s1", "b1", "s2", "b2", "mins", "maxs", "distinct", "ranked")

    def __init__(self, col: int, parts: Collection[str]) -> None:
        self.col, self.n = col, 0  # n: values in the window that are not None
        self.s1, self.b1 = (0 if "sums" in parts else None), 0
        self.s2, self.b2 = (0 if "squares" in parts else None), 0
        self.mins: deque | None = deque() if "mins" in parts else None  # monotonic: (time, value)
        self.maxs: deque | None = deque() if "maxs" in parts else None
        self.distinct: dict | None = {} if "distinct" in parts else None  # value -> occurrences
        self.ranked = self.mins is not None or self.maxs is not None

    def add(self, v: Any, sign: int = 1) -> None:
        """Count `v` in (sign 1) or out of (sign -1) the window; the hot path, so inlined."""
        self.n += sign
        s1 = self.s1
        if s1 is not None:
            if type(v) is int:
                num, k = v, 0
            else:
                num, den = v.as_integer_ratio()  # v == num / 2**k exactly
                k = den.bit_length() - 1
            square = num * num
            if sign < 0:
                num, square = -num, -square
            b1 = self.b1
            if k > b1:
                s1 <<= k - b1
                self.b1 = b1 = k
            self.s1 = s1 + (num << (b1 - k))
            s2 = self.s2
            if s2 is not None:
                b2, k2 = self.b2, 2 * k
                if k2 > b2:
                    s2 <<= k2 - b2
                    self.b2 = b2 = k2
                self.s2 = s2 + (square << (b2 - k2))
        d = self.distinct
        if d is not None:
            left = d.get(v, 0) + sign
            if left:
                d[v] = left
            else:
                del d[v]

    def push(self, t: int, v: Any) -> None:
        """Enter a value that follows every value already in the min/max deques."""
        mins, maxs = self.mins, self.maxs
        if mins is not None:
            while mins and mins[-1][1] >= v:
                mins.pop()
            mins.append((t, v))
        if maxs is not None:
            while maxs and maxs[-1][1] <= v:
                maxs.pop()
            maxs.append((t, v))

    def expire(self, cut: int) -> None:
        """Drop from the min/max deques what lies at or before `cut`."""
        for dq in (self.mins, self.maxs):
            while dq and dq[0][0] <= cut:
                dq.popleft()

    def rebuild_deques(self, entries: list[list]) -> None:
        """Recompute the deques over `entries`, the window in order (after a mid-window insert)."""
        for name in ("mins", "maxs"):
            if getattr(self, name) is not None:
                setattr(self, name, deque())
        for e in entries:
            if e[self.col] is not None:
                self.push(e[0], e[self.col])


def _sum(a: _Agg) -> float:
    return a.s1 / (1 << a.b1) if a.s1 else 0.0


# These run only on an _Agg built with the parts _NEEDS lists for their aggregate, so the s1, s2 or
# distinct they read is never None; a check would cost a branch per feature per event, hence the ignores.
def _avg(a: _Agg) -> float | None:
    return a.s1 / (a.n << a.b1) if a.n else None  # type: ignore[operator]


def _stddev(a: _Agg) -> float:
    if a.n < 2:
        return 0.0
    e = max(a.b2, 2 * a.b1)
    num = ((a.n * a.s2) << (e - a.b2)) - ((a.s1 * a.s1) << (e - 2 * a.b1))  # type: ignore[operator]
    return math.sqrt(num / ((a.n * a.n) << e)) if num else 0.0


def _min(a: _Agg) -> float | None:
    return float(a.mins[0][1]) if a.mins else None


def _max(a: _Agg) -> float | None:
    return float(a.maxs[0][1]) if a.maxs else None


def _distinct(a: _Agg) -> int:
    return len(a.distinct)  # type: ignore[arg-type]


_FROM_AGG = {"sum": _sum, "avg": _avg, "stddev": _stddev, "min": _min, "max": _max,
             "count_distinct": _distinct}
_NEEDS = {"sum": ("sums",), "avg": ("sums",), "stddev": ("sums", "squares"), "min": ("mins",),
          "max": ("maxs",), "count_distinct": ("distinct",)}


def _from_values(agg: str, values: list) -> Value:
    """One aggregate straight from the non-None values of a window, in window order."""
    if agg == "last":
        return values[-1] if values else None
    if agg == "count_distinct":
        return len(set(values))
    if agg in ("min", "max"):
        return float((min if agg == "min" else max)(values)) if values else None
    a = _Agg(0, ("sums", "squares"))
    for v in values:
        a.add(v)
    return _FROM_AGG[agg](a)


class FeatureLogic:
    """Computes a spec's features event by event; holds no entity data itself."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self._lateness = spec.allowed_lateness_ms
        self._horizon = spec.state_horizon_ms
        types = spec.field_types
        fields = list(dict.fromkeys(f.of for f in spec.features if f.of is not None))
        col = {name: i + 1 for i, name in enumerate(fields)}  # entry[0] is the event time
        self._cols = tuple((name, _PY_TYPES.get(types[name])) for name in fields)
        windows = sorted({f.window_ms for f in spec.features
                          if f.window_ms is not None and f.agg != "last"})
        needs: list[dict[int, set[str]]] = [{} for _ in windows]
        lasts = list(dict.fromkeys(col[f.of] for f in spec.features if f.agg == "last" and f.of is not None))
        plan = []
        for f in spec.features:
            wi = windows.index(f.window_ms) if f.window_ms in windows else -1
            slot = -1
            c = 0 if f.of is None else col[f.of]  # the spec gives `of` to every aggregate but count, time_since_last
            if f.agg in _NEEDS:
                needs[wi].setdefault(c, set()).update(_NEEDS[f.agg])
                slot = list(needs[wi]).index(c)
            elif f.agg == "last":
                slot = lasts.index(c)
            plan.append((f.name, f.agg, wi, slot, c, f.window_ms or 0))
        self._plan = tuple(plan)
        self._layout = tuple((ms, tuple((c, tuple(sorted(n))) for c, n in needs[i].items()))
                             for i, ms in enumerate(windows))
        self._n_lasts = len(lasts)
        self._last_cols = tuple((slot, c) for slot, c in enumerate(lasts))
        self._tag = hashlib.sha256(repr((self._cols, self._layout, lasts)).encode()).hexdigest()[:12]

    def new_state(self) -> EntityState:
        """The state of an entity with no events yet."""
        wins = [_Win(ms, 0, [_Agg(c, parts) for c, parts in aggs]) for ms, aggs in self._layout]
        return EntityState(wins, self._n_lasts)

    def update(self, state: EntityState, event_time_ms: int, values: Mapping[str, Any]) -> FeatureRow:
        """The feature row of one event; mutates `state` in place unless the event is late.

        `values` is the validated record. Raises ValueError, with `state` untouched, when an
        aggregated field holds a value that cannot be aggregated (a non-finite or non-number
        value in a numeric field, an unhashable one elsewhere)."""
        entry = self._entry(event_time_ms, values)
        seen = state.max_seen
        if seen is None or event_time_ms >= seen:
            return FeatureRow(self._in_order(state, entry), False)
        ev = state.events
        hi = bisect_right(ev, event_time_ms, state.start, len(ev), key=_time)
        row = self._scan(state, entry, hi)
        if event_time_ms < seen - self._lateness:
            return FeatureRow(row, True)
        self._insert(state, entry, hi, seen)
        return FeatureRow(row, False)

    def _entry(self, t: int, values: Mapping[str, Any]) -> list:
        entry: list = [t]
        for name, kind in self._cols:
            v = values.get(name)
            if v is not None:
                if type(v) is not kind:
                    v = _coerce(name, kind, v)
                elif kind is float and v - v != 0.0:  # inf or nan
                    raise ValueError(f"field {name!r}: {v!r} is not a finite number")
            entry.append(v)
        return entry

    def _in_order(self, st: EntityState, entry: list) -> dict[str, Value]:
        """The common case, t >= max_seen: slide every window forward, O(1) amortised."""
        t = entry[0]
        tsl = None if st.max_seen is None else (t - st.max_seen) / 1000
        ev = st.events
        ev.append(entry)
        st.max_seen = t
        for win in st.wins:
            cut = t - win.ms
            lo, aggs = win.lo, win.aggs
            while ev[lo][0] <= cut:
                old = ev[lo]
                lo += 1
                for a in aggs:
                    if old[a.col] is not None:
                        a.add(old[a.col], -1)
            win.lo = lo
            for a in aggs:
                v = entry[a.col]
                if v is not None:
                    a.add(v)
                    if a.ranked:
                        a.push(t, v)
                if a.ranked:
                    a.expire(cut)
        for slot, c in self._last_cols:
            if entry[c] is not None:
                st.lasts[slot] = [t, entry[c]]
        row = self._row(st, t, tsl, len(ev))
        self._evict(st, t)
        return row

    def _row(self, st: EntityState, t: int, tsl: float | None, end: int) -> dict[str, Value]:
        row: dict[str, Value] = {}
        wins, lasts = st.wins, st.lasts
        for name, agg, wi, slot, _, ms in self._plan:
            if agg == "count":
                row[name] = end - wins[wi].lo
            elif agg == "time_since_last":
                row[name] = tsl
            elif agg == "last":
                rec = lasts[slot]
                row[name] = rec[1] if rec is not None and rec[0] > t - ms else None
            else:
                row[name] = _FROM_AGG[agg](wins[wi].aggs[slot])
        return row

    def _scan(self, st: EntityState, entry: list, hi: int) -> dict[str, Value]:
        """The slow exact path for out-of-order and late events: read each window directly."""
        t, ev, start = entry[0], st.events, st.start
        row: dict[str, Value] = {}
        for name, agg, _, _, c, ms in self._plan:
            if agg == "time_since_last":
                prev = ev[hi - 1][0] if hi > start else st.evicted_max
                row[name] = None if prev is None or prev > t else (t - prev) / 1000
                continue
            lo = bisect_right(ev, t - ms, start, hi, key=_time)
            if agg == "count":
                row[name] = hi - lo + 1
                continue
            values = [e[c] for e in ev[lo:hi] if e[c] is not None]
            if entry[c] is not None:
                values.append(entry[c])
            row[name] = _from_values(agg, values)
        return row

    def _insert(self, st: EntityState, entry: list, hi: int, max_seen: int) -> None:
        """Enter an out-of-order (not late) event at its place in event-time order; `max_seen` is
        st.max_seen, which it leaves as it is."""
        t, ev = entry[0], st.events
        ev.insert(hi, entry)
        for win in st.wins:
            if t <= max_seen - win.ms:
                win.lo += 1  # it landed before this window
                continue
            for a in win.aggs:
                if entry[a.col] is not None:
                    a.add(entry[a.col])
                    if a.ranked:
                        a.rebuild_deques(ev[win.lo:])
        for slot, c in self._last_cols:
            rec = st.lasts[slot]
            if entry[c] is not None and (rec is None or t >= rec[0]):
                st.lasts[slot] = [t, entry[c]]
        self._evict(st, max_seen)

    def _evict(self, st: EntityState, max_seen: int) -> None:
        """Drop events no future non-late event can see: time <= max_seen - lateness - max window
        (`max_seen` is st.max_seen, passed by the caller that just set or read it)."""
        cut = max_seen - self._horizon
        ev, i, end = st.events, st.start, len(st.events)
        while i < end and ev[i][0] <= cut:
            i += 1
        if i == st.start:
            return
        st.evicted_max, st.start = ev[i - 1][0], i
        if 2 * i >= end:  # compact: amortised O(1), as each entry is dropped once
            del ev[:i]
            for win in st.wins:
                win.lo -= i
            st.start = 0

    def dumps(self, state: EntityState) -> bytes:
        """Compact bytes of `state` (orjson), for Faust tables, Flink keyed state or Redis."""
        s = state.start
        wins = [[w.lo - s, [[a.n, _hex(a.s1), a.b1, _hex(a.s2), a.b2,
                             None if a.mins is None else list(a.mins),
                             None if a.maxs is None else list(a.maxs),
                             None if a.distinct is None else list(a.distinct.items())]
                            for a in w.aggs]] for w in state.wins]
        return orjson.dumps([self._tag, state.max_seen, state.evicted_max,
                             state.events[s:] if s else state.events, wins, state.lasts])

    def loads(self, data: bytes) -> EntityState:
        """The state `dumps` wrote; SpecError when it was written for another feature layout."""
        tag, max_seen, evicted_max, events, wins, lasts = orjson.loads(data)
        if tag != self._tag:
            raise SpecError(f"entity state was written for another feature layout ({tag}, "
                            f"this spec's is {self._tag}); rebuild it by replaying the source topic")
        st = self.new_state()
        st.max_seen, st.evicted_max, st.events, st.lasts = max_seen, evicted_max, events, lasts
        for win, (lo, aggs) in zip(st.wins, wins, strict=True):
            win.lo = lo
            for a, (n, s1, b1, s2, b2, mins, maxs, distinct) in zip(win.aggs, aggs, strict=True):
                a.n, a.b1, a.b2 = n, b1, b2
                a.s1 = None if s1 is None else int(s1, 16)
                a.s2 = None if s2 is None else int(s2, 16)
                a.mins = None if mins is None else deque(mins)
                a.maxs = None if maxs is None else deque(maxs)
                a.distinct = None if distinct is None else dict(distinct)
        return st


def _hex(n: int | None) -> str | None:
    return None if n is None else hex(n)


def _coerce(name: str, kind: type | None, v: Any) -> Any:
    """`v` as the Python type of its schema type; ValueError when it cannot be aggregated."""
    if kind is float or kind is int:
        if isinstance(v, float) and math.isfinite(v) and (kind is float or v.is_integer()):
            return kind(v)
        if not isinstance(v, bool) and hasattr(type(v), "__index__"):
            return kind(operator.index(v))  # int, or numpy integers from the batch backfill
        raise ValueError(f"field {name!r}: {v!r} is not a finite {'integer' if kind is int else 'number'}")
    try:
        hash(v)
    except TypeError:
        raise ValueError(f"field {name!r}: {type(v).__name__} values cannot be counted") from None
    return v
