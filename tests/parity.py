"""Engine parity: a source stream with every awkward case, and the features it must give, computed naively.

make_stream() builds, for any spec, records keyed by entity with out-of-order events inside the allowed
lateness, late ones beyond it, events exactly on a window bound and exactly on the lateness bound, both
timestamp forms, resent duplicates, invalid records, and events stamped further ahead of their record's
Kafka timestamp than source.max_future allows (and one exactly on that bound). Each record carries the
Kafka timestamp to produce it with: the history's own clock, the latest event time so far.
reference_rows() derives each first-seen valid event's expected row from the feature semantics of
docs/contract.md by looping over the entity's earlier-arrived events; it shares no code with
features/windows.py or features/apply.py, so an engine test that matches it checks the real numbers."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

from features.spec import PipelineSpec

Stream = list[tuple[bytes | None, bytes | None, int]]  # (key, value, Kafka timestamp in epoch ms)
Row = tuple[dict[str, Any], bool]
START_MS = 1_795_341_600_123  # 2026-11-22T10:00:00.123Z
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_OFFSETS = [timedelta(0), timedelta(hours=2), timedelta(hours=-5), timedelta(hours=5, minutes=30)]
_VOCAB = ["a", "b", "c", "d"]


def invalid_records(spec: PipelineSpec, event: dict[str, Any]) -> list[tuple[bytes | None, str]]:
    """Refused values made from the valid record `event`, each with a part of the reason the DLQ must carry."""
    number = next(f.name for f in spec.schema if f.type in ("double", "float"))
    ts, key = spec.timestamp_field, spec.key
    return [
        (b"", "empty record"),
        (b"\x00\xff garbage", "not JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (orjson.dumps({k: v for k, v in event.items() if k != key}), f"field {key!r} is missing"),
        (orjson.dumps({**event, number: "12.5"}), f"field {number!r}: expected a finite number"),
        (orjson.dumps({**event, ts: "yesterday"}), "is not ISO-8601 with an offset or epoch milliseconds"),
        (orjson.dumps({**event, ts: "2026-11-22T10:00:00"}), "is not ISO-8601 with an offset"),
        (orjson.dumps({**event, "padding": "x" * spec.max_record_bytes}), "bytes is over the bound of"),
        *((orjson.dumps({**event, name: "not-a-value"}), f"field {name!r}: 'not-a-value' is not one of")
          for name in list(spec.enums)[:1]),
    ]


FUTURE_REASON = "ahead of the record's Kafka timestamp"


def dead_letters(spec: PipelineSpec, stream: Stream) -> list[tuple[bytes | None, str]]:
    """The records of `stream` that go to the DLQ, each with a part of its reason: the invalid ones
    make_stream put there, and the first-seen valid events stamped too far ahead of their arrival."""
    template = next(record for _, raw, _ in stream if (record := valid_record(spec, raw)) is not None)
    seen: set[str] = set()
    ahead = []
    for _, raw, arrival in stream:
        record = valid_record(spec, raw)
        if record is None or record[spec.id_field] in seen:
            continue
        seen.add(record[spec.id_field])
        if _parse_time(record[spec.timestamp_field]) - arrival > spec.max_future_ms:
            ahead.append((raw, FUTURE_REASON))
    return invalid_records(spec, template) + ahead


def duplicates(spec: PipelineSpec, stream: Stream) -> int:
    """Valid records whose id an earlier valid record carried."""
    ids = [record[spec.id_field] for _, raw, _ in stream if (record := valid_record(spec, raw)) is not None]
    return len(ids) - len(set(ids))


def make_stream(spec: PipelineSpec, seed: int, entities: int = 6, per_entity: int = 40) -> Stream:
    """(key, value) records in the order they are to be produced; keys are entity keys."""
    rng = random.Random(seed)
    windows = sorted({f.window_ms for f in spec.features if f.window_ms})
    lateness = spec.allowed_lateness_ms
    # Steps between in-order events: every window length (the previous event then lies exactly on the
    # bound t - w), fractions of them (sums of several land on bounds too), and odd milliseconds.
    steps = windows + [w // 2 for w in windows] + [w // 3 for w in windows] + [1, 999, 1_000, 7_777, 15_000] * 4
    names = [f"{spec.entity}-{i}" for i in range(entities)]
    clock = {n: START_MS + rng.randrange(0, 60_000) for n in names}  # latest time so far, per entity
    timelines = {n: [] for n in names}
    for name in names:
        for i in range(per_entity):
            roll, latest = rng.random(), clock[name]
            if i > 2 and roll < 0.12:  # out of order, within the lateness (sometimes exactly on its bound)
                t = latest - (lateness if rng.random() < 0.3 else rng.randrange(0, lateness + 1))
            elif i > 2 and roll < 0.20:  # late: further behind than the allowed lateness
                t = latest - lateness - rng.choice([1, 1_000, lateness + 5_000, windows[-1]])
            else:
                t = latest + rng.choice(steps)
                clock[name] = t
            timelines[name].append(_event(spec, rng, f"{name}-e{i}", name, t))
    # Interleave entities at random, keeping each entity's own order (its arrival order).
    order = [n for n in names for _ in range(per_entity)]
    rng.shuffle(order)
    cursor = dict.fromkeys(names, 0)
    stream: list[tuple[bytes | None, bytes | None]] = []
    sent: list[tuple[bytes, bytes]] = []
    for name in order:
        event = timelines[name][cursor[name]]
        cursor[name] += 1
        record = (name.encode(), orjson.dumps(event))
        stream.append(record)
        sent.append(record)
        if rng.random() < 0.06:  # a duplicate: some earlier record resent unchanged
            stream.append(rng.choice(sent))
    for value, _reason in invalid_records(spec, orjson.loads(stream[0][1])):
        stream.insert(rng.randrange(len(stream) + 1), (names[0].encode(), value))
    return _stamped(spec, rng, stream)


def _stamped(spec: PipelineSpec, rng: random.Random, stream: list[tuple[bytes | None, bytes | None]]) -> Stream:
    """The records with the Kafka timestamps to produce them with (the latest event time so far, so no
    ordinary event is ahead of its arrival), and two events of one entity stamped ahead of their
    arrival: one by more than source.max_future (refused), one by exactly that much (admitted)."""
    out: Stream = []
    clock = START_MS
    ahead_at = sorted(rng.sample(range(len(stream) // 3, len(stream)), 2))
    for i, (key, value) in enumerate(stream):
        record = valid_record(spec, value)
        if record is not None:
            clock = max(clock, _parse_time(record[spec.timestamp_field]))
        out.append((key, value, clock))
        if i in ahead_at:
            beyond = 1 if i == ahead_at[0] else 0  # the bound itself is allowed
            entity = f"{spec.entity}-ahead"
            event = _event(spec, rng, f"{entity}-{i}", entity, clock + spec.max_future_ms + beyond)
            event[spec.timestamp_field] = clock + spec.max_future_ms + beyond  # epoch ms: exact
            out.append((entity.encode(), orjson.dumps(event), clock))
    return out


def _event(spec: PipelineSpec, rng: random.Random, event_id: str, key: str, t: int) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for field in spec.schema:
        name, kind = field.name, field.type
        if name == spec.id_field:
            record[name] = event_id
        elif name == spec.key:
            record[name] = key
        elif kind == "timestamp":
            record[name] = t if rng.random() < 0.5 else _iso(t, rng.choice(_OFFSETS))
        elif kind in ("double", "float"):
            record[name] = rng.randrange(-50, 500) if rng.random() < 0.1 else round(rng.uniform(-50, 500), 3)
        elif kind in ("long", "int"):
            record[name] = rng.randrange(0, 5_000)
        elif kind == "boolean":
            record[name] = rng.random() < 0.5
        else:
            record[name] = rng.choice(field.values or _VOCAB)
    return record


def _iso(t: int, offset: timedelta) -> str:
    """ISO-8601 with an explicit offset (Z for UTC) and milliseconds."""
    moment = _EPOCH + timedelta(milliseconds=t)
    text = moment.astimezone(timezone(offset)).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z") if offset == timedelta(0) else text


def _parse_time(value: Any) -> int:
    if isinstance(value, int):
        return value
    moment = datetime.fromisoformat(value)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def valid_record(spec: PipelineSpec, raw: bytes | None) -> dict[str, Any] | None:
    """The record when it is valid (at most source.max_record_bytes; every field present, of its type, and
    one of its values for an enum; no field outside the schema with source.extra_fields: refuse), else None."""
    if raw is not None and len(raw) > spec.max_record_bytes:
        return None
    try:
        record = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or (spec.extra_fields == "refuse" and set(record) - set(spec.field_types)):
        return None
    for field in spec.schema:
        v = record.get(field.name)
        if field.type == "timestamp":
            try:
                ok = isinstance(v, int) or (isinstance(v, str) and datetime.fromisoformat(v).tzinfo is not None)
            except ValueError:
                ok = False
        elif field.type in ("double", "float"):
            ok = isinstance(v, int | float) and not isinstance(v, bool)
        elif field.type in ("long", "int"):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif field.type == "boolean":
            ok = isinstance(v, bool)
        else:
            ok = isinstance(v, str) and (v != "" or field.name not in (spec.key, spec.id_field)) \
                and (field.values is None or v in field.values)
        if not ok:
            return None
    return record


def reference_rows(spec: PipelineSpec, stream: Stream) -> dict[str, Row]:
    """event id -> (features, late) for every first-seen valid record, straight from the definition."""
    accepted: dict[str, list[tuple[int, dict[str, Any]]]] = {}  # entity -> non-late events, arrival order
    rows: dict[str, Row] = {}
    refused: set[str] = set()
    for _key, raw, arrival in stream:
        record = valid_record(spec, raw)
        if record is None or record[spec.id_field] in rows or record[spec.id_field] in refused:
            continue
        t = _parse_time(record[spec.timestamp_field])
        if t - arrival > spec.max_future_ms:  # stamped too far ahead of its arrival: the DLQ's
            refused.add(record[spec.id_field])
            continue
        earlier = accepted.setdefault(record[spec.key], [])
        latest = max((s for s, _ in earlier), default=None)
        late = latest is not None and t < latest - spec.allowed_lateness_ms
        features = {f.name: _feature(f, t, record, earlier) for f in spec.features}
        rows[record[spec.id_field]] = (features, late)
        if not late:
            earlier.append((t, record))
    return rows


def _feature(feature, t: int, record: dict[str, Any], earlier: list[tuple[int, dict[str, Any]]]) -> Any:
    if feature.agg == "time_since_last":
        before = [s for s, _ in earlier if s <= t]
        return (t - max(before)) / 1000 if before else None
    window = [(s, r) for s, r in earlier if t - feature.window_ms < s <= t] + [(t, record)]
    if feature.agg == "count":
        return len(window)
    values = [r[feature.of] for _, r in window]
    if feature.agg == "count_distinct":
        return len(set(values))
    if feature.agg == "last":  # the latest in event time; among equal times the last to arrive
        return max(enumerate(window), key=lambda pair: (pair[1][0], pair[0]))[1][1][feature.of]
    numbers = [float(v) for v in values]
    n = len(numbers)
    mean = math.fsum(numbers) / n
    return {
        "sum": math.fsum(numbers),
        "avg": mean,
        "min": min(numbers),
        "max": max(numbers),
        "stddev": math.sqrt(math.fsum((x - mean) ** 2 for x in numbers) / n),
    }[feature.agg]


def same_features(got: dict[str, Any], want: dict[str, Any]) -> bool:
    """Equal names, and equal values (numbers within a relative 1e-9)."""
    if got.keys() != want.keys():
        return False
    for name, w in want.items():
        g = got[name]
        if w is None or g is None:
            if w is not g:
                return False
        elif not math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-9):
            return False
    return True


def check_engine_output(settings, spec: PipelineSpec, expected: dict[str, Row], delivered: list, invalid: list,
                        carries_timestamps: bool = True) -> None:
    """What an engine wrote for a make_stream() stream: exactly one row per first-seen valid event, keyed by
    its entity, equal to the reference for every non-late event, and each invalid record in the DLQ byte
    for byte with its reason and source position."""
    from streams.engines.config import STAGE
    from tests.kafka_helpers import read_committed

    rows = read_committed(settings.kafka, spec.topics.features, len(expected), timeout_s=30, idle_s=1.0)
    letters = read_committed(settings.kafka, spec.topics.dlq, len(invalid), timeout_s=30, idle_s=1.0)

    # Exactly one row per first-seen valid event, keyed by its entity, and nothing else.
    got = {}
    for msg in rows:
        value = orjson.loads(msg.value())
        assert value["event_id"] not in got, f"two rows for {value['event_id']}"
        assert msg.key() == value[spec.key].encode()
        got[value["event_id"]] = value
    assert got.keys() == expected.keys()
    # Each row carries its source record's Kafka timestamp on (so later stages measure from the event);
    # the Flink job's rows are stamped by its Kafka sink instead (carries_timestamps False).
    arrived: dict[str, int] = {}
    for d in delivered:
        record = valid_record(spec, d.value())
        if record is not None:
            arrived.setdefault(record[spec.id_field], d.timestamp()[1])
    stamps = {orjson.loads(m.value())["event_id"]: m.timestamp()[1] for m in rows}
    assert (stamps == {event_id: arrived[event_id] for event_id in stamps}) is carries_timestamps
    late = [i for i, (_, is_late) in expected.items() if is_late]
    assert 10 <= len(late) < len(expected) // 4  # the stream holds late events, and mostly timely ones
    assert any(FUTURE_REASON in reason for _, reason in invalid)  # and events refused by the apply step
    for event_id, (features, is_late) in expected.items():
        assert got[event_id]["late"] is is_late, event_id
        if not is_late:
            assert same_features(got[event_id]["features"], features), (event_id, got[event_id], features)

    # Invalid records: in the DLQ byte for byte, with the reason and where they came from.
    assert len(letters) == len(invalid)
    sent = {d.value(): d for d in delivered}
    by_value = {m.value(): m for m in letters}
    for value, reason in invalid:
        letter = by_value[value]
        headers = {k: v.decode() for k, v in letter.headers()}
        assert reason in headers["eddy.error"], (reason, headers["eddy.error"])
        assert headers["eddy.stage"] == STAGE
        assert headers["eddy.source.topic"] == spec.topics.source
        assert int(headers["eddy.source.partition"]) == sent[value].partition()
        assert int(headers["eddy.source.offset"]) == sent[value].offset()
        assert letter.key() == sent[value].key()


@dataclass(frozen=True)
class ParityCase:
    """A private copy of a shipped spec with make_stream()'s records already on its source topic."""

    spec: PipelineSpec
    spec_path: Path
    stream: Stream
    expected: dict[str, Row]
    delivered: list
    invalid: list
    resent: int


