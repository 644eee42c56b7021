"""deploy/: the kustomize overlays render and validate offline, the dashboard, alerts and
prometheus-adapter rules use only metrics that exist, and the container recipes say what
they must.

* Every overlay is rendered with `kubectl kustomize` (kubectl must be on PATH; without it
  these tests fail, they do not skip: an unrendered overlay is an untested one).
* Core objects are validated with kubernetes-validate (its Python API, strict schemas, the
  newest Kubernetes version it ships). The Prometheus Operator kinds (ServiceMonitor,
  PodMonitor, PrometheusRule) are CRDs that kubernetes-validate has no schema for: they are
  validated against the small JSON schemas below, which cover exactly the fields deploy/
  uses and refuse any other field (so a typo is caught, not ignored).
* Metric names are pulled out of every PromQL expression (dashboard targets and variables,
  PrometheusRule expressions, adapter seriesQuery/metricsQuery) by a small tokenizer and
  must be one the gateway exports (services/gateway/metrics.py EXPORTED_METRIC_NAMES), a
  documented Triton 2.51 metric (TRITON_METRICS below), or a recording rule defined in the
  PrometheusRule.
"""
from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.gateway.metrics import EXPORTED_METRIC_NAMES

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
OVERLAYS = ("cpu", "gpu")
NAMESPACE = "faceedit"

# Triton 2.51 metrics as documented (docs/user_guide/metrics.md of the 24.10 release). The
# summaries (nv_inference_request_summary_us ...) need --metrics-config
# summary_latencies=true, which deploy/ does not set, so they are not allowed here.
TRITON_METRICS = frozenset({
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "nv_inference_pending_request_count",
    "nv_gpu_utilization",
    "nv_gpu_memory_total_bytes",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_power_usage",
    "nv_cpu_utilization",
    "nv_cpu_memory_total_bytes",
    "nv_cpu_memory_used_bytes",
})
GATEWAY_METRICS = frozenset(EXPORTED_METRIC_NAMES)


# ---------------------------------------------------------------------------------------
# rendering


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not on PATH: it is needed to render deploy/k8s overlays "
                    "(`kubectl kustomize`); install kubectl >= 1.27 and rerun")
    return path


@functools.lru_cache(maxsize=None)
def _render(overlay: str) -> tuple[str, ...]:
    result = subprocess.run([kubectl(), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize overlays/{overlay} failed:\n{result.stderr}")
    # kept as text: every caller parses its own copy, so a test may mutate what it gets
    return tuple(d for d in result.stdout.split("\n---\n") if d.strip())


def render(overlay: str) -> list[dict]:
    return [yaml.safe_load(d) for d in _render(overlay)]


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict], kind: str, name: str) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def container(deployment: dict, name: str) -> dict:
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"deployment {deployment['metadata']['name']} has no container {name}")


def selects(selector: dict, labels: dict) -> bool:
    """matchLabels semantics (deploy/ uses no matchExpressions; refuse them, not ignore)."""
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    wanted = selector.get("matchLabels", {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def adapter_config(objs: list[dict]) -> dict:
    cm = one(objs, "ConfigMap", "faceedit-prometheus-adapter")
    return yaml.safe_load(cm["data"]["config.yaml"])


# ---------------------------------------------------------------------------------------
# schema validation


# JSON schemas of the Prometheus Operator CRDs (monitoring.coreos.com/v1), reduced to the
# fields deploy/ uses; additionalProperties: false everywhere, so an unknown or misspelt
# field fails here instead of being silently dropped by the API server's pruning.
_METADATA = {
    "type": "object", "required": ["name", "namespace"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                   "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                   "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
    "additionalProperties": False,
}
_DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
_LABEL_SELECTOR = {
    "type": "object", "required": ["matchLabels"],
    "properties": {"matchLabels": {"type": "object", "minProperties": 1,
                                   "additionalProperties": {"type": "string"}}},
    "additionalProperties": False,
}
_NAMESPACE_SELECTOR = {
    "type": "object",
    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                   "any": {"type": "boolean"}},
    "additionalProperties": False,
}
_SCRAPE_ENDPOINT = {
    "type": "object", "required": ["port"],
    "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                   "interval": _DURATION, "scrapeTimeout": _DURATION,
                   "scheme": {"enum": ["http", "https"]}},
    "additionalProperties": False,
}


def _crd(kind: str, spec: dict) -> dict:
    return {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                       "metadata": _METADATA, "spec": spec},
        "additionalProperties": False,
    }


