"""Strict offline validation of the custom resources the Helm chart can render.

kubernetes-validate bundles the schemas of the built-in Kubernetes kinds only: for a custom resource
it prints "WARN ... Couldn't find schema for kind ..." and exits 0, so a misspelled ServiceMonitor or
ScaledObject field would pass unnoticed. This script closes that gap for the two CRDs the chart uses:

    monitoring.coreos.com/v1  ServiceMonitor   prometheus-operator 0.80 CRD schema
    keda.sh/v1alpha1          ScaledObject     KEDA 2.16 CRD schema

The schemas come from the cloudcoil model packages (pydantic models generated from the upstream CRD
OpenAPI schemas, pinned in deploy/tools-requirements.txt). Their base model ignores unknown fields;
here it is switched to extra="forbid" before any model class is built, which makes every nested
object strict, like `kubernetes-validate --strict`. Values are checked in pydantic's lax mode (e.g.
the string "5" passes as an integer), which is looser than the API server for scalars only.

Run with the tools venv (bash deploy/tools.sh):
    .tools/bin/python deploy/validate_crds.py RENDERED.yaml [...]   # validate the CRs in these files
    .tools/bin/python deploy/validate_crds.py --list                # "apiVersion kind" per line
Exit status 1 when a custom resource is invalid, or when a document's kind is neither built in
(left to kubernetes-validate) nor listed here and --allow-unknown is not given.
"""

from __future__ import annotations

import argparse
import sys

import cloudcoil.pydantic as _cc

# Must run before the model modules are imported: pydantic merges model_config at class creation.
_cc.BaseModel.model_config["extra"] = "forbid"

import pydantic  # noqa: E402
import yaml  # noqa: E402
from cloudcoil.models.keda import v1alpha1 as keda_v1alpha1  # noqa: E402
from cloudcoil.models.prometheus_operator import v1 as prom_v1  # noqa: E402

MODELS: dict[tuple[str, str], type[pydantic.BaseModel]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): prom_v1.ServiceMonitor,
    ("keda.sh/v1alpha1", "ScaledObject"): keda_v1alpha1.ScaledObject,
}

# API groups whose kinds have schemas in kubernetes-validate (checked there, skipped here).
BUILTIN_GROUPS = {
    "", "admissionregistration.k8s.io", "apiextensions.k8s.io", "apiregistration.k8s.io", "apps",
    "authentication.k8s.io", "authorization.k8s.io", "autoscaling", "batch", "certificates.k8s.io",
    "coordination.k8s.io", "discovery.k8s.io", "events.k8s.io", "flowcontrol.apiserver.k8s.io",
    "networking.k8s.io", "node.k8s.io", "policy", "rbac.authorization.k8s.io", "resource.k8s.io",
    "scheduling.k8s.io", "storage.k8s.io", "storagemigration.k8s.io",
}


def _self_test() -> None:
    """Fail loudly if a cloudcoil upgrade ever stops the forbid switch from reaching nested models."""
    probe = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
             "metadata": {"name": "probe"},
             "spec": {"selector": {}, "endpoints": [{"port": "http", "intervall": "15s"}]}}
    try:
        prom_v1.ServiceMonitor.model_validate(probe)
    except pydantic.ValidationError:
        return
    sys.exit("validate_crds.py: strict mode is not in effect (a misspelled field passed); "
             "check the cloudcoil version pinned in deploy/tools-requirements.txt")


def validate_file(path: str, allow_unknown: bool) -> int:
    errors = 0
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
        name = (doc.get("metadata") or {}).get("name", "?")
        model = MODELS.get((api_version, kind))
        if model is None:
            group = api_version.rpartition("/")[0] if "/" in api_version else ""
            if group in BUILTIN_GROUPS:
                continue
            level = "WARN" if allow_unknown else "ERROR"
            print(f"{level} {path} {api_version} {kind}/{name}: no schema here or in kubernetes-validate")
            errors += 0 if allow_unknown else 1
            continue
        try:
            model.model_validate(doc)
        except pydantic.ValidationError as exc:
            errors += 1
            print(f"ERROR {path} {api_version} {kind}/{name} did not validate:")
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                print(f"    {loc}: {err['msg']}")
        else:
            print(f"INFO {path} passed for resource {kind}/{name} against the {api_version} CRD schema (strict)")
    return errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--list", action="store_true", help="print the custom resource kinds checked here")
    ap.add_argument("--allow-unknown", action="store_true", help="only warn on kinds without any schema")
    args = ap.parse_args(argv)
    if args.list:
        for api_version, kind in MODELS:
            print(api_version, kind)
        return 0
    _self_test()
    errors = sum(validate_file(p, args.allow_unknown) for p in args.files)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
