"""Kubernetes manifests (docker/k8s), checked offline: every object of every overlay renders with
``kubectl kustomize`` and validates strictly against a pinned Kubernetes version
(``kubernetes-validate``), the KEDA objects against the schema written from KEDA's docs, and the names
the manifests share with the code agree with it (RQ queue key, Redis address, ports, health paths,
the metrics endpoint, env names against ``Settings``, grace period against the longest job).

Each cross-check returns a list of problems; the negative controls break one name and expect a
problem, so a wrong queue or env name in a manifest fails here."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import settings_from_env
from test_deploy import app_matcher, parse_motionguard, settings_fields

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "docker" / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.32.0"  # the oldest Kubernetes the manifests promise to run on
KEDA_SCHEMA = K8S / "schemas" / "keda-v1alpha1.schema.yaml"
KEDA_API = "keda.sh/v1alpha1"


def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (kubectl kustomize renders the overlays offline)")
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def docs(request) -> list[dict]:
    return render(request.param)


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


# --------------------------------------------------------------------------------- schemas


def kubernetes_errors(doc: dict) -> list[str]:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}"]
    return []


def keda_errors(doc: dict) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(yaml.safe_load(KEDA_SCHEMA.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_keda_schema_is_a_valid_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(yaml.safe_load(KEDA_SCHEMA.read_text()))


def test_every_object_validates_strictly(docs):
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"} <= kinds
    assert {"ScaledObject", "TriggerAuthentication"} <= kinds
    errors = []
    for doc in docs:
        errors += keda_errors(doc) if doc["apiVersion"] == KEDA_API else kubernetes_errors(doc)
    assert errors == []


def test_schema_checks_catch_mistakes(docs):
    """Negative controls: a misspelt field fails strict validation, for Kubernetes and KEDA objects."""
    api = copy.deepcopy(find(docs, "Deployment", "motionguard-api"))
    container(api)["readinessProbe"]["httpGett"] = container(api)["readinessProbe"].pop("httpGet")
    assert kubernetes_errors(api)
    scaled = copy.deepcopy(find(docs, "ScaledObject", "motionguard-worker"))
    scaled["spec"]["maxReplicas"] = scaled["spec"].pop("maxReplicaCount")
    assert keda_errors(scaled)
    scaled = copy.deepcopy(find(docs, "ScaledObject", "motionguard-worker"))
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 2  # KEDA metadata values are strings
    assert keda_errors(scaled)
    scaled["spec"]["triggers"][0]["metadata"] = {"listName": "rq:queue:motionguard", "listLenght": "2"}
    assert keda_errors(scaled)


# --------------------------------------------------------------------------------- cross-checks


def container_env(docs: list[dict], spec: dict) -> dict[str, str]:
    """What a container's process sees: envFrom ConfigMaps/Secrets, then env (with $(VAR) expanded)."""

    def source(kind: str, name: str) -> dict[str, str]:
        doc = find(docs, kind, name)
        return {**doc.get("data", {}), **doc.get("stringData", {})}

    env: dict[str, str] = {}
    for ref in spec.get("envFrom", []):
        if "configMapRef" in ref:
            env.update(source("ConfigMap", ref["configMapRef"]["name"]))
        if "secretRef" in ref:
            env.update(source("Secret", ref["secretRef"]["name"]))
    for item in spec.get("env", []):
        if "value" in item:
            value = item["value"]
            for name, known in env.items():
                value = value.replace(f"$({name})", known)
            assert "$(" not in value, f"{item['name']} refers to a variable not defined before it: {value}"
            env[item["name"]] = value
        else:
            ref = item["valueFrom"].get("secretKeyRef") or item["valueFrom"]["configMapKeyRef"]
            kind = "Secret" if "secretKeyRef" in item["valueFrom"] else "ConfigMap"
            values = source(kind, ref["name"])
            assert ref["key"] in values, f"{item['name']}: {kind} {ref['name']} has no key {ref['key']}"
            env[item["name"]] = values[ref["key"]]
    return env


def settings_of(docs: list[dict], deployment: str):
    env = container_env(docs, container(find(docs, "Deployment", deployment)))
    return settings_from_env({k: v for k, v in env.items() if k.startswith("MOTIONGUARD_")})


