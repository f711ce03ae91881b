"""Print deploy/prometheus's rule files as one PrometheusRule (Prometheus Operator).

The rule files stay the source of truth (promtool checks and tests them); this
wraps their groups for clusters where Prometheus reads rules from custom
resources:

    python scripts/prometheus_rule.py --namespace monitoring | kubectl apply -f -
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

RULES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULE_FILES = ("recording.yml", "alerts.yml")  # recording first: alerts read its series


def prometheus_rule(rules_dir: Path, name: str, namespace: str) -> dict[str, Any]:
    groups: list[Any] = []
    for file_name in RULE_FILES:
        groups.extend(yaml.safe_load((rules_dir / file_name).read_text())["groups"])
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "avatar"},
        },
        "spec": {"groups": groups},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="avatar-rules")
    parser.add_argument("--namespace", default="monitoring")
    args = parser.parse_args()
    rule = prometheus_rule(RULES_DIR, args.name, args.namespace)
    yaml.safe_dump(rule, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
