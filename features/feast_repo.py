"""The Feast repo generated from the pipeline spec: the entity, the push source, the feature view,
feature_store.yaml, and the one online read. Feast is imported inside the functions (a ~6 s import),
so `import features` stays cheap. Where the view's history lives offline is the caller's to say
(an OfflineSource); by default it is a parquet placeholder under the repo."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import yaml

from features.errors import ConfigError, EddyError, ServiceError
from features.spec import PipelineSpec

if TYPE_CHECKING:
    import feast
    import pandas as pd

TIMESTAMP_FIELD = "event_time"  # the features-topic field every feature row carries
INT_AGGS = frozenset({"count", "count_distinct"})
REGISTRY_FILE = "registry.db"
CONFIG_FILE = "feature_store.yaml"
ENTITY_KEY_SERIALIZATION_VERSION = 3  # Feast 0.67 deprecates anything lower
_NOT_PROJECT_CHARS = re.compile(r"[^A-Za-z0-9_]")


class UnknownEntity(EddyError):
    """The online store holds no features for this entity id."""


@dataclass(frozen=True)
class OfflineSource:
    """Where Feast reads the view's history, described by the caller so this module names no
    lakehouse path or engine: `store` is feature_store.yaml's offline_store block ({"type": "spark"}),
    and `batch_source(name, timestamp_field)` builds the view's batch DataSource under that name."""

    store: Mapping[str, Any]
    batch_source: Callable[[str, str], Any]


def skip_torch_import() -> None:
    """Feast 0.67 imports torch when it is imported (feast.torch_wrapper, for tensor output only):
    ~500 MB and ~2.5 s. A process that never uses torch (the online writer, `eddy features get`)
    calls this before Feast's import, which then finds torch missing and carries on without it."""
    if "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  # None there makes `import torch` raise ImportError


# --- names and types: pure, no Feast import ---------------------------------------------------------

def project_name(spec: PipelineSpec) -> str:
    """The Feast project of a pipeline: its name with '-' and '.' as '_' (Feast 0.67 refuses hyphens
    when it validates the project before the online store type)."""
    return _NOT_PROJECT_CHARS.sub("_", spec.name)


def view_name(spec: PipelineSpec) -> str:
    return spec.name


def push_source_name(spec: PipelineSpec) -> str:
    return f"{spec.name}_push"


def batch_source_name(spec: PipelineSpec) -> str:
    return f"{spec.name}_features_batch"


def feature_dtypes(spec: PipelineSpec) -> dict[str, str]:
    """Feature name -> Feast dtype name, in spec order: Int64 for counts, Float64 for the rest."""
    return {f.name: ("Int64" if f.agg in INT_AGGS else "Float64") for f in spec.features}


def ttl(spec: PipelineSpec) -> timedelta:
    """The feature view's TTL: the longest window plus the allowed lateness (0, no limit, when
    the spec has no windowed feature)."""
    if spec.max_window_ms == 0:
        return timedelta(0)
    return timedelta(milliseconds=spec.state_horizon_ms)