CRD_SCHEMAS = {
    "ServiceMonitor": _crd("ServiceMonitor", {
        "type": "object", "required": ["selector", "endpoints"],
        "properties": {"selector": _LABEL_SELECTOR, "namespaceSelector": _NAMESPACE_SELECTOR,
                       "jobLabel": {"type": "string"},
                       "endpoints": {"type": "array", "minItems": 1, "items": _SCRAPE_ENDPOINT}},
        "additionalProperties": False,
    }),
    "PodMonitor": _crd("PodMonitor", {
        "type": "object", "required": ["selector", "podMetricsEndpoints"],
        "properties": {"selector": _LABEL_SELECTOR, "namespaceSelector": _NAMESPACE_SELECTOR,
                       "jobLabel": {"type": "string"},
                       "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _SCRAPE_ENDPOINT}},
        "additionalProperties": False,
    }),
    "PrometheusRule": _crd("PrometheusRule", {
        "type": "object", "required": ["groups"],
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "rules"],
            "properties": {"name": {"type": "string"}, "interval": _DURATION,
                           "rules": {"type": "array", "minItems": 1, "items": {
                               "type": "object", "required": ["expr"],
                               "properties": {
                                   "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                                   "alert": {"type": "string", "pattern": r"^[A-Za-z][A-Za-z0-9]*$"},
                                   "expr": {"type": "string", "minLength": 1},
                                   "for": _DURATION,
                                   "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                   "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
                               "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                               "additionalProperties": False}}},
            "additionalProperties": False}}},
        "additionalProperties": False,
    }),
}

K8S_VERSION = kubernetes_validate.latest_version()


def validate(obj: dict) -> None:
    """Raise (with the object and the path) when `obj` does not match its schema."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind in CRD_SCHEMAS:
        try:
            jsonschema.validate(obj, CRD_SCHEMAS[kind])
        except jsonschema.ValidationError as exc:
            raise AssertionError(f"{kind}/{name}: {'.'.join(map(str, exc.path))}: {exc.message}") from None
        return
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{kind}/{name} (Kubernetes {exc.version}): "
                             f"{'.'.join(map(str, exc.path))}: {exc.message}") from None
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise AssertionError(f"{kind}/{name}: {exc.message} -- add a schema for it here") from None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_validate(overlay):
    objs = render(overlay)
    for obj in objs:
        validate(obj)
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor", "PodMonitor",
            "PrometheusRule"} <= kinds, f"overlay {overlay} lacks {sorted(kinds)}"


def test_validation_catches_mistakes():
    """The validators are strict: a misspelt field, a wrong type, an unknown CRD field fail."""
    objs = render("gpu")
    deployment = one(objs, "Deployment", "gateway")
    deployment["spec"]["replica"] = 3                       # misspelt field
    with pytest.raises(AssertionError, match="replica"):
        validate(deployment)
    hpa = one(objs, "HorizontalPodAutoscaler", "triton")
    hpa["spec"]["minReplicas"] = "two"                      # wrong type
    with pytest.raises(AssertionError, match="minReplicas"):
        validate(hpa)
    monitor = one(objs, "ServiceMonitor", "gateway")
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"    # misspelt CRD field
    with pytest.raises(AssertionError, match="intervall"):
        validate(monitor)
    rule = one(objs, "PrometheusRule", "faceedit")
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    with pytest.raises(AssertionError):
        validate(rule)


# ---------------------------------------------------------------------------------------
# how the objects fit together


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespaces(overlay):
    objs = render(overlay)
    assert one(objs, "Namespace", NAMESPACE)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objs:
        if obj["kind"] == "Namespace":
            continue
        ns = obj["metadata"].get("namespace")
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "faceedit-prometheus-adapter":
            assert ns == "monitoring", "the adapter reads its rules ConfigMap from its own namespace"
        else:
            assert ns == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']} is in namespace {ns!r}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_pdbs_and_monitors_select_pods(overlay):
    objs = render(overlay)
    deployments = find(objs, "Deployment")
    for svc in find(objs, "Service"):
        targets = [d for d in deployments if selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(d))]
        assert len(targets) == 1, f"Service {svc['metadata']['name']} selects {len(targets)} deployments"
        ports = {p["name"] for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {svc['metadata']['name']} port {port}"
    for pdb in find(objs, "PodDisruptionBudget"):
        assert sum(selects(pdb["spec"]["selector"], pod_labels(d)) for d in deployments) == 1, pdb["metadata"]["name"]

    sm = one(objs, "ServiceMonitor", "gateway")
    svcs = [s for s in find(objs, "Service") if selects(sm["spec"]["selector"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in svcs] == ["gateway"]
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svcs[0]["spec"]["ports"]}

    pm = one(objs, "PodMonitor", "triton")
    pods = [d for d in deployments if selects(pm["spec"]["selector"], pod_labels(d))]
    assert [d["metadata"]["name"] for d in pods] == ["triton"]
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= {p["name"] for p in container(pods[0], "triton")["ports"]}
    # the Prometheus of kube-prometheus-stack selects by this label (deploy/README.md)
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        for obj in find(objs, kind):
            assert obj["metadata"]["labels"].get("release") == "kube-prometheus-stack", obj["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_pod(overlay):
    objs = render(overlay)
    gw = one(objs, "Deployment", "gateway")
    c = container(gw, "gateway")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9090}
    # readiness on the native gRPC health check of the gRPC port
    assert c["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    assert "service" not in c["readinessProbe"]["grpc"], "the overall status (\"\") is the readiness signal"
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["tcpSocket"]["port"] == "grpc", f"{probe} must not depend on the backend"

    # every $(VAR) in the args is defined by the settings ConfigMap (the kubelet would pass
    # an undefined one through literally), and that ConfigMap is in the overlay
    (ref,) = c["envFrom"]
    settings = one(objs, "ConfigMap", ref["configMapRef"]["name"])["data"]
    used = {m for a in c["args"] for m in re.findall(r"\$\(([A-Z_]+)\)", a)}
    assert used and used <= set(settings), f"undefined: {sorted(used - set(settings))}"
    assert settings["FACEEDIT_BACKEND"] == "triton"
    triton_svc = one(objs, "Service", "triton")
    grpc_port = next(p["port"] for p in triton_svc["spec"]["ports"] if p["name"] == "grpc")
    assert settings["FACEEDIT_TRITON_URL"] == f"triton.{NAMESPACE}.svc.cluster.local:{grpc_port}"
    # the drain fits in the termination grace period, after the preStop sleep
    grace = float(next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--grace=")))
    sleep = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert sleep + grace < gw["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def test_gateway_flags_exist():
    """Every flag the Deployment passes is one `faceedit serve` defines."""
    import argparse

    from services.gateway import serve

    parser = argparse.ArgumentParser()
    parser.add_argument("--log-level")  # added to every verb by faceedit.cli
    serve.add_arguments(parser)
    known = {opt for action in parser._actions for opt in action.option_strings}
    c = container(one(render("gpu"), "Deployment", "gateway"), "gateway")
    assert c["args"][0] == "serve"
    passed = {a.split("=", 1)[0] for a in c["args"][1:]}
    assert passed <= known, f"unknown flags {sorted(passed - known)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_pod(overlay):
    objs = render(overlay)
    tr = one(objs, "Deployment", "triton")
    spec = tr["spec"]["template"]["spec"]
    c = container(tr, "triton")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    args = c["args"]
    assert args[0] == "tritonserver"
    for flag, port in (("--http-port", 8000), ("--grpc-port", 8001), ("--metrics-port", 8002)):
        assert f"{flag}={port}" in args
    assert "--model-repository=/models" in args and "--strict-readiness=true" in args
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_gpu_overlay_runs_on_gpus_with_engine_cache():
    objs = render("gpu")
    tr = one(objs, "Deployment", "triton")
    spec = tr["spec"]["template"]["spec"]
    c = container(tr, "triton")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    assert c["image"].startswith("faceedit/triton-worker:"), "production serves refine: the torch image"
    # the engine cache the exporter's configs point at (/engine-cache) is a shared PVC
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/engine-cache")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    pvc = one(objs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every Triton replica mounts the cache"
    from exporters.repository import ENGINE_CACHE_ROOT
    assert mount["mountPath"] == ENGINE_CACHE_ROOT
    # a cold TensorRT engine build gets 30 minutes before liveness may kill it, and the
    # rollout is not declared failed before that
    startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert startup >= 30 * 60
    assert tr["spec"]["progressDeadlineSeconds"] > startup


def test_cpu_overlay_has_no_gpu():
    objs = render("cpu")
    text = "\n".join(_render("cpu"))
    assert "nvidia.com/gpu" not in text
    assert not find(objs, "PersistentVolumeClaim")
    tr = one(objs, "Deployment", "triton")
    assert container(tr, "triton")["image"].startswith("faceedit/triton:")
    for d in find(objs, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            assert "cpu" not in c["resources"].get("limits", {}), "no CPU limits (throttling = tail latency)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_restricted_pod_security(overlay):
    """The namespace enforces the `restricted` Pod Security Standard: pods that break it
    would be refused at admission, so check its rules here."""
    for d in find(render(overlay), "Deployment"):
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "add" not in sc["capabilities"]
        for v in spec["volumes"]:
            assert set(v) - {"name"} <= {"emptyDir", "persistentVolumeClaim", "configMap", "secret"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_reachable_only_from_gateway_and_prometheus(overlay):
    objs = render(overlay)
    (policy,) = find(objs, "NetworkPolicy")
    tr, gw = one(objs, "Deployment", "triton"), one(objs, "Deployment", "gateway")
    assert selects(policy["spec"]["podSelector"], pod_labels(tr))
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    triton_ports = {p["name"] for p in container(tr, "triton")["ports"]}
    gateway_rule, prometheus_rule = policy["spec"]["ingress"]
    (peer,) = gateway_rule["from"]
    assert set(peer) == {"podSelector"} and selects(peer["podSelector"], pod_labels(gw))
    assert {p["port"] for p in gateway_rule["ports"]} == {"grpc", "http"}
    (peer,) = prometheus_rule["from"]
    assert set(peer) == {"namespaceSelector", "podSelector"}
    assert [p["port"] for p in prometheus_rule["ports"]] == ["metrics"]
    for rule in policy["spec"]["ingress"]:
        assert {p["port"] for p in rule["ports"]} <= triton_ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpas_scale_on_metrics_the_adapter_serves(overlay):
    objs = render(overlay)
    rules = adapter_config(objs)["rules"]
    served = {r["name"]["as"] for r in rules}
    for r in rules:
        assert r["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    hpas = {h["metadata"]["name"]: h for h in find(objs, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"gateway", "triton"}
    for name, hpa in hpas.items():
        spec = hpa["spec"]
        target = spec["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)
        one(objs, "Deployment", name)
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
        for metric in spec["metrics"]:
            if metric["type"] == "Pods":
                assert metric["pods"]["metric"]["name"] in served
    custom = {name: [m["pods"]["metric"]["name"] for m in h["spec"]["metrics"] if m["type"] == "Pods"]
              for name, h in hpas.items()}
    assert custom == {"gateway": ["faceedit_inflight_requests"], "triton": ["triton_queue_ms_per_request"]}
    # the in-flight target leaves headroom below the per-replica concurrency limit
    gw = container(one(objs, "Deployment", "gateway"), "gateway")
    settings = one(objs, "ConfigMap", gw["envFrom"][0]["configMapRef"]["name"])["data"]
    inflight = next(m for m in hpas["gateway"]["spec"]["metrics"] if m["type"] == "Pods")
    assert float(inflight["pods"]["target"]["averageValue"]) < int(settings["FACEEDIT_MAX_CONCURRENCY"])


# ---------------------------------------------------------------------------------------
# PromQL: metric names


# aggregation operators, keywords and literals that look like identifiers
PROMQL_WORDS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio", "by", "without", "on", "ignoring", "group_left",
    "group_right", "bool", "and", "or", "unless", "offset", "atan2", "inf", "nan",
})


def promql_metric_names(expr: str) -> set[str]:
    """Metric names used by a PromQL expression: identifiers that are not functions (followed
    by `(`), aggregation operators, keywords, label names (inside {...}, by/without/on/
    ignoring/group_left/group_right (...)), label values (strings) or durations ([...])."""
    names = set()
    if re.search(r"__name__\s*=~", expr):
        raise ValueError(f"a regex on __name__ cannot be checked: {expr!r}")
    names |= set(re.findall(r"__name__\s*=\s*\"([^\"]*)\"", expr))
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)   # strings
    text = re.sub(r"#[^\n]*", " ", text)                                                # comments
    text = re.sub(r"\{[^{}]*\}", " ", text)                                             # matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)                                           # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", r" \1 ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)                                            # Grafana vars
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_promql_metric_names_parser():
    f = promql_metric_names
    assert f('sum by (le, method) (rate(faceedit_x_bucket{code!="OK", le="2.5"}[5m]))') == {"faceedit_x_bucket"}
    assert f("histogram_quantile(0.95, sum by (le) (rate(a_bucket[$__rate_interval])))") == {"a_bucket"}
    assert f("a / ignoring (code) group_left b > 1e-3 and on (pod) c offset 5m") == {"a", "b", "c"}
    assert f("x:y:ratio_rate5m > (14.4 * 0.01) or absent(up{job=\"t\"})") == {"x:y:ratio_rate5m", "up"}
    assert f('{__name__="nv_gpu_utilization", pod!=""}') == {"nv_gpu_utilization"}
    assert f("count by (namespace, pod) (m) < on (namespace) group_left max by (namespace) (n)") == {"m", "n"}
    assert f("sum(rate(m[5m])) / clamp_min(sum(rate(n[5m])), 0.001) / 1000 > Inf") == {"m", "n"}
    with pytest.raises(ValueError):
        f('{__name__=~"nv_.*"}')


def adapter_expressions(config: dict) -> list[str]:
    """seriesQuery and metricsQuery of every rule, the adapter's Go templates filled in the
    way the adapter fills them."""
    exprs = []
    for rule in config["rules"]:
        series = rule["seriesQuery"]
        (series_name,) = promql_metric_names(series)
        exprs.append(series)
        exprs.append(rule["metricsQuery"]
                     .replace("<<.Series>>", series_name)
                     .replace("<<.LabelMatchers>>", 'namespace="faceedit",pod=~"p1|p2"')
                     .replace("<<.GroupBy>>", "pod"))
    return exprs


def dashboard_expressions(dashboard: dict) -> list[str]:
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
            assert m, f"variable {var['name']}: only label_values(METRIC, LABEL) queries are used"
            exprs.append(m.group(1))
    return exprs


def load_dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "faceedit.json").read_text())


def rule_expressions(objs: list[dict]) -> tuple[list[str], set[str]]:
    exprs, records = [], set()
    for pr in find(objs, "PrometheusRule"):
        for group in pr["spec"]["groups"]:
            for rule in group["rules"]:
                exprs.append(rule["expr"])
                if "record" in rule:
                    records.add(rule["record"])
    return exprs, records


def unknown_metrics(exprs: list[str], records: set[str]) -> dict[str, set[str]]:
    allowed = GATEWAY_METRICS | TRITON_METRICS | records
    bad = {}
    for e in exprs:
        names = promql_metric_names(e)
        assert names, f"no metric in {e!r}"
        if names - allowed:
            bad[e] = names - allowed
    return bad


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_metric_used_exists(overlay):
    objs = render(overlay)
    rules, records = rule_expressions(objs)
    sources = {"alerts": rules, "adapter": adapter_expressions(adapter_config(objs)),
               "dashboard": dashboard_expressions(load_dashboard())}
    for source, exprs in sources.items():
        assert exprs, source
        assert unknown_metrics(exprs, records) == {}, f"{source} uses metrics that are not exported"
    # and the check can fail: a misspelt gateway metric, an invented Triton one
    assert unknown_metrics(["rate(faceedit_request_totl[5m])", "nv_inference_queue_us"], records)


def test_dashboard_covers_what_operators_need():
    dash = load_dashboard()
    used = set().union(*(promql_metric_names(e) for e in dashboard_expressions(dash)))
    for metric in ("faceedit_requests_total", "faceedit_request_latency_seconds_bucket",
                   "faceedit_stage_latency_seconds_bucket", "faceedit_inflight_requests",
                   "faceedit_inversion_cache_hits_total", "faceedit_inversion_cache_misses_total",
                   "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
                   "nv_inference_count", "nv_inference_exec_count", "nv_gpu_utilization",
                   "nv_gpu_memory_used_bytes"):
        assert metric in used, metric
    exprs = dashboard_expressions(dash)
    for q in ("0.5", "0.95", "0.99"):
        for by in ("method", "stage"):
            assert any(f"histogram_quantile({q}, sum by (le, {by})" in e for e in exprs), (q, by)
    assert any("sum by (method, code)" in e for e in exprs)


def test_dashboard_structure():
    dash = load_dashboard()
    (ds_var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${" + ds_var["name"] + "}"}
    ids, cells = set(), set()
    for p in dash["panels"]:
        assert p["id"] not in ids, f"duplicate panel id {p['id']}"
        ids.add(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"] == ref and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ref and t["expr"].count("(") == t["expr"].count(")"), p["title"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_alerts(overlay):
    objs = render(overlay)
    alerts = {}
    for group in one(objs, "PrometheusRule", "faceedit")["spec"]["groups"]:
        for rule in group["rules"]:
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule
            if "alert" in rule:
                alerts[rule["alert"]] = rule
                assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
                assert rule["annotations"]["summary"] and rule["annotations"]["runbook"], rule["alert"]
            else:  # recording rules follow level:metric:operations
                assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]
    for required in ("FaceeditLatencySLOBurnFast", "FaceeditLatencySLOBurnSlow", "FaceeditServerErrorRatioHigh",
                     "FaceeditGatewayBackendNotReady", "TritonNotReady"):
        assert required in alerts, required
    # multi-window: the fast burn alert looks at a long and a short window in each branch
    fast = alerts["FaceeditLatencySLOBurnFast"]["expr"]
    assert all(w in fast for w in ("ratio_rate1h", "ratio_rate5m", "ratio_rate6h", "ratio_rate30m"))
    assert "by (namespace, method, code)" in alerts["FaceeditServerErrorRatioHigh"]["expr"]
    # every alert is explained in the operations guide
    readme = (DEPLOY / "README.md").read_text()
    for name in alerts:
        assert f"`{name}`" in readme, f"deploy/README.md does not explain {name}"


def test_slo_threshold_is_a_bucket_boundary():
    from services.gateway.metrics import LATENCY_BUCKETS

    text = (DEPLOY / "k8s" / "base" / "prometheus-rules.yaml").read_text()
    thresholds = set(re.findall(r'le="([0-9.]+)"', text))
    assert thresholds and {float(t) for t in thresholds} <= set(LATENCY_BUCKETS)


# ---------------------------------------------------------------------------------------
# container recipes (Docker cannot run here: check what can be checked by reading)


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuations joined,
    heredoc bodies kept with their RUN."""
    lines = (DEPLOY / "docker" / name).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1]
            while i < len(lines) and lines[i].strip().startswith("#"):
                i += 1
            line += " " + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<-?'?(\w+)'?", line)
        if heredoc:
            body = []
            while lines[i].strip() != heredoc.group(1):
                body.append(lines[i])
                i += 1
            i += 1
            line += "\n" + "\n".join(body)
        instr, _, rest = line.partition(" ")
        out.append((instr.upper(), rest.strip()))
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    start = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[start:]


