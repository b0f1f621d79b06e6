#!/usr/bin/python3
"""k8s.validate: render every kustomization under k8s/ and check what it produces.

1. `kubectl kustomize` renders k8s/base, each overlay (dev, prod, canary) and the HPA
   alternative (base + components/hpa, built in a temporary kustomization).
2. Every rendered object validates offline against a strict JSON Schema of its kind
   (tests/k8s/schemas/: Kubernetes, KEDA, prometheus-operator, CloudNativePG, generated
   from npm packages by tests/k8s/schema-gen; RabbitmqCluster written from the
   operator's CRD).  Unknown fields fail, as with `kubeconform -strict`.  A kind without
   a schema fails too.
3. Policy: every container has requests and limits for cpu and memory, runs as non-root
   with no privilege escalation, all capabilities dropped and RuntimeDefault seccomp (the
   "restricted" Pod Security Standard); long-running containers have liveness and
   readiness probes (longrun's own also a startup probe and a read-only root
   filesystem); a longrun pod's terminationGracePeriodSeconds exceeds its preStop sleep
   + LONGRUN_DRAIN_SECONDS (from its env or ConfigMap, else the compiled default) + 3 s
   + 10 s slack; worker pods have a preStop hook.
4. Consistency: references to ConfigMaps and Secrets resolve (or are the documented,
   hand-made ones); Services, PDBs, ServiceMonitors, ScaledObjects and HPAs select or
   target something that exists; every LONGRUN_* variable set is one a longrun binary
   reads (the table of common/config.c, a getenv() in the sources, or ${VAR} in the
   agents file); the KEDA trigger counts unacknowledged messages (protocol http, mode
   QueueLength) on each queue the workers consume; scale-down removes at most one worker
   per grace period; the agents file is examples/agents.json and passes
   `longrun-worker --check-config` with the rendered environment (when the build tree
   has the binary); no Secret values or credential-bearing URLs are rendered.
5. Monitoring: every longrun_* and process_* metric in the PrometheusRule and the Grafana
   dashboard is documented in docs/metrics.md (before that file existed: the agreed list);
   every alert has an absolute runbook_url, <runbookBaseURL>/runbooks/<page>.md with the base
   of k8s/overlays/prod/monitoring/settings.yaml, to a page under docs/runbooks/ that names
   it, and a copy of the tree with another base renders with that one; the dashboard has
   the namespace, agent, model and queue variables; `promtool check rules` accepts the rules
   (when promtool, from Debian's prometheus package, is installed).
6. k8s/set-image rewrites an overlay's image and the overlay still renders.
7. docs/deploy.md and docs/runbooks/: links and anchors resolve, and the repository
   paths they name exist.
   Security (issue 15): where an operator runs PostgreSQL or RabbitMQ (prod, canary), every
   longrun Deployment and Job mounts the CloudNativePG CA and (with an AMQP URL) the broker's
   CA as LONGRUN_AMQP_CACERT, projecting only ca.crt, without LONGRUN_ALLOW_PLAINTEXT, and the
   RabbitmqCluster has TLS; no egress rule of a longrun NetworkPolicy lacks ports, and one
   admits in-cluster model servers by the longrun.io/model-server label only.
8. Self-test: deliberately broken copies of the prod worker (unknown field, wrong type,
   bad quantity, no readiness probe, root, no limits, short grace, writable root, no
   preStop, a drain longer than the grace) must each be caught.

Exit 0 passed, 1 failed, 77 skipped (kubectl or python3-yaml/jsonschema missing).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

SRC = os.environ.get("LONGRUN_SOURCE_DIR") or os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("LONGRUN_BUILD_DIR") or os.path.join(SRC, "build")
K8S = os.path.join(SRC, "k8s")
SCHEMAS = os.path.join(SRC, "tests", "k8s", "schemas")

try:
    import yaml
    import jsonschema
except ImportError as e:  # pragma: no cover
    print(f"k8s.validate: SKIPPED: {e} (install python3-yaml and python3-jsonschema: scripts/dev deps)")
    sys.exit(77)

KUBECTL = shutil.which("kubectl")
if KUBECTL is None:
    print("k8s.validate: SKIPPED: kubectl not found; it renders the kustomizations (`kubectl kustomize`). "
          "Install kubectl (the project's Debian machines ship it) and rerun.")
    sys.exit(77)

# Overlays and what each must contain.
TARGETS = {
    "base": os.path.join(K8S, "base"),
    "dev": os.path.join(K8S, "overlays", "dev"),
    "prod": os.path.join(K8S, "overlays", "prod"),
    "canary": os.path.join(K8S, "overlays", "canary"),
}
# Secrets the manifests may reference: created per environment, never rendered
# (docs/deploy.md "Secrets").
EXTERNAL_SECRETS = {"longrun-database", "longrun-amqp", "longrun-provider-keys"}
# ConfigMaps created by hand (docs/deploy.md), per overlay.
EXTERNAL_CONFIGMAPS = {"dev": {"longrun-fixture"}}
# The metric names of the worker and scheduler agreed for issue 7; once docs/metrics.md
# exists, the names it documents are the authority instead.
METRICS = {
    "longrun_tasks_finished_total", "longrun_steps_total", "longrun_step_duration_seconds",
    "longrun_model_requests_total", "longrun_tool_calls_total", "longrun_dead_letters_total",
    "longrun_in_flight", "longrun_queue_depth", "longrun_circuit_state", "longrun_lease_renewals_total",
    "longrun_fencing_rejections_total", "longrun_ready",
}
MIN_SLACK = 10        # seconds of grace beyond preStop + drain + close
CLOSE_AFTER_DRAIN = 3  # worker.c: closes 3 s after the drain deadline

failures = []
notes = []


def fail(where, msg):
    failures.append(f"{where}: {msg}")


def kustomize(path):
    t0 = time.monotonic()
    r = subprocess.run([KUBECTL, "kustomize", path], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        fail(path, f"kubectl kustomize failed:\n{r.stderr.strip()}")
        return []
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    notes.append(f"rendered {os.path.relpath(path, SRC)}: {len(docs)} objects in {time.monotonic() - t0:.1f} s")
    return docs


def config_variables():
    """LONGRUN_* names and integer defaults from the configuration table."""
    names, defaults = set(), {}
    with open(os.path.join(SRC, "common", "config.c")) as f:
        for m in re.finditer(r'\b[SID]\("(LONGRUN_[A-Z0-9_]+)",\s*\w+,\s*("([^"]*)"|\w+)', f.read()):
            names.add(m.group(1))
            if m.group(3) is not None:
                defaults[m.group(1)] = m.group(3)
    return names, defaults


CONFIG_NAMES, CONFIG_DEFAULTS = config_variables()


def env_variables():
    """LONGRUN_* names a binary reads: the configuration table, getenv() calls in the
    sources (e.g. LONGRUN_HTTP_STEPS_URL), and ${VAR} in the example agents file."""
    names = set(CONFIG_NAMES)
    for d in ("common", "worker", "scheduler", "cli"):
        for root, _, files in os.walk(os.path.join(SRC, d)):
            for fn in files:
                if fn.endswith((".c", ".h")):
                    with open(os.path.join(root, fn), errors="replace") as f:
                        names.update(re.findall(r'getenv\("(LONGRUN_[A-Z0-9_]+)"\)', f.read()))
    with open(os.path.join(SRC, "examples", "agents.json")) as f:
        names.update(re.findall(r"\$\{(LONGRUN_[A-Z0-9_]+)\}", f.read()))
    return names


KNOWN_ENV = env_variables()


# --- schemas -------------------------------------------------------------------

_validators = {}


def schema_file(obj):
    api = obj.get("apiVersion", "")
    group_version = api if "/" in api else f"core/{api}"
    return os.path.join(SCHEMAS, f"{group_version.replace('/', '_')}_{obj.get('kind')}.json")


def validate_schema(where, obj):
    path = schema_file(obj)
    if not os.path.exists(path):
        fail(where, f"no schema for {obj.get('apiVersion')} {obj.get('kind')} "
                    f"(add the kind to tests/k8s/schema-gen/gen.mjs and run gen.sh)")
        return
    v = _validators.get(path)
    if v is None:
        with open(path) as f:
            schema = json.load(f)
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
        v = _validators[path] = cls(schema)
    for err in sorted(v.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        loc = "/".join(str(p) for p in err.absolute_path) or "(root)"
        fail(where, f"schema: {loc}: {err.message[:300]}")


# --- helpers ---------------------------------------------------------------------

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def pod_spec(obj):
    return obj["spec"]["template"]["spec"]


def pod_labels(obj):
    return obj["spec"]["template"].get("metadata", {}).get("labels", {}) or {}


def matches(selector, labels):
    """matchLabels / plain-map selector against a label set."""
    sel = selector.get("matchLabels", selector) if isinstance(selector, dict) else {}
    if "matchExpressions" in (selector or {}):
        return False  # not used in k8s/; treat as unsupported
    return bool(sel) and all(labels.get(k) == v for k, v in sel.items())


def is_longrun(obj):
    return pod_labels(obj).get("app.kubernetes.io/name") == "longrun"


def container_env(c, configmaps):
    """Effective LONGRUN_* environment of a container: envFrom ConfigMaps, then env."""
    env = {}
    for ef in c.get("envFrom", []) or []:
        ref = ef.get("configMapRef")
        if ref and ref.get("name") in configmaps:
            env.update(configmaps[ref["name"]].get("data", {}) or {})
    for e in c.get("env", []) or []:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "valueFrom" in e:
            env[e["name"]] = None  # from a Secret or the downward API
    return env


def prestop_sleep(c):
    pre = (c.get("lifecycle") or {}).get("preStop")
    if not pre:
        return None
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    cmd = (pre.get("exec") or {}).get("command") or []
    if len(cmd) == 2 and cmd[0].endswith("sleep"):
        return int(cmd[1])
    return 0


# --- policy -------------------------------------------------------------------------


def check_workload(where, obj, configmaps):
    spec = pod_spec(obj)
    kind = obj["kind"]
    psc = spec.get("securityContext", {}) or {}
    longrun = is_longrun(obj)
    if kind != "Job" and spec.get("automountServiceAccountToken") is not False:
        fail(where, "automountServiceAccountToken must be false (nothing here calls the Kubernetes API)")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        cw = f"{where} container {c['name']}"
        csc = c.get("securityContext", {}) or {}
        # resources
        res = c.get("resources", {}) or {}
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(part) or {}):
                    fail(cw, f"no resources.{part}.{r}")
        # non-root, restricted
        run_as_non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        run_as_user = csc.get("runAsUser", psc.get("runAsUser"))
        if run_as_non_root is not True:
            fail(cw, "runAsNonRoot is not true (pod or container securityContext)")
        if run_as_user is None or run_as_user == 0:
            fail(cw, f"runAsUser must be a non-zero uid (is {run_as_user})")
        if csc.get("allowPrivilegeEscalation") is not False:
            fail(cw, "allowPrivilegeEscalation must be false")
        if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
            fail(cw, "capabilities.drop must contain ALL")
        seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            fail(cw, "seccompProfile must be RuntimeDefault")
        if csc.get("privileged"):
            fail(cw, "privileged")
        image = c.get("image", "")
        if image == "longrun" and where.startswith("base "):
            pass  # the base's placeholder, mapped by every overlay (checked there)
        elif image.endswith(":latest") or (":" not in image.rsplit("/", 1)[-1] and "@" not in image):
            fail(cw, f"image {image!r} has no pinned tag or digest")
        # probes: long-running containers only
        if kind != "Job":
            for p in ("livenessProbe", "readinessProbe"):
                if p not in c:
                    fail(cw, f"no {p}")
            if longrun and "startupProbe" not in c:
                fail(cw, "no startupProbe")
        if longrun and csc.get("readOnlyRootFilesystem") is not True:
            fail(cw, "readOnlyRootFilesystem must be true for longrun containers")
        # grace period vs drain
        if longrun and kind != "Job":
            env = container_env(c, configmaps)
            for name in env:
                if name.startswith("LONGRUN_") and name not in KNOWN_ENV:
                    fail(cw, f"{name} is read by no longrun binary (common/config.c, getenv, agents file)")
            drain = int(env.get("LONGRUN_DRAIN_SECONDS") or CONFIG_DEFAULTS["LONGRUN_DRAIN_SECONDS"])
            sleep = prestop_sleep(c)
            component = pod_labels(obj).get("app.kubernetes.io/component")
            if component == "worker" and sleep is None:
                fail(cw, "workers need a preStop hook (docs/deploy.md: termination)")
            need = (sleep or 0) + drain + CLOSE_AFTER_DRAIN + MIN_SLACK
            if grace < need:
                fail(cw, f"terminationGracePeriodSeconds {grace} is not longer than preStop {sleep or 0} s + "
                         f"LONGRUN_DRAIN_SECONDS {drain} s + {CLOSE_AFTER_DRAIN} s + {MIN_SLACK} s slack = {need} s")
            elif not where.startswith("self-test"):
                notes.append(f"{cw}: grace {grace} s >= preStop {sleep or 0} + drain {drain} + "
                             f"{CLOSE_AFTER_DRAIN} + {MIN_SLACK} slack")


def operator_secrets(by_kind):
    """Secrets the rendered operators' objects create: CloudNativePG's <cluster>-ca and the
    certificate Secret a RabbitmqCluster names in spec.tls.secretName (cert-manager's)."""
    names = {f"{n}-ca" for n in by_kind.get("Cluster", {})}
    for r in by_kind.get("RabbitmqCluster", {}).values():
        if r["spec"].get("tls", {}).get("secretName"):
            names.add(r["spec"]["tls"]["secretName"])
    return names


def check_tls(target, by_kind):
    """Issue 15: where the operators run the servers, every longrun pod verifies them: the
    CloudNativePG CA and the broker's CA mounted (ca.crt only, never a key),
    LONGRUN_AMQP_CACERT pointing into the broker's, and no LONGRUN_ALLOW_PLAINTEXT."""
    clusters = list(by_kind.get("Cluster", {}))
    rabbits = [r for r in by_kind.get("RabbitmqCluster", {}).values()]
    if not clusters and not rabbits:
        return
    for r in rabbits:
        if not r["spec"].get("tls", {}).get("secretName"):
            fail(f"{target} RabbitmqCluster/{r['metadata']['name']}", "no spec.tls.secretName: AMQPS is off")
    for kind in ("Deployment", "Job"):
        for name, o in by_kind.get(kind, {}).items():
            if not is_longrun(o):
                continue
            w = f"{target} {kind}/{name}"
            spec = pod_spec(o)
            vols = {v["name"]: v for v in spec.get("volumes", []) or []}
            secret_vols = {v["secret"]["secretName"]: v for v in vols.values() if "secret" in v}
            for v in secret_vols.values():
                keys = [i["key"] for i in v["secret"].get("items", [])]
                if keys != ["ca.crt"]:
                    fail(w, f"volume {v['name']} projects {keys or 'every key'} of Secret "
                            f"{v['secret']['secretName']}: only ca.crt (no private key in a longrun pod)")
            c = spec["containers"][0]
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", []) or []}
            env = {e["name"]: e.get("value") for e in c.get("env", []) or []}
            if env.get("LONGRUN_ALLOW_PLAINTEXT") not in (None, "0"):
                fail(w, "LONGRUN_ALLOW_PLAINTEXT is set where the servers speak TLS")
            for cl in clusters:
                v = secret_vols.get(f"{cl}-ca")
                if v is None or v["name"] not in mounts:
                    fail(w, f"the CloudNativePG CA (Secret {cl}-ca) is not mounted (sslrootcert for verify-full)")
            uses_amqp = any(e["name"] == "LONGRUN_AMQP_URL" for e in c.get("env", []) or [])
            for r in rabbits if uses_amqp else []:
                v = secret_vols.get(r["spec"].get("tls", {}).get("secretName"))
                path = v is not None and mounts.get(v["name"])
                if not path or env.get("LONGRUN_AMQP_CACERT") != path.rstrip("/") + "/ca.crt":
                    fail(w, f"LONGRUN_AMQP_CACERT must be ca.crt of the broker's certificate Secret, mounted "
                            f"(got {env.get('LONGRUN_AMQP_CACERT')!r})")


def check_network(target, by_kind):
    """Issue 15: egress from longrun pods is by port only (no rule opens every port), and
    in-cluster model servers are reachable only by the longrun.io/model-server label."""
    found = False
    for name, np_ in by_kind.get("NetworkPolicy", {}).items():
        sel = np_["spec"].get("podSelector", {}).get("matchLabels", {})
        if sel.get("app.kubernetes.io/name") != "longrun":
            continue
        for rule in np_["spec"].get("egress", []) or []:
            if not rule.get("ports"):
                fail(f"{target} NetworkPolicy/{name}", f"an egress rule without ports opens everything: {rule}")
            peers = rule.get("to", [])
            labelled = [p for p in peers if p.get("podSelector", {}).get("matchLabels", {})
                        .get("longrun.io/model-server") == "true"]
            if labelled:
                found = True
                if len(labelled) != len(peers) or any(
                        "namespaceSelector" in p and p["namespaceSelector"].get("matchLabels", {})
                        .get("longrun.io/model-server") != "true" for p in peers):
                    fail(f"{target} NetworkPolicy/{name}", "the model-server rule must select labelled pods "
                         "(in labelled namespaces) only")
    if not found:
        fail(target, 'no egress rule for in-cluster model servers (pods labelled longrun.io/model-server: "true")')


def check_references(target, objs):
    where = target
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    configmaps = by_kind.get("ConfigMap", {})
    external_cm = EXTERNAL_CONFIGMAPS.get(target, set())
    workloads = [o for o in objs if o["kind"] in WORKLOADS]

    for o in workloads:
        w = f"{target} {o['kind']}/{o['metadata']['name']}"
        spec = pod_spec(o)
        sa = spec.get("serviceAccountName")
        if sa and sa not in by_kind.get("ServiceAccount", {}):
            fail(w, f"serviceAccountName {sa} is not rendered")
        for v in spec.get("volumes", []) or []:
            if "configMap" in v and v["configMap"]["name"] not in configmaps and v["configMap"]["name"] not in external_cm:
                fail(w, f"volume {v['name']}: ConfigMap {v['configMap']['name']} does not exist")
            if "secret" in v and v["secret"]["secretName"] not in EXTERNAL_SECRETS | operator_secrets(by_kind):
                fail(w, f"volume {v['name']}: Secret {v['secret']['secretName']} is not a documented Secret")
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for ef in c.get("envFrom", []) or []:
                if "configMapRef" in ef and ef["configMapRef"]["name"] not in configmaps:
                    fail(w, f"envFrom ConfigMap {ef['configMapRef']['name']} does not exist")
                if "secretRef" in ef and ef["secretRef"]["name"] not in EXTERNAL_SECRETS:
                    fail(w, f"envFrom Secret {ef['secretRef']['name']} is not a documented Secret")
            for e in c.get("env", []) or []:
                vf = e.get("valueFrom") or {}
                if "secretKeyRef" in vf and vf["secretKeyRef"]["name"] not in EXTERNAL_SECRETS:
                    fail(w, f"env {e['name']}: Secret {vf['secretKeyRef']['name']} is not a documented Secret")
                if "configMapKeyRef" in vf and vf["configMapKeyRef"]["name"] not in configmaps:
                    fail(w, f"env {e['name']}: ConfigMap {vf['configMapKeyRef']['name']} does not exist")
                if re.search(r"://[^/\s:@]+:[^/\s@]+@", str(e.get("value", ""))):
                    fail(w, f"env {e['name']} carries a credential in a URL: use a Secret")
        if o["kind"] != "Job":
            sel = o["spec"]["selector"]
            if not matches(sel, pod_labels(o)):
                fail(w, "spec.selector does not match the pod template labels")
    for name, s in by_kind.get("Secret", {}).items():
        fail(f"{target} Secret/{name}", "Secrets must not be rendered (values are created per environment)")
    for name, cm in configmaps.items():
        for k, v in (cm.get("data") or {}).items():
            if k.startswith("LONGRUN_") and k not in KNOWN_ENV:
                fail(f"{target} ConfigMap/{name}", f"{k} is read by no longrun binary (common/config.c, getenv, "
                                                   "agents file)")
            if re.search(r"://[^/\s:@\"]+:[^/\s@\"]+@", str(v)):
                fail(f"{target} ConfigMap/{name}", f"{k} carries a credential in a URL")
    for name, svc in by_kind.get("Service", {}).items():
        sel = svc["spec"].get("selector") or {}
        targets = [o for o in workloads if matches(sel, pod_labels(o))]
        if not targets:
            fail(f"{target} Service/{name}", f"selector {sel} matches no workload")
        for p in svc["spec"].get("ports", []):
            tp = p.get("targetPort")
            if isinstance(tp, str):
                names = {cp.get("name") for o in targets for c in pod_spec(o)["containers"] for cp in c.get("ports", [])}
                if tp not in names:
                    fail(f"{target} Service/{name}", f"targetPort {tp} is no container port name of its pods")
    for name, pdb in by_kind.get("PodDisruptionBudget", {}).items():
        if not any(matches(pdb["spec"]["selector"], pod_labels(o)) for o in workloads):
            fail(f"{target} PodDisruptionBudget/{name}", "selector matches no workload")
    for name, sm in by_kind.get("ServiceMonitor", {}).items():
        svcs = [s for s in by_kind.get("Service", {}).values()
                if matches(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
        if not svcs:
            fail(f"{target} ServiceMonitor/{name}", "selector matches no Service")
        for ep in sm["spec"].get("endpoints", []):
            if not any(ep.get("port") == p.get("name") for s in svcs for p in s["spec"]["ports"]):
                fail(f"{target} ServiceMonitor/{name}", f"port {ep.get('port')} is no port name of the Service")
    deployments = by_kind.get("Deployment", {})
    for kind in ("ScaledObject", "HorizontalPodAutoscaler"):
        for name, so in by_kind.get(kind, {}).items():
            ref = so["spec"]["scaleTargetRef"]["name"]
            w = f"{target} {kind}/{name}"
            if ref not in deployments:
                fail(w, f"scaleTargetRef {ref} does not exist")
                continue
            dep = deployments[ref]
            if "replicas" in dep["spec"]:
                fail(w, f"Deployment {ref} still sets spec.replicas: every apply would fight the autoscaler")
            grace = pod_spec(dep).get("terminationGracePeriodSeconds", 30)
            behavior = (so["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
                        if kind == "ScaledObject" else so["spec"].get("behavior")) or {}
            down = behavior.get("scaleDown") or {}
            pols = down.get("policies") or []
            if not pols or any(p["type"] != "Pods" or p["value"] != 1 or p["periodSeconds"] < grace for p in pols):
                fail(w, f"scaleDown must remove at most 1 pod per period >= the grace period ({grace} s), so "
                        "drains never overlap")
            if down.get("stabilizationWindowSeconds", 300) < 120:
                fail(w, "scaleDown.stabilizationWindowSeconds below 120 s: continuation bursts cause flapping")
            env = container_env(pod_spec(dep)["containers"][0], configmaps)
            max_in_flight = int(env.get("LONGRUN_MAX_IN_FLIGHT") or CONFIG_DEFAULTS["LONGRUN_MAX_IN_FLIGHT"])
            if kind == "ScaledObject":
                if so["spec"].get("minReplicaCount", 0) == 0 and so["spec"].get("cooldownPeriod", 300) < 2 * grace:
                    fail(w, "cooldownPeriod must be well above the drain time when scaling to zero")
                queues = {f"longrun.q.{q.strip()}" for q in (env.get("LONGRUN_QUEUES") or "default").split(",")}
                seen = set()
                for t in so["spec"]["triggers"]:
                    if t["type"] != "rabbitmq":
                        continue
                    md = t["metadata"]
                    seen.add(md.get("queueName"))
                    if md.get("protocol") != "http" or md.get("mode") != "QueueLength" or \
                            md.get("excludeUnacknowledged", "false") != "false":
                        fail(w, "the rabbitmq trigger must count unacked messages: protocol http, mode QueueLength, "
                                "excludeUnacknowledged false (over AMQP KEDA sees ready messages only)")
                    if float(md.get("value", "0")) > max_in_flight:
                        fail(w, f"target value {md.get('value')} exceeds LONGRUN_MAX_IN_FLIGHT {max_in_flight}")
                    auth = (t.get("authenticationRef") or {}).get("name")
                    if auth and auth not in by_kind.get("TriggerAuthentication", {}):
                        fail(w, f"authenticationRef {auth} does not exist")
                if seen != queues:
                    fail(w, f"triggers cover queues {sorted(seen)}, the workers consume {sorted(queues)}")
    for name, ta in by_kind.get("TriggerAuthentication", {}).items():
        for ref in ta["spec"].get("secretTargetRef", []):
            if ref["name"] not in EXTERNAL_SECRETS:
                fail(f"{target} TriggerAuthentication/{name}", f"Secret {ref['name']} is not a documented Secret")
    ns = by_kind.get("Namespace", {}).get("longrun")
    if ns is None:
        fail(target, "Namespace longrun is not rendered")
    elif ns["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") != "restricted":
        fail(target, "Namespace longrun must enforce the restricted Pod Security Standard")
    for o in objs:
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != "longrun":
            fail(f"{target} {o['kind']}/{o['metadata']['name']}", "not in namespace longrun")
    return by_kind


def check_agents(target, by_kind):
    """The agents ConfigMap holds examples/agents.json and the worker accepts it."""
    cms = [cm for name, cm in by_kind.get("ConfigMap", {}).items() if name.startswith("longrun-agents")]
    if len(cms) != 1:
        fail(target, f"expected one longrun-agents ConfigMap, found {len(cms)}")
        return
    agents = cms[0]["data"]["agents.json"]
    with open(os.path.join(SRC, "examples", "agents.json")) as f:
        if agents != f.read():
            fail(target, "k8s/base/agents.json differs from examples/agents.json (copy it again)")
    worker = os.path.join(BUILD, "longrun-worker")
    if not os.access(worker, os.X_OK):
        notes.append(f"{target}: {worker} not built: --check-config of the agents file not run")
        return
    env_cm = [cm for name, cm in by_kind["ConfigMap"].items() if name.startswith("longrun-env")][0]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "agents.json")
        with open(path, "w") as f:
            f.write(agents)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LONGRUN_")}
        env.update(env_cm["data"])
        env["LONGRUN_AGENTS_FILE"] = path
        env.setdefault("LONGRUN_FIXTURE_URL", "http://fixture.invalid")
        r = subprocess.run([worker, "--check-config"], env=env, capture_output=True, text=True, timeout=30)
        if r.returncode != 0 or "configuration ok" not in r.stdout:
            fail(target, f"longrun-worker --check-config with the rendered ConfigMaps: {r.stdout}{r.stderr}")
        else:
            notes.append(f"{target}: longrun-worker --check-config: {r.stdout.strip()}")


def runbook_base(k8s=K8S):
    """runbookBaseURL of the monitoring settings (k8s/overlays/prod/monitoring/settings.yaml)."""
    with open(os.path.join(k8s, "overlays", "prod", "monitoring", "settings.yaml")) as f:
        return yaml.safe_load(f)["data"]["runbookBaseURL"]


def check_runbook_base():
    """The base is configurable: a copy of k8s/ with another runbookBaseURL renders every
    runbook_url (prod and canary) from it."""
    other = "https://runbooks.test.invalid/ops/longrun-docs"
    with tempfile.TemporaryDirectory() as d:
        shutil.copytree(K8S, os.path.join(d, "k8s"))
        path = os.path.join(d, "k8s", "overlays", "prod", "monitoring", "settings.yaml")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace(runbook_base(), other))
        for ov in ("prod", "canary"):
            r = subprocess.run([KUBECTL, "kustomize", os.path.join(d, "k8s", "overlays", ov)], capture_output=True,
                               text=True, timeout=120)
            if r.returncode != 0:
                fail("runbook base", f"{ov} with another runbookBaseURL does not render: {r.stderr}")
                continue
            urls = [rule["annotations"]["runbook_url"] for o in yaml.safe_load_all(r.stdout)
                    if o and o["kind"] == "PrometheusRule" for g in o["spec"]["groups"] for rule in g["rules"]
                    if "alert" in rule]
            bad = [u for u in urls if not u.startswith(other + "/runbooks/")]
            if not urls or bad:
                fail("runbook base", f"{ov}: runbook_urls not built from {other}: {bad or 'none found'}")
            else:
                notes.append(f"runbook base: {ov} with runbookBaseURL {other}: {len(urls)} runbook_urls follow it")


def check_monitoring(target, by_kind):
    rules = by_kind.get("PrometheusRule", {})
    dash = [cm for cm in by_kind.get("ConfigMap", {}).values() if (cm["metadata"].get("labels") or {}).get("grafana_dashboard")]
    if not rules or not dash:
        fail(target, "prod needs the PrometheusRule and the Grafana dashboard ConfigMap")
        return
    known = set(METRICS)
    metrics_md = os.path.join(SRC, "docs", "metrics.md")
    if os.path.exists(metrics_md):
        with open(metrics_md) as f:
            known = set(re.findall(r"`((?:longrun|process)_[a-z0-9_]+)`", f.read()))
    base = runbook_base() + "/runbooks/"
    texts = []
    for name, pr in rules.items():
        for g in pr["spec"]["groups"]:
            for r in g["rules"]:
                texts.append((f"PrometheusRule/{name} {r.get('alert') or r.get('record')}", r["expr"]))
                url = (r.get("annotations") or {}).get("runbook_url")
                page = os.path.join(SRC, "docs", "runbooks", url[len(base):].split("#")[0]) if url else None
                if r.get("alert") and not url:
                    fail(target, f"alert {r['alert']} has no runbook_url")
                elif url and not url.startswith(base):
                    fail(target, f"alert {r['alert']}: runbook_url {url} is not <runbookBaseURL>/runbooks/... "
                                 f"({base})")
                elif url and not os.path.isfile(page):
                    fail(target, f"alert {r['alert']}: runbook {url}: {os.path.relpath(page, SRC)} does not exist")
                elif url:
                    with open(page) as f:
                        if r["alert"] not in f.read():
                            fail(target, f"alert {r['alert']}: its runbook {url} does not name it")
        promtool = shutil.which("promtool")
        if promtool:
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                yaml.safe_dump({"groups": pr["spec"]["groups"]}, f)
            r = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True, timeout=60)
            os.unlink(f.name)
            if r.returncode != 0:
                fail(target, f"promtool check rules PrometheusRule/{name}:\n{r.stdout}{r.stderr}")
            else:
                notes.append(f"{target}: promtool check rules PrometheusRule/{name}: {r.stdout.strip().splitlines()[-1]}")
        else:
            notes.append(f"{target}: promtool not installed (Debian package prometheus): PromQL syntax not checked")
    for cm in dash:
        for key, text in cm["data"].items():
            board = json.loads(text)
            names = {v["name"] for v in board.get("templating", {}).get("list", [])}
            for want in ("namespace", "agent", "model", "queue"):
                if want not in names:
                    fail(target, f"dashboard {key} has no template variable {want}")
            for p in board["panels"]:
                for t in p.get("targets", []):
                    texts.append((f"dashboard {key} panel {p['title']!r}", t["expr"]))
    promtool = shutil.which("promtool")
    panels = [(w, e) for w, e in texts if w.startswith("dashboard ")]
    if promtool and panels:
        # the panels' PromQL parses, with the template variables set to "any value"
        rules = [{"record": f"dashboard:panel{i}", "expr": re.sub(r"\$\{?\w+\}?", ".*", e)}
                 for i, (w, e) in enumerate(panels)]
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        r = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True, timeout=60)
        os.unlink(f.name)
        if r.returncode != 0:
            fail(target, f"promtool: a dashboard panel's query does not parse:\n{r.stdout}{r.stderr}")
        else:
            notes.append(f"{target}: promtool parses the {len(panels)} dashboard queries")
    for where, expr in texts:
        for m in sorted(set(re.findall(r"\b(?:longrun|process)_[a-z0-9_]+", expr))):
            base = re.sub(r"_(bucket|sum|count)$", "", m)
            if m not in known and base not in known:
                fail(target, f"{where}: metric {m} is not documented "
                             f"({'docs/metrics.md' if os.path.exists(metrics_md) else 'the agreed list'})")


