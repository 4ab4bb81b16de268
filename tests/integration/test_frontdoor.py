"""Validation, DLQ and dedupe through the real broker and redis-server."""

from __future__ import annotations

import uuid

import orjson
import pytest
import redis
import yaml

from features.spec import parse_spec
from streams.dedupe import Deduper
from streams.frontdoor import FrontDoor
from streams.kafka import ensure_topics
from streams.loop import TransactionalLoop
from tests.kafka_helpers import Background, produce_all, read_committed

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

GOOD = {"event_id": "t-1", "event_time": "2026-11-22T10:00:00.123Z", "card_id": "c-42", "merchant_id": "m-7",
        "amount": 12.5, "currency": "EUR", "country": "DE", "channel": "online"}


def private_spec(settings):
    """The fraud spec on topics of this test's own."""
    data = yaml.safe_load(settings.pipeline.read_text())
    suffix = uuid.uuid4().hex[:8]
    data["source"]["topic"] = f"tx-{suffix}"
    data["topics"] = {**data["topics"], "dlq": f"tx-{suffix}.dlq", "features": f"out-{suffix}"}
    spec = parse_spec(data)
    ensure_topics(settings.kafka, spec.topics.all(), partitions=3)
    return spec


class PassThrough:
    """A stand-in engine stage: admitted events are re-emitted unchanged to the features topic."""

    def __init__(self, spec, door):
        self.spec, self.door = spec, door

    def process(self, messages, out):
        for msg, _event in self.door.admit(messages, out):
            out.produce(self.spec.topics.features, msg.value(), msg.key())


def run_stage(settings, spec, group, door):
    loop = TransactionalLoop(settings.kafka, group, [spec.topics.source], f"{group}-0")
    return Background(lambda stop: loop.run(PassThrough(spec, door), stop))


def test_bad_records_go_to_the_dlq_with_reasons_and_good_ones_flow(settings):
    spec = private_spec(settings)
    r = redis.Redis.from_url(settings.redis_url)
    door = FrontDoor(spec, Deduper(r, f"test-{spec.topics.source}"))
    good = [{**GOOD, "event_id": f"g-{i}", "card_id": f"c-{i % 2}"} for i in range(3)]
    good[2]["event_time"] = 1795341600123  # the epoch-millisecond form
    bad = [
        (b"", "empty record"),
        (b"\x00\xff\xfe garbage", "not JSON"),
        (b"[1, 2, 3]", "expected a JSON object, got list"),
        (orjson.dumps({**GOOD, "amount": "12.5"}), "field 'amount': expected a finite number (double), got str"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "merchant_id"}), "field 'merchant_id' is missing"),
        (orjson.dumps({**GOOD, "event_time": "22/11/2026"}), "field 'event_time': '22/11/2026' is not ISO-8601"),
        (orjson.dumps({**GOOD, "event_time": "2026-11-22T10:00:00"}), "is not ISO-8601 with an offset"),
    ]
    records = [(b"c-0", orjson.dumps(good[0]))]
    records += [(b"c-x", raw) for raw, _ in bad[:4]]
    records += [(b"c-1", orjson.dumps(good[1]))]
    records += [(b"c-x", raw) for raw, _ in bad[4:]]
    records += [(b"c-0", orjson.dumps(good[0])), (b"c-0", orjson.dumps(good[2]))]  # a duplicate, then g-2
    delivered = produce_all(settings.kafka, spec.topics.source, records)

    stage = run_stage(settings, spec, f"fd-{spec.topics.source}", door)
    try:
        out = read_committed(settings.kafka, spec.topics.features, 3, idle_s=2.0)
        dlq = read_committed(settings.kafka, spec.topics.dlq, len(bad), idle_s=0.5)
    finally:
        stage.stop()

    assert sorted(orjson.loads(m.value())["event_id"] for m in out) == ["g-0", "g-1", "g-2"]
    assert len(dlq) == len(bad)
    by_value = {m.value(): m for m in dlq}
    sent = {d.value(): d for d in delivered}
    for raw, reason in bad:
        letter = by_value[raw]  # byte for byte, the empty value too
        headers = dict(letter.headers())
        assert reason in headers["eddy.error"].decode()
        assert headers["eddy.stage"] == b"validate"
        assert headers["eddy.source.topic"].decode() == spec.topics.source
        src = sent[raw]
        assert int(headers["eddy.source.partition"]) == src.partition()
        assert int(headers["eddy.source.offset"]) == src.offset()
        assert letter.key() == b"c-x"
    assert (door.counts.valid, door.counts.invalid, door.counts.duplicates) == (3, len(bad), 1)