def test_gateway_image():
    ins = dockerfile("gateway.Dockerfile")
    froms = [a.split()[0] for i, a in ins if i == "FROM"]
    assert froms and all(f == "python:3.11-slim" for f in froms)
    runs = [a for i, a in ins if i == "RUN"]
    assert any("python -m faceedit.protos" in r for r in runs), "stubs are generated at build time"
    for r in runs:
        for cmd in re.split(r"&&|;|\n", r):
            if "pip install" in cmd:
                assert "torch" not in cmd and "[" not in cmd, f"the gateway image installs extras: {cmd!r}"
    user = [a for i, a in final_stage(ins) if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    # run the requirements script of the image on our pyproject: no torch, no Triton server
    # (tomllib: Python >= 3.11, like the image)
    (script,) = [r.split("\n", 1)[1] for r in runs if "tomllib" in r]
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    requirements = [re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower() for r in result.stdout.split()]
    assert "tritonclient" in requirements and "onnxruntime" in requirements and "dlib-bin" in requirements
    assert not {"torch", "onnx", "onnxscript", "nvidia-pytriton", "scipy"} & set(requirements), requirements
    # the ports the Deployment uses are the ones the image exposes
    (expose,) = [a for i, a in ins if i == "EXPOSE"]
    assert set(expose.split()) == {"50051", "9090"}


@pytest.mark.parametrize("name", ["triton.Dockerfile", "worker.Dockerfile"])
def test_triton_images(name):
    ins = dockerfile(name)
    froms = [a.split()[0] for i, a in ins if i == "FROM"]
    # Triton 2.51 is the NGC 24.10 release
    assert froms == ["nvcr.io/nvidia/tritonserver:24.10-py3"]
    user = [a for i, a in ins if i == "USER"]
    assert user and user[-1] == "1000:1000", "triton-server (uid 1000) of the NGC image"
    copies = [a for i, a in ins if i == "COPY"]
    assert any(c.endswith(" /models/") for c in copies), "the repository is baked in at /models"
    runs = " ".join(a for i, a in ins if i == "RUN")
    if name == "worker.Dockerfile":
        assert 'pip install --no-cache-dir ".[torch]"' in runs
    else:
        assert "torch" not in runs and "onnxruntime" in runs
    (expose,) = [a for i, a in ins if i == "EXPOSE"]
    assert set(expose.split()) == {"8000", "8001", "8002"}


@pytest.mark.parametrize("name", ["gateway.Dockerfile", "triton.Dockerfile", "worker.Dockerfile"])
def test_dockerignore_sends_what_the_image_copies(name):
    """Each Dockerfile has its own allow-list ignore file (BuildKit reads
    NAME.dockerignore next to it): everything it COPYs from the context must be re-included."""
    ignore = (DEPLOY / "docker" / f"{name}.dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.strip().startswith("#")]
    assert patterns[0] == "**", "allow-list: ignore everything, then re-include"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    args = {}
    for instr, rest in dockerfile(name):
        if instr == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
        if instr == "COPY" and "--from" not in rest:
            *sources, _dest = rest.split()
            for src in sources:
                src = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], src).rstrip("/")
                top = src.split("/")[0]
                assert top in included or src in included, f"{name} copies {src}, which {name}.dockerignore excludes"
    assert ".venv" not in included and ".git" not in included


def test_kubernetes_images_are_the_dockerfiles_images():
    for overlay, want in (("cpu", {"faceedit/gateway", "faceedit/triton"}),
                          ("gpu", {"faceedit/gateway", "faceedit/triton-worker"})):
        images = {c["image"].rsplit(":", 1)[0] for d in find(render(overlay), "Deployment")
                  for c in d["spec"]["template"]["spec"]["containers"]}
        assert images == want, overlay
        readme = (DEPLOY / "README.md").read_text()
        for image in want:
            assert f"-t {image}:" in readme, f"deploy/README.md does not say how to build {image}"
