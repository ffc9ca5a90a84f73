"""Writes deploy/schemas/inferenceservice-v1beta1.json: the part of KServe's
InferenceService CRD schema that deploy/kserve/inferenceservice.yaml uses, made strict.

    python deploy/schemas/vendor_kserve_schema.py CRD_YAML COMMIT

CRD_YAML is config/crd/full/serving.kserve.io_inferenceservices.yaml of kserve/kserve at
COMMIT (40 hex digits, recorded in the output). The output keeps, verbatim from the CRD's
v1beta1 openAPIV3Schema, `spec.predictor.model` (KServe's ModelSpec: modelFormat,
storageUri, runtimeVersion, resources, ...) and the predictor fields listed in
PREDICTOR_FIELDS; `metadata` is a subset written here (the CRD leaves it to the API
server). Unlike the CRD, whose unknown fields the API server prunes without a word, every
kept object refuses fields it does not list (additionalProperties: false), so a typo fails
the test instead of being dropped. Fields of the CRD not kept here are refused too: add
them to PREDICTOR_FIELDS and rerun when the manifest needs them.
"""

import argparse
import json
import pathlib
import re
import sys

import yaml

OUT = pathlib.Path(__file__).resolve().parent / "inferenceservice-v1beta1.json"
SOURCE = "kserve/kserve config/crd/full/serving.kserve.io_inferenceservices.yaml"
PREDICTOR_FIELDS = ("model", "minReplicas", "maxReplicas", "scaleMetric", "scaleMetricType",
                    "scaleTarget", "timeout", "containerConcurrency", "canaryTrafficPercent",
                    "deploymentStrategy", "serviceAccountName", "annotations", "labels",
                    "nodeSelector", "tolerations")
METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        # KServe names become Service and DNS names: an RFC 1035 label.
        "name": {"type": "string", "maxLength": 63, "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def subset(crd, commit):
    """The strict schema for one InferenceService, from the parsed CRD document."""
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    predictor = spec["properties"]["predictor"]
    missing = [f for f in PREDICTOR_FIELDS if f not in predictor["properties"]]
    if missing:
        raise ValueError(f"the CRD's predictor has no {missing}")
    model = dict(predictor["properties"]["model"], additionalProperties=False)
    fields = {f: predictor["properties"][f] for f in PREDICTOR_FIELDS}
    fields["model"] = model
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (f"Subset of {SOURCE} at commit {commit} (v1beta1 openAPIV3Schema: "
                     f"spec.predictor.{{{', '.join(PREDICTOR_FIELDS)}}} verbatim, "
                     "additionalProperties false added; metadata written by "
                     "deploy/schemas/vendor_kserve_schema.py)."),
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": f"{crd['spec']['group']}/v1beta1"},
            "kind": {"const": crd["spec"]["names"]["kind"]},
            "metadata": METADATA,
            "spec": {
                "type": "object",
                "required": ["predictor"],
                "additionalProperties": False,
                "properties": {"predictor": {
                    "type": "object",
                    "required": ["model"],
                    "additionalProperties": False,
                    "properties": fields,
                }},
            },
        },
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd", help="serving.kserve.io_inferenceservices.yaml")
    parser.add_argument("commit", help="the kserve/kserve commit it comes from")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[0-9a-f]{40}", args.commit):
        print(f"error: commit {args.commit!r} must be 40 lowercase hex digits", file=sys.stderr)
        return 2
    try:
        with open(args.crd, encoding="utf-8") as f:
            schema = subset(yaml.safe_load(f), args.commit)
    except (OSError, yaml.YAMLError, KeyError, StopIteration, ValueError) as e:
        print(f"error: {args.crd} is not KServe's InferenceService CRD ({e!r}); pass "
              "config/crd/full/serving.kserve.io_inferenceservices.yaml", file=sys.stderr)
        return 2
    from keras_alexnet.files import atomic_write  # the project's one atomic writer

    atomic_write(OUT, json.dumps(schema, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