def env_name_problems(docs: list[dict]) -> list[str]:
    fields = settings_fields()
    names = set()
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            names |= set(doc["data"])
        if doc["kind"] == "Secret":
            names |= set(doc.get("stringData", {})) | set(doc.get("data", {}))
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for spec in doc["spec"]["template"]["spec"]["containers"]:
                names |= {item["name"] for item in spec.get("env", [])}
    names = {n for n in names if n.startswith("MOTIONGUARD_")}
    return [f"{n} is not a field of worker.settings.Settings" for n in sorted(names) if n[12:] not in fields]


def shipped(settings):
    """The settings with the image's /bundles read from the repository's models/bundles (what the
    images copy there), so the code can name the queues the pods would use."""
    bundles = ROOT / "models" / "bundles"

    def local(path) -> Path:
        return bundles / Path(path).relative_to("/bundles") if str(path).startswith("/bundles") else Path(path)

    return settings.model_copy(
        update={"bundle_dir": local(settings.bundle_dir), "model_repository": local(settings.model_repository)}
    )


def worker_deployments(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "Deployment" and container(d)["command"][:2] == ["motionguard", "worker"]]


def queue_problems(docs: list[dict]) -> list[str]:
    """Each model's worker Deployment has its ScaledObject, whose KEDA trigger watches the list RQ
    really pushes that model's jobs to, on the Redis the workers really use."""
    problems = []
    scaled_objects = [d for d in docs if d["kind"] == "ScaledObject"]
    targets = {s["spec"]["scaleTargetRef"]["name"] for s in scaled_objects}
    for worker in worker_deployments(docs):
        if worker["metadata"]["name"] not in targets:
            problems.append(f"worker Deployment {worker['metadata']['name']} has no ScaledObject")
    for scaled in scaled_objects:
        problems += scaled_object_problems(docs, scaled)
    return problems


