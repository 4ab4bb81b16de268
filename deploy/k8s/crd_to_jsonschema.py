"""JSON schemas kubeconform can load, made offline: the Kubernetes schemas of PyPI's
kubernetes-validate (their absolute `$ref`s made relative), and CRDs' openAPIV3Schema converted
to kubeconform's `{group}/{kind}_{version}.json` layout, strict like openapi2jsonschema's strict mode.

    python -m deploy.k8s.crd_to_jsonschema kube WHEEL K8S_VERSION OUT_DIR
    python -m deploy.k8s.crd_to_jsonschema crd OUT_DIR CRD_FILE...
"""

from __future__ import annotations

import json
import re
import sys
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

# kubernetes-validate's files carry "$id": "https://kubernetes.io/api/..." and refer to their shared
# definitions as "/api/_definitions.json#/$defs/...", which resolves to kubernetes.io: kubeconform
# cannot load that, says "could not find schema", and (without check.sh's count check) passes.
# Without the $id and with relative refs, the definitions resolve beside the file.
_ABSOLUTE_REF = re.compile(r'("\$ref":\s*")/api/_definitions\.json#')


def extract_kube_schemas(wheel: Path, version: str, out: Path) -> int:
    """Unpack the strict schemas of Kubernetes `version` (like v1.34.0) from the kubernetes-validate
    wheel into `out`, refs made relative; returns the number of files written."""
    prefix = f"kubernetes_validate/kubernetes-json-schema/{version}-local-strict/"
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not name.startswith(prefix) or not name.endswith(".json"):
                continue
            schema = json.loads(_ABSOLUTE_REF.sub(r"\1_definitions.json#", archive.read(name).decode("utf-8")))
            if isinstance(schema, dict):
                schema.pop("$id", None)
            (out / name.removeprefix(prefix)).write_text(json.dumps(schema))
            written += 1
    if written == 0:
        raise SystemExit(f"{wheel}: no schemas for Kubernetes {version} (look for "
                         f"kubernetes-json-schema/<version>-local-strict in the wheel)")
    return written


def strict(schema: Any) -> Any:
    """The OpenAPI v3 schema of a CRD as JSON schema: objects that list their properties and say
    nothing else refuse unknown ones; Kubernetes' extensions become plain JSON schema."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        for key in ("type", "format"):
            out.pop(key, None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    open_object = out.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in out and "additionalProperties" not in out and not open_object:
        out["additionalProperties"] = False
    return out


def crd_schemas(crd: dict) -> Iterator[tuple[str, str, str, dict]]:
    """(group, kind, version, JSON schema) for each served version of an apiextensions.k8s.io/v1 CRD."""
    spec = crd["spec"]
    kind, group = spec["names"]["kind"], spec["group"]
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        if schema is None:
            raise SystemExit(f"CRD {crd['metadata']['name']} {version['name']}: no openAPIV3Schema")
        body = strict(schema)
        # apiVersion and kind must name this exact schema; metadata is the API server's (ObjectMeta),
        # allowed whether or not the CRD lists it (fabric8's CRDs, the Flink operator's, do not).
        props = body.setdefault("properties", {})
        props["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
        props["kind"] = {"type": "string", "enum": [kind]}
        props.setdefault("metadata", {"type": "object"})
        body["$schema"] = "http://json-schema.org/draft-07/schema#"
        yield group, kind, version["name"], body


class _Loader(yaml.SafeLoader):
    """SafeLoader reading a bare `=` (YAML 1.1's value tag, in the Prometheus operator's enums) as text."""


_Loader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def load_crds(paths: Iterable[Path]) -> Iterator[dict]:
    for path in paths:
        for doc in yaml.load_all(path.read_text(encoding="utf-8"), Loader=_Loader):  # noqa: S506 - a SafeLoader
            if not doc:
                continue
            if doc.get("kind") != "CustomResourceDefinition" or doc.get("apiVersion") != "apiextensions.k8s.io/v1":
                raise SystemExit(f"{path}: not an apiextensions.k8s.io/v1 CustomResourceDefinition "
                                 f"({doc.get('apiVersion')} {doc.get('kind')})")
            yield doc


def convert_crds(paths: Iterable[Path], out: Path) -> list[Path]:
    written = []
    for crd in load_crds(paths):
        for group, kind, version, body in crd_schemas(crd):
            target = out / group / f"{kind.lower()}_{version}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(body, indent=1, sort_keys=True))
            written.append(target)
    return written


def main(argv: list[str]) -> None:
    if len(argv) == 4 and argv[0] == "kube":
        count = extract_kube_schemas(Path(argv[1]), argv[2], Path(argv[3]))
        print(f"{count} Kubernetes {argv[2]} schemas in {argv[3]}")
    elif len(argv) >= 3 and argv[0] == "crd":
        for path in convert_crds(map(Path, argv[2:]), Path(argv[1])):
            print(path)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