def redis_connection_string(url: str) -> str:
    """A redis:// or rediss:// URL as Feast's connection string: host:port,db=N,password=...,ssl=true.

    Feast splits the string on ',' and JSON-decodes each value (then expands $VARS in the whole
    file), so credentials go in as JSON strings with ',' and '$' escaped."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"EDDY_REDIS_URL: Feast's Redis store needs a redis:// or rediss:// URL, "
                          f"got a {parts.scheme or 'bare'} one")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ConfigError("EDDY_REDIS_URL: the port is not a number; set it like redis://127.0.0.1:6379/0") from None
    host = parts.hostname or "localhost"
    out = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        raise ConfigError(f"EDDY_REDIS_URL: database {db!r} is not a number; set it like redis://host:6379/0")
    out.append(f"db={int(db)}")
    if parts.username:
        out.append(f"username={_json_string(unquote(parts.username))}")
    if parts.password is not None:
        out.append(f"password={_json_string(unquote(parts.password))}")
    if parts.scheme == "rediss":
        out.append("ssl=true")
    return ",".join(out)


def _json_string(value: str) -> str:
    return json.dumps(value).replace(",", "\\u002c").replace("$", "\\u0024")


def config_yaml(spec: PipelineSpec, repo_dir: Path, redis_url: str, project: str | None = None,
                offline: OfflineSource | None = None) -> str:
    """The text of feature_store.yaml for this pipeline (Feast's default offline store unless
    `offline` names one)."""
    config: dict[str, Any] = {
        "project": project or project_name(spec),
        "provider": "local",
        "registry": {"registry_type": "file", "path": str(Path(repo_dir).resolve() / REGISTRY_FILE)},
        "online_store": {"type": "redis", "connection_string": redis_connection_string(redis_url)},
    }
    if offline is not None:
        config["offline_store"] = dict(offline.store)
    config["entity_key_serialization_version"] = ENTITY_KEY_SERIALIZATION_VERSION
    return yaml.safe_dump(config, sort_keys=False)


# --- the Feast objects ---------------------------------------------------------------------------------

def definitions(spec: PipelineSpec, repo_dir: Path, offline: OfflineSource | None = None) -> list[Any]:
    """[Entity, PushSource, FeatureView] for the spec. The push source's batch source is the one
    `offline` builds, or a parquet placeholder under the repo."""
    from feast import Entity, FeatureView, Field, FileSource, PushSource
    from feast.types import Float64, Int64, String
    from feast.value_type import ValueType

    dtypes = {"Int64": Int64, "Float64": Float64}
    entity = Entity(name=spec.entity, join_keys=[spec.key], value_type=ValueType.STRING,
                    description=f"the {spec.entity} of pipeline {spec.name}, keyed by {spec.key}")
    if offline is not None:
        batch = offline.batch_source(batch_source_name(spec), TIMESTAMP_FIELD)
    else:
        batch = FileSource(name=batch_source_name(spec), timestamp_field=TIMESTAMP_FIELD,
                           path=str(Path(repo_dir).resolve() / "data" / f"{spec.name}_features.parquet"))
    push = PushSource(name=push_source_name(spec), batch_source=batch)
    view = FeatureView(
        name=view_name(spec),
        entities=[entity],
        ttl=ttl(spec),
        # The key's field makes it an entity column here rather than by inference at apply.
        schema=[Field(name=spec.key, dtype=String)]
        + [Field(name=name, dtype=dtypes[kind]) for name, kind in feature_dtypes(spec).items()],
        source=push,
        online=True,
        tags={"eddy.spec_hash": spec.spec_hash},
    )
    return [entity, push, view]


def feature_store(spec: PipelineSpec, repo_dir: Path, redis_url: str, project: str | None = None,
                  offline: OfflineSource | None = None) -> feast.FeatureStore:
    """Write feature_store.yaml under repo_dir and apply the spec's definitions; returns the store.
    Give a repo with an `offline` source a repo_dir of its own: two callers with different batch
    sources on one registry would rewrite it in turn.

    Idempotent and safe for concurrent callers: a file lock serialises them, and the registry is
    rewritten only when its definitions differ from the spec's (Feast's file registry is not
    written atomically, so needless rewrites could tear a concurrent reader's view)."""
    from feast import FeatureStore

    repo_dir = Path(repo_dir)
    repo_dir.mkdir(parents=True, exist_ok=True)
    with _locked(repo_dir / ".lock"):
        _write_private(repo_dir / CONFIG_FILE, config_yaml(spec, repo_dir, redis_url, project, offline))
        store = FeatureStore(repo_path=str(repo_dir))
        objects = definitions(spec, repo_dir, offline)
        if not _registered(store, objects):
            store.apply(objects)
            store.refresh_registry()
    return store