def scaled_object_problems(docs: list[dict], scaled: dict) -> list[str]:
    from worker.queueing import model_queue_key
    from worker.repository import Repository

    problems = []
    worker = find(docs, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    settings = settings_of(docs, worker["metadata"]["name"])
    local = shipped(settings)
    repository = Repository.scan(local)
    model = parse_motionguard(container(worker)["command"]).model
    name, _, version = (model or "").partition(":")
    try:
        entry = repository.resolve(name or None, version or None, served_only=False)
    except LookupError as exc:
        return [f"{worker['metadata']['name']}: --model {model} is no shipped bundle ({exc})"]
    queue_key = model_queue_key(local, entry.name)  # rq:queue:<MOTIONGUARD_QUEUE_NAME>[.<model>]
    trigger = next(t for t in scaled["spec"]["triggers"] if t["type"] == "redis")
    meta = trigger["metadata"]
    if meta["listName"] != queue_key:
        problems.append(f"KEDA listName {meta['listName']!r} is not the RQ queue key {queue_key!r}")
    redis = urlsplit(settings.redis_url)
    db = int(redis.path.strip("/") or 0)
    if int(meta.get("databaseIndex", "0")) != db:
        problems.append(f"KEDA databaseIndex {meta.get('databaseIndex')} != the workers' Redis db {db}")
    service = find(docs, "Service", redis.hostname)
    namespace = service["metadata"]["namespace"]
    port = service["spec"]["ports"][0]["port"]
    if meta["address"] != f"{redis.hostname}.{namespace}.svc:{port}" or (redis.port or 6379) != port:
        problems.append(
            f"KEDA address {meta['address']} or Redis URL {redis.hostname}:{redis.port} miss Service {redis.hostname}"
        )
    if container(worker)["command"][:2] != ["motionguard", "worker"]:
        problems.append("the ScaledObject does not scale the worker Deployment")
    auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    redis_password = container_env(docs, container(worker)).get("REDIS_PASSWORD")
    for ref in auth["spec"]["secretTargetRef"]:
        secret = find(docs, "Secret", ref["name"])["stringData"]
        if ref["parameter"] == "password" and secret.get(ref["key"]) != redis_password:
            problems.append("KEDA authenticates with another password than the workers'")
    if settings_of(docs, "motionguard-api").queue_name != settings.queue_name:
        problems.append("API and workers use different queues")
    return problems


def test_env_names_are_settings_fields(docs):
    assert env_name_problems(docs) == []


def test_queue_and_redis_names_agree_with_the_code(docs):
    assert queue_problems(docs) == []


def test_wrong_queue_or_env_name_fails(docs):
    """Negative controls for the two cross-checks above."""
    broken = copy.deepcopy(docs)
    find(broken, "ScaledObject", "motionguard-worker")["spec"]["triggers"][0]["metadata"]["listName"] = "motionguard"
    assert any("listName" in p for p in queue_problems(broken))
    broken = copy.deepcopy(docs)  # a second model's worker Deployment without its own autoscaler
    second = copy.deepcopy(find(docs, "Deployment", "motionguard-worker"))
    second["metadata"]["name"] = "motionguard-worker-other"
    assert any("has no ScaledObject" in p for p in queue_problems([*broken, second]))
    scaled = copy.deepcopy(find(docs, "ScaledObject", "motionguard-worker"))  # ... or one on another queue
    scaled["metadata"]["name"] = scaled["spec"]["scaleTargetRef"]["name"] = "motionguard-worker-other"
    scaled["spec"]["triggers"][0]["metadata"]["listName"] = "rq:queue:motionguard.other"
    assert any("listName" in p for p in queue_problems([*broken, second, scaled]))
    container(second)["command"] += ["--model", "no-such-model"]  # ... or a model no image ships
    assert any("no shipped bundle" in p for p in queue_problems([*broken, second, scaled]))
    broken = copy.deepcopy(docs)
    find(broken, "ConfigMap", "motionguard-config")["data"]["MOTIONGUARD_QUEUE_NAME"] = "jobs"
    assert any("listName" in p for p in queue_problems(broken))
    broken = copy.deepcopy(docs)
    find(broken, "ScaledObject", "motionguard-worker")["spec"]["triggers"][0]["metadata"]["databaseIndex"] = "1"
    assert any("databaseIndex" in p for p in queue_problems(broken))
    broken = copy.deepcopy(docs)
    data = find(broken, "ConfigMap", "motionguard-config")["data"]
    data["MOTIONGUARD_QUEUE"] = data.pop("MOTIONGUARD_QUEUE_NAME")
    assert env_name_problems(broken) == ["MOTIONGUARD_QUEUE is not a field of worker.settings.Settings"]


def test_api_deployment(docs):
    matches = app_matcher()
    api = find(docs, "Deployment", "motionguard-api")
    spec = container(api)
    args = parse_motionguard(spec["command"])
    assert args.command == "serve" and args.workers == 0
    port = next(p for p in spec["ports"] if p["name"] == "http")["containerPort"]
    assert args.port == port and args.host == "0.0.0.0"
    assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert matches(spec[probe]["httpGet"]["path"]) and spec[probe]["httpGet"]["port"] == "http"
    assert api["spec"]["replicas"] >= 2
    assert spec["resources"]["requests"] and spec["resources"]["limits"]["memory"]
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics" and matches(annotations["prometheus.io/path"])
    # Without a Redis URL `motionguard serve` starts an embedded Redis per pod: replicas would not share jobs.
    settings = settings_of(docs, "motionguard-api")
    assert settings.redis_url and urlsplit(settings.redis_url).hostname == "motionguard-redis"
    assert settings.api_keys, "the API has no keys: anyone reaching the Service could submit jobs"
    service = find(docs, "Service", "motionguard-api")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    pdb = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    assert 1 <= pdb["spec"]["minAvailable"] < api["spec"]["replicas"]


def test_worker_deployment_and_grace_period(docs):
    for worker in worker_deployments(docs):
        check_worker_deployment(docs, worker)


def check_worker_deployment(docs: list[dict], worker: dict) -> None:
    name = worker["metadata"]["name"]
    spec = container(worker)
    args = parse_motionguard(spec["command"])
    settings = settings_of(docs, name)
    assert args.command == "worker" and args.device == settings.device
    gpu = spec["image"].startswith("motionguard-worker-cuda")
    assert (args.device == "cuda") == gpu
    assert (spec["resources"].get("limits", {}).get("nvidia.com/gpu") == 1) == gpu
    # Warm shutdown on scale-down: the longest job the API may enqueue must fit in the grace period.
    # The API computes the timeout, so it is the API's settings that bound the worker's job.
    api_settings = settings_of(docs, "motionguard-api")
    longest = api_settings.job_timeout(api_settings.max_clips, api_settings.max_steps)
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert longest + 30 <= grace <= longest + 600, (longest, grace)
    probe = spec["livenessProbe"]["exec"]["command"]
    assert (
        probe == ["python", "/app/docker/worker_healthcheck.py"] and (ROOT / "docker/worker_healthcheck.py").is_file()
    )
    # No shared disk between pods: blobs and uploads travel through Redis.
    assert settings.blob_store == "redis" and api_settings.blob_store == "redis"
    volumes = worker["spec"]["template"]["spec"]["volumes"]
    assert all("emptyDir" in v for v in volumes)


def test_one_worker_deployment_per_model(docs):
    """Each worker Deployment selects only its own model's pods (label = --model), so two models'
    Deployments never adopt each other's pods, and no model has two."""
    models = []
    for worker in worker_deployments(docs):
        model = (parse_motionguard(container(worker)["command"]).model or "").partition(":")[0]
        selector = worker["spec"]["selector"]["matchLabels"]
        assert selector.get("motionguard.io/model") == model, worker["metadata"]["name"]
        assert selector.items() <= worker["spec"]["template"]["metadata"]["labels"].items()
        models.append(model)
    assert len(models) == len(set(models)) >= 1


def test_redis_keeps_its_data(docs):
    redis = find(docs, "StatefulSet", "motionguard-redis")
    spec = container(redis)
    command = " ".join(spec["command"] + spec["args"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--dir /data", "--maxmemory-policy noeviction"):
        assert flag in command
    claim = redis["spec"]["volumeClaimTemplates"][0]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in spec["volumeMounts"]
    assert redis["spec"]["replicas"] == 1


def test_only_the_service_reaches_redis(docs):
    """Every pod that is given the Redis URL is let through the NetworkPolicy, and nothing else is."""
    policy = find(docs, "NetworkPolicy", "motionguard-redis")["spec"]
    redis = find(docs, "StatefulSet", "motionguard-redis")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= redis.items() and policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    allowed = next(p["podSelector"]["matchExpressions"][0] for p in rule["from"] if "podSelector" in p)
    assert allowed["key"] == "app.kubernetes.io/name" and allowed["operator"] == "In"
    clients = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
        for d in docs
        if d["kind"] == "Deployment" and "MOTIONGUARD_REDIS_URL" in container_env(docs, container(d))
    }
    assert clients == set(allowed["values"]) == {"motionguard-api", "motionguard-worker"}
    assert rule["ports"] == [{"port": "redis"}]


def test_worker_threads_fit_its_cpu_request(docs):
    spec = container(find(docs, "Deployment", "motionguard-worker"))
    assert settings_of(docs, "motionguard-worker").torch_threads == int(spec["resources"]["requests"]["cpu"])


def test_scaled_object_bounds(docs):
    for scaled in (d["spec"] for d in docs if d["kind"] == "ScaledObject"):
        check_scaled_object_bounds(scaled)


def check_scaled_object_bounds(scaled: dict) -> None:
    assert 1 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    trigger = scaled["triggers"][0]["metadata"]
    assert int(trigger["listLength"]) >= 1 and "activationListLength" in trigger
    down = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= scaled["pollingInterval"]


def test_autoscale_bench_defaults_are_the_manifest():
    """`motionguard bench autoscale` simulates, by default, the rule the base (cpu) overlay deploys."""
    from service.bench.autoscale_sim import KedaRule

    scaled = find(render("cpu"), "ScaledObject", "motionguard-worker")["spec"]
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    (up,), (down,) = behavior["scaleUp"]["policies"], behavior["scaleDown"]["policies"]
    rule = KedaRule()
    assert rule.list_length == int(scaled["triggers"][0]["metadata"]["listLength"])
    assert (rule.min_replicas, rule.max_replicas) == (scaled["minReplicaCount"], scaled["maxReplicaCount"])
    assert rule.polling_s == scaled["pollingInterval"]
    assert (rule.scale_up_pods, rule.scale_up_period_s) == (up["value"], up["periodSeconds"]) and up["type"] == "Pods"
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert rule.scale_down_window_s == behavior["scaleDown"]["stabilizationWindowSeconds"]
    assert (rule.scale_down_pods, rule.scale_down_period_s) == (down["value"], down["periodSeconds"])
