"""Where model artifacts live for the hosts that load them: this host's folder (file:// URIs) or an
S3-compatible bucket (s3:// URIs). A fetched artifact is only bytes in a private temporary folder
until verify_artifact/load_artifact have checked its signature and sha256, as for a local one."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from features.errors import EddyError
from models.errors import UpdateRefused
from models.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, MAX_WEIGHTS_BYTES, WEIGHTS_FILE

if TYPE_CHECKING:
    from pyarrow.fs import S3FileSystem

# An artifact is these two files and nothing else; each is fetched only up to its own bound.
ARTIFACT_FILES = {MANIFEST_FILE: MAX_MANIFEST_BYTES, WEIGHTS_FILE: MAX_WEIGHTS_BYTES}
OBJECT_SCHEMES = ("s3", "s3a")


class StoreError(EddyError):
    """The object store refused or failed a request; the message names the object and the cause."""


@dataclass(frozen=True)
class ObjectStore:
    """An S3-compatible store. endpoint: its URL (empty: AWS's own); the keys: empty for the AWS SDKs'
    default chain (environment, profile, instance role). The secret never prints."""

    endpoint: str = ""
    region: str = "us-east-1"
    access_key: str = ""
    secret_key: str = field(default="", repr=False)

    def filesystem(self, create_buckets: bool = False) -> S3FileSystem:
        from pyarrow.fs import S3FileSystem

        parts = urlsplit(self.endpoint)
        options: dict[str, object] = {"region": self.region, "allow_bucket_creation": create_buckets}
        if self.endpoint:
            options |= {"endpoint_override": parts.netloc, "scheme": parts.scheme or "https"}
        if self.access_key:
            options |= {"access_key": self.access_key, "secret_key": self.secret_key}
        return S3FileSystem(**options)

    def environment(self) -> dict[str, str]:
        """The AWS_* variables that delta-rs, pyarrow's S3 and Spark's S3A credential chain read."""
        env = {"AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region}
        if self.endpoint:
            env["AWS_ENDPOINT_URL"] = self.endpoint
            if self.endpoint.startswith("http://"):
                env["AWS_ALLOW_HTTP"] = "true"
        if self.access_key:
            env |= {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        return env

    def hadoop_conf(self) -> dict[str, str]:
        """Spark's S3A settings for this store; the keys go by spark.hadoop.* (redacted in Spark's UI and
        logs by spark.redaction.regex) so that a cluster's executors, which do not share the driver's
        environment, sign their requests too."""
        conf = {"spark.hadoop.fs.s3a.endpoint.region": self.region}
        if self.endpoint:
            conf |= {"spark.hadoop.fs.s3a.endpoint": self.endpoint, "spark.hadoop.fs.s3a.path.style.access": "true",
                     "spark.hadoop.fs.s3a.connection.ssl.enabled": str(self.endpoint.startswith("https")).lower()}
        if self.access_key:
            conf |= {"spark.hadoop.fs.s3a.access.key": self.access_key,
                     "spark.hadoop.fs.s3a.secret.key": self.secret_key}
        return conf


def is_object_uri(location: str) -> bool:
    return urlsplit(location).scheme in OBJECT_SCHEMES


def object_key(uri: str) -> str:
    """pyarrow's bucket/key path of an s3:// or s3a:// URI."""
    parts = urlsplit(uri)
    return f"{parts.netloc}/{parts.path.strip('/')}".rstrip("/")


