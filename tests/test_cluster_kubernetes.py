"""deploy/kubernetes/: the StatefulSet for replicas, validated against the Kubernetes schemas with
kubernetes-validate (as tests/test_deploy.py does for deploy/kubernetes.yaml), plus what it must say."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path
from typing import Any

import yaml

from tests.test_deploy import tool

MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes" / "relay-replicas.yaml"


def resources() -> dict[str, dict[str, Any]]:
    return {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


def test_the_manifests_pass_kubernetes_validate_strict() -> None:
    done = subprocess.run(
        [tool("kubernetes-validate"), "--strict", str(MANIFEST)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_statefulset_with_a_spool_volume_per_pod_a_prestop_handoff_and_time_for_it() -> None:
    found = resources()
    assert {"Service/relay-smtp", "Service/relay-ops", "Service/relay-peers", "PodDisruptionBudget/relay"} <= set(found)
    statefulset = found["StatefulSet/relay"]["spec"]
    assert statefulset["serviceName"] == "relay-peers"
    assert [claim["metadata"]["name"] for claim in statefulset["volumeClaimTemplates"]] == ["spool"]
    pod = statefulset["template"]["spec"]
    (relay,) = pod["containers"]
    assert {"name": "spool", "mountPath": "/var/spool/relay"} in relay["volumeMounts"]
    hook = relay["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:5] == ["relay", "queue", "--config", "/etc/relay/config.toml", "handoff"]
    assert hook[hook.index("--to") + 1] == "relay-smtp:2525"
    handoff_timeout = float(hook[hook.index("--timeout") + 1])
    config = tomllib.loads(found["ConfigMap/relay-replicas-config"]["data"]["config.toml"])
    drain = config["spool"]["drain_timeout"]
    assert pod["terminationGracePeriodSeconds"] >= handoff_timeout + drain + 10  # hand-off, then the drain
    assert relay["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert relay["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {item["name"]: item["valueFrom"] for item in relay["env"]}
    assert env["RELAY_CLUSTER__REDIS_URL"]["secretKeyRef"]["name"] == "relay-cluster"  # a URL with a password
    assert env["RELAY_CLUSTER__NODE_NAME"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert config["limits"]["messages_per_minute"] > 0  # the budget the replicas share