def private_copy(settings, path: Path, into: Path) -> tuple[PipelineSpec, Path]:
    """The spec at `path` on topics (and with a name, hence consumer group and transactional ids) of the
    test's own, written to `into`; its topics exist."""
    import uuid

    import yaml

    from deploy.broker import grant
    from features.spec import parse_spec
    from streams.kafka import ensure_topics

    data = yaml.safe_load(path.read_text())
    suffix = uuid.uuid4().hex[:8]
    data["name"] = f"{data['name']}-{suffix}"
    data["source"]["topic"] = f"{data['source']['topic']}-{suffix}"
    data["topics"] = {**data.get("topics", {}), "dlq": f"dlq-{suffix}", "features": f"features-{suffix}",
                      "predictions": f"predictions-{suffix}", "model_updates": f"model-updates-{suffix}"}
    spec = parse_spec(data)
    # make_stream's records carry the Kafka timestamps of their history (days ago): kept forever, so the
    # broker's retention (7 days by default, checked every 5 minutes) never deletes them mid-test;
    # model updates on one partition, as `eddy up` makes them
    ensure_topics(settings.kafka, [spec.topics.model_updates], partitions=1, configs={"retention.ms": "-1"})
    ensure_topics(settings.kafka, spec.topics.all(), partitions=3, configs={"retention.ms": "-1"})
    grant(settings, spec)  # each role's ACLs on the copy's topics, groups and transactional ids
    into.write_text(yaml.safe_dump(data))
    return spec, into