def feature_frame(spec: PipelineSpec, keys: Sequence[str], event_ms: Sequence[int],
                  features: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Feature rows in the view's shape for write_to_online_store: the key, event_time (UTC, in
    microseconds) and one typed column per feature (null floats become NaN, which Feast stores as
    null). TypeError or ValueError when a value does not fit its column (a null count)."""
    import numpy as np
    import pandas as pd

    columns: dict[str, Any] = {
        spec.key: list(keys),
        TIMESTAMP_FIELD: pd.to_datetime(np.asarray(event_ms, dtype=np.int64), unit="ms", utc=True).as_unit("us"),
    }
    for name, kind in feature_dtypes(spec).items():
        values = [f.get(name) for f in features]
        columns[name] = np.array(values, dtype=np.int64 if kind == "Int64" else np.float64)
    return pd.DataFrame(columns)


def open_feature_store(repo_dir: Path) -> feast.FeatureStore:
    """The store a writer set up under repo_dir, without applying anything."""
    repo_dir = Path(repo_dir)
    if not (repo_dir / CONFIG_FILE).is_file() or not (repo_dir / REGISTRY_FILE).is_file():
        raise ServiceError(f"Feast is not set up under {repo_dir}; run `eddy up` (its online writer sets it up)")
    from feast import FeatureStore

    return FeatureStore(repo_path=str(repo_dir))


def online_features(store: feast.FeatureStore, spec: PipelineSpec,
                    entity_ids: Sequence[str]) -> list[dict[str, Any] | None]:
    """The latest features of each entity id, in order: {name: value} (None for a null value),
    or None for an entity the online store has never seen."""
    from feast.errors import FeastObjectNotFoundException
    from redis.exceptions import ConnectionError as RedisConnectionError

    names = list(feature_dtypes(spec))
    refs = [f"{view_name(spec)}:{n}" for n in names]
    try:
        data = store.get_online_features(features=refs, entity_rows=[{spec.key: i} for i in entity_ids]).to_dict()
    except FeastObjectNotFoundException as exc:
        raise ServiceError(f"Feast has no feature view for pipeline {spec.name!r} ({exc}); run `eddy up`") from None
    except RedisConnectionError as exc:
        raise ServiceError(f"the Feast online store (Redis) is not reachable: {str(exc).rstrip('.')}; "
                           "is the stack up (`eddy up`)?") from None
    out: list[dict[str, Any] | None] = []
    for i in range(len(entity_ids)):
        row = {n: data[n][i] for n in names}
        # Counts are never null in a written row, so all-null means no row at all.
        out.append(None if all(v is None for v in row.values()) else row)
    return out


def online_row(store: feast.FeatureStore, spec: PipelineSpec, entity_id: str) -> dict[str, Any]:
    """One entity's latest features; UnknownEntity when the online store has none."""
    row = online_features(store, spec, [entity_id])[0]
    if row is None:
        raise UnknownEntity(f"no features for {spec.key} {entity_id!r} in the online store "
                            f"(pipeline {spec.name!r}): no event of it has been processed yet")
    return row


# --- helpers -------------------------------------------------------------------------------------------

def _registered(store: feast.FeatureStore, objects: list[Any]) -> bool:
    """True when the registry already holds exactly these definitions."""
    from feast import Entity, FeatureView

    found: object
    try:
        for obj in objects:
            if isinstance(obj, Entity):
                found = store.get_entity(obj.name, allow_registry_cache=False)
            elif isinstance(obj, FeatureView):
                found = store.get_feature_view(obj.name, allow_registry_cache=False)
            else:
                found = store.get_data_source(obj.name)
            if found != obj:
                return False
    except Exception:  # noqa: BLE001 - missing registry or object: apply writes it
        return False
    return True


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_private(path: Path, text: str) -> None:
    """Write text (it may hold the Redis password) readable by the owner only, atomically and
    only when it changed."""
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.{hashlib.sha256(text.encode()).hexdigest()[:8]}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
