"""Synthetic card transactions for the fraud pipeline, deterministic under a seed."""

from streams.generator.episodes import PATTERNS
from streams.generator.population import CHANNELS, CardProfile
from streams.generator.stream import Batch, GeneratorConfig, TransactionGenerator, iso_ms, label_record

__all__ = [
    "CHANNELS",
    "PATTERNS",
    "Batch",
    "CardProfile",
    "GeneratorConfig",
    "TransactionGenerator",
    "iso_ms",
    "label_record",
]
