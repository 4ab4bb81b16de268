"""The pipeline spec: the YAML of docs/contract.md, validated into frozen dataclasses, and
everything derived from it that the other layers read (topics, record schema, model inputs)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from features.errors import SpecError

AGGS = ("count", "sum", "avg", "min", "max", "stddev", "count_distinct", "last", "time_since_last")
NUMERIC_AGGS = frozenset({"sum", "avg", "min", "max", "stddev", "last"})
TYPES = ("string", "double", "float", "long", "int", "boolean", "timestamp")
NUMERIC_TYPES = ("double", "float", "long", "int")
MODEL_KINDS = ("mlp", "sequence")
RESERVED_FEATURE_NAMES = frozenset({"late"})  # a column of every feature row
# How far an event time may lie ahead of its record's Kafka timestamp before the event is refused:
# a clock a few minutes fast is normal, an event hours ahead would make the entity's real events late.
DEFAULT_MAX_FUTURE_MS = 5 * 60_000
# The largest source record the engines take: an event is a few hundred bytes; a record beyond this is
# a mistake or an attack (parsing it would cost every engine), refused to the DLQ with its size.
DEFAULT_MAX_RECORD_BYTES = 64 * 1024
EXTRA_FIELDS = ("ignore", "refuse")  # source.extra_fields: what a field outside the schema does
GUARANTEES = ("exactly_once", "at_least_once")  # guarantee: how the native stages deliver their outputs
_SIZE = re.compile(r"\s*(\d+)\s*(B|KiB|MiB)?\s*\Z")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024 * 1024}

_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"\s*(\d+)\s*(ms|s|m|h|d)\s*\Z")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}\Z")


@dataclass(frozen=True)
class Field:
    """One field of the source schema: its name, its schema type (one of TYPES) and, for a string
    field declared as {enum: [...]}, the values it may take."""

    name: str
    type: str
    values: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Feature:
    """One feature: aggregation `agg` of schema field `of` over the last `window_ms` of event time
    (`of` is None for count and time_since_last, `window_ms` None for time_since_last)."""

    name: str
    agg: str
    of: str | None
    window_ms: int | None


@dataclass(frozen=True)
class Labels:
    """Where labels come from: their topic, the field holding the labelled event's id, and the 0/1
    label field."""

    topic: str
    id: str
    label: str


@dataclass(frozen=True)
class PublishPolicy:
    """What a model must show before it is published, promoted or rolled out (models.policy): holdout
    PR-AUC and rows at least these, a holdout PR-AUC at most `max_drop` below the champion's on the
    same holdout, and a signature by one of `signers` (key ids; empty: any trusted key). None: no bound."""

    min_pr_auc: float | None = None
    min_holdout_rows: int | None = None
    max_drop: float | None = None
    signers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Model:
    """The model the pipeline scores with: its name and kind (one of MODEL_KINDS), and the publish policy
    (not part of the spec hash: a changed policy keeps every model compatible)."""

    name: str
    kind: str
    publish: PublishPolicy = PublishPolicy()


@dataclass(frozen=True)
class Topics:
    """The topic of each role, as the spec names it or by default; parse_spec guarantees no two
    roles share one."""

    source: str
    labels: str | None
    features: str
    predictions: str
    dlq: str
    model_updates: str

    @property
    def shadow(self) -> str:
        """Where scorers write a shadow challenger's predictions during a rollout (never read by the
        consumers of `predictions`): the predictions topic's name with `.shadow`."""
        return f"{self.predictions}.shadow"

    def all(self) -> tuple[str, ...]:
        """Every topic the pipeline uses, source first, labels included when set."""
        names = (self.source, self.labels, self.features, self.predictions, self.shadow, self.dlq,
                 self.model_updates)
        return tuple(dict.fromkeys(n for n in names if n is not None))


