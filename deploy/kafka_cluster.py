"""What a home's local Kafka cluster is: its id and each broker's client address, recorded once by
`eddy up` (deploy.broker) so every later command and process reaches all of its brokers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CLUSTER_FILE = "cluster.json"


@dataclass(frozen=True)
class Cluster:
    cluster_id: str
    addresses: tuple[str, ...]  # broker i's clients' address is addresses[i - 1]
    # A controller of its own beside the lone broker (deploy.broker); False: every broker is a controller too
    # (three brokers, or a home formatted before the lone broker had one).
    controller: bool = False

    @property
    def bootstrap(self) -> str:
        return ",".join(self.addresses)


def cluster_path(home: Path) -> Path:
    return home / "kafka" / CLUSTER_FILE


def recorded_cluster(home: Path) -> Cluster | None:
    """The local cluster `eddy up` recorded in `home`; None when there is none (or the record is unreadable)."""
    try:
        data = json.loads(cluster_path(home).read_text())
        return Cluster(str(data["cluster_id"]), tuple(str(a) for a in data["addresses"]), bool(data.get("controller")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_cluster(home: Path, cluster: Cluster) -> None:
    path = cluster_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cluster_id": cluster.cluster_id, "addresses": list(cluster.addresses),
                                "controller": cluster.controller}) + "\n")


def cluster_bootstrap(home: Path, bootstrap: str) -> str:
    """Every broker of this home's local cluster when `bootstrap` names its first one, so a client reaches
    the cluster while that broker is down; else `bootstrap` as given."""
    cluster = recorded_cluster(home)
    if cluster is not None and len(cluster.addresses) > 1 and bootstrap == cluster.addresses[0]:
        return cluster.bootstrap
    return bootstrap
