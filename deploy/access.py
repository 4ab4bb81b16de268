"""Who may do what: the roles a process of eddy runs as, each role's least-privilege Kafka ACL and Redis
ACL, derived from the pipeline spec. The local secure stack (deploy.security) and the Helm chart
(deploy.k8s.values_from_spec) both apply these, so the two never disagree."""

from __future__ import annotations

from typing import Any

from features.feast_repo import project_name
from features.spec import PipelineSpec
from models.groups import RETRAIN_GROUP_PREFIX, SEQUENCE_GROUP_PREFIX
from streams.engines.config import STAGE as FEATURES_STAGE
from streams.metrics import metrics_key

# The roles of Kafka principals and Redis users; a stage runs as exactly one. The outside roles
# (producer, reader, admin) are for people's own clients and the CLI.
ROLES = ("producer", "features", "online-writer", "scorer", "fused", "lakehouse", "publisher", "reader", "admin")
# The stages with a consumer group of their own, named by PipelineSpec.stage_id.
GROUP_STAGES = (FEATURES_STAGE, "scorer", "online-writer", "lakehouse")
# Spark's Kafka source names its groups "spark-kafka-source-..." unless the query sets groupIdPrefix;
# ingestion sets none yet, so the lakehouse role may use both.
SPARK_GROUP_PREFIX = "spark-kafka-source-"
# `eddy consume` reads under a group of its own per run.
CONSUME_GROUP_PREFIX = "eddy-consume-"
# Group prefixes not named after the pipeline (each is a reader that never commits).
SHARED_GROUP_PREFIXES = (SPARK_GROUP_PREFIX, CONSUME_GROUP_PREFIX, SEQUENCE_GROUP_PREFIX, RETRAIN_GROUP_PREFIX)

READ = ["Read", "Describe"]
WRITE = ["Write", "Describe"]


def _rule(kind: str, name: str | None, operations: list[str], prefix: bool = False) -> dict[str, Any]:
    """One ACL rule in Strimzi's KafkaUser form (kafka.strimzi.io/v1 `simple` authorization); the
    cluster has no name."""
    resource: dict[str, Any] = {"type": kind}
    if name is not None:
        resource.update(name=name, patternType="prefix" if prefix else "literal")
    return {"resource": resource, "operations": list(operations)}


def kafka_acls(spec: PipelineSpec) -> dict[str, list[dict[str, Any]]]:
    """Each role's ACL rules: the topics it reads and writes, its consumer groups and transactional
    ids (by the stage id's prefix), nothing else."""
    t, sid = spec.topics, spec.stage_id
    features = sid(FEATURES_STAGE)
    sources = [t.source] + ([t.labels] if t.labels else [])
    features_rules = [
        _rule("topic", t.source, READ),
        # Read on its outputs too: Flink's exactly-once sink describes the producers of the topics it
        # writes before it starts (DescribeProducers needs Read)
        _rule("topic", t.features, ["Read", *WRITE]),
        _rule("topic", t.dlq, ["Read", *WRITE]),
        # the engine's own topics: the native changelog, Faust's table changelog and leader topic
        _rule("topic", features, ["Create", "Read", "Write", "Describe", "DescribeConfigs"], prefix=True),
        # the engine's group, and the native engine's restore client named after it
        _rule("group", features, ["Read", "Describe"], prefix=True),
        _rule("transactionalId", features, ["Write", "Describe"], prefix=True),
    ]
    scoring_rules = [
        _rule("topic", t.model_updates, READ),
        _rule("topic", t.predictions, WRITE),
        _rule("topic", t.shadow, WRITE),  # a shadow challenger's predictions during a rollout
        _rule("group", sid("model-updates"), ["Read", "Describe"], prefix=True),  # the update listener
    ]
    return {
        "producer": [_rule("topic", topic, WRITE) for topic in sources],
        "features": features_rules,
        "online-writer": [
            _rule("topic", t.features, READ),
            _rule("group", sid("online-writer"), ["Read", "Describe"]),
        ],
        "scorer": [
            _rule("topic", t.features, READ),
            *scoring_rules,
            _rule("topic", t.dlq, WRITE),
            _rule("group", sid("scorer"), ["Read", "Describe"]),
            _rule("transactionalId", sid("scorer"), ["Write", "Describe"], prefix=True),
        ],
        # the fused stage: the engine's rules (its group and transactional ids) and the scorer's outputs
        "fused": features_rules + scoring_rules,
        "lakehouse": [
            *(_rule("topic", topic, READ) for topic in t.all()),
            _rule("group", sid("lakehouse"), ["Read", "Describe"], prefix=True),
            _rule("group", SPARK_GROUP_PREFIX, ["Read", "Describe"], prefix=True),
        ],
        # the retrainer, the rollout judge, `eddy retrain`, `eddy promote`, `eddy rollback` and `eddy rollout`:
        # the only writer of model-updates
        "publisher": [
            _rule("topic", t.model_updates, ["Read", "Write", "Describe"]),
            *(_rule("topic", topic, READ) for topic in (t.features, *([t.labels] if t.labels else []))),
            _rule("group", sid("registry"), ["Read", "Describe"], prefix=True),
            _rule("group", sid("probe"), ["Read", "Describe"]),
            _rule("group", SEQUENCE_GROUP_PREFIX, ["Read", "Describe"], prefix=True),
            _rule("group", RETRAIN_GROUP_PREFIX, ["Read", "Describe"], prefix=True),
        ],
        "reader": [
            *(_rule("topic", topic, READ) for topic in t.all()),
            _rule("group", sid("reader"), ["Read", "Describe"], prefix=True),
            _rule("group", CONSUME_GROUP_PREFIX, ["Read", "Describe"], prefix=True),
        ],
        "admin": [
            _rule("cluster", None, ["All"]),
            _rule("topic", "*", ["All"]),
            _rule("group", "*", ["All"]),
            _rule("transactionalId", "*", ["All"]),
        ],
    }


