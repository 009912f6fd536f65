"""Write the JSON schemas of the custom resources in deploy/kubernetes/ to tests/data/crd-schemas/.

The CRDs' field lists come from their own SDKs: KServe's (``kserve``) for ServingRuntime and
InferenceService, the Kubeflow Training Operator's (``kubeflow-training``) for PyTorchJob, and
cloudcoil's Prometheus Operator models for ServiceMonitor. Those SDKs pull in a server stack
(KServe alone brings grpcio, pandas, aiohttp, ...), far too much for ``make test``, so this script
runs once in a throwaway environment and the tests read its small JSON output:

    python3 -m venv /tmp/crd-sdk
    /tmp/crd-sdk/bin/pip install kserve==0.21.0 kubeflow-training==1.9.4 \\
        cloudcoil-models-prometheus-operator==0.80.1.0 kubernetes-validate
    /tmp/crd-sdk/bin/python scripts/generate_crd_schemas.py

Every object is closed (``additionalProperties: false``), so a misspelt field fails validation.
Kubernetes' own types inside a CRD (Container, Volume, ObjectMeta, ...) are not copied: they
``$ref`` the definitions kubernetes-validate ships, so the tests check them against the same
Kubernetes version as the built-in kinds.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "crd-schemas"
K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"
# Named by a model of the SDK but missing from it (kserve 0.21.0: ServingRuntimeSpec.workerSpec,
# for multi-node runtimes, unused here); such a field is an open object.
SDK_GAPS = {"V1alpha1WorkerSpec"}
# Named by the SDK, not shipped, but documented as a Kubernetes quantity (a string or a number).
QUANTITIES = {"V1beta1MetricQuantity", "ResourceQuantity", "Quantity"}
PRIMITIVES: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "object": {},
    "datetime": {"type": "string"},
    "date": {"type": "string"},
}


def kubernetes_definitions() -> dict[str, str]:
    """Kubernetes client class name (``V1Container``) -> definition name in kubernetes-validate's schemas."""
    version = kubernetes_validate.utils.latest_version()
    defs = kubernetes_validate.utils.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version
    )["$defs"]
    by_class: dict[str, list[str]] = {}
    for name in defs:
        *_, api_version, kind = name.split(".")
        if re.fullmatch(r"v\d+((alpha|beta)\d+)?", api_version):
            by_class.setdefault(api_version.capitalize() + kind, []).append(name)
    preferred = ("io.k8s.api.core.", "io.k8s.apimachinery.")
    # Go-package names (K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior) are unambiguous.
    resolved = {
        "K8sIo" + "".join(part[:1].upper() + part[1:] for part in name.split(".")[2:]): name
        for name in defs
        if name.startswith("io.k8s.")
    }
    for cls, names in by_class.items():
        core = [n for n in names if n.startswith(preferred)]
        if len(names) == 1 or len(core) == 1:
            resolved[cls] = names[0] if len(names) == 1 else core[0]
    return resolved


