#!/usr/bin/env python3
"""Turn an upstream CustomResourceDefinition into the strict JSON Schema the tests validate with.

    python3 tests/kubernetes/schemas/extract.py CRD.yaml VERSION SOURCE > OUT.json

SOURCE names where the CRD came from (repository, tag, path); it is kept in the output with
the CRD file's sha256, so anyone can fetch the same file and reproduce the schema. The schema is
the CRD's openAPIV3Schema for VERSION with descriptions removed, made as strict as the API
server's strict field validation (kubectl's default since 1.27): an object that lists its
properties and does not preserve unknown fields rejects any other field, `nullable` admits
null, and RE2 patterns are written the way Python's re reads them. CEL rules
(x-kubernetes-validations) stay in the file but are not evaluated: tests/kubernetes checks the
ones our objects touch field by field.

The files here were made from these upstream files (the tags are the versions README claims):
  cloudnative-pg/cloudnative-pg v1.30.0 config/crd/bases/
    postgresql.cnpg.io_{clusters,scheduledbackups}.yaml
  cloudnative-pg/plugin-barman-cloud v0.14.0 config/crd/bases/barmancloud.cnpg.io_objectstores.yaml
  prometheus-operator/prometheus-operator v0.93.0 example/prometheus-operator-crd/
    monitoring.coreos.com_{servicemonitors,podmonitors,prometheusrules}.yaml
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def strict(node: Any) -> Any:
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict(value) for key, value in node.items() if key != "description"}
    if (
        out.get("type") == "object"
        and "properties" in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if isinstance(out.get("pattern"), str) and out["pattern"].startswith("^(?i)"):
        # Go's RE2 takes a flag group anywhere; Python's re only at the start
        out["pattern"] = "(?i)^" + out["pattern"][len("^(?i)") :]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def main(crd_path: str, version: str, source: str) -> int:
    raw = Path(crd_path).read_bytes()
    crd = yaml.safe_load(raw)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict(served["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "minLength": 1}},
    }
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    document = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": f"{source} sha256:{hashlib.sha256(raw).hexdigest()}; made by extract.py",
        **schema,
    }
    json.dump(document, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
