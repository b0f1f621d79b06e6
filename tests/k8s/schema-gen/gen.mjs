// gen.mjs OUTDIR — write one strict JSON Schema per Kubernetes kind that k8s/ uses.
//
// Source: the TypeScript declarations of kubernetes-models (Kubernetes OpenAPI) and
// @kubernetes-models/{keda,prometheus-operator,cloudnative-pg} (those projects' CRDs),
// converted by ts-json-schema-generator with additionalProperties=false, so an unknown or
// misspelt field fails validation.  Post-processing, for the core Kubernetes kinds only:
// numbers become integers (the Kubernetes API has no floating-point fields; quantities
// are a separate type); in every kind, quantities get the apimachinery Quantity pattern.
// RabbitmqCluster has no npm package: tests/k8s/schemas/rabbitmq.com_v1beta1_RabbitmqCluster.json
// is written by hand from the operator's CRD (see its $comment) and is not touched here.
import { createGenerator } from "ts-json-schema-generator";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";

const out = process.argv[2];
if (!out) {
  console.error("usage: node gen.mjs OUTDIR");
  process.exit(2);
}
mkdirSync(out, { recursive: true });
const pkgVersion = (name) => JSON.parse(readFileSync(path.join("node_modules", name, "package.json"), "utf8")).version;

// [apiVersion, kind, module (without .d.ts), interface, core?]
const KINDS = [
  ["v1", "Namespace", "kubernetes-models/v1/Namespace", "INamespace", true],
  ["v1", "ServiceAccount", "kubernetes-models/v1/ServiceAccount", "IServiceAccount", true],
  ["v1", "ConfigMap", "kubernetes-models/v1/ConfigMap", "IConfigMap", true],
  ["v1", "Secret", "kubernetes-models/v1/Secret", "ISecret", true],
  ["v1", "Service", "kubernetes-models/v1/Service", "IService", true],
  ["apps/v1", "Deployment", "kubernetes-models/apps/v1/Deployment", "IDeployment", true],
  ["apps/v1", "StatefulSet", "kubernetes-models/apps/v1/StatefulSet", "IStatefulSet", true],
  ["batch/v1", "Job", "kubernetes-models/batch/v1/Job", "IJob", true],
  ["policy/v1", "PodDisruptionBudget", "kubernetes-models/policy/v1/PodDisruptionBudget", "IPodDisruptionBudget", true],
  ["networking.k8s.io/v1", "NetworkPolicy", "kubernetes-models/networking.k8s.io/v1/NetworkPolicy", "INetworkPolicy", true],
  ["autoscaling/v2", "HorizontalPodAutoscaler", "kubernetes-models/autoscaling/v2/HorizontalPodAutoscaler", "IHorizontalPodAutoscaler", true],
  ["keda.sh/v1alpha1", "ScaledObject", "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject", "IScaledObject", false],
  ["keda.sh/v1alpha1", "TriggerAuthentication", "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication", "ITriggerAuthentication", false],
  ["monitoring.coreos.com/v1", "ServiceMonitor", "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor", "IServiceMonitor", false],
  ["monitoring.coreos.com/v1", "PodMonitor", "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor", "IPodMonitor", false],
  ["monitoring.coreos.com/v1", "PrometheusRule", "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule", "IPrometheusRule", false],
  ["postgresql.cnpg.io/v1", "Cluster", "@kubernetes-models/cloudnative-pg/postgresql.cnpg.io/v1/Cluster", "ICluster", false],
  ["postgresql.cnpg.io/v1", "Pooler", "@kubernetes-models/cloudnative-pg/postgresql.cnpg.io/v1/Pooler", "IPooler", false],
];

const QUANTITY = "^(\\+|-)?(([0-9]+(\\.[0-9]*)?)|(\\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\\+|-)?(([0-9]+(\\.[0-9]*)?)|(\\.[0-9]+))))?$";

// Kubernetes: every number is an integer, except quantities (which may be 0.5).
function integers(node, inQuantity) {
  if (Array.isArray(node)) return node.map((n) => integers(n, inQuantity));
  if (node === null || typeof node !== "object") return node;
  const res = {};
  for (const [k, v] of Object.entries(node)) {
    if (k === "type" && !inQuantity) {
      res[k] = v === "number" ? "integer" : Array.isArray(v) ? v.map((t) => (t === "number" ? "integer" : t)) : v;
    } else {
      res[k] = integers(v, inQuantity);
    }
  }
  return res;
}

function postprocess(schema, core) {
  const defs = schema.definitions || {};
  for (const [name, def] of Object.entries(defs)) {
    if (name === "IQuantity") {
      defs[name] = { anyOf: [{ type: "number" }, { type: "string", pattern: QUANTITY }] };
    } else if (core) {
      defs[name] = integers(def, false);
    }
  }
  return schema;
}

const sources = {
  "kubernetes-models": pkgVersion("kubernetes-models"),
  "@kubernetes-models/keda": pkgVersion("@kubernetes-models/keda"),
  "@kubernetes-models/prometheus-operator": pkgVersion("@kubernetes-models/prometheus-operator"),
  "@kubernetes-models/cloudnative-pg": pkgVersion("@kubernetes-models/cloudnative-pg"),
  "ts-json-schema-generator": pkgVersion("ts-json-schema-generator"),
};

const tsconfig = path.resolve("tsconfig.gen.json");
writeFileSync(tsconfig, JSON.stringify({
  compilerOptions: { module: "nodenext", moduleResolution: "nodenext", strict: true, skipLibCheck: true, target: "es2022" },
}));

for (const [apiVersion, kind, mod, iface, core] of KINDS) {
  const dts = path.resolve("node_modules", `${mod}.d.ts`);
  // Shared definitions keep the schemas small; when two packages declare different types
  // under one name (CloudNativePG has its own ConfigMapKeySelector), inline everything.
  let schema;
  for (const expose of ["export", "none"]) {
    try {
      const gen = createGenerator({
        path: dts, tsconfig, type: iface, skipTypeCheck: true, jsDoc: "none",
        additionalProperties: false, topRef: true, expose,
      });
      schema = gen.createSchema(iface);
      break;
    } catch (e) {
      if (expose === "none" || !/has multiple definitions/.test(String(e.message))) throw e;
    }
  }
  schema = postprocess(schema, core);
  const pkg = mod.startsWith("@") ? mod.split("/").slice(0, 2).join("/") : mod.split("/")[0];
  schema.$comment = `${apiVersion} ${kind}: generated by tests/k8s/schema-gen/gen.mjs from ${pkg}@${sources[pkg]} ` +
    `(${mod}.d.ts, interface ${iface}) with ts-json-schema-generator@${sources["ts-json-schema-generator"]}; ` +
    `unknown fields are rejected.  Do not edit: regenerate.`;
  // core/v1 -> core_v1_Service.json, apps/v1 -> apps_v1_Deployment.json, ...
  const file = `${(apiVersion.includes("/") ? apiVersion : `core/${apiVersion}`).replace("/", "_")}_${kind}.json`;
  writeFileSync(path.join(out, file), JSON.stringify(schema) + "\n");
  console.log(`${file}: ${Object.keys(schema.definitions || {}).length} definitions`);
}