def as_role(stack_env: dict[str, str], role: str) -> dict[str, str]:
    """The variables that sign a process in to the session's secure broker as `role` (its ACLs alone
    decide what it may do); Redis stays the admin's, whose users know the shipped specs' keys only."""
    from deploy.security import kafka_client_file

    return {"EDDY_KAFKA_CONFIG": str(kafka_client_file(Path(stack_env["EDDY_HOME"]), role))}


def parity_case(settings, path: Path, into: Path, seed: int = 11) -> ParityCase:
    """A private copy of the spec with make_stream()'s records produced to its source topic."""
    from tests.kafka_helpers import produce_all

    spec, spec_path = private_copy(settings, path, into)
    stream = make_stream(spec, seed)
    delivered = produce_all(settings.kafka, spec.topics.source, stream)
    return ParityCase(spec, spec_path, stream, reference_rows(spec, stream), delivered,
                      dead_letters(spec, stream), duplicates(spec, stream))


def halves_with_a_resend(spec: PipelineSpec, seed: int) -> tuple[Stream, Stream]:
    """make_stream() cut in two, the second half ending by resending a valid record of the first: after a
    restart between the halves, only the restored dedupe state can tell it was seen."""
    stream = make_stream(spec, seed=seed)
    first, second = stream[: len(stream) // 2], stream[len(stream) // 2:]
    key, value, _stamp = next(r for r in first if valid_record(spec, r[1]) is not None)
    return first, [*second, (key, value, second[-1][2])]


def check_resumed_rows(expected: dict[str, Row], rows: list) -> None:
    """The features records of a restarted engine are the reference's, each exactly once, and entity state
    came through the restart (windows reach across it)."""
    got = [orjson.loads(m.value()) for m in rows]
    assert sorted(r["event_id"] for r in got) == sorted(expected), "a row is missing or came twice"
    for row in got:
        features, is_late = expected[row["event_id"]]
        assert row["late"] is is_late
        if not is_late:
            assert same_features(row["features"], features), (row, features)
