"""The Spark session's settings (lakehouse.session.session_conf), read without starting a JVM: a local
master stays on loopback; a cluster authenticates and encrypts, and a standalone master without its
shared secret is refused in one line that says the fix."""

from __future__ import annotations

import pytest

from deploy.settings import REPO_ROOT
from features.errors import ConfigError
from lakehouse.session import SparkConfig, session_conf

JARS = REPO_ROOT / ".jars"
if not (JARS / "spark").is_dir():
    pytest.skip("the Spark jars are fetched by make setup", allow_module_level=True)


def test_a_local_session_stays_on_loopback_without_cluster_security():
    conf = session_conf(SparkConfig(JARS, master="local[2]"))
    assert conf["spark.driver.bindAddress"] == conf["spark.driver.host"] == "127.0.0.1"
    assert "spark.authenticate" not in conf


@pytest.mark.parametrize("master", ["k8s://https://kube:6443", "yarn", "spark://m:7077"])
def test_a_cluster_session_authenticates_and_encrypts(master):
    extra = {"spark.authenticate.secret": "s3cr3t"} if master.startswith("spark://") else {}
    conf = session_conf(SparkConfig(JARS, master=master, conf=extra))
    assert (conf["spark.authenticate"], conf["spark.network.crypto.enabled"], conf["spark.io.encryption.enabled"]) \
        == ("true", "true", "true")
    assert "secret" in conf["spark.redaction.regex"]  # the secret never shows in Spark's UI or logs


def test_a_standalone_master_without_its_secret_is_one_line():
    with pytest.raises(ConfigError, match="spark.authenticate.secret in EDDY_SPARK_CONF"):
        session_conf(SparkConfig(JARS, master="spark://m:7077"))
    off = session_conf(SparkConfig(JARS, master="spark://m:7077", conf={"spark.authenticate": "false"}))
    assert off["spark.authenticate"] == "false"  # the operator's explicit choice wins
