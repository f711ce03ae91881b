"""Deployment artefacts: Prometheus rules, Grafana dashboard, Kubernetes manifests.

The tool checks run scripts/ci-deploy-checks.sh (promtool, kubectl kustomize,
kubernetes-validate, the CRD validator in deploy/validate) and skip, naming the
missing tool, where it is not installed. The rest reads the files and the
rendered manifests and checks that the pieces agree with each other, with the
metric contract and with the server's config schema (agent/config.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, timeout

from agent.config import AgentConfig, parse_config

pytestmark = pytest.mark.integration

PROMETHEUS = REPO / "deploy" / "prometheus"
SCRIPT = REPO / "scripts" / "ci-deploy-checks.sh"
DASHBOARD = REPO / "deploy" / "grafana" / "avatar-dashboard.json"

# The metric contract (names without the _bucket/_count/_sum of histograms).
CONTRACT_METRICS = frozenset(
    {
        "avatar_stage_duration_seconds",
        "avatar_time_to_first_frame_seconds",
        "avatar_inter_frame_interval_seconds",
        "avatar_turn_duration_seconds",
        "avatar_queue_wait_seconds",
        "avatar_resume_duration_seconds",
        "avatar_frames_sent_total",
        "avatar_chunks_total",
        "avatar_turns_total",
        "avatar_errors_total",
        "avatar_admission_rejections_total",
        "avatar_frame_validation_failures_total",
        "avatar_circuit_breaker_transitions_total",
        "avatar_degradation_transitions_total",
        "avatar_barge_ins_total",
        "avatar_slow_consumer_events_total",
        "avatar_active_sessions",
        "avatar_sessions_by_tier",
        "avatar_queue_depth",
        "avatar_circuit_breaker_state",
        "avatar_degradation_tier",
        "avatar_draining",
        "avatar_model_ready",
        "avatar_gpu_utilization_ratio",
        "avatar_gpu_memory_used_bytes",
        "avatar_gpu_memory_total_bytes",
        "process_resident_memory_bytes",
    }
)
# From kube-state-metrics, not from our server.
CLUSTER_METRICS = frozenset({"kube_pod_container_resource_limits"})
_METRIC_REF = re.compile(r"\b(?:avatar_|process_|kube_)[a-z0-9_]+|\bavatar:[a-z0-9_:]+")
_HISTOGRAM_SUFFIX = re.compile(r"_(?:bucket|count|sum)$")


def _rules(file_name: str) -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / file_name).read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _rule_tests() -> list[dict[str, Any]]:
    return [
        test
        for path in sorted((PROMETHEUS / "tests").glob("*.yml"))
        for test in yaml.safe_load(path.read_text())["tests"]
    ]


def _recorded() -> set[str]:
    return {rule["record"] for rule in _rules("recording.yml")}


def _unknown_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression that neither the contract nor our rules define."""
    names = {_HISTOGRAM_SUFFIX.sub("", name) for name in _METRIC_REF.findall(expr)}
    return names - CONTRACT_METRICS - CLUSTER_METRICS - _recorded()


def _run_checks(section: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["bash", str(SCRIPT), section, *args],
        capture_output=True,
        text=True,
        timeout=timeout(120),
        check=False,
    )
    if result.returncode == 3:  # the script's exit code for a missing tool
        pytest.skip(result.stderr.strip())
    return result


# --- Prometheus rules --------------------------------------------------------


def test_rules_pass_promtool_check_and_unit_tests() -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus)")
    result = _run_checks("rules")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 12 rules found" in result.stdout  # recording.yml
    assert "SUCCESS: 5 rules found" in result.stdout  # alerts.yml


def test_every_recording_rule_has_a_unit_test() -> None:
    tested = {case["expr"] for test in _rule_tests() for case in test.get("promql_expr_test", [])}
    assert _recorded() - tested == set()


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for test in _rule_tests():
        for case in test.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else silent).add(case["alertname"])
    alerts = {rule["alert"] for rule in _rules("alerts.yml")}
    assert alerts - firing == set()
    assert alerts - silent == set()
    assert alerts == {
        "AvatarTimeToFirstFrameP95High",
        "AvatarGpuUtilizationHigh",
        "AvatarErrorRateHigh",
        "AvatarQueueDepthHigh",
        "AvatarMemoryHigh",
    }


def test_alerts_carry_severity_action_and_a_runbook_section_that_exists() -> None:
    deploy_doc = (REPO / "docs" / "deploy.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in deploy_doc.splitlines()
        if line.startswith("#")
    }
    for rule in _rules("alerts.yml"):
        assert rule["labels"]["severity"] in {"page", "warning"}, rule["alert"]
        assert rule["labels"]["action"], rule["alert"]
        runbook = rule["annotations"]["runbook"]
        assert runbook.startswith("docs/deploy.md#"), rule["alert"]
        assert runbook.split("#", 1)[1] in anchors, rule["alert"]