@dataclass(frozen=True)
class PipelineSpec:
    """A validated pipeline spec, made by parse_spec or load_spec. `spec_hash` covers every field;
    artifacts and model updates carry it, and a scorer refuses those made for another spec."""

    name: str
    entity: str
    key: str
    id_field: str
    timestamp_field: str
    allowed_lateness_ms: int
    schema: tuple[Field, ...]
    features: tuple[Feature, ...]
    labels: Labels | None
    topics: Topics
    model: Model
    spec_hash: str
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    extra_fields: str = "ignore"
    # The delivery guarantee of the native engine, the scorers and the fused stage (docs/contract.md):
    # exactly_once or at_least_once. Not in spec_hash: how outputs are delivered changes no model input.
    guarantee: str = "exactly_once"

    def stage_id(self, stage: str) -> str:
        """The stable id of one stage of this pipeline: its consumer group, transactional id prefix,
        heartbeat, changelog topics and Flink uid prefix all derive from it."""
        return f"eddy-{self.name}-{stage}"

    @property
    def field_types(self) -> dict[str, str]:
        """The record schema used by validation: field name -> type, in spec order."""
        return {f.name: f.type for f in self.schema}

    @property
    def enums(self) -> dict[str, tuple[str, ...]]:
        """The string fields declared as enums: field name -> the values it may take."""
        return {f.name: f.values for f in self.schema if f.values is not None}

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The feature names in spec order: the columns of every feature row."""
        return tuple(f.name for f in self.features)

    @property
    def model_inputs(self) -> tuple[str, ...]:
        """The model's input names, in the order the model sees them."""
        return self.feature_names

    @property
    def max_window_ms(self) -> int:
        """The longest window of any feature (0 when no feature has one)."""
        return max((f.window_ms for f in self.features if f.window_ms is not None), default=0)

    @property
    def state_horizon_ms(self) -> int:
        """How far behind the latest event time the state must keep an event."""
        return self.max_window_ms + self.allowed_lateness_ms


