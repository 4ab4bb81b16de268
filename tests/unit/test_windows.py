"""FeatureLogic against a naive reference written from the feature semantics of docs/contract.md."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.errors import SpecError
from features.spec import PipelineSpec, load_spec, parse_spec
from features.windows import FeatureLogic, FeatureRow

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
FRAUD = load_spec(PIPELINES / "fraud.yaml")
SENSORS = load_spec(PIPELINES / "sensors.yaml")
S, M, H = 1_000, 60_000, 3_600_000


def make_spec(features: list[dict], lateness: str = "30s") -> PipelineSpec:
    """A small spec with every kind of field, for hand-made cases."""
    return parse_spec({
        "name": "t", "entity": {"name": "user", "key": "user"},
        "source": {"topic": "src", "id": "id", "timestamp": "ts", "allowed_lateness": lateness,
                   "schema": {"id": "string", "ts": "timestamp", "user": "string",
                              "x": "double", "n": "long", "tag": "string"}},
        "features": features, "model": {"name": "t", "kind": "mlp"}})


ALL_AGGS = make_spec([
    {"name": "cnt", "agg": "count", "window": "1m"},
    {"name": "total", "agg": "sum", "of": "x", "window": "1m"},
    {"name": "mean", "agg": "avg", "of": "x", "window": "1m"},
    {"name": "lo", "agg": "min", "of": "x", "window": "1m"},
    {"name": "hi", "agg": "max", "of": "x", "window": "1m"},
    {"name": "sd", "agg": "stddev", "of": "x", "window": "1m"},
    {"name": "tags", "agg": "count_distinct", "of": "tag", "window": "1m"},
    {"name": "last_n", "agg": "last", "of": "n", "window": "1m"},
    {"name": "gap", "agg": "time_since_last"},
])


# ---------------------------------------------------------------------------- the reference

def reference_rows(spec: PipelineSpec, stream: list[tuple[int, dict]]) -> list[FeatureRow]:
    """Every row straight from the definition: loop over all earlier-arrived, non-late events.

    A late event reads what the state still holds: events newer than
    max_seen - allowed_lateness - max_window (older ones are evicted)."""
    lateness, horizon = spec.allowed_lateness_ms, spec.state_horizon_ms
    accepted: list[tuple[int, dict]] = []
    max_seen: int | None = None
    rows = []
    for t, values in stream:
        late = max_seen is not None and t < max_seen - lateness
        pool, evicted = accepted, []
        if late:
            pool = [e for e in accepted if e[0] > max_seen - horizon]
            evicted = [e[0] for e in accepted if e[0] <= max_seen - horizon]
        row = {f.name: reference_value(f, t, values, pool, evicted) for f in spec.features}
        rows.append(FeatureRow(row, late))
        if not late:
            accepted.append((t, values))
            max_seen = t if max_seen is None else max(max_seen, t)
    return rows


def reference_value(f, t, values, pool, evicted):
    if f.agg == "time_since_last":
        earlier = [et for et, _ in pool if et <= t]
        if not earlier and evicted and max(evicted) <= t:
            earlier = [max(evicted)]
        return (t - max(earlier)) / 1000 if earlier else None
    window = [(et, ev) for et, ev in pool if t - f.window_ms < et <= t] + [(t, values)]
    if f.agg == "count":
        return len(window)
    timed = [(et, i, ev[f.of]) for i, (et, ev) in enumerate(window) if ev.get(f.of) is not None]
    vals = [v for _, _, v in timed]
    if f.agg == "count_distinct":
        return len(set(vals))
    if f.agg == "sum":
        return math.fsum(vals)
    if f.agg == "stddev":
        return statistics.pstdev(vals) if vals else 0.0
    if not vals:
        return None
    if f.agg == "last":
        return max(timed, key=lambda x: (x[0], x[1]))[2]  # latest time, then latest arrival
    return {"avg": math.fsum(vals) / len(vals), "min": min(vals), "max": max(vals)}[f.agg]


def run(spec: PipelineSpec, stream: list[tuple[int, dict]], key: str = "k") -> list[FeatureRow]:
    logic = FeatureLogic(spec)
    states: dict = {}
    rows = []
    for t, values in stream:
        state = states.setdefault(values.get(key, key), logic.new_state())
        rows.append(logic.update(state, t, values))
    return rows


def assert_rows_match(actual: list[FeatureRow], expected: list[FeatureRow]) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.late == e.late, f"event {i}: late {a.late} != {e.late}"
        assert list(a.features) == list(e.features), f"event {i}: feature order"
        for name, want in e.features.items():
            got = a.features[name]
            if want is None or got is None:
                assert got is want, f"event {i} {name}: {got!r} != {want!r}"
            else:
                assert type(got) is type(want) or isinstance(got, float), (i, name, got)
                assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-6), (
                    f"event {i} {name}: {got!r} != {want!r}")


def ev(t: int, x=None, n=None, tag=None) -> tuple[int, dict]:
    return t, {"x": x, "n": n, "tag": tag}


def rows_of(spec: PipelineSpec, stream: list[tuple[int, dict]]) -> list[dict]:
    rows = run(spec, stream)
    assert_rows_match(rows, reference_rows(spec, stream))
    return [r.features for r in rows]


# ---------------------------------------------------------------------------- hand-made cases

def test_window_bound_equal_to_t_minus_w_is_outside():
    rows = rows_of(ALL_AGGS, [ev(0, 1.0, 1, "a"), ev(M, 2.0, 2, "b"), ev(M + 1, 4.0, 3, "a")])
    assert rows[1]["cnt"] == 1 and rows[1]["total"] == 2.0 and rows[1]["tags"] == 1
    assert rows[2]["cnt"] == 2 and rows[2]["total"] == 6.0 and rows[2]["mean"] == 3.0
    assert (rows[2]["lo"], rows[2]["hi"], rows[2]["sd"]) == (2.0, 4.0, 1.0)


def test_first_event_and_single_event_values():
    [row] = rows_of(ALL_AGGS, [ev(5_000, 2.5, 7, "a")])
    assert row == {"cnt": 1, "total": 2.5, "mean": 2.5, "lo": 2.5, "hi": 2.5, "sd": 0.0,
                   "tags": 1, "last_n": 7, "gap": None}
    assert type(row["cnt"]) is int and type(row["tags"]) is int and type(row["sd"]) is float


def test_time_since_last_in_seconds_and_out_of_order():
    rows = rows_of(ALL_AGGS, [ev(10_000), ev(11_500), ev(11_000), ev(9_000), ev(20_000)])
    assert [r["gap"] for r in rows] == [None, 1.5, 1.0, None, 8.5]


def test_none_values_are_absent_but_counted_by_count():
    rows = rows_of(ALL_AGGS, [ev(0, None, None, None), ev(S, 3.0, None, "a"), ev(2 * S)])
    assert rows[0] == {"cnt": 1, "total": 0.0, "mean": None, "lo": None, "hi": None, "sd": 0.0,
                       "tags": 0, "last_n": None, "gap": None}
    assert rows[2]["cnt"] == 3 and rows[2]["mean"] == 3.0 and rows[2]["tags"] == 1


def test_last_breaks_ties_by_arrival_and_ignores_older_arrivals():
    rows = rows_of(ALL_AGGS, [ev(0, n=1), ev(S, n=2), ev(S, n=3), ev(500, n=4), ev(S, n=None)])
    assert [r["last_n"] for r in rows] == [1, 2, 3, 4, 3]


def test_last_tie_with_an_out_of_order_event():
    rows = rows_of(ALL_AGGS, [ev(0, n=1), ev(S, n=2), ev(2 * S), ev(S, n=3), ev(3 * S)])
    assert [r["last_n"] for r in rows] == [1, 2, 2, 3, 3]


def test_out_of_order_window_excludes_the_bound_too():
    rows = rows_of(ALL_AGGS, [ev(20 * S, 1.0), ev(90 * S, 2.0), ev(80 * S, 4.0), ev(81 * S, 8.0)])
    assert [r["cnt"] for r in rows] == [1, 1, 1, 2]
    assert [r["total"] for r in rows] == [1.0, 2.0, 4.0, 12.0]


def test_event_just_inside_the_horizon_is_kept_for_the_lateness_bound():
    # horizon 90s: at max_seen 91s the event at 1.001s must stay, as an event at 61s (exactly
    # allowed_lateness behind) still has it in its 1m window (1s, 61s].
    rows = rows_of(ALL_AGGS, [ev(1_001, 1.0), ev(91 * S, 2.0), ev(61 * S, 4.0)])
    assert rows[2]["cnt"] == 2 and rows[2]["total"] == 5.0 and rows[2]["gap"] == 59.999


def test_out_of_order_event_enters_the_running_windows():
    rows = rows_of(ALL_AGGS, [ev(0, 1.0, tag="a"), ev(10 * S, 5.0, tag="b"),
                              ev(5 * S, -2.0, tag="c"), ev(20 * S, 2.0, tag="a")])
    assert rows[2] == {"cnt": 2, "total": -1.0, "mean": -0.5, "lo": -2.0, "hi": 1.0, "sd": 1.5,
                       "tags": 2, "last_n": None, "gap": 5.0}
    assert (rows[3]["cnt"], rows[3]["total"], rows[3]["lo"], rows[3]["hi"]) == (4, 6.0, -2.0, 5.0)
    assert rows[3]["tags"] == 3


def test_late_event_gets_a_row_but_leaves_the_state_unchanged():
    logic = FeatureLogic(ALL_AGGS)
    state = logic.new_state()
    logic.update(state, 100 * S, {"x": 1.0})
    before = logic.dumps(state)
    late = logic.update(state, 100 * S - 30 * S - 1, {"x": 5.0})
    assert late.late and late.features["cnt"] == 1 and late.features["total"] == 5.0
    assert logic.dumps(state) == before
    edge = logic.update(state, 70 * S, {"x": 2.0})  # exactly allowed_lateness behind: on time
    assert not edge.late and logic.dumps(state) != before
    after = logic.update(state, 101 * S, {"x": 0.0})
    assert after.features["cnt"] == 3 and after.features["total"] == 3.0


def test_window_slides_and_forgets_distinct_values():
    rows = rows_of(ALL_AGGS, [ev(0, 1.0, tag="a"), ev(30 * S, 9.0, tag="b"),
                              ev(61 * S, 3.0, tag="b"), ev(95 * S, 4.0, tag="c")])
    assert [r["tags"] for r in rows] == [1, 2, 1, 2]
    assert [r["hi"] for r in rows] == [1.0, 9.0, 9.0, 4.0]
    assert [r["lo"] for r in rows] == [1.0, 1.0, 3.0, 3.0]


def test_exact_sums_do_not_drift_or_cancel():
    stream = [ev(i * S, v) for i, v in enumerate([1e15, 0.1, -1e15, 0.1, 0.1, 0.2])]
    rows = rows_of(ALL_AGGS, stream)
    assert rows[-1]["total"] == math.fsum([1e15, 0.1, -1e15, 0.1, 0.1, 0.2])
    same = rows_of(ALL_AGGS, [ev(i * S, 1234.5678) for i in range(200)])
    assert all(r["sd"] == 0.0 for r in same)


def test_bad_values_raise_and_leave_the_state_alone():
    logic = FeatureLogic(ALL_AGGS)
    state = logic.new_state()
    logic.update(state, 0, {"x": 1.0, "tag": "a"})
    before = logic.dumps(state)
    for bad in ({"x": float("nan")}, {"x": float("-inf")}, {"x": "12"}, {"x": True},
                {"n": 3.5}, {"tag": ["a"]}):
        with pytest.raises(ValueError):
            logic.update(state, S, bad)
        assert logic.dumps(state) == before


def test_values_take_the_python_type_of_their_schema_type():
    logic = FeatureLogic(ALL_AGGS)
    state = logic.new_state()
    row = logic.update(state, 0, {"x": 3, "n": 4.0, "tag": "a"}).features
    assert row["total"] == 3.0 and type(row["total"]) is float and type(row["last_n"]) is int
    row = logic.update(state, S, {"x": np.float64(0.5), "n": np.int64(9)}).features
    assert row["total"] == 3.5 and row["last_n"] == 9 and type(row["last_n"]) is int
    assert orjson_roundtrip(logic, state) == logic.dumps(state)


def orjson_roundtrip(logic: FeatureLogic, state) -> bytes:
    return logic.dumps(logic.loads(logic.dumps(state)))


def test_state_of_another_layout_is_refused():
    data = FeatureLogic(FRAUD).dumps(FeatureLogic(FRAUD).new_state())
    with pytest.raises(SpecError, match="another feature layout"):
        FeatureLogic(SENSORS).loads(data)


# ---------------------------------------------------------------------------- properties

KEYS = ("k1", "k2", "k3")
VALUE_BY_TYPE = {
    "double": st.one_of(st.none(), st.sampled_from([0.0, 0.1, 2.5, -3.0, 1e6]),
                        st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)),
    "long": st.one_of(st.none(), st.integers(-5, 5), st.integers(-2**40, 2**40)),
    "string": st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d"])),
}


def time_steps(spec: PipelineSpec) -> st.SearchStrategy[int]:
    """Steps between arrivals: small and large, exact window bounds, back in time, late."""
    bounds = sorted({f.window_ms for f in spec.features if f.window_ms} | {
        spec.allowed_lateness_ms})
    exact = [b * sign for b in bounds for sign in (1, -1)] + [-spec.allowed_lateness_ms - 1]
    grid = math.gcd(*bounds)  # steps on a grid make events land exactly on window bounds
    return st.one_of(st.just(0), st.sampled_from(exact), st.integers(-3, 4).map(grid.__mul__),
                     st.integers(-2 * S, 10 * S),
                     st.integers(-2 * spec.allowed_lateness_ms, spec.max_window_ms),
                     st.integers(0, 2 * spec.state_horizon_ms))


@st.composite
def streams(draw, spec: PipelineSpec) -> list[tuple[int, dict]]:
    """Events of a few keys on a wandering clock: in order, out of order, late, same times."""
    numeric_or_str = {f.name: f.type for f in spec.schema if f.type in VALUE_BY_TYPE}
    clock = 1_700_000_000_000
    out = []
    for _ in range(draw(st.integers(1, 60))):
        clock += draw(time_steps(spec))
        values = {name: draw(VALUE_BY_TYPE[kind]) for name, kind in numeric_or_str.items()}
        values[spec.key] = draw(st.sampled_from(KEYS))
        out.append((clock, values))
    return out


def per_key_reference(spec: PipelineSpec, stream: list[tuple[int, dict]]) -> list[FeatureRow]:
    rows: list[FeatureRow | None] = [None] * len(stream)
    for key in KEYS:
        idx = [i for i, (_, v) in enumerate(stream) if v[spec.key] == key]
        for i, row in zip(idx, reference_rows(spec, [stream[i] for i in idx]), strict=True):
            rows[i] = row
    return rows


PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("spec", [FRAUD, SENSORS, ALL_AGGS], ids=["fraud", "sensors", "all"])
@PROPERTY
@given(data=st.data())
def test_matches_the_reference_on_random_streams(spec, data):
    stream = data.draw(streams(spec))
    assert_rows_match(run(spec, stream, key=spec.key), per_key_reference(spec, stream))


@pytest.mark.parametrize("spec", [FRAUD, SENSORS], ids=["fraud", "sensors"])
@PROPERTY
@given(data=st.data())
def test_dumps_loads_mid_stream_gives_identical_rows(spec, data):
    stream = data.draw(streams(spec))
    cut = data.draw(st.integers(0, len(stream)))
    logic = FeatureLogic(spec)
    kept = {k: logic.new_state() for k in KEYS}
    reloaded = {k: logic.new_state() for k in KEYS}
    for i, (t, values) in enumerate(stream):
        key = values[spec.key]
        if i >= cut:  # from here on, every state comes back from bytes before each event
            reloaded[key] = logic.loads(logic.dumps(reloaded[key]))
        assert logic.update(reloaded[key], t, values) == logic.update(kept[key], t, values)
    for key in KEYS:
        assert logic.dumps(logic.loads(logic.dumps(kept[key]))) == logic.dumps(kept[key])


def test_state_stays_bounded_on_a_long_in_order_stream():
    logic = FeatureLogic(ALL_AGGS)  # horizon: 1m window + 30s lateness
    state = logic.new_state()
    for i in range(20_000):
        logic.update(state, i * S, {"x": float(i % 7), "n": i, "tag": str(i % 5)})
        assert len(state) <= 91
        assert len(state.events) <= 2 * 91
    assert len(state) == 90  # times in (t - 90s, t]
    assert len(logic.dumps(state)) < 10_000


def test_fraud_state_bounded_by_its_24h_horizon():
    logic = FeatureLogic(FRAUD)
    state = logic.new_state()
    step = 10 * M
    for i in range(2_000):
        row = logic.update(state, i * step, {"amount": 1.0, "merchant_id": f"m{i % 50}"})
    assert len(state) == FRAUD.state_horizon_ms // step + 1
    assert row.features == {"txn_count_1m": 1, "amount_sum_1h": 6.0, "amount_avg_24h": 1.0,
                            "merchants_24h": 50, "secs_since_last": 600.0}