class OpenApiModels:
    """JSON schemas from openapi-generator Python classes (``openapi_types`` + ``attribute_map``)."""

    def __init__(self, packages: list[Any], kube: dict[str, str]):
        # every module of the packages: some models are not re-exported by the package itself
        self.classes = {
            name: cls
            for package in packages
            for info in pkgutil.iter_modules(package.__path__)
            for name, cls in vars(importlib.import_module(f"{package.__name__}.{info.name}")).items()
            if isinstance(cls, type) and hasattr(cls, "openapi_types")
        }
        self.kube = kube
        self.defs: dict[str, dict[str, Any]] = {}

    def find(self, name: str) -> type | None:
        return self.classes.get(name)

    def type_schema(self, spec: str) -> dict[str, Any]:
        spec = spec.strip()
        if spec.startswith("list["):
            return {"type": "array", "items": self.type_schema(spec[5:-1])}
        if spec.startswith("dict("):
            return {"type": "object", "additionalProperties": self.type_schema(spec[5:-1].split(",", 1)[1])}
        if spec in PRIMITIVES:
            return dict(PRIMITIVES[spec])
        if self.find(spec) is not None:
            self.add(spec)
            return {"$ref": f"#/$defs/{spec}"}
        if spec in self.kube:
            return {"$ref": f"{K8S_DEFINITIONS}#/$defs/{self.kube[spec]}"}
        if spec in QUANTITIES:
            return {"$ref": f"{K8S_DEFINITIONS}#/$defs/io.k8s.apimachinery.pkg.api.resource.Quantity"}
        if spec in SDK_GAPS:
            print(f"warning: {spec} is named but not shipped by its SDK: left open", file=sys.stderr)
            return {"type": "object", "description": f"{spec}: not in the SDK, not checked"}
        raise SystemExit(f"unknown type {spec!r}: neither an SDK model nor a Kubernetes definition")

    def add(self, name: str, skip: tuple[str, ...] = ()) -> None:
        if name in self.defs:
            return
        cls = self.find(name)
        schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": {}}
        self.defs[name] = schema
        for attr, json_name in cls.attribute_map.items():
            if json_name in skip:
                continue
            schema["properties"][json_name] = self.type_schema(cls.openapi_types[attr])
        required = [
            cls.attribute_map[a] for a in cls.openapi_types if a not in skip and self.rejects_none(cls, a)
        ]
        if required:
            schema["required"] = required

    @staticmethod
    def rejects_none(cls: type, attr: str) -> bool:
        """openapi-generator marks required fields only in their setters: they refuse None."""
        instance = cls.__new__(cls)
        config = type("Validating", (), {"client_side_validation": True})()
        instance.local_vars_configuration = config
        try:
            setattr(instance, attr, None)
        except ValueError:
            return True
        return False


def resource_schema(models: OpenApiModels, root: str, api_version: str, kind: str) -> dict[str, Any]:
    models.defs.clear()
    models.add(root, skip=("status",))  # written by the controller, never by a manifest
    top = models.defs.pop(root)
    top["properties"]["apiVersion"] = {"type": "string", "enum": [api_version]}
    top["properties"]["kind"] = {"type": "string", "enum": [kind]}
    top["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **top, "$defs": dict(models.defs)}


def close_pydantic(schema: Any) -> Any:
    """Pydantic schemas leave objects open; close every object that lists its properties."""
    if isinstance(schema, dict):
        if "properties" in schema:
            schema.setdefault("additionalProperties", False)
        return {k: close_pydantic(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [close_pydantic(v) for v in schema]
    return schema


def service_monitor_schema() -> dict[str, Any]:
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    schema = close_pydantic(ServiceMonitor.model_json_schema(by_alias=True, mode="validation"))
    schema["properties"].pop("status", None)
    schema["properties"]["apiVersion"] = {"type": "string", "enum": ["monitoring.coreos.com/v1"]}
    schema["properties"]["kind"] = {"type": "string", "enum": ["ServiceMonitor"]}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def main() -> int:
    import kserve.models
    import kubeflow.training.models

    kube = kubernetes_definitions()
    models = OpenApiModels([kserve.models, kubeflow.training.models], kube)
    schemas = {
        "servingruntime-serving.kserve.io-v1alpha1": resource_schema(
            models, "V1alpha1ServingRuntime", "serving.kserve.io/v1alpha1", "ServingRuntime"
        ),
        "inferenceservice-serving.kserve.io-v1beta1": resource_schema(
            models, "V1beta1InferenceService", "serving.kserve.io/v1beta1", "InferenceService"
        ),
        "pytorchjob-kubeflow.org-v1": resource_schema(
            models, "KubeflowOrgV1PyTorchJob", "kubeflow.org/v1", "PyTorchJob"
        ),
        "servicemonitor-monitoring.coreos.com-v1": service_monitor_schema(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    for name, schema in schemas.items():
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(f"{path.relative_to(OUT.parents[2])}: {len(schema.get('$defs', {}))} definitions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