def test_dedupe_survives_a_restart_and_a_replay_is_not_a_duplicate(settings):
    spec = private_spec(settings)
    r = redis.Redis.from_url(settings.redis_url)
    namespace = f"test-{spec.topics.source}"
    group = f"fd-{spec.topics.source}"
    produce_all(settings.kafka, spec.topics.source, [(b"c-1", orjson.dumps({**GOOD, "event_id": "a"}))])
    first = run_stage(settings, spec, group, FrontDoor(spec, Deduper(r, namespace)))
    try:
        assert len(read_committed(settings.kafka, spec.topics.features, 1, idle_s=1.0)) == 1
    finally:
        first.stop()

    # A new process: same id again, plus a new one. Only the new one comes out.
    produce_all(settings.kafka, spec.topics.source, [(b"c-1", orjson.dumps({**GOOD, "event_id": "a"})),
                                                     (b"c-1", orjson.dumps({**GOOD, "event_id": "b"}))])
    door = FrontDoor(spec, Deduper(redis.Redis.from_url(settings.redis_url), namespace))
    second = run_stage(settings, spec, group, door)
    try:
        out = read_committed(settings.kafka, spec.topics.features, 2, idle_s=2.0)
    finally:
        second.stop()
    assert [orjson.loads(m.value())["event_id"] for m in out] == ["a", "b"]
    assert door.counts.duplicates == 1

    # The same record replayed from the same position (as after an aborted transaction) is not a duplicate.
    dedupe = Deduper(r, namespace)
    assert dedupe.first_seen([("z", "t:0:5"), ("z", "t:0:5"), ("z", "t:1:9")]) == [True, True, False]
    assert dedupe.duplicates == 1
    assert 0 < r.pttl(f"eddy:{namespace}:seen:z") <= 24 * 3600 * 1000


class _NoScripts:
    """A Redis client whose ACL refuses EVAL (as some managed Redis services do)."""

    def __init__(self, client) -> None:
        self._client = client
        self.refused = 0

    def register_script(self, _source):
        def refuse(**_kwargs):
            from redis.exceptions import NoPermissionError

            self.refused += 1
            raise NoPermissionError("this user has no permissions to run the 'evalsha' command")
        return refuse

    def pipeline(self, **kwargs):
        return self._client.pipeline(**kwargs)


def test_dedupe_decides_the_same_without_server_scripts(settings):
    """The scripted path (one EVALSHA a batch) and the pipelined fallback give the same answers."""
    r = redis.Redis.from_url(settings.redis_url)
    scripted = Deduper(r, f"test-s-{uuid.uuid4().hex[:8]}")
    no_scripts = _NoScripts(r)
    pipelined = Deduper(no_scripts, f"test-p-{uuid.uuid4().hex[:8]}")
    batches = [[("a", "t:0:1"), ("b", "t:0:2"), ("a", "t:0:3")], [("a", "t:0:1"), ("b", "t:1:7"), ("c", "t:2:0")]]
    for batch in batches:
        assert scripted.first_seen(batch) == pipelined.first_seen(batch)
    assert scripted.first_seen([("a", "t:0:1")]) == [True] and scripted.duplicates == pipelined.duplicates == 2
    assert no_scripts.refused == 1  # refused once, then the pipeline is used without asking again
