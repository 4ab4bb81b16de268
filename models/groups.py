"""The consumer group prefixes of the model tools' readers (each reads the topics whole and never commits):
a module of its own, so what grants them (deploy.access) does not import torch with models.updates."""

SEQUENCE_GROUP_PREFIX = "eddy-seq-"     # the sequence models' training reads
RETRAIN_GROUP_PREFIX = "eddy-retrain-"  # retraining's reads of the topics