def test_rules_read_only_contract_metrics() -> None:
    for rule in _rules("recording.yml") + _rules("alerts.yml"):
        assert _unknown_metrics(rule["expr"]) == set(), rule.get("record", rule.get("alert"))


# --- Grafana dashboard -------------------------------------------------------


def _panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def test_dashboard_queries_read_only_contract_metrics() -> None:
    exprs = [target["expr"] for panel in _panels() for target in panel["targets"]]
    assert exprs
    for expr in exprs:
        assert _unknown_metrics(expr) == set(), expr


def test_dashboard_shows_every_contract_metric() -> None:
    text = DASHBOARD.read_text()
    assert {name for name in CONTRACT_METRICS if name not in text} == set()


def test_dashboard_panels_use_the_datasource_variable_and_unique_ids() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {var["name"] for var in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace"}
    for panel in _panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all('namespace="$namespace"' in t["expr"] for t in panel["targets"]), panel["title"]


# --- Kubernetes manifests ----------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """base/dev/prod rendered and schema-validated by the CI script."""
    out = tmp_path_factory.mktemp("render")
    result = _run_checks("k8s", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return {
        name: [doc for doc in yaml.safe_load_all((out / f"{name}.yaml").read_text()) if doc]
        for name in ("base", "dev", "prod", "prometheus-rule")
    }


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {f"{d['kind']}/{d['metadata']['name']}" for d in docs}


def _server(docs: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = _one(docs, "Deployment", "avatar")["spec"]["template"]["spec"][
        "containers"
    ][0]
    return container


def _server_config(docs: list[dict[str, Any]]) -> AgentConfig:
    """The ConfigMap's config.yaml, parsed by the server's own config schema."""
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    return parse_config(yaml.safe_load(config_map["data"]["config.yaml"]), source="ConfigMap")


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _overlays(rendered: dict[str, list[dict[str, Any]]]) -> Iterator[list[dict[str, Any]]]:
    yield rendered["dev"]
    yield rendered["prod"]


def test_prod_pod_gets_one_t4_or_a10_gpu_and_15_gib(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["prod"]
    pod = _one(docs, "Deployment", "avatar")["spec"]["template"]["spec"]
    resources = _server(docs)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == "15Gi"
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    (products,) = term["matchExpressions"]
    assert set(products["values"]) == {"Tesla-T4", "NVIDIA-A10", "NVIDIA-A10G"}
    assert {t["key"] for t in pod["tolerations"]} == {"nvidia.com/gpu"}


def test_probes_and_graceful_drain_fit_the_server_config(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for docs in _overlays(rendered):
        pod = _one(docs, "Deployment", "avatar")["spec"]["template"]["spec"]
        server = _server(docs)
        config = _server_config(docs)
        assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert server["startupProbe"]["httpGet"]["path"] == "/readyz"
        assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
        (port,) = server["ports"]
        assert port["containerPort"] == config.server.port
        assert config.server.host == "0.0.0.0"
        # SIGTERM comes after preStop; the drain then needs drain_timeout_s, and
        # closing sessions with 1012 and exiting needs a few seconds more.
        pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= pre_stop + config.server.drain_timeout_s + 10


def test_server_reads_the_mounted_config_and_read_only_weights(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["prod"]
    pod = _one(docs, "Deployment", "avatar")["spec"]["template"]["spec"]
    server = _server(docs)
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_path = Path(server["args"][server["args"].index("--config") + 1])
    assert config_path.parent == Path(mounts["config"]["mountPath"])
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_path.name in config_map["data"]
    config = _server_config(docs)
    assert config.renderer.name == "latentsync"
    assert mounts["models"]["readOnly"] is True
    assert volumes["models"]["persistentVolumeClaim"]["readOnly"] is True
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert _one(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert config.renderer.latentsync.checkpoint_dir.is_relative_to(mounts["models"]["mountPath"])
    assert config.avatars.cache_dir.is_relative_to(mounts["avatar-cache"]["mountPath"])
    assert "emptyDir" in volumes["avatar-cache"]


def test_selectors_pick_the_server_pods_and_only_them(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for docs in _overlays(rendered):
        pod_labels = _one(docs, "Deployment", "avatar")["spec"]["template"]["metadata"]["labels"]
        other_pods = [
            d["spec"]["template"]["metadata"]["labels"]
            for d in docs
            if d["kind"] == "Deployment" and d["metadata"]["name"] != "avatar"
        ]
        service = _one(docs, "Service", "avatar")
        selectors = [
            service["spec"]["selector"],
            _one(docs, "PodDisruptionBudget", "avatar")["spec"]["selector"]["matchLabels"],
        ]
        for selector in selectors:
            assert _matches(selector, pod_labels)
            assert not any(_matches(selector, labels) for labels in other_pods)
        monitor = _one(docs, "ServiceMonitor", "avatar")["spec"]
        assert _matches(monitor["selector"]["matchLabels"], service["metadata"]["labels"])
        (endpoint,) = monitor["endpoints"]
        (service_port,) = service["spec"]["ports"]
        assert endpoint["port"] == service_port["name"]
        assert endpoint["path"] == "/metrics"
        assert service_port["targetPort"] == _server(docs)["ports"][0]["name"]


def test_rules_select_the_job_the_service_monitor_produces(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    # Prometheus Operator names the job after the Service.
    jobs = set(re.findall(r'job="([^"]+)"', (PROMETHEUS / "recording.yml").read_text()))
    assert jobs == {_one(rendered["prod"], "Service", "avatar")["metadata"]["name"]}
    (rule,) = rendered["prometheus-rule"]
    expected = yaml.safe_load((PROMETHEUS / "recording.yml").read_text())["groups"]
    expected += yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    assert rule["spec"]["groups"] == expected


def test_route_hashes_sessions_on_the_session_query_parameter(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["prod"]
    route = _one(docs, "HTTPRoute", "avatar")
    (parent,) = route["spec"]["parentRefs"]
    gateway = _one(docs, "Gateway", parent["name"])
    assert [listener["protocol"] for listener in gateway["spec"]["listeners"]] == ["HTTPS"]
    service = _one(docs, "Service", "avatar")
    paths = set()
    for rule in route["spec"]["rules"]:
        (backend,) = rule["backendRefs"]
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"] == service["spec"]["ports"][0]["port"]
        paths |= {match["path"]["value"] for match in rule["matches"]}
    assert paths == {"/v1/session", "/v1/avatars"}  # /metrics, /healthz, /readyz stay inside
    policy = _one(docs, "BackendTrafficPolicy", "avatar-session-affinity")["spec"]
    (target,) = policy["targetRefs"]
    assert (target["kind"], target["name"]) == ("HTTPRoute", route["metadata"]["name"])
    assert policy["loadBalancer"]["type"] == "ConsistentHash"
    assert policy["loadBalancer"]["consistentHash"] == {
        "type": "QueryParams",
        "queryParams": [{"name": "session"}],
    }


def test_keda_scales_the_server_on_the_recorded_gpu_rule(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["prod"]
    scaled = _one(docs, "ScaledObject", "avatar")
    deployment = _one(docs, "Deployment", "avatar")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"]  # KEDA owns the count
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 120
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 600
    assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 600}]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metricType"] == "Value"
    assert trigger["metadata"]["threshold"] == "70"
    assert trigger["metadata"]["ignoreNullValues"] == "false"  # no data: hold, not shrink
    namespace = deployment["metadata"]["namespace"]
    query = trigger["metadata"]["query"]
    assert query == f'100 * avatar:gpu_autoscale_input:ratio{{namespace="{namespace}"}}'
    assert "avatar:gpu_autoscale_input:ratio" in _recorded()
    # The bounds are the capacity plan's, for the measured users per GPU.
    plan = (REPO / "docs" / "deploy.md").read_text()
    row = re.search(r"^\| maxReplicaCount per region \|.*\| (\d+) \|$", plan, re.MULTILINE)
    assert row is not None, "docs/deploy.md lost its maxReplicaCount row"
    assert scaled["spec"]["maxReplicaCount"] == int(row.group(1))
    assert scaled["spec"]["minReplicaCount"] >= 3


def test_prod_uses_managed_redis_under_the_same_service_name(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["prod"]
    assert "Deployment/avatar-redis" not in _kinds(docs)
    assert _one(docs, "Service", "avatar-redis")["spec"]["type"] == "ExternalName"
    assert "Deployment/avatar-redis" in _kinds(rendered["dev"])
    for docs in _overlays(rendered):
        env = {e["name"]: e["value"] for e in _server(docs)["env"]}
        assert env["AVATAR_STATE_URL"] == "redis://avatar-redis:6379/0"


def test_dev_runs_one_cpu_pod_without_weights_or_autoscaling(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["dev"]
    assert {d["metadata"].get("namespace") for d in docs} == {"avatar-dev", None}
    deployment = _one(docs, "Deployment", "avatar")
    assert deployment["spec"]["replicas"] == 1
    assert "nvidia.com/gpu" not in json.dumps(docs)
    pod = deployment["spec"]["template"]["spec"]
    assert "affinity" not in pod
    assert "tolerations" not in pod
    assert "models" not in {v["name"] for v in pod["volumes"]}
    kinds = _kinds(docs)
    assert "ScaledObject/avatar" not in kinds
    assert "PersistentVolumeClaim/avatar-models" not in kinds
    assert _server_config(docs).renderer.name == "cpu"
