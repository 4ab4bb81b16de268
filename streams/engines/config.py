"""What a feature engine is given to run; deploy builds it from Settings, so engines read no environment."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from features.spec import PipelineSpec
from streams.kafka import KafkaConfig

STAGE = "features"


@dataclass(frozen=True)
class EngineConfig:
    """Everything a feature engine runs with, built by deploy from Settings: frozen, so an engine
    reads no environment of its own."""

    kafka: KafkaConfig
    spec: PipelineSpec
    redis_url: str
    data_dir: Path          # engine-local state: Faust data, Flink checkpoints
    partitions: int
    commit_interval_s: float = 0.2   # how often outputs become visible to read_committed readers (Faust; Flink
                                     # checkpoints no more often than every second; native: components)
    batch_size: int = 500
    batch_wait_s: float = 0.01
    jars_dir: Path | None = None     # the Maven-fetched jars (Flink's Kafka connector under flink/)
    bounded: bool = False            # stop at the end offsets seen at start (tests, backfills)

    @property
    def app_id(self) -> str:
        """The stage's stable id: consumer group, transactional ids, changelog topics, Flink uid prefix."""
        return self.spec.stage_id(STAGE)