class _Invalid(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")


def parse_duration(text: str | int) -> int:
    """Milliseconds in `text` (500ms, 30s, 1m, 1h, 24h, 7d); a bare integer is milliseconds."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise SpecError(f"duration {text} is negative; use a value >= 0")
        return text
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise SpecError(f"{text!r} is not a duration; use a whole number with ms, s, m, h or d "
                        "(500ms, 30s, 1m, 1h, 24h, 7d)")
    return int(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_spec(data: Mapping, source: str = "<spec>") -> PipelineSpec:
    """Validate `data` (the loaded YAML) into a PipelineSpec; SpecError names the bad field."""
    try:
        return _parse(data)
    except _Invalid as exc:
        raise SpecError(f"{source}: {exc}") from None


def load_spec(path: str | os.PathLike) -> PipelineSpec:
    """Read and validate the spec at `path`; SpecError names the path on any failure."""
    where = os.fspath(path)
    try:
        text = Path(where).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SpecError(f"{where}: cannot read the pipeline spec: {reason}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as exc:
        raise SpecError(f"{where}: not valid YAML: {_yaml_reason(exc)}") from None
    return parse_spec(data, source=where)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which PyYAML would otherwise drop silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem


def _parse(data: Any) -> PipelineSpec:
    top = _section(data, "spec", ("name", "entity", "source", "features", "model"),
                   ("labels", "topics", "guarantee"))
    name = _text(top, "name", "name", _NAME)
    entity = _section(top["entity"], "entity", ("name", "key"))
    src = _section(top["source"], "source", ("topic", "id", "timestamp", "schema"),
                   ("allowed_lateness", "max_future", "max_record_bytes", "extra_fields"))
    schema = _schema(src["schema"])
    types = {f.name: f.type for f in schema}
    key = _field_ref(entity, "key", "entity.key", types)
    id_field = _field_ref(src, "id", "source.id", types)
    ts_field = _field_ref(src, "timestamp", "source.timestamp", types)
    if types[ts_field] != "timestamp":
        raise _Invalid("source.timestamp", f"field {ts_field!r} is {types[ts_field]}; "
                                           "it must be of type timestamp")
    lateness = _duration(src.get("allowed_lateness", 0), "source.allowed_lateness", positive=False)
    max_future = _duration(src.get("max_future", DEFAULT_MAX_FUTURE_MS), "source.max_future", positive=False)
    max_record_bytes = _size(src.get("max_record_bytes", DEFAULT_MAX_RECORD_BYTES), "source.max_record_bytes")
    extra_fields = _choice(src, "extra_fields", "source.extra_fields", EXTRA_FIELDS) if "extra_fields" in src \
        else "ignore"
    features = _features(top["features"], types, {key, id_field, ts_field} | RESERVED_FEATURE_NAMES)
    labels = None if top.get("labels") is None else _labels(top["labels"])
    topics = _topics(top.get("topics"), _text(src, "topic", "source.topic", _TOPIC), labels)
    model_sec = _section(top["model"], "model", ("name", "kind"), ("publish",))
    model = Model(_text(model_sec, "name", "model.name", _NAME),
                  _choice(model_sec, "kind", "model.kind", MODEL_KINDS),
                  _publish_policy(model_sec.get("publish") or {}))
    spec = PipelineSpec(name, _text(entity, "name", "entity.name", _IDENT), key, id_field,
                        ts_field, lateness, schema, features, labels, topics, model, "", max_future,
                        max_record_bytes, extra_fields,
                        _choice(top, "guarantee", "guarantee", GUARANTEES) if "guarantee" in top else "exactly_once")
    return replace(spec, spec_hash=_hash(spec))


def _publish_policy(value: Any) -> PublishPolicy:
    sec = _section(value, "model.publish", (), ("min_pr_auc", "min_holdout_rows", "max_drop", "signers"))

    def share(key: str) -> float | None:
        v = sec.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1):
            raise _Invalid(f"model.publish.{key}", f"expected a number from 0 to 1, got {v!r}")
        return None if v is None else float(v)

    rows = sec.get("min_holdout_rows")
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
        raise _Invalid("model.publish.min_holdout_rows", f"expected a whole number of rows, got {rows!r}")
    signers = sec.get("signers") or []
    if not isinstance(signers, list) or not all(isinstance(s, str) and re.fullmatch(r"[0-9a-f]{16}", s)
                                                for s in signers):
        raise _Invalid("model.publish.signers", "expected a list of key ids (16 hex characters: "
                                                "`eddy model-key` prints the key, its id on stderr)")
    return PublishPolicy(share("min_pr_auc"), rows, share("max_drop"), tuple(signers))


def _section(value: Any, path: str, required: tuple[str, ...],
             optional: tuple[str, ...] = ()) -> Mapping:
    if not isinstance(value, Mapping):
        raise _Invalid(path, f"expected a mapping with keys {', '.join(required + optional)}, "
                             f"got {_kind(value)}")
    allowed = required + optional
    for k in value:
        if k not in allowed:
            raise _Invalid(_join(path, k), f"unknown key; allowed: {', '.join(allowed)}")
    for k in required:
        if k not in value:
            raise _Invalid(_join(path, k), "required key is missing")
    return value


def _text(m: Mapping, key: str, path: str, pattern: re.Pattern) -> str:
    value = m[key]
    if not isinstance(value, str):
        raise _Invalid(path, f"expected a string, got {_kind(value)}")
    if not pattern.match(value):
        raise _Invalid(path, f"{value!r} is not a valid name (allowed: {_describe(pattern)})")
    return value


def _choice(m: Mapping, key: str, path: str, allowed: tuple[str, ...]) -> str:
    value = m[key]
    if value not in allowed:
        raise _Invalid(path, f"{value!r} is not one of {', '.join(allowed)}")
    return value


def _field_ref(m: Mapping, key: str, path: str, types: Mapping[str, str]) -> str:
    value = m[key]
    if not isinstance(value, str) or value not in types:
        raise _Invalid(path, f"{value!r} is not a field of source.schema "
                             f"(fields: {', '.join(types)})")
    return value


def _duration(value: Any, path: str, positive: bool) -> int:
    try:
        ms = parse_duration(value)
    except SpecError as exc:
        raise _Invalid(path, str(exc)) from None
    if positive and ms == 0:
        raise _Invalid(path, "a window must be longer than 0")
    return ms


def _size(value: Any, path: str) -> int:
    """Bytes, from an integer or a text like 64KiB or 1 MiB; at least 1 KiB."""
    match = _SIZE.match(value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif match is not None:
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    else:
        raise _Invalid(path, f"{value!r} is not a size; write bytes or a size like 64KiB or 1MiB")
    if size < 1024:
        raise _Invalid(path, f"{size} bytes is below the least bound of 1KiB")
    return size


def _schema(value: Any) -> tuple[Field, ...]:
    if not isinstance(value, Mapping) or not value:
        raise _Invalid("source.schema", f"expected a mapping of field name to type, "
                                        f"got {_kind(value)}")
    fields = []
    for name, type_ in value.items():
        path = f"source.schema.{name}"
        if not isinstance(name, str) or not _IDENT.match(name):
            raise _Invalid(path, f"{name!r} is not a valid field name ({_describe(_IDENT)})")
        if isinstance(type_, Mapping):
            fields.append(Field(name, "string", _enum(type_, path)))
            continue
        if type_ not in TYPES:
            raise _Invalid(path, f"{type_!r} is not one of {', '.join(TYPES)}, or {{enum: [values]}}")
        fields.append(Field(name, type_))
    return tuple(fields)


def _enum(value: Mapping, path: str) -> tuple[str, ...]:
    """The values of a string field declared as {enum: [a, b, ...]}: distinct, non-empty strings."""
    values = _section(value, path, ("enum",))["enum"]
    if not isinstance(values, list) or not values:
        raise _Invalid(f"{path}.enum", f"expected a non-empty list of strings, got {_kind(values)}")
    for v in values:
        if not isinstance(v, str) or not v:
            raise _Invalid(f"{path}.enum", f"{v!r} is not a non-empty string")
    if len(set(values)) != len(values):
        raise _Invalid(f"{path}.enum", "a value is listed twice")
    return tuple(values)


def _features(value: Any, types: Mapping[str, str], reserved: set[str]) -> tuple[Feature, ...]:
    if not isinstance(value, list) or not value:
        raise _Invalid("features", f"expected a non-empty list of features, got {_kind(value)}")
    features: list[Feature] = []
    for i, item in enumerate(value):
        path = f"features[{i}]"
        m = _section(item, path, ("name", "agg"), ("of", "window"))
        name = _text(m, "name", f"{path}.name", _IDENT)
        if name in reserved:
            raise _Invalid(f"{path}.name", f"{name!r} is reserved (the key, id, timestamp "
                                           "fields and 'late' name columns of a feature row)")
        if any(f.name == name for f in features):
            raise _Invalid(f"{path}.name", f"{name!r} is already the name of another feature")
        agg = _choice(m, "agg", f"{path}.agg", AGGS)
        features.append(Feature(name, agg, _of(m, agg, path, types), _window(m, agg, path)))
    return tuple(features)


def _of(m: Mapping, agg: str, path: str, types: Mapping[str, str]) -> str | None:
    if agg in ("count", "time_since_last"):
        if "of" in m:
            raise _Invalid(f"{path}.of", f"{agg} takes no 'of'; remove it")
        return None
    if "of" not in m:
        raise _Invalid(f"{path}.of", f"required for {agg}: the schema field to aggregate")
    of = _field_ref(m, "of", f"{path}.of", types)
    if agg in NUMERIC_AGGS and types[of] not in NUMERIC_TYPES:
        raise _Invalid(f"{path}.of", f"{agg} needs a numeric field ({', '.join(NUMERIC_TYPES)}); "
                                     f"{of!r} is {types[of]}")
    return of


def _window(m: Mapping, agg: str, path: str) -> int | None:
    if agg == "time_since_last":
        if "window" in m:
            raise _Invalid(f"{path}.window", "time_since_last has no window; remove it")
        return None
    if "window" not in m:
        raise _Invalid(f"{path}.window", f"required for {agg} (a duration like 1m, 1h, 24h)")
    return _duration(m["window"], f"{path}.window", positive=True)


def _labels(value: Any) -> Labels:
    m = _section(value, "labels", ("topic", "id", "label"))
    return Labels(_text(m, "topic", "labels.topic", _TOPIC), _text(m, "id", "labels.id", _IDENT),
                  _text(m, "label", "labels.label", _IDENT))


def _topics(value: Any, source: str, labels: Labels | None) -> Topics:
    roles = ("features", "predictions", "dlq", "model_updates")
    m = {} if value is None else _section(value, "topics", (), roles)
    defaults = {"features": "features", "predictions": "predictions", "dlq": f"{source}.dlq",
                "model_updates": "model-updates"}
    named = {"source": source, **({"labels": labels.topic} if labels else {})}
    for role in roles:
        named[role] = _text(m, role, f"topics.{role}", _TOPIC) if role in m else defaults[role]
    shadow = {"shadow predictions": f"{named['predictions']}.shadow"}  # Topics.shadow: no other role may take it
    owner: dict[str, str] = {}
    for role, topic in {**shadow, **named}.items():
        if topic in owner:
            raise _Invalid(f"topics.{role}", f"{topic!r} is already the {owner[topic]} topic; "
                                             "each role needs its own topic")
        owner[topic] = role
    return Topics(source, labels.topic if labels else None, named["features"],
                  named["predictions"], named["dlq"], named["model_updates"])


def _hash(spec: PipelineSpec) -> str:
    canonical = {
        "name": spec.name, "entity": spec.entity, "key": spec.key, "id": spec.id_field,
        "timestamp": spec.timestamp_field, "allowed_lateness_ms": spec.allowed_lateness_ms,
        "max_future_ms": spec.max_future_ms,
        "schema": {f.name: f.type if f.values is None else {"enum": list(f.values)} for f in spec.schema},
        "features": [[f.name, f.agg, f.of, f.window_ms] for f in spec.features],
        "labels": None if spec.labels is None else spec.labels.__dict__,
        "topics": spec.topics.__dict__, "model": {"name": spec.model.name, "kind": spec.model.kind},
    }
    # Settings added later count only when set away from their defaults: a spec that does not use
    # them keeps its hash, and with it its models.
    if spec.max_record_bytes != DEFAULT_MAX_RECORD_BYTES:
        canonical["max_record_bytes"] = spec.max_record_bytes
    if spec.extra_fields != "ignore":
        canonical["extra_fields"] = spec.extra_fields
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _join(path: str, key: Any) -> str:
    return str(key) if path == "spec" else f"{path}.{key}"


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _describe(pattern: re.Pattern) -> str:
    return {
        _IDENT: "letters, digits and _, not starting with a digit",
        _NAME: "letters, digits, '.', '_' and '-', starting with a letter or digit",
        _TOPIC: "1 to 249 of letters, digits, '.', '_' and '-'",
    }[pattern]
