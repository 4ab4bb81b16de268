"""Model artifacts through the local object store (S3Proxy, AWS v4 signatures): a published artifact is
fetched and verified by URI alone; one altered on the store is refused; a request with the wrong key is
refused; a restarted (empty) store gets this home's artifacts back from `republish`."""

from __future__ import annotations

from dataclasses import replace

import pytest

from deploy import object_store
from deploy.processes import ProcessTable, free_port
from deploy.settings import load_settings
from models.artifacts import verify_artifact
from models.baseline import baseline_artifact
from models.errors import BadManifest, ChecksumMismatch
from models.signing import SigningKey
from models.store import StoreError, fetched, object_key

pytestmark = [pytest.mark.distributed]


@pytest.fixture
def store_settings(tmp_path):
    settings = load_settings(environ={"EDDY_HOME": str(tmp_path / "home"), "EDDY_LAKEHOUSE": "s3a://eddy/lakehouse",
                                      "EDDY_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    table = ProcessTable(settings.run_dir, settings.logs_dir)
    try:
        yield settings, table
    finally:
        table.stop(object_store.NAME)


def test_an_artifact_goes_through_the_store_verified_and_comes_back_after_a_restart(store_settings):
    settings, table = store_settings
    started = object_store.ensure_object_store(settings, table)
    assert started is not None and started.managed and started.start_s > 0
    spec, key, artifacts = settings.pipeline_spec(), SigningKey.generate(), settings.artifacts
    directory = artifacts.directory(spec.name, "baseline-1")
    manifest = baseline_artifact(spec, directory, key)
    uri = artifacts.publish(directory)
    assert uri == f"s3://eddy/lakehouse/models/{spec.name}/baseline-1"

    def fetched_sha256() -> str:
        with fetched(uri, settings.object_store) as folder:
            assert folder != directory and folder.parent != directory.parent  # a private copy, not this host's
            return verify_artifact(folder, key.public(), spec.spec_hash, list(spec.model_inputs)).sha256

    assert fetched_sha256() == manifest.sha256

    # one byte changed on the store: refused by the sha256 the signed manifest carries
    fs = settings.object_store.filesystem()
    weights = f"{object_key(uri)}/model.safetensors"
    with fs.open_input_stream(weights) as src:
        data = bytearray(src.read())
    data[-1] ^= 1
    with fs.open_output_stream(weights) as dst:
        dst.write(bytes(data))
    with pytest.raises(ChecksumMismatch):
        fetched_sha256()

    # the wrong key: the store refuses the request
    with pytest.raises(StoreError), fetched(uri, replace(settings.object_store, secret_key="not-the-key")):
        pass

    # a restarted store is empty (it keeps objects in memory) until this home's artifacts go back
    table.stop(object_store.NAME)
    assert object_store.ensure_object_store(settings, table).start_s > 0
    with pytest.raises(BadManifest, match="missing"):
        fetched_sha256()
    assert artifacts.republish() == [uri]
    assert fetched_sha256() == manifest.sha256  # the untouched local copy went back
    assert artifacts.republish() == []  # nothing missing now
