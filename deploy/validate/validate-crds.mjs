// Validates the custom resources in rendered manifests against the schemas of
// their CRDs, offline. Usage: node validate-crds.mjs FILE...
//
// Built-in kinds are left to kubernetes-validate --strict (same script). A
// custom kind missing from CUSTOM fails: add its model here, never skip it.
// These models check types, enums, patterns and required fields, but not
// unknown fields (the CRD schemas allow them; the API server prunes them), so
// tests/test_deploy.py asserts the fields that matter by path.
import { readFileSync } from "node:fs";
import yaml from "js-yaml";
import { BackendTrafficPolicy } from "@kubernetes-models/envoy-gateway/gateway.envoyproxy.io/v1alpha1/BackendTrafficPolicy";
import { Gateway } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/Gateway";
import { HTTPRoute } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/HTTPRoute";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const CUSTOM = new Map(
  [BackendTrafficPolicy, Gateway, HTTPRoute, ScaledObject, PrometheusRule, ServiceMonitor].map(
    (model) => [`${model.apiVersion}/${model.kind}`, model],
  ),
);
const BUILTIN_GROUPS = new Set([
  "", "apps", "batch", "policy", "autoscaling", "networking.k8s.io",
  "rbac.authorization.k8s.io", "storage.k8s.io", "scheduling.k8s.io",
]);

let failures = 0;
let checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(readFileSync(file, "utf8"))) {
    if (doc === null) continue;
    const key = `${doc.apiVersion}/${doc.kind}`;
    const where = `${file}: ${doc.kind}/${doc.metadata?.name}`;
    const group = doc.apiVersion.includes("/") ? doc.apiVersion.split("/")[0] : "";
    const Model = CUSTOM.get(key);
    if (Model === undefined) {
      if (!BUILTIN_GROUPS.has(group)) {
        console.error(`FAIL ${where}: no schema for ${key}`);
        failures += 1;
      }
      continue;
    }
    try {
      new Model(doc).validate();
      checked += 1;
      console.log(`ok   ${where}`);
    } catch (err) {
      console.error(`FAIL ${where}: ${err.message}`);
      failures += 1;
    }
  }
}
console.log(`${checked} custom resources valid, ${failures} failed`);
process.exit(failures === 0 ? 0 : 1);
