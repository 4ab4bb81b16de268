"""The local S3-compatible object store of an s3a:// lakehouse: S3Proxy (from Maven), started only on a free
loopback port, signing in with this home's generated key (AWS signature v4); the lakehouse's bucket is
created once it answers. It keeps its objects in memory (jclouds' transient store): S3Proxy's folder-backed
store answers a directory as an object, which breaks the directory semantics Spark's S3A client relies on
(its checkpoints and Delta's log). It is a store to try the object-storage paths on one machine and to
test them, not a place to keep a lake: `eddy down` empties it."""

from __future__ import annotations

import shutil
from urllib.parse import urlsplit

from deploy import security
from deploy.environment import child_environment
from deploy.processes import ProcessTable, is_loopback, port_holder, port_open
from deploy.redis_local import ServiceInfo
from deploy.settings import Settings
from features.errors import ConfigError, ServiceError
from models.store import ObjectStore

NAME = "objectstore"
START_DEADLINE_S = 60.0
LOGBACK = """<configuration>
  <appender name="out" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%d{HH:mm:ss.SSS} [%thread] %level %logger - %msg%n</pattern></encoder>
  </appender>
  <logger name="org.gaul.s3proxy" level="INFO"/>
  <root level="WARN"><appender-ref ref="out"/></root>
</configuration>
"""


def bucket_of(settings: Settings) -> str:
    return urlsplit(settings.lakehouse).netloc


def answers(store: ObjectStore, bucket: str, create: bool = True) -> bool:
    """Whether the store answers a signed request for the bucket (made when missing, with `create`)."""
    from pyarrow.fs import FileType

    try:
        fs = store.filesystem(create_buckets=create)
        found = fs.get_file_info(bucket).type != FileType.NotFound
        if not found and create:
            fs.create_dir(bucket)
        return found or create
    except OSError:
        return False


def ensure_object_store(settings: Settings, table: ProcessTable) -> ServiceInfo | None:
    """The object store of an s3a:// lakehouse (None for a local lakehouse): a remote one must answer; on a
    loopback EDDY_S3_ENDPOINT, S3Proxy is started there unless it runs already."""
    store = settings.object_store
    if store is None:
        return None
    bucket = bucket_of(settings)
    parts = urlsplit(store.endpoint)
    if not store.endpoint or not is_loopback(parts.hostname or ""):
        if not answers(store, bucket):
            raise ServiceError(f"the object store at {store.endpoint or 'AWS S3'} refused a signed request for bucket "
                               f"{bucket!r}: check EDDY_S3_ENDPOINT, the keys and that the bucket exists")
        return ServiceInfo(False, store.endpoint or "s3.amazonaws.com")
    if parts.scheme != "http":
        raise ConfigError(f"EDDY_S3_ENDPOINT={store.endpoint}: the local object store speaks http on loopback; "
                          f"set it like http://127.0.0.1:{parts.port or 9000}")
    record = table.get(NAME)
    if record is not None and record.alive():
        return ServiceInfo(True, store.endpoint, pid=record.pid)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if port_open(host, port):
        if answers(store, bucket):
            return ServiceInfo(False, store.endpoint)
        raise ServiceError(f"{host}:{port} is held by {port_holder(port) or 'another process'}, which does not answer "
                           "as this home's object store: stop it, or set EDDY_S3_ENDPOINT to a free port")
    java = shutil.which("java")
    jars = settings.jars_dir / "objectstore"
    if java is None or not any(jars.glob("s3proxy-*.jar")):
        raise ServiceError(f"the object store's jars are missing under {jars} (or java is): run `make setup`")
    config = security.write_private(settings.home / "objectstore" / "s3proxy.conf", "".join(f"{k}={v}\n" for k, v in {
        "s3proxy.endpoint": f"http://{host}:{port}",
        "s3proxy.authorization": "aws-v4",
        "s3proxy.identity": store.access_key,
        "s3proxy.credential": store.secret_key,  # in a private file: never in argv or the pid record
        "jclouds.provider": "transient",
        "jclouds.identity": "eddy",  # the transient store's own, unused
        "jclouds.credential": "eddy",
    }.items()))
    # The jars from Maven carry no logging config, and logback's default is DEBUG for everything: Jetty's
    # selector alone then wrote 12 GB in 15 minutes of a test and a third of the store's CPU.
    logging_config = settings.home / "objectstore" / "logback.xml"
    logging_config.write_text(LOGBACK)
    argv = [java, "-Xmx256m", f"-Dlogback.configurationFile={logging_config}", "-cp", f"{jars}/*",
            "org.gaul.s3proxy.Main", "--properties", str(config)]
    record = table.start(NAME, argv, child_environment(settings), address=store.endpoint)
    took = table.wait_healthy(record, lambda: answers(store, bucket), START_DEADLINE_S,
                              "the object store (S3Proxy)")
    return ServiceInfo(True, store.endpoint, took, record.pid)