@dataclass(frozen=True)
class Artifacts:
    """Where this host saves artifacts (local) and, with an object store, where it publishes them for
    every other host (remote: an s3:// prefix). Without remote, the local folder is what file:// URIs name."""

    local: Path
    remote: str = ""
    store: ObjectStore | None = None

    def directory(self, name: str, version: str) -> Path:
        return self.local / name / version

    def existing(self, name: str, version: str) -> Path:
        """The folder of a saved version (fetched from the store when this host lacks it); EddyError
        naming the known versions when there is none."""
        self.sync(name)
        directory = self.directory(name, version)
        if not (directory / MANIFEST_FILE).exists():
            known = ", ".join(sorted(p.parent.name for p in (self.local / name).glob(f"*/{MANIFEST_FILE}")))
            raise EddyError(f"no model version {version!r} under {self.remote or self.local}/{name}; "
                            f"known: {known or 'none'}")
        return directory

    def uri(self, directory: Path) -> str:
        """The URI that names the artifact saved in `directory` for every host."""
        if not self.remote:
            return directory.resolve().as_uri()
        return f"{self.remote.rstrip('/')}/{directory.parent.name}/{directory.name}"

    def publish(self, directory: Path) -> str:
        """uri(directory), after uploading the artifact there when remote."""
        uri = self.uri(directory)
        if not self.remote:
            return uri
        fs = self._filesystem()
        # the weights first, the manifest last: a reader that sees a manifest sees its weights
        for name in (WEIGHTS_FILE, MANIFEST_FILE):
            try:
                with open(directory / name, "rb") as src, fs.open_output_stream(f"{object_key(uri)}/{name}") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except OSError as exc:
                raise StoreError(f"could not upload {name} to {uri}: {exc}") from None
        return uri

    def sync(self, name: str) -> None:
        """Mirror the store's artifacts of model `name` into the local folder (those missing here),
        so that listing, promoting and rolling back work on a host that did not train them."""
        if not self.remote:
            return
        from pyarrow.fs import FileSelector, FileType

        base = f"{object_key(self.remote)}/{name}"
        try:
            infos = self._filesystem().get_file_info(FileSelector(base, allow_not_found=True, recursive=True))
        except OSError as exc:
            raise StoreError(f"could not list {self.remote}/{name}: {exc}") from None
        for info in infos:
            if info.type == FileType.File and info.base_name == MANIFEST_FILE:
                version = info.path.rsplit("/", 2)[-2]
                target = self.directory(name, version)
                if not (target / MANIFEST_FILE).exists():
                    _download(self._filesystem(), f"{base}/{version}", target)

    def republish(self) -> list[str]:
        """Upload every artifact saved here that the store lacks (a store that lost its objects, as the
        local in-memory one does when it restarts); returns their URIs."""
        if not self.remote:
            return []
        from pyarrow.fs import FileType

        fs = self._filesystem()
        uploaded = []
        for manifest in sorted(self.local.glob(f"*/*/{MANIFEST_FILE}")):
            uri = self.uri(manifest.parent)
            if fs.get_file_info(f"{object_key(uri)}/{MANIFEST_FILE}").type == FileType.NotFound:
                uploaded.append(self.publish(manifest.parent))
        return uploaded

    def _filesystem(self) -> S3FileSystem:
        return (self.store or ObjectStore()).filesystem()


@contextmanager
def fetched(uri: str, store: ObjectStore | None) -> Iterator[Path]:
    """The folder of the artifact `uri` names, for the length of the block: a local path or file:// URI
    as it is; an s3:// one downloaded into a private temporary folder, removed after. Any other scheme,
    or s3:// without a store configured, is refused (an update never makes a scorer fetch elsewhere)."""
    parts = urlsplit(uri)
    if parts.scheme in ("", "file"):
        yield Path(parts.path)
        return
    if parts.scheme not in OBJECT_SCHEMES or store is None:
        raise UpdateRefused(f"artifact URI {uri!r}: only local paths, file:// and, with an object store "
                            "configured (EDDY_S3_ENDPOINT or an s3a:// EDDY_LAKEHOUSE), s3:// URIs are served")
    with tempfile.TemporaryDirectory(prefix="eddy-artifact-") as folder:
        _download(store.filesystem(), object_key(uri), Path(folder))
        yield Path(folder)


def _download(fs: S3FileSystem, prefix: str, target: Path) -> None:
    """The artifact's two files under `prefix` into `target`, each read only up to its bound (a larger
    object is cut there, and verification refuses it)."""
    target.mkdir(parents=True, exist_ok=True)
    for name, limit in ARTIFACT_FILES.items():
        try:
            with fs.open_input_stream(f"{prefix}/{name}") as src, open(target / f".{name}.part", "wb") as dst:
                left = limit + 1
                while left > 0 and (chunk := src.read(min(1 << 20, left))):
                    dst.write(chunk)
                    left -= len(chunk)
        except FileNotFoundError:
            continue  # verification names the missing file
        except OSError as exc:
            raise StoreError(f"could not fetch {prefix}/{name}: {exc}") from None
        (target / f".{name}.part").replace(target / name)