# What every role but admin is refused in Redis: FLUSHALL, CONFIG, KEYS, DEBUG and the like.
_NOT_DANGEROUS = "-@dangerous"
# What the stages call: reads, writes, EXPIRE and SELECT, MULTI/EXEC, and the connection's own commands.
_COMMANDS = "+@read +@write +@keyspace +@transaction +@connection"


def redis_acls(spec: PipelineSpec) -> dict[str, str]:
    """Each role's Redis ACL rules (after `user NAME on >PASSWORD`): its keys by pattern, read-only
    where it only reads (%R~), commands without @dangerous, and scripts only for the engines' dedupe.

    Feast's online keys are binary (the serialised entity key), ending with the Feast project's name."""
    p = spec.name
    feast = f"*{project_name(spec)}"

    def beat(*stages: str) -> str:
        return " ".join(f"~{metrics_key(p, s)}" for s in stages)

    base = f"resetkeys resetchannels -@all {_COMMANDS} {_NOT_DANGEROUS} -@scripting"
    return {
        # the dedupe script (EVALSHA, SCRIPT LOAD) is the only script eddy runs
        "features": f"resetkeys resetchannels -@all {_COMMANDS} +@scripting {_NOT_DANGEROUS} "
                    f"-script|flush -script|kill -function ~eddy:{p}:seen:* {beat(FEATURES_STAGE)}",
        "online-writer": f"{base} ~{feast} {beat('online-writer')}",
        "scorer": f"{base} %R~{feast} ~eddy:{p}:hist:* ~eddy:{p}:drift {beat('scorer')}",
        # the fused stage writes what the engine, the online writer and the scorer write
        "fused": f"resetkeys resetchannels -@all {_COMMANDS} +@scripting {_NOT_DANGEROUS} "
                 f"-script|flush -script|kill -function ~eddy:{p}:seen:* ~{feast} ~eddy:{p}:hist:* ~eddy:{p}:drift "
                 f"{beat(FEATURES_STAGE, 'online-writer', 'scorer')}",
        "lakehouse": f"{base} %R~eddy:{p}:* {beat('lakehouse')}",
        "publisher": f"{base} %R~eddy:{p}:* %R~{feast} {beat('retrainer', 'rollouts')}",
        # people's own clients have no business in Redis
        "producer": "resetkeys resetchannels -@all",
        "reader": f"resetkeys resetchannels -@all +@read +@connection {_NOT_DANGEROUS} %R~{feast}",
        "admin": "~* &* +@all",
    }