def check_set_image():
    """k8s/set-image on a copy of the overlays: the rendered image changes, nothing else."""
    with tempfile.TemporaryDirectory() as d:
        shutil.copytree(K8S, os.path.join(d, "k8s"))
        tool = os.path.join(d, "k8s", "set-image")
        ov = os.path.join(d, "k8s", "overlays", "canary")
        r = subprocess.run([tool, ov, "longrun-canary", "registry.example.com/longrun:9.9.9"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            fail("k8s/set-image", r.stderr)
            return
        docs = [x for x in yaml.safe_load_all(subprocess.run([KUBECTL, "kustomize", ov], capture_output=True,
                                                                 text=True, timeout=120).stdout) if x]
        images = {o["metadata"]["name"]: pod_spec(o)["containers"][0]["image"] for o in docs if o["kind"] == "Deployment"}
        if images.get("longrun-worker-canary") != "registry.example.com/longrun:9.9.9" or \
                images.get("longrun-worker") != "registry.example.com/longrun:0.1.0":
            fail("k8s/set-image", f"unexpected images after set-image: {images}")
        r = subprocess.run([tool, ov, "no-such-image", "x/y:1"], capture_output=True, text=True, timeout=30)
        if r.returncode != 1:
            fail("k8s/set-image", f"an unknown image name must exit 1, got {r.returncode}")


def self_test(objs):
    """The checks must catch what they exist for: break a copy of the prod worker in
    known ways and expect one complaint each (so a check that silently stopped working
    fails this test)."""
    import copy
    global failures
    saved, failures = failures, []
    configmaps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    worker = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "longrun-worker")
    cases = {
        "unknown field": (lambda w: pod_spec(w)["containers"][0].__setitem__("livenesProbe", {}), "schema"),
        "wrong type": (lambda w: w["spec"].__setitem__("minReadySeconds", "10"), "schema"),
        "bad quantity": (lambda w: pod_spec(w)["containers"][0]["resources"]["limits"].__setitem__("memory", "512MB"),
                         "schema"),
        "no readiness probe": (lambda w: pod_spec(w)["containers"][0].pop("readinessProbe"), "readinessProbe"),
        "root": (lambda w: pod_spec(w)["securityContext"].__setitem__("runAsUser", 0), "runAsUser"),
        "no limits": (lambda w: pod_spec(w)["containers"][0]["resources"].pop("limits"), "limits"),
        "short grace": (lambda w: pod_spec(w).__setitem__("terminationGracePeriodSeconds", 30), "terminationGrace"),
        "writable root": (lambda w: pod_spec(w)["containers"][0]["securityContext"].__setitem__(
            "readOnlyRootFilesystem", False), "readOnlyRootFilesystem"),
        "no preStop": (lambda w: pod_spec(w)["containers"][0].pop("lifecycle"), "preStop"),
    }
    missed = []
    for name, (mutate, expect) in cases.items():
        w = copy.deepcopy(worker)
        mutate(w)
        failures = []
        validate_schema("self-test", w)
        check_workload("self-test", w, configmaps)
        if not any(expect in f_ for f_ in failures):
            missed.append(f"{name} (expected a complaint about {expect}, got {failures})")
    # A longer drain in the ConfigMap must raise the required grace period.
    cms = copy.deepcopy(configmaps)
    for n, cm in cms.items():
        if n.startswith("longrun-env"):
            cm["data"]["LONGRUN_DRAIN_SECONDS"] = "120"
    failures = []
    check_workload("self-test", copy.deepcopy(worker), cms)
    if not any("LONGRUN_DRAIN_SECONDS 120" in f_ for f_ in failures):
        missed.append(f"drain 120 s vs grace 60 s not caught: {failures}")
    failures = saved
    for m in missed:
        fail("self-test", f"a broken manifest passed: {m}")
    notes.append(f"self-test: {len(cases) + 1 - len(missed)} of {len(cases) + 1} deliberate breakages caught")


def slug(heading):
    """GitHub's anchor for a Markdown heading."""
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return h.replace(" ", "-")


def check_docs():
    """docs/deploy.md and docs/runbooks/: relative links and #anchors resolve, and every
    path under k8s/ or tests/ or scripts/ they name in backticks exists."""
    pages = [os.path.join(SRC, "docs", "deploy.md")] + sorted(
        os.path.join(SRC, "docs", "runbooks", f) for f in os.listdir(os.path.join(SRC, "docs", "runbooks"))
        if f.endswith(".md"))
    anchors = {}

    def anchors_of(path):
        if path not in anchors:
            with open(path) as f:
                anchors[path] = {slug(m) for m in re.findall(r"^#+ (.*)$", f.read(), re.M)}
        return anchors[path]

    for page in pages:
        with open(page) as f:
            text = f.read()
        where = os.path.relpath(page, SRC)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(dest):
                fail(where, f"link {target}: {os.path.relpath(dest, SRC)} does not exist")
            elif anchor and dest.endswith(".md") and anchor not in anchors_of(dest):
                fail(where, f"link {target}: no heading #{anchor} in {os.path.relpath(dest, SRC)}")
        for ref in set(re.findall(r"`((?:k8s|tests|scripts|docs|examples)/[\w./-]+)`", text)):
            if not os.path.exists(os.path.join(SRC, ref.rstrip("/"))):
                fail(where, f"names {ref}, which does not exist")


def main():
    t0 = time.monotonic()
    rendered = {name: kustomize(path) for name, path in TARGETS.items()}
    # The HPA alternative: base + components/hpa, in a throwaway kustomization
    # (kustomize wants relative paths).
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "kustomization.yaml"), "w") as f:
            yaml.safe_dump({"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                            "resources": [os.path.relpath(os.path.join(K8S, "base"), d)],
                            "components": [os.path.relpath(os.path.join(K8S, "components", "hpa"), d)],
                            "namespace": "longrun",
                            "images": [{"name": "longrun", "newName": "localhost/longrun", "newTag": "test"}]}, f)
        rendered["base+hpa"] = kustomize(d)
    expect = {
        "dev": {"StatefulSet", "ScaledObject", "Job", "NetworkPolicy", "PodDisruptionBudget"},
        "prod": {"RabbitmqCluster", "Cluster", "ServiceMonitor", "PrometheusRule", "ScaledObject"},
        "canary": {"RabbitmqCluster", "Cluster", "ScaledObject"},
        "base+hpa": {"HorizontalPodAutoscaler"},
    }
    for target, objs in rendered.items():
        if not objs:
            continue
        kinds = {o["kind"] for o in objs}
        missing = expect.get(target, set()) - kinds
        if missing:
            fail(target, f"missing kinds {sorted(missing)}")
        if target == "base+hpa" and "ScaledObject" in kinds:
            fail(target, "both a ScaledObject and an HPA")
        configmaps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
        for o in objs:
            where = f"{target} {o['kind']}/{o['metadata'].get('name')}"
            validate_schema(where, o)
            if o["kind"] in WORKLOADS:
                check_workload(where, o, configmaps)
                if target != "base":
                    for c in pod_spec(o)["containers"]:
                        if c["image"].split(":")[0] == "longrun":
                            fail(where, "the overlay does not map image 'longrun' to a registry (images:)")
        by_kind = check_references(target, objs)
        check_tls(target, by_kind)
        check_network(target, by_kind)
        check_agents(target, by_kind)
        if target in ("prod", "canary"):
            check_monitoring(target, by_kind)
        if target == "canary":
            deps = by_kind.get("Deployment", {})
            can = deps.get("longrun-worker-canary")
            if can is None:
                fail(target, "no Deployment longrun-worker-canary")
            else:
                st = pod_spec(deps["longrun-worker"])["containers"][0]["image"]
                ci = pod_spec(can)["containers"][0]["image"]
                if st == ci:
                    fail(target, f"the canary runs the stable image {st}")
                if pod_labels(can).get("track") != "canary" or pod_labels(deps["longrun-worker"]).get("track") != "stable":
                    fail(target, "track labels: stable pods must have track=stable, the canary track=canary")
                if can["spec"].get("replicas", 1) > 1:
                    fail(target, "the canary runs more than one replica")
    if rendered.get("prod"):
        self_test(rendered["prod"])
    check_set_image()
    check_runbook_base()
    check_docs()
    for n in notes:
        print(f"  {n}")
    n_objs = sum(len(v) for v in rendered.values())
    if failures:
        print(f"k8s.validate: FAILED ({len(failures)} problems in {n_objs} objects):")
        for f_ in failures:
            print(f"  - {f_}")
        return 1
    print(f"k8s.validate: {n_objs} objects in {len(rendered)} renderings valid and within policy "
          f"({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
