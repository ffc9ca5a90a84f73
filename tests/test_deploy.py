"""deploy/ (Kubernetes, KServe), the serving image's health check and docker-compose.yml,
checked offline: every built-in manifest against the Kubernetes JSON schemas that
kubernetes-validate ships (strict: unknown fields fail), the InferenceService against the
vendored subset of KServe's CRD schema, yamllint, the facts that several files must agree
on (ports, image pins, flags, configs, names), the TF_CONFIG each training worker builds,
and deploy/healthcheck.sh against the embedded server and against TF Serving's answers."""

import ast
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jsonschema
import kubernetes_validate
import pytest
import yaml
from _serving_fixtures import REPO, ServerProcess, export_tiny, free_port
from kubernetes_validate.utils import latest_version

DEPLOY = REPO / "deploy"
HEALTHCHECK = DEPLOY / "healthcheck.sh"
DOCS = REPO / "docs" / "deploy.md"
# The oldest release the manifests target (every field used is GA there, and every
# kubernetes-validate allowed by setup.cfg ships it) and the newest the installed one ships.
KUBERNETES_VERSIONS = sorted({"1.30.0", latest_version()})
BUILTIN_KINDS = {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                 "PodDisruptionBudget", "PersistentVolumeClaim", "Job"}


def _manifests():
    """{path relative to deploy/: the one document in it}, kustomizations excluded."""
    found = {}
    for path in sorted(DEPLOY.rglob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(docs) == 1, f"{path}: one document per file"
        if path.name != "kustomization.yaml":
            found[str(path.relative_to(DEPLOY))] = docs[0]
    return found


MANIFESTS = _manifests()


def _one(kind, name=None):
    docs = [d for d in MANIFESTS.values()
            if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(docs) == 1, (kind, name, len(docs))
    return docs[0]


def _container(workload):
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _flags(args):
    """{"--flag": value or True} of `--flag=value` / `--flag` arguments."""
    out = {}
    for arg in args:
        assert arg.startswith("--"), arg
        name, _, value = arg.partition("=")
        out[name] = value if "=" in arg else True
    return out


def _dockerfile_stage(target):
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    stages = {s.split()[2]: s for s in re.split(r"(?m)^FROM ", text)[1:]}
    return stages[target]


def _seconds(value):
    number, unit = re.fullmatch(r"(\d+)(s|m|h)", str(value)).groups()
    return int(number) * {"s": 1, "m": 60, "h": 3600}[unit]


def _models_config():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((REPO / "serving" / "models.config").read_text(), config)
    return config.model_config_list.config


def _mount_of(workload, claim):
    """The mount path of the PersistentVolumeClaim `claim` in `workload`."""
    spec = workload["spec"]["template"]["spec"]
    volume = next(v["name"] for v in spec["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == claim)
    return next(m["mountPath"] for m in _container(workload)["volumeMounts"]
                if m["name"] == volume)


# Schemas and lint.


def test_every_manifest_is_listed_in_one_kustomization():
    listed = []
    for path in sorted(DEPLOY.rglob("kustomization.yaml")):
        kustomization = yaml.safe_load(path.read_text())
        assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        assert kustomization["kind"] == "Kustomization"
        for resource in kustomization["resources"]:
            assert (path.parent / resource).is_file(), (path, resource)
            listed.append(str((path.parent / resource).relative_to(DEPLOY)))
    assert sorted(listed) == sorted(MANIFESTS)
    assert {d["kind"] for d in MANIFESTS.values()} == BUILTIN_KINDS | {"InferenceService"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_manifests_validate_against_the_kubernetes_schemas(version):
    checked = set()
    for path, doc in MANIFESTS.items():
        if doc["kind"] in BUILTIN_KINDS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{path}: {'.'.join(map(str, e.path))}: {e.message}")
            checked.add(doc["kind"])
    assert checked == BUILTIN_KINDS


def test_the_pages_manifest_examples_validate_too():
    blocks = [yaml.safe_load(textwrap.dedent(b)) for b in
              re.findall(r"(?ms)^ *```yaml\n(.*?)^ *```$", DOCS.read_text())]
    assert blocks and all(b["kind"] in BUILTIN_KINDS | {"Pod"} for b in blocks)
    for block in blocks:
        kubernetes_validate.validate(block, "1.30.0", strict=True)


def test_strict_schemas_refuse_a_misspelt_field():
    deployment = json.loads(json.dumps(_one("Deployment")))
    _container(deployment)["readinessprobe"] = _container(deployment).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessprobe"):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)
    service = json.loads(json.dumps(_one("InferenceService")))
    service["spec"]["predictor"]["model"]["storageURI"] = "pvc://x/y"
    errors = list(_kserve_validator().iter_errors(service))
    assert errors and "storageURI" in errors[0].message


def _kserve_validator():
    schema = json.loads((DEPLOY / "schemas" / "inferenceservice-v1beta1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_inferenceservice_validates_against_the_vendored_kserve_schema():
    schema = json.loads((DEPLOY / "schemas" / "inferenceservice-v1beta1.json").read_text())
    assert re.search(r"kserve/kserve \S+inferenceservices\.yaml at commit [0-9a-f]{40}",
                     schema["$comment"])
    service = _one("InferenceService")
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
              for e in _kserve_validator().iter_errors(service)]
    assert not errors
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "tensorflow"
    # KServe's TF runtime serves --model_name=<InferenceService name> from /mnt/models,
    # which is storageUri: the claim's folder of numeric versions.
    (config,) = _models_config()
    assert service["metadata"]["name"] == config.name
    claim, folder = re.fullmatch(r"pvc://([^/]+)/(.+)", model["storageUri"]).groups()
    assert _one("PersistentVolumeClaim", claim)
    serving = _one("Deployment", "alexnet-serving")
    assert os.path.join(_mount_of(serving, claim), folder) == config.base_path
    assert model["runtimeVersion"] == _container(serving)["image"].split(":")[1]


def test_yamllint_is_clean():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    paths = [*sorted(DEPLOY.rglob("*.yaml")), DEPLOY / ".yamllint", REPO / "docker-compose.yml"]
    problems = [f"{p.relative_to(REPO)}:{problem.line}: {problem.message}"
                for p in paths for problem in linter.run(p.read_text(), config, str(p))]
    assert not problems
    # The config is the one yamllint would use: deploy/ files with trailing spaces fail.
    assert list(linter.run("a: 1   \n", config))


# One definition: the ConfigMap is serving/'s files; flags, ports and pins agree.


def _load_renderer():
    spec = importlib.util.spec_from_file_location("render_configmap",
                                                  DEPLOY / "render_configmap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configmap_carries_the_serving_files_byte_for_byte():
    renderer = _load_renderer()
    checked_in = (DEPLOY / "serving-configmap.yaml").read_text()
    assert renderer.render() == checked_in, "run python deploy/render_configmap.py"
    data = _one("ConfigMap")["data"]
    assert set(data) == {p.split("/")[-1] for p in renderer.SOURCES}
    for source in renderer.SOURCES:
        assert data[source.split("/")[-1]] == (REPO / source).read_text(), source


def test_configmap_renderer_refuses_a_file_yaml_would_not_keep(tmp_path):
    renderer = _load_renderer()
    for source in renderer.SOURCES:
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / source).write_text((REPO / source).read_text())
    (tmp_path / "serving" / "batching.config").write_text("max_batch_size { value: 64 }  \n")
    with pytest.raises(ValueError, match="serving/batching.config: line 1 has trailing"):
        renderer.render(tmp_path)


def test_ports_agree_across_image_deployment_service_probes_and_compose():
    serving = _one("Deployment", "alexnet-serving")
    container = _container(serving)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 8500, "http": 8501}
    flags = _flags(container["args"])
    assert (int(flags["--port"]), int(flags["--rest_api_port"])) == (8500, 8501)
    # The image's EXPOSE, and its entrypoint's fixed --port=8500 --rest_api_port=8501.
    assert re.search(r"(?m)^EXPOSE 8500 8501$", _dockerfile_stage("serving"))
    service = _one("Service", "alexnet-serving")
    for port in service["spec"]["ports"]:
        assert ports[port["targetPort"]] == port["port"]
    assert {p["name"]: p["appProtocol"] for p in service["spec"]["ports"]} == {
        "grpc": "grpc", "http": "http"}
    assert container["startupProbe"]["grpc"]["port"] == ports["grpc"]
    assert container["livenessProbe"]["grpc"]["port"] == ports["grpc"]
    readiness = container["readinessProbe"]["exec"]["command"]
    assert readiness[:2] == ["bash", "/config/healthcheck.sh"]
    (config,) = _models_config()
    assert readiness[2] == config.name and int(readiness[3]) == ports["http"]
    annotations = serving["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    monitoring = (REPO / "serving" / "monitoring.config").read_text()
    assert re.search(r"(?m)^\s*enable:\s*true\s*$", monitoring)
    path = re.search(r'(?m)^\s*path:\s*"([^"]+)"', monitoring).group(1)
    assert annotations["prometheus.io/path"] == path
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["serving"]
    published = {int(p.split(":")[1]) for p in compose["ports"]}
    assert published == set(ports.values())


def test_image_pins_agree():
    import importlib.metadata

    image = re.match(r"(tensorflow/serving:\S+) AS serving", _dockerfile_stage("serving"))[1]
    assert image == f"tensorflow/serving:{importlib.metadata.version('tensorflow-serving-api')}"
    assert _container(_one("Deployment", "alexnet-serving"))["image"] == image
    # The training image is the Dockerfile's training target, tagged with the package version.
    version = importlib.metadata.version("keras-alexnet")
    assert _container(_one("Job"))["image"] == f"keras-alexnet-train:{version}"


def test_deployment_runs_the_images_flags_on_the_configmap():
    serving = _one("Deployment", "alexnet-serving")
    container = _container(serving)
    assert container["command"] == ["/usr/bin/tensorflow_model_server"]
    flags = _flags(container["args"])
    cmd = json.loads(re.search(r"(?m)^CMD (\[.*\])$", _dockerfile_stage("serving"))[1])
    for flag, value in _flags(cmd).items():
        assert flags[flag] == value, flag  # every flag of the image, with the same value
    assert flags["--monitoring_config_file"] == "/config/monitoring.config"
    assert flags["--enable_grpc_healthcheck_service"] is True
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in serving["spec"]["template"]["spec"]["volumes"]}
    config_volume = next(n for n, v in volumes.items() if "configMap" in v)
    assert volumes[config_volume]["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    data = _one("ConfigMap")["data"]
    for flag in ("--model_config_file", "--batching_parameters_file", "--monitoring_config_file"):
        folder, name = os.path.split(flags[flag])
        assert folder == mounts[config_volume] and name in data, flag
    (config,) = _models_config()
    models = _mount_of(serving, "alexnet-models")
    assert os.path.dirname(config.base_path) == models
    assert next(m for m in container["volumeMounts"] if m["mountPath"] == models)["readOnly"]


def test_rollout_drains_before_the_server_goes():
    serving = _one("Deployment", "alexnet-serving")
    spec, pod = serving["spec"], serving["spec"]["template"]["spec"]
    container = _container(serving)
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert "replicas" not in spec  # the autoscaler owns it
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    channel = dict(a.split("=") for a in
                   _flags(container["args"])["--grpc_channel_arguments"].split(","))
    age = int(channel["grpc.max_connection_age_ms"]) / 1000
    grace = int(channel["grpc.max_connection_age_grace_ms"]) / 1000
    # gRPC jitters the age by +-10 %: every connection is told to go, and has finished its
    # calls, before preStop ends; the grace period covers preStop.
    assert 1.1 * age + grace < int(sleep[1]) < pod["terminationGracePeriodSeconds"]
    assert pod["shareProcessNamespace"] is True  # the server is not PID 1: SIGTERM ends it
    assert container["readinessProbe"]["exec"]["command"][1] == "/config/healthcheck.sh"
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"] == labels
    assert _one("Service", "alexnet-serving")["spec"]["selector"] == labels
    hpa = _one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", serving["metadata"]["name"])
    assert container["resources"]["requests"]["cpu"]  # utilisation is relative to it
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_pods_run_unprivileged(kind):
    workload = _one(kind)
    pod = workload["spec"]["template"]["spec"]
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True and context["seccompProfile"]["type"] == "RuntimeDefault"
    # The uid:gid of the image's USER (both stages), which owns or can read what they use.
    stage = _dockerfile_stage("serving" if kind == "Deployment" else "training")
    user = re.search(r"(?m)^USER (\d+):(\d+)$", stage).groups()
    assert (str(context["runAsUser"]), str(context["runAsGroup"])) == user
    assert pod["automountServiceAccountToken"] is False
    container = _container(workload)["securityContext"]
    assert container == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                         "capabilities": {"drop": ["ALL"]}}


# Docker: the image's HEALTHCHECK and compose.


def _healthcheck_instruction():
    match = re.search(r"(?m)^HEALTHCHECK ((?:--\S+ )+)\s*CMD (\[.*\])$",
                      _dockerfile_stage("serving"))
    options = {k.lstrip("-"): v for k, v in (o.split("=") for o in match[1].split())}
    return options, json.loads(match[2])


def test_image_healthcheck_is_the_script_and_compose_uses_the_same():
    options, command = _healthcheck_instruction()
    copied = re.search(r"(?m)^COPY (?:--\S+ )*deploy/healthcheck\.sh (\S+)$",
                       _dockerfile_stage("serving"))
    assert command == [copied[1]]
    assert _seconds(options["start-period"]) >= 60  # a slow first load is not "unhealthy"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["serving"]
    check = compose["healthcheck"]
    assert check["test"] == ["CMD", *command]
    for name in ("interval", "timeout", "start-period"):
        assert _seconds(check[name.replace("-", "_")]) == _seconds(options[name]), name
    assert check["retries"] == int(options["retries"])
    # compose keeps the image's CMD, so monitoring and batching are on there too.
    assert "command" not in compose and compose["build"]["target"] == "serving"


# Multi-worker training: TF_CONFIG from the Indexed Job's completion index.


def _run_worker_script(index, tmp_path, workers=None):
    """Runs the Job's container command for pod `index` with a stand-in `python` that
    prints TF_CONFIG and its arguments; returns the CompletedProcess."""
    job = _one("Job")
    container = _container(job)
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            # The Job controller sets this label to the Job's name on each of its pods.
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == (
                "metadata.labels['batch.kubernetes.io/job-name']")
            env[var["name"]] = job["metadata"]["name"]
    if workers is not None:
        env["WORKERS"] = str(workers)
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "python").write_text('#!/bin/sh\nprintf "%s\\n" "$TF_CONFIG" "$@"\n')
    (fake / "python").chmod(0o755)
    env.update(PATH=f"{fake}:{os.environ['PATH']}", JOB_COMPLETION_INDEX=str(index))
    return subprocess.run([*container["command"], *container["args"]], env=env,
                          capture_output=True, text=True, timeout=30)


def test_each_worker_builds_a_valid_tf_config(tmp_path, monkeypatch):
    import tensorflow as tf

    from keras_alexnet.training.distribute import is_chief

    job = _one("Job")
    container = _container(job)
    assert "$(" not in container["command"][2]  # the kubelet would expand it
    env = {v["name"]: v.get("value") for v in container["env"]}
    workers = int(env["WORKERS"])
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == workers >= 2
    service = _one("Service", "alexnet-train")
    assert service["spec"]["clusterIP"] == "None"
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert env["WORKER_SERVICE"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name":
                                           job["metadata"]["name"]}
    assert [p["port"] for p in service["spec"]["ports"]] == [int(env["WORKER_PORT"])]
    assert [p["containerPort"] for p in container["ports"]] == [int(env["WORKER_PORT"])]
    # Pod <job>-<index> of an Indexed Job with a subdomain is <job>-<index>.<subdomain>.
    expected = [f"{job['metadata']['name']}-{i}.{service['metadata']['name']}:"
                f"{env['WORKER_PORT']}" for i in range(workers)]
    for index in range(workers):
        result = _run_worker_script(index, tmp_path)
        assert result.returncode == 0, result.stderr
        tf_config, *argv = result.stdout.splitlines()
        parsed = json.loads(tf_config)
        assert parsed == {"cluster": {"worker": expected},
                          "task": {"type": "worker", "index": index}}
        assert argv == ["training/train.py", *container["args"]]
        monkeypatch.setenv("TF_CONFIG", tf_config)
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        assert resolver.cluster_spec().as_dict() == {"worker": expected}
        assert (resolver.task_type, resolver.task_id) == ("worker", index)
        assert is_chief(parsed) is (index == 0)


def test_worker_script_refuses_an_index_past_the_worker_count(tmp_path):
    result = _run_worker_script(2, tmp_path, workers=2)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: JOB_COMPLETION_INDEX=2 must be below WORKERS=2")


def test_job_args_are_trainable_flags_on_the_shared_volumes():
    from training.train import build_parser, resolve_config

    job = _one("Job")
    args = build_parser().parse_args(_container(job)["args"])
    assert resolve_config(args).strategy == "multiworker"
    runs = _mount_of(job, "alexnet-runs")
    models = _mount_of(job, "alexnet-models")
    assert os.path.commonpath([args.run_dir, runs]) == runs
    # The chief exports into the claim the servers read, where models.config looks.
    (config,) = _models_config()
    serving_mount = _mount_of(_one("Deployment", "alexnet-serving"), "alexnet-models")
    assert (os.path.relpath(args.export_dir, models)
            == os.path.relpath(config.base_path, serving_mount))


# The health check itself.


def _healthcheck(*args, env=None):
    return subprocess.run(["bash", str(HEALTHCHECK), *args], capture_output=True, text=True,
                          timeout=30, env=dict(os.environ, **(env or {})))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("deploy") / "alexnet"
    export_tiny(base, version=1)
    return base


def test_healthcheck_follows_the_model_state_of_the_embedded_server(models, tmp_path):
    server = ServerProcess(tmp_path, "--model_name=alexnet", f"--model_base_path={models}",
                           "--file_system_poll_wait_seconds=0.2", rest=True)
    before = _healthcheck("alexnet", str(server.rest_port))
    assert before.returncode == 1 and "nothing listening" in before.stdout
    server.start()
    try:
        port = str(server.rest_port)
        healthy = _healthcheck("alexnet", port)
        assert (healthy.returncode, healthy.stdout) == (
            0, "healthy: model alexnet version 1 is AVAILABLE\n")
        by_env = _healthcheck("", port, env={"MODEL_NAME": "alexnet"})
        assert by_env.returncode == 0
        unknown = _healthcheck("resnet", port)
        assert unknown.returncode == 1 and "answered 404" in unknown.stdout
        assert "resnet" in unknown.stdout
        # docs/deploy.md's rollout check, for 3 s: calls answered, none failed.
        client = re.search(r"(?ms)python - alexnet-serving:8500 300 <<'EOF'\n(.*?)^EOF$",
                           DOCS.read_text())[1]
        check = subprocess.run([sys.executable, "-", server.address, "3"], input=client,
                               capture_output=True, text=True, timeout=300, cwd=REPO,
                               env=dict(os.environ, PYTHONPATH=str(REPO),
                                        CUDA_VISIBLE_DEVICES="-1"))
        assert check.returncode == 0, check.stderr[-2000:]
        report = ast.literal_eval(check.stdout.strip().splitlines()[-1])  # the dict it prints
        assert report["ok"] > 0 and report["failed"] == 0 and report["versions"] == [1]
        # The only version goes away: it unloads (state END), and the check fails.
        os.rename(models / "1", tmp_path / "gone")
        try:
            for _ in range(300):  # at most a minute
                gone = _healthcheck("alexnet", port)
                if gone.returncode:
                    break
                time.sleep(0.2)
            assert gone.returncode == 1
            assert "no version of model alexnet is AVAILABLE" in gone.stdout
            assert '"state": "END"' in gone.stdout
        finally:
            os.rename(tmp_path / "gone", models / "1")
    finally:
        server.terminate()


# TF Serving's own answers (http_rest_api_handler.cc prints status JSON indented).
_TF_SERVING_STATUS = """{{
 "model_version_status": [
  {{
   "version": "2",
   "state": "{new}",
   "status": {{
    "error_code": "{code}",
    "error_message": "{message}"
   }}
  }},
  {{
   "version": "1",
   "state": "{old}",
   "status": {{
    "error_code": "OK",
    "error_message": ""
   }}
  }}
 ]
}}
"""


class _Scripted(BaseHTTPRequestHandler):
    """Answers every GET with the server's (status, body, send_length)."""

    def do_GET(self):
        self.server.paths.append(self.path)
        self.server.hosts.append(self.headers["Host"])
        status, body, send_length = self.server.answer
        data = body.encode()
        self.protocol_version = "HTTP/1.1" if send_length else "HTTP/1.0"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if send_length:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _ScriptedV6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


@pytest.fixture(params=["127.0.0.1"])
def scripted(request):
    server = (_ScriptedV6 if ":" in request.param else ThreadingHTTPServer)(
        (request.param, 0), _Scripted)
    server.paths, server.hosts = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("send_length", [True, False])
@pytest.mark.parametrize("new, old, code, message, healthy, says", [
    ("AVAILABLE", "END", "OK", "", True, "version 2 is AVAILABLE"),
    ("LOADING", "AVAILABLE", "OK", "", True, "version 1 is AVAILABLE"),  # swap under way
    ("LOADING", "END", "OK", "", False, "no version of model alexnet is AVAILABLE"),
    ("END", "END", "UNAVAILABLE", "Servable not AVAILABLE: \\\"state\\\": \\\"AVAILABLE\\\"",
     False, "no version of model alexnet is AVAILABLE"),
])
def test_healthcheck_reads_tf_serving_status_answers(scripted, send_length, new, old, code,
                                                     message, healthy, says):
    body = _TF_SERVING_STATUS.format(new=new, old=old, code=code, message=message)
    scripted.answer = (200, body, send_length)
    result = _healthcheck("alexnet", str(scripted.server_address[1]))
    assert result.returncode == (0 if healthy else 1), result.stdout
    assert says in result.stdout
    assert scripted.paths == ["/v1/models/alexnet"]


def test_healthcheck_fails_on_an_error_answer(scripted):
    scripted.answer = (404, '{ "error": "Servable not found for request: Latest(alexnet)" }',
                       True)
    result = _healthcheck("alexnet", str(scripted.server_address[1]))
    assert result.returncode == 1
    assert result.stdout == ('unhealthy: GET /v1/models/alexnet answered 404: '
                             '{ "error": "Servable not found for request: Latest(alexnet)" }\n')


@pytest.mark.parametrize("args, env, problem", [
    (["bad name"], {}, "model name 'bad name'"),
    (["alexnet", "0"], {}, "port '0'"),
    (["alexnet", "http"], {}, "port 'http'"),
    (["alexnet", "8501", "a/b"], {}, "host 'a/b'"),
    (["alexnet", "8501"], {"HEALTHCHECK_TIMEOUT": "soon"}, "HEALTHCHECK_TIMEOUT 'soon'"),
])
def test_healthcheck_refuses_bad_arguments(args, env, problem):
    result = _healthcheck(*args, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {problem}")


def test_healthcheck_without_a_listener_is_unhealthy():
    port = str(free_port())
    result = _healthcheck("alexnet", port)
    assert (result.returncode, result.stdout) == (
        1, f"unhealthy: nothing listening on 127.0.0.1:{port} (starting, or not serving "
           "REST there)\n")


def test_a_prompt_answer_returns_without_waiting_for_the_watchdog(scripted):
    """The connect watchdog must not keep the check's output pipe open: a caller that
    captures it (Docker, a kubelet exec probe, this test) would otherwise wait the whole
    HEALTHCHECK_TIMEOUT for every healthy answer, past the probe's own timeout."""
    scripted.answer = (200, _TF_SERVING_STATUS.format(new="AVAILABLE", old="END", code="OK",
                                                      message=""), True)
    # Whether the watchdog has forked its sleep before it is killed is a race (a leaking
    # script hung in 1 of 5 to 2 of 3 runs by hand), so the check runs 20 times.
    for _ in range(20):
        result = subprocess.run(["bash", str(HEALTHCHECK), "alexnet",
                                 str(scripted.server_address[1])], capture_output=True,
                                text=True, timeout=15,
                                env=dict(os.environ, HEALTHCHECK_TIMEOUT="60"))
        assert result.returncode == 0, result.stdout


def _has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no IPv6 loopback (::1)")
@pytest.mark.parametrize("scripted", ["::1"], indirect=True)
def test_healthcheck_speaks_to_an_ipv6_address_with_a_bracketed_host(scripted):
    """An IPv6 literal needs brackets in the Host header (RFC 7230, 5.4): ``::1:8501``
    would be an address, not a host and port."""
    port = scripted.server_address[1]
    scripted.answer = (200, _TF_SERVING_STATUS.format(new="AVAILABLE", old="END", code="OK",
                                                      message=""), True)
    result = _healthcheck("alexnet", str(port), "::1")
    assert result.returncode == 0, result.stdout
    assert scripted.hosts == [f"[::1]:{port}"]


def test_healthcheck_gives_up_on_a_connection_that_never_completes():
    """A listener whose accept queue is full drops new SYNs, so bash's connect would wait
    for minutes of retransmissions (as for a host that drops them); the check reports
    unhealthy after HEALTHCHECK_TIMEOUT instead (the subprocess is given 30 s)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = []
    try:
        for _ in range(4):  # fill the accept queue; nothing ever accepts
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            queued.append(client)
        result = _healthcheck("alexnet", str(port), env={"HEALTHCHECK_TIMEOUT": "1"})
    finally:
        for client in queued:
            client.close()
        listener.close()
    assert (result.returncode, result.stdout) == (
        1, f"unhealthy: no connection to 127.0.0.1:{port} within 1 s\n")


def test_healthcheck_gives_up_on_a_server_that_never_answers():
    """A server that accepts the connection and then says nothing (hung, or a proxy
    waiting on it) is unhealthy after HEALTHCHECK_TIMEOUT, not when Docker's own timeout
    kills the check without a reason."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # the kernel completes the handshake; nothing ever answers
    port = listener.getsockname()[1]
    try:
        result = _healthcheck("alexnet", str(port), env={"HEALTHCHECK_TIMEOUT": "1"})
    finally:
        listener.close()
    assert (result.returncode, result.stdout) == (
        1, f"unhealthy: no HTTP answer from 127.0.0.1:{port}\n")
