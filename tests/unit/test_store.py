"""models.store without a server: what a store configuration gives delta-rs and Spark, which URIs an
artifact is published and fetched by, and what a scorer refuses to fetch."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.settings import load_settings
from models.errors import UpdateRefused
from models.store import Artifacts, ObjectStore, fetched

LOCAL = ObjectStore("http://127.0.0.1:9000", "eu-west-1", "eddy", "s3cret")


def test_the_store_gives_delta_rs_and_spark_its_endpoint_and_keys_and_never_prints_the_secret():
    assert LOCAL.environment() == {
        "AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "eddy", "AWS_SECRET_ACCESS_KEY": "s3cret"}
    conf = LOCAL.hadoop_conf()
    assert conf["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:9000"
    assert conf["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "false"
    assert conf["spark.hadoop.fs.s3a.secret.key"] == "s3cret"
    assert "s3cret" not in repr(LOCAL)
    # AWS itself, keys from the SDKs' chain: nothing but the region
    assert ObjectStore().environment() == {"AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    assert ObjectStore().hadoop_conf() == {"spark.hadoop.fs.s3a.endpoint.region": "us-east-1"}


def test_artifacts_are_named_by_file_uris_locally_and_by_s3_uris_beside_an_object_store_lakehouse(tmp_path):
    local = Artifacts(tmp_path / "models")
    assert local.uri(local.directory("fraud", "v1")) == (tmp_path / "models" / "fraud" / "v1").as_uri()
    remote = Artifacts(tmp_path / "models", "s3://lake/eddy/models", LOCAL)
    assert remote.uri(remote.directory("fraud", "v1")) == "s3://lake/eddy/models/fraud/v1"


def test_settings_put_the_artifacts_of_an_s3a_lakehouse_on_its_store_and_keep_a_local_lake_local(tmp_path):
    remote = load_settings(environ={"EDDY_HOME": str(tmp_path), "EDDY_LAKEHOUSE": "s3a://lake/eddy/",
                                    "EDDY_S3_ENDPOINT": "https://minio.example:9000", "EDDY_S3_ACCESS_KEY": "k",
                                    "EDDY_S3_SECRET_KEY": "v"})
    assert remote.artifacts.remote == "s3://lake/eddy/models" and remote.artifacts.local == tmp_path / "models"
    assert remote.object_store == ObjectStore("https://minio.example:9000", "us-east-1", "k", "v")
    assert "'v'" not in repr(remote)
    local = load_settings(environ={"EDDY_HOME": str(tmp_path)})
    assert local.object_store is None and local.artifacts == Artifacts(tmp_path / "lakehouse" / "models")


def test_a_scorer_fetches_only_local_paths_and_from_a_configured_store(tmp_path):
    with fetched((tmp_path / "v1").as_uri(), None) as directory:
        assert directory == tmp_path / "v1"
    with fetched(str(tmp_path / "v1"), None) as directory:
        assert directory == tmp_path / "v1"
    with pytest.raises(UpdateRefused, match="with an object store configured"), fetched("s3://lake/m/v1", None):
        pass
    for uri in ("https://evil.example/m/v1", "gs://lake/m/v1", "ftp://x/y"):
        with pytest.raises(UpdateRefused, match="only local paths"), fetched(uri, LOCAL):
            pass
    assert not list(Path(tmp_path).iterdir())
