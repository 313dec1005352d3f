#!/usr/bin/env python3
"""Checks the deployment files without a cluster (run through deploy/check.sh, which sets up the venv).

1. Helm charts: lint (strict) and render every chart with its default values and each
   helm/<chart>/examples/*.yaml; validate every rendered manifest with kubernetes-validate (strict,
   Kubernetes K8S_VERSION); cross-check Services, probes, mounts and the agent's capabilities.
   The gateway chart: one gateway renders a Deployment and its claim; a fleet (examples/fleet.yaml and
   variants) a StatefulSet with a claim, config file, advertise address and Service per replica and
   etcd's Secret mounted read-only; no secret in a ConfigMap or on a command line; UDP tunnels' datagram
   channel (config.udp.listen) in the config, the container and every Service with libp2p ports, on the
   port agents are told, and the leased ports on each protocol of service.leaseProtocols (variants of the
   default values too); values it must refuse (several replicas on the embedded store, a shared identity
   key, the channel on a taken port ...) fail to render.
2. Config files the charts, compose.yaml and deploy/*.toml.example produce: `check-config` of the
   real binaries accepts them (unknown keys are errors there).
3. Monitoring: every metric name in alerts.yaml and grafana-dashboard.json is exported by a running
   gateway and agent (started on loopback with free ports and temporary data dirs, a tunnel with
   proto=both echoing over TCP and UDP), or registered in their src/**/metrics.rs.
Prints one line per check and "N passed, N failed"; exits 1 on any failure.
"""

import copy
import json
import os
import re
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.37.0"
RELEASE, NAMESPACE = "rg", "relaygate"

# Metrics that alerts or dashboards take from outside relaygate, and where they come from.
EXTERNAL_METRICS = {
    "container_memory_working_set_bytes": "cAdvisor (kubelet)",
    "kube_pod_container_resource_limits": "kube-state-metrics",
}

passed, failed = 0, 0


def ok(what):
    global passed
    passed += 1
    print(f"ok    {what}")


def fail(what, why):
    global failed
    failed += 1
    print(f"FAIL  {what}: {why}")


def clean_env():
    """The environment without RELAYGATE_* variables, so only what a check sets reaches a binary."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RELAYGATE_")}


# ---------------------------------------------------------------------------------------------
# binaries


def find_bins():
    d = os.environ.get("RELAYGATE_BIN_DIR")
    cands = [Path(d).resolve()] if d else [ROOT / "target" / "release", ROOT / "target" / "debug"]
    have = [
        c for c in cands
        if (c / "relaygate-gateway").is_file() and (c / "relaygate-agent").is_file()
    ]
    if not have:
        return None
    # Both exist: the newer build (a stale release build could miss a new metric).
    return max(have, key=lambda c: (c / "relaygate-gateway").stat().st_mtime)


def run_bin(binary, args, env=None, check=True):
    e = clean_env()
    e.update(env or {})
    p = subprocess.run([str(binary), *args], env=e, capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise RuntimeError(f"{binary.name} {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
    return p


# ---------------------------------------------------------------------------------------------
# charts


def chart_cases(chart):
    cases = [("default values", None)]
    for f in sorted((chart / "examples").glob("*.yaml")):
        cases.append((f"examples/{f.name}", f))
    return cases


def render_chart(helm, chart, values):
    with helm.Chart.load(str(chart)) as c:
        c.validate_schema(values)
        out = c.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs, notes = [], ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for d in yaml.safe_load_all(text):
            if d:
                docs.append((path, d))
    return docs, notes


def k8s_validate(kv, docs, what):
    bad = 0
    for path, d in docs:
        name = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        if d.get("apiVersion") == "monitoring.coreos.com/v1":
            continue  # a CRD: checked structurally in cross_check
        try:
            kv.validate(d, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            fail(f"{what}: {name}", f"{'.'.join(str(p) for p in e.path)}: {e.message}")
            bad += 1
        except kv.SchemaNotFoundError as e:
            fail(f"{what}: {name}", e.message)
            bad += 1
    if not bad:
        ok(f"{what}: {len(docs)} manifests valid (kubernetes-validate strict, Kubernetes {K8S_VERSION})")


def pod_specs(docs):
    for _, d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            yield d, d["spec"]["template"]


def containers(tpl):
    spec = tpl["spec"]
    return spec.get("initContainers", []) + spec.get("containers", [])


def pod_label_sets(workload, tpl):
    """The labels of the pods a workload runs: a StatefulSet's pods also carry their own name
    (statefulset.kubernetes.io/pod-name), which per-replica Services select."""
    labels = tpl["metadata"].get("labels", {})
    if workload["kind"] != "StatefulSet":
        return [labels]
    name = workload["metadata"]["name"]
    return [{**labels, "statefulset.kubernetes.io/pod-name": f"{name}-{i}"}
            for i in range(workload["spec"].get("replicas", 1))]


def cross_check(docs, what, chart_name, values):
    problems = []
    services = [d for _, d in docs if d["kind"] == "Service"]
    workloads = list(pod_specs(docs))
    for s in services:
        sel = s["spec"].get("selector", {})
        targets = [t for w, t in workloads if any(sel.items() <= ls.items() for ls in pod_label_sets(w, t))]
        if not targets:
            problems.append(f"Service {s['metadata']['name']} selects no pod")
            continue
        names = {p.get("name") for t in targets for c in containers(t) for p in c.get("ports", [])}
        numbers = {p["containerPort"] for t in targets for c in containers(t) for p in c.get("ports", [])}
        for p in s["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            if isinstance(tp, str) and tp not in names:
                problems.append(f"Service {s['metadata']['name']} targets unknown port name {tp}")
    # Node ports are allocated cluster-wide: two Services cannot share one (one Service may use a
    # number for both TCP and UDP).
    owner = {}
    for s in services:
        for n in {p["nodePort"] for p in s["spec"]["ports"] if "nodePort" in p}:
            if n in owner:
                problems.append(f"node port {n} in both Service {owner[n]} and {s['metadata']['name']}")
            owner[n] = s["metadata"]["name"]
    rendered = {(d["kind"], d["metadata"]["name"]) for _, d in docs}
    # Secrets the user creates: the chart only names them.
    external = {values_get(values, "secrets.existingSecret", ""), values_get(values, "secrets.etcd.existingSecret", "")}
    external.discard("")
    for w, t in workloads:
        spec = t["spec"]
        vols = {v["name"] for v in spec.get("volumes", [])}
        for v in spec.get("volumes", []):
            if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in rendered:
                problems.append(f"volume {v['name']} names ConfigMap {v['configMap']['name']}, not rendered")
            sn = v.get("secret", {}).get("secretName")
            if sn and ("Secret", sn) not in rendered and sn not in external:
                problems.append(f"volume {v['name']} names Secret {sn}, neither rendered nor existingSecret")
        for c in containers(t):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef", {}).get("name")
                if ref and ("Secret", ref) not in rendered and ref not in external:
                    problems.append(f"env {e['name']} names Secret {ref}, neither rendered nor existingSecret")
        vols |= {v["metadata"]["name"] for v in w["spec"].get("volumeClaimTemplates", [])}
        for c in containers(t):
            ports = {p.get("name") for p in c.get("ports", [])}
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                pr = c.get(kind, {}).get("httpGet")
                if pr and isinstance(pr["port"], str) and pr["port"] not in ports:
                    problems.append(f"{c['name']} {kind} uses unknown port {pr['port']}")
            for m in c.get("volumeMounts", []):
                if m["name"] not in vols:
                    problems.append(f"{c['name']} mounts undefined volume {m['name']}")
            sc = c.get("securityContext", {})
            caps = sc.get("capabilities", {})
            if "ALL" not in caps.get("drop", []):
                problems.append(f"{c['name']} does not drop ALL capabilities")
            if chart_name == "relaygate-agent" and c["name"] == values_get(values, "sidecar.name", "relaygate-agent"):
                transparent = any(
                    (tn.get("deliver") or "plain") == "transparent"
                    for tn in values_get(values, "config.tunnels", []))
                added = set(caps.get("add", []))
                if transparent and added != {"NET_ADMIN", "NET_RAW"}:
                    problems.append(f"transparent tunnel but the agent adds {sorted(added)}")
                if not transparent and added:
                    problems.append(f"no transparent tunnel but the agent adds {sorted(added)}")
                if not transparent and not sc.get("readOnlyRootFilesystem"):
                    problems.append("agent root filesystem is writable")
            elif c["name"] == "gateway":
                if not (sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False):
                    problems.append("gateway container is not read-only / no-privilege-escalation")
                if caps.get("add"):
                    problems.append(f"gateway adds capabilities {caps['add']}")
    for _, d in docs:
        if d["kind"] == "ServiceMonitor":
            sel = d["spec"]["selector"]["matchLabels"]
            match = [s for s in services if sel.items() <= s["metadata"]["labels"].items()]
            if len(match) != 1:
                problems.append(f"ServiceMonitor selects {len(match)} Services")
            else:
                pnames = {p.get("name") for p in match[0]["spec"]["ports"]}
                for ep in d["spec"]["endpoints"]:
                    if ep["port"] not in pnames:
                        problems.append(f"ServiceMonitor endpoint port {ep['port']} not in the Service")
    if problems:
        for p in problems:
            fail(f"{what}: consistency", p)
    else:
        ok(f"{what}: Services, probes, mounts and capabilities consistent")


def values_get(values, dotted, default):
    cur = values
    for k in dotted.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return default
        cur = cur[k]
    return cur


def merged_values(chart, override):
    base = yaml.safe_load((chart / "values.yaml").read_text()) or {}

    def merge(a, b):
        for k, v in (b or {}).items():
            if isinstance(v, dict) and isinstance(a.get(k), dict):
                merge(a[k], v)
            else:
                a[k] = v
        return a

    return merge(base, override)


def config_check(bins, docs, what, chart_name, values):
    """Runs the binary's check-config on the config file the chart rendered."""
    if bins is None:
        return
    cms = [d for _, d in docs if d["kind"] == "ConfigMap"]
    with tempfile.TemporaryDirectory() as tmp:
        for cm in cms:
            for key, text in cm.get("data", {}).items():
                if not key.endswith(".toml"):
                    continue
                f = Path(tmp) / key
                f.write_text(text)
                binary = bins / ("relaygate-gateway" if chart_name == "relaygate-gateway" else "relaygate-agent")
                args = ["--config", str(f), "--data-dir", str(Path(tmp) / "data")]
                if chart_name == "relaygate-agent":
                    # Tunnels on the command line (a target naming $(POD_IP)): as the sidecar passes them.
                    sidecar = [c for _, t in pod_specs(docs) for c in containers(t)
                               if c["name"] == values_get(values, "sidecar.name", "relaygate-agent")]
                    cmd = sidecar[0]["args"] if sidecar else ["run"]
                    args += [a.replace("$(POD_IP)", "192.0.2.10") for a in cmd[1:]]
                p = run_bin(binary, [*args, "check-config"], check=False)
                if p.returncode == 0:
                    ok(f"{what}: {binary.name} check-config accepts the rendered {key}")
                else:
                    fail(f"{what}: {binary.name} check-config on {key}", p.stderr.strip())


def check_charts(bins):
    import helm_python as helm
    import kubernetes_validate.utils as kv

    if K8S_VERSION.rsplit(".", 1)[0] not in [v.rsplit(".", 1)[0] for v in kv.all_versions()]:
        fail("kubernetes-validate", f"does not support Kubernetes {K8S_VERSION}")
        return
    for chart in sorted(p.parent for p in (ROOT / "helm").glob("*/Chart.yaml")):
        meta = yaml.safe_load((chart / "Chart.yaml").read_text())
        helpers = (chart / "templates" / "_helpers.tpl").read_text()
        m = re.search(r'define "[\w-]+\.appVersion" -}}\s*(\S+)', helpers)
        if m and m.group(1) != str(meta["appVersion"]):
            fail(f"{chart.name}: appVersion", f"_helpers.tpl says {m.group(1)}, Chart.yaml {meta['appVersion']}")
        for label, vfile in chart_cases(chart):
            what = f"{chart.name} [{label}]"
            override = yaml.safe_load(vfile.read_text()) if vfile else None
            try:
                lint = helm.lint(str(chart), override, strict=True, kube_version=f"v{K8S_VERSION}")
            except Exception as e:  # noqa: BLE001 - any SDK error is a failed check
                fail(f"{what}: helm lint", e)
                continue
            msgs = [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2]
            if lint.get("errors") or msgs:
                fail(f"{what}: helm lint --strict", "; ".join(
                    [str(e) for e in lint.get("errors", [])] + [f"{m['path']}: {m['error']}" for m in msgs]))
            else:
                ok(f"{what}: helm lint --strict")
            try:
                docs, notes = render_chart(helm, chart, override)
            except Exception as e:  # noqa: BLE001
                fail(f"{what}: render", e)
                continue
            if not notes.strip():
                fail(f"{what}: NOTES.txt", "renders empty")
            k8s_validate(kv, docs, what)
            values = merged_values(chart, override)
            cross_check(docs, what, chart.name, values)
            config_check(bins, docs, what, chart.name, values)
            if chart.name == "relaygate-gateway":
                gateway_checks(docs, what, values)
        if chart.name == "relaygate-gateway":
            check_gateway_fleet(helm, kv, bins, chart)
        if chart.name == "relaygate-agent":
            check_refusals(helm, chart, AGENT_REFUSED)


# ---------------------------------------------------------------------------------------------
# the gateway chart: one gateway, or a fleet


def deep_merge(a, b):
    """a with b merged in (dicts recursively, anything else replaced); neither is changed."""
    out = copy.deepcopy(a or {})
    for k, v in (b or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def listen_ports(values):
    """(protocol, port) of config.listen, as the chart derives them."""
    out = set()
    for a in values_get(values, "config.listen", []):
        m = re.search(r"/(tcp|udp)/(\d+)", a)
        if m:
            out.add((m.group(1).upper(), int(m.group(2))))
    return out


def gateway_configs(docs):
    """{ConfigMap key: parsed TOML} of the gateway's config files."""
    return {k: tomllib.loads(v) for _, d in docs if d["kind"] == "ConfigMap"
            for k, v in d.get("data", {}).items() if k.endswith(".toml")}


def gateway_container(tpl):
    return next(c for c in containers(tpl) if c["name"] == "gateway")


def gateway_secret_problems(docs, values):
    """No secret in a ConfigMap, on a command line or in a literal environment value."""
    problems = []
    secrets = [values_get(values, f"secrets.{k}", "") for k in ("joinToken", "adminToken", "identityKey")]
    secrets = [s for s in secrets if s]
    for key, cfg in gateway_configs(docs).items():
        for dotted in ("admission.token", "admin.token", "identity.key", "store.etcd.password"):
            if values_get(cfg, dotted, None) is not None:
                problems.append(f"ConfigMap {key} holds the secret {dotted}")
    for _, d in docs:
        if d["kind"] == "ConfigMap":
            text = json.dumps(d.get("data", {}))
            problems += [f"ConfigMap {d['metadata']['name']} holds a secret value from values.yaml"
                         for s in secrets if s in text]
            if "BEGIN" in text and "PRIVATE KEY" in text:
                problems.append(f"ConfigMap {d['metadata']['name']} holds a PEM key")
    for _, t in pod_specs(docs):
        for c in containers(t):
            line = " ".join(c.get("command", []) + c.get("args", []))
            problems += [f"{c['name']}'s command line holds a secret value" for s in secrets if s in line]
            if re.search(r"token|password", line, re.I):
                problems.append(f"{c['name']}'s command line names a token or password: {line}")
            for e in c.get("env", []):
                if re.search(r"TOKEN|PASSWORD|IDENTITY__KEY", e["name"]) and "value" in e:
                    problems.append(f"{c['name']}'s env {e['name']} is a literal value, not from a Secret")
    return problems


def gateway_single_problems(docs, values):
    """Default and non-fleet values: one Deployment with its claim, as before fleets existed."""
    problems = []
    kinds = [d["kind"] for _, d in docs]
    deps = [d for _, d in docs if d["kind"] == "Deployment"]
    if "StatefulSet" in kinds or len(deps) != 1:
        return [f"want one Deployment and no StatefulSet, got {sorted(kinds)}"]
    spec = deps[0]["spec"]
    if spec.get("replicas") != 1 or spec.get("strategy", {}).get("type") != "Recreate":
        problems.append("the Deployment is not 1 replica with strategy Recreate")
    persist = values_get(values, "persistence.enabled", True)
    claim = values_get(values, "persistence.existingClaim", "")
    if (kinds.count("PersistentVolumeClaim") == 1) != bool(persist and not claim):
        problems.append(f"{kinds.count('PersistentVolumeClaim')} PersistentVolumeClaims rendered")
    if set(gateway_configs(docs)) != {"gateway.toml"}:
        problems.append(f"ConfigMap keys {sorted(gateway_configs(docs))}, want gateway.toml")
    for _, d in docs:
        if d["kind"] == "PodDisruptionBudget" and "minAvailable" not in d["spec"]:
            problems.append("PodDisruptionBudget of one gateway without minAvailable")
    return problems


def gateway_fleet_problems(docs, values):
    """fleet.enabled: a StatefulSet whose replicas each have their own volume, config file (advertise),
    and Service; etcd's files from the Secret, read-only; the leased ports on a shared Service."""
    problems = []
    n = values_get(values, "fleet.replicas", 1)
    kinds = [d["kind"] for _, d in docs]
    sts = [d for _, d in docs if d["kind"] == "StatefulSet"]
    if len(sts) != 1 or "Deployment" in kinds or "PersistentVolumeClaim" in kinds:
        return [f"want one StatefulSet, no Deployment or PersistentVolumeClaim; got {sorted(kinds)}"]
    st = sts[0]
    name, spec = st["metadata"]["name"], st["spec"]
    tpl = spec["template"]
    pod = tpl["spec"]
    gw = gateway_container(tpl)
    by_kind_name = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    if spec.get("replicas") != n:
        problems.append(f"StatefulSet replicas {spec.get('replicas')}, want fleet.replicas {n}")
    if spec.get("podManagementPolicy") != "Parallel":
        problems.append("podManagementPolicy is not Parallel")
    headless = by_kind_name.get(("Service", spec.get("serviceName")))
    if not headless or headless["spec"].get("clusterIP") != "None":
        problems.append(f"serviceName {spec.get('serviceName')} is not a rendered headless Service")
    # Each replica's own data dir (its identity.key): a claim template, never a shared volume.
    mounts = {m["name"]: m for m in gw.get("volumeMounts", [])}
    data_mount = mounts.get("data", {}).get("mountPath")
    if data_mount != values_get(values, "persistence.mountPath", ""):
        problems.append("the gateway does not mount volume data at persistence.mountPath")
    if values_get(values, "persistence.enabled", True):
        if [v["metadata"]["name"] for v in spec.get("volumeClaimTemplates", [])] != ["data"]:
            problems.append("no volumeClaimTemplates [data]: replicas would share or lose their identity")
        if any(v["name"] == "data" for v in pod.get("volumes", [])):
            problems.append("volume data is in the pod template (shared) besides volumeClaimTemplates")
    if values_get(values, "fleet.podAntiAffinity", "preferred") != "none" and \
            "podAntiAffinity" not in pod.get("affinity", {}):
        problems.append("no podAntiAffinity spreading the replicas")
    for _, d in docs:
        if d["kind"] == "PodDisruptionBudget" and ("maxUnavailable" not in d["spec"] or "minAvailable" in d["spec"]):
            problems.append("a fleet's PodDisruptionBudget should set maxUnavailable (and not minAvailable)")

    # Each replica picks its own config file by its pod name.
    env = gw.get("env", [])
    names = [e["name"] for e in env]
    pod_name = next((e for e in env if e["name"] == "POD_NAME"), {})
    cfg_env = next((e for e in env if e["name"] == "RELAYGATE_CONFIG"), {})
    if pod_name.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
        problems.append("no POD_NAME from the downward API (metadata.name)")
    elif "RELAYGATE_CONFIG" not in names or names.index("POD_NAME") > names.index("RELAYGATE_CONFIG"):
        problems.append("POD_NAME must precede RELAYGATE_CONFIG for $(POD_NAME) to expand")
    cfg_path = cfg_env.get("value", "")
    cfg_dir = mounts.get("config", {}).get("mountPath")
    if cfg_path != f"{cfg_dir}/$(POD_NAME).toml" or "subPath" in mounts.get("config", {}):
        problems.append(f"RELAYGATE_CONFIG {cfg_path!r} does not pick <pod name>.toml from the config mount {cfg_dir}")
    cfgs = gateway_configs(docs)
    want = {f"{name}-{i}.toml" for i in range(n)}
    if set(cfgs) != want:
        problems.append(f"ConfigMap keys {sorted(cfgs)}, want one per replica {sorted(want)}")
        return problems
    advertised = [tuple(cfgs[f"{name}-{i}.toml"].get("advertise", [])) for i in range(n)]
    if len(set(advertised)) != n and not values_get(values, "hostNetwork", False):
        problems.append(f"replicas do not each advertise their own addresses: {advertised}")
    for i, adv in enumerate(advertised):
        per = (values_get(values, "fleet.perReplica", []) + [{}] * n)[i].get("advertise")
        expect = per or [a.replace("{ordinal}", str(i)) for a in values_get(values, "config.advertise", [])]
        if list(adv) != expect:
            problems.append(f"replica {i} advertises {list(adv)}, want {expect}")
    for key, cfg in cfgs.items():
        if values_get(cfg, "store.kind", "embedded") != "etcd":
            problems.append(f"{key}: store.kind is not etcd")
        if values_get(cfg, "fleet.advertise", []) != values_get(values, "config.fleet.advertise", []):
            problems.append(f"{key}: fleet.advertise differs from config.fleet.advertise")
        # A gateway on etcd rewrites its token file with the fleet's token: never a read-only mount.
        if values_get(cfg, "admission.token_file", None):
            problems.append(f"{key}: admission.token_file on etcd (the gateway rewrites it with the fleet's token)")

    # The join token from a Secret, inline through the environment.
    if values_get(values, "secrets.joinToken", "") or values_get(values, "secrets.existingSecret", ""):
        ref = next((e for e in env if e["name"] == "RELAYGATE_ADMISSION__TOKEN"), {})
        if ref.get("valueFrom", {}).get("secretKeyRef", {}).get("key") != "join-token":
            problems.append("join token from the Secret not given as RELAYGATE_ADMISSION__TOKEN (secretKeyRef join-token)")

    # etcd's files: the user's Secret, read-only, owner/group-readable only, named in every config.
    etcd_secret = values_get(values, "secrets.etcd.existingSecret", "")
    keys = values_get(values, "secrets.etcd.keys", {})
    want_files = {}
    if etcd_secret:
        if keys.get("ca"):
            want_files["ca"] = "ca.crt"
            if keys.get("cert") and keys.get("key"):
                want_files.update(cert="tls.crt", key="tls.key")
        if values_get(values, "config.store.etcd.user", ""):
            want_files["password_file"] = "password"
    vols = [v for v in pod.get("volumes", []) if v.get("secret", {}).get("secretName") == etcd_secret and etcd_secret]
    if want_files:
        if len(vols) != 1:
            problems.append(f"Secret {etcd_secret} is not mounted once")
        else:
            v = vols[0]
            mode = v["secret"].get("defaultMode")
            if mode not in (0o400, 0o440):
                problems.append(f"etcd Secret mounted with mode {oct(mode or 0o644)}, want 0400 or 0440")
            m = mounts.get(v["name"], {})
            if not m.get("readOnly"):
                problems.append("etcd Secret mounted writable")
            items = {i["path"]: i["key"] for i in v["secret"].get("items", [])}
            for setting, file in want_files.items():
                src = {"ca": "ca", "cert": "cert", "key": "key", "password_file": "password"}[setting]
                if items.get(file) != keys.get(src):
                    problems.append(f"etcd Secret key {keys.get(src)} not mounted as {file}")
                for key, cfg in cfgs.items():
                    got = values_get(cfg, f"store.etcd.{setting}", None)
                    if got != f"{m.get('mountPath')}/{file}":
                        problems.append(f"{key}: store.etcd.{setting} = {got!r}, not the mounted {file}")
    elif vols:
        problems.append(f"Secret {etcd_secret} mounted with no file the gateway reads")
    if keys.get("endpoints") and etcd_secret:
        ref = next((e for e in env if e["name"] == "RELAYGATE_STORE__ETCD__ENDPOINTS"), {})
        if ref.get("valueFrom", {}).get("secretKeyRef") != {"name": etcd_secret, "key": keys["endpoints"]}:
            problems.append("etcd endpoints from the Secret not given as RELAYGATE_STORE__ETCD__ENDPOINTS")
    elif not all(values_get(cfg, "store.etcd.endpoints", []) for cfg in cfgs.values()):
        problems.append("store.etcd.endpoints empty and not from the Secret")

    # One Service per replica (a dial names its peer id), the leased ports on the shared one.
    if values_get(values, "service.enabled", True):
        stype = values_get(values, "service.type", "LoadBalancer")
        listen = listen_ports(values)
        per_replica = values_get(values, "fleet.perReplica", [])
        for i in range(n):
            svc = by_kind_name.get(("Service", f"{name}-{i}"))
            if not svc:
                problems.append(f"no Service {name}-{i} for replica {i}")
                continue
            if svc["spec"].get("selector", {}).get("statefulset.kubernetes.io/pod-name") != f"{name}-{i}":
                problems.append(f"Service {name}-{i} does not select pod {name}-{i} alone")
            if svc["spec"].get("type") != stype:
                problems.append(f"Service {name}-{i} is {svc['spec'].get('type')}, want service.type {stype}")
            ports = {(p["protocol"], p["port"]) for p in svc["spec"]["ports"]}
            if not listen <= ports:
                problems.append(f"Service {name}-{i} lacks the libp2p ports {sorted(listen - ports)}")
            lb = per_replica[i].get("loadBalancerIP") if i < len(per_replica) else None
            if stype == "LoadBalancer" and svc["spec"].get("loadBalancerIP") != lb:
                problems.append(f"Service {name}-{i} loadBalancerIP {svc['spec'].get('loadBalancerIP')}, want {lb}")
        shared = by_kind_name.get(("Service", name), {"spec": {"ports": []}})
        ports = {(p["protocol"], p["port"]) for p in shared["spec"]["ports"]}
        if listen & ports:
            problems.append(f"shared Service {name} carries libp2p ports (a dial there would meet a random peer id)")
        if not any(p.startswith("lease-") for p in (q.get("name", "") for q in shared["spec"]["ports"])):
            problems.append(f"shared Service {name} carries no leased port")
    return problems


def channel_ports(values):
    """(pod port, public port) of the UDP tunnels' datagram channel (config.udp), or None when it is off."""
    if not values_get(values, "config.udp.enabled", True):
        return None
    pod = int(str(values_get(values, "config.udp.listen", "0.0.0.0:4002")).rsplit(":", 1)[1])
    return pod, int(values_get(values, "config.udp.advertise_port", None) or pod)


def lease_protocols(values):
    """The protocols leased ports are published on: service.leaseProtocols, UDP only with config.udp.enabled."""
    protos = {str(p).upper() for p in values_get(values, "service.leaseProtocols", ["TCP"])}
    return protos if values_get(values, "config.udp.enabled", True) else protos - {"UDP"}


def gateway_udp_problems(docs, values):
    """UDP tunnels: the datagram channel in every config file, as the container port udp-channel, and on every
    Service that carries libp2p ports, on the port agents are told (its node port with NodePort); leased ports
    on each protocol of service.leaseProtocols, the same numbers on each; the NetworkPolicy opens the channel
    and the lease ranges on those protocols."""
    problems = []
    ch = channel_ports(values)
    protos = lease_protocols(values)
    cfgs = gateway_configs(docs)
    for key, cfg in cfgs.items():
        udp = cfg.get("udp", {})
        if bool(udp.get("enabled", True)) != (ch is not None):
            problems.append(f"{key}: udp.enabled = {udp.get('enabled')}, values say {ch is not None}")
        if udp.get("listen") != values_get(values, "config.udp.listen", None):
            problems.append(f"{key}: udp.listen = {udp.get('listen')!r}, not config.udp.listen")
    for _, t in pod_specs(docs):
        named = {p.get("name"): p for p in gateway_container(t).get("ports", [])}
        got = named.get("udp-channel")
        if ch and (not got or got.get("protocol") != "UDP" or got["containerPort"] != ch[0]):
            problems.append(f"gateway container port udp-channel is {got}, want UDP {ch[0]} (config.udp.listen)")
        if not ch and got:
            problems.append("container port udp-channel with config.udp.enabled false")
    listen = listen_ports(values)
    for _, d in docs:
        if d["kind"] != "Service" or d["spec"].get("clusterIP") == "None":
            continue
        name, ports = d["metadata"]["name"], d["spec"]["ports"]
        libp2p = listen & {(p["protocol"], p["port"]) for p in ports}
        chan = [p for p in ports if p.get("name") == "udp-channel"]
        if libp2p and ch:
            # The port agents are told: udp.advertise_port of this gateway's config, else listen's.
            cfg = cfgs.get(f"{name}.toml") or cfgs.get("gateway.toml") or {}
            told = cfg.get("udp", {}).get("advertise_port") or ch[0]
            public = chan[0].get("nodePort" if d["spec"].get("type") == "NodePort" else "port") if chan else None
            if not chan or chan[0]["protocol"] != "UDP" or chan[0].get("targetPort") != "udp-channel":
                problems.append(f"Service {name} carries libp2p ports but not the datagram channel (UDP, targetPort udp-channel)")
            elif public != told:
                problems.append(f"Service {name} publishes the datagram channel on {public}, agents are told {told}")
        elif chan:
            problems.append(f"Service {name} carries the datagram channel " +
                            ("with config.udp.enabled false" if libp2p else "but no libp2p port (a dial meets a random gateway)"))
        leases = {}
        for p in ports:
            if p.get("name", "").startswith("lease-"):
                leases.setdefault(p["protocol"], set()).add(p["port"])
        if leases and set(leases) != protos:
            problems.append(f"Service {name}: leased ports on {sorted(leases)}, want service.leaseProtocols {sorted(protos)}")
        if len({frozenset(v) for v in leases.values()}) > 1:
            problems.append(f"Service {name}: the leased ports differ between TCP and UDP")
    for _, d in docs:
        if d["kind"] != "NetworkPolicy":
            continue
        opened = {(p.get("protocol", "TCP"), p["port"]) for r in d["spec"].get("ingress", []) for p in r.get("ports", [])}
        if ch and ("UDP", ch[0]) not in opened:
            problems.append(f"NetworkPolicy does not open the datagram channel UDP {ch[0]}")
        first = int(str(values_get(values, "config.leases.port_range", "")).split("-")[0])
        if {pr for pr, port in opened if port == first} != protos:
            problems.append(f"NetworkPolicy opens the lease range on {sorted(pr for pr, port in opened if port == first)}, "
                            f"want {sorted(protos)}")
    return problems


def gateway_checks(docs, what, values):
    fleet = values_get(values, "fleet.enabled", False)
    problems = (gateway_fleet_problems if fleet else gateway_single_problems)(docs, values)
    problems += gateway_secret_problems(docs, values)
    udp = gateway_udp_problems(docs, values)
    if udp:
        for p in udp:
            fail(f"{what}: UDP", p)
    else:
        ch = channel_ports(values)
        ok(f"{what}: UDP: " + (f"datagram channel udp/{ch[0]} in config, container and each libp2p Service (public {ch[1]})"
                               if ch else "off, no channel port") +
           f"; leased ports on {'+'.join(sorted(lease_protocols(values)))}")
    if problems:
        for p in problems:
            fail(f"{what}: {'fleet' if fleet else 'one gateway'}", p)
    elif fleet:
        n = values_get(values, "fleet.replicas", 1)
        claims = "volumeClaimTemplates" if values_get(values, "persistence.enabled", True) else "emptyDir"
        etcd = (f"etcd Secret {values_get(values, 'secrets.etcd.existingSecret', '')} mounted read-only"
                if values_get(values, "secrets.etcd.existingSecret", "") else "plain etcd")
        ok(f"{what}: StatefulSet of {n} (Parallel, {claims}, anti-affinity, PDB maxUnavailable), "
           f"{n} config files each with its own advertise, {n} per-replica {values_get(values, 'service.type', '')} "
           f"Services + shared lease Service, {etcd}, no secret in ConfigMap/args")
    else:
        ok(f"{what}: one Deployment (Recreate) with its claim and gateway.toml, no secret in ConfigMap/args")


# Values the gateway chart must refuse, with what the message must say: changes to examples/fleet.yaml
# (3 replicas), or (None, values) for the default values plus these.
GATEWAY_REFUSED = [
    ("fleet of 3 on the embedded store", {"config": {"store": {"kind": "embedded"}}}, "config.store.kind=etcd"),
    ("3 replicas without fleet.enabled", (None, {"fleet": {"replicas": 3}}), "needs fleet.enabled=true"),
    ("secrets.identityKey shared by 3 replicas", {"secrets": {"identityKey": "ab" * 32}}, "secrets.identityKey"),
    ("every replica advertising the same address",
     {"fleet": {"perReplica": []}, "config": {"advertise": ["/dns4/gw.example.com/tcp/4001"]}},
     "advertise the same addresses"),
    ("a fleet without advertise addresses", {"fleet": {"perReplica": []}, "config": {"advertise": []}},
     "has no advertise address"),
    ("a fleet on one existing claim", {"persistence": {"existingClaim": "data"}}, "existingClaim"),
    ("etcd user without its password Secret", {"secrets": {"etcd": {"existingSecret": ""}}}, "needs its password"),
    ("leased ports on UDP only with UDP off",
     (None, {"config": {"udp": {"enabled": False}}, "service": {"leaseProtocols": ["UDP"]}}),
     "no leased port would be published"),
    ("the datagram channel on the libp2p UDP port", (None, {"config": {"udp": {"listen": "0.0.0.0:4001"}}}),
     "needs a port of its own"),
    ("the channel's public port among the leased UDP ports", (None, {"config": {"udp": {"advertise_port": 20005}}}),
     "also a leased port on UDP"),
    ("60 lease ports on TCP and UDP (120 Service entries)",
     (None, {"config": {"leases": {"port_range": "20000-20059"}}}), "more than service.maxPorts (100) lease entries"),
]

# Variants of examples/fleet.yaml rendered and checked like an example.
GATEWAY_FLEET_VARIANTS = [
    ("NodePort", {"service": {"type": "NodePort"},
                  "config": {"listen": ["/ip4/0.0.0.0/tcp/31001", "/ip4/0.0.0.0/udp/31001/quic-v1"],
                             "udp": {"listen": "0.0.0.0:31010"},
                             "leases": {"port_range": "31100-31119"},
                             "advertise": ["/dns4/node-{ordinal}.example.com/tcp/31001"]}}),
    ("join token, admin token and endpoints from Secrets",
     {"secrets": {"joinToken": "rgt_check_join_token", "adminToken": "check-admin-token",
                  "etcd": {"keys": {"endpoints": "endpoints"}}},
      "config": {"store": {"etcd": {"endpoints": []}}}}),
    ("UDP off", {"config": {"udp": {"enabled": False}}}),
    ("the channel on another public port, leases on TCP only",
     {"config": {"udp": {"advertise_port": 443}}, "service": {"leaseProtocols": ["TCP"]}}),
    ("plain etcd, per-replica addresses, no persistence",
     {"secrets": {"etcd": {"existingSecret": ""}}, "persistence": {"enabled": False},
      "config": {"store": {"etcd": {"user": ""}}},
      "fleet": {"replicas": 2, "perReplica": [{"advertise": ["/ip4/203.0.113.20/tcp/4001"]},
                                              {"advertise": ["/ip4/203.0.113.21/tcp/4001"]}]}}),
]


# Values the agent chart must refuse (default values plus these), with what the message must say.
AGENT_REFUSED = [
    ("a UDP tunnel delivering PROXY headers",
     {"config": {"tunnels": [{"name": "node", "target": "127.0.0.1:9905", "deliver": "proxy-v2", "proto": "both"}]}},
     "cannot carry UDP"),
]


def check_refusals(helm, chart, cases):
    """Renders the chart with values it must refuse; the render must fail saying what is expected."""
    for label, override, expect in cases:
        what = f"{chart.name} [refuses {label}]"
        try:
            render_chart(helm, chart, override)
        except Exception as e:  # noqa: BLE001 - the render must fail; what it says is checked
            if expect in str(e):
                ok(f"{what}: {str(e).split('): ', 1)[-1][:110]}")
            else:
                fail(what, f"failed without saying {expect!r}: {e}")
            continue
        fail(what, "rendered")


# Variants of the default values (one gateway), rendered and checked like an example.
GATEWAY_VARIANTS = [
    ("UDP off, NetworkPolicy", {"config": {"udp": {"enabled": False}}, "networkPolicy": {"enabled": True}}),
    ("the channel on public port 443, leases on TCP only, NetworkPolicy",
     {"config": {"udp": {"advertise_port": 443}}, "service": {"leaseProtocols": ["TCP"]},
      "networkPolicy": {"enabled": True}}),
    ("NodePort with the channel on node port 31002 behind pod port 4002",
     {"service": {"type": "NodePort"},
      "config": {"listen": ["/ip4/0.0.0.0/tcp/31001", "/ip4/0.0.0.0/udp/31001/quic-v1"],
                 "udp": {"advertise_port": 31002}, "leases": {"port_range": "31100-31119"}}}),
]


def check_gateway_fleet(helm, kv, bins, chart):
    """Renders the gateway chart with values it must refuse, and variants of examples/fleet.yaml and of
    the default values."""
    example = chart / "examples" / "fleet.yaml"
    if not example.is_file():
        fail(f"{chart.name}: fleet", "examples/fleet.yaml is missing")
        return
    base = yaml.safe_load(example.read_text())
    if values_get(base, "fleet.replicas", 1) <= 1:
        fail(f"{chart.name} [examples/fleet.yaml]", "fleet.replicas must be above 1 for the refusals below")
    check_refusals(helm, chart, [
        (label, deep_merge(change[0], change[1]) if isinstance(change, tuple) else deep_merge(base, change), expect)
        for label, change, expect in GATEWAY_REFUSED])
    variants = [(f"examples/fleet.yaml + {label}", deep_merge(base, change)) for label, change in GATEWAY_FLEET_VARIANTS]
    variants += [(f"default values + {label}", change) for label, change in GATEWAY_VARIANTS]
    for label, override in variants:
        what = f"{chart.name} [{label}]"
        try:
            docs, _ = render_chart(helm, chart, override)
        except Exception as e:  # noqa: BLE001
            fail(f"{what}: render", e)
            continue
        k8s_validate(kv, docs, what)
        values = merged_values(chart, override)
        cross_check(docs, what, chart.name, values)
        config_check(bins, docs, what, chart.name, values)
        gateway_checks(docs, what, values)


PARENT_TEMPLATE = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-mynode
spec:
  replicas: 1
  selector:
    matchLabels: {app: mynode}
  template:
    metadata:
      labels: {app: mynode}
    spec:
      initContainers:
        {{- include "relaygate-agent.sidecar" . | nindent 8 }}
      containers:
        - name: node
          image: example/node:1
          securityContext:
            capabilities: {drop: [ALL]}
          volumeMounts:
            {{- include "relaygate-agent.nodeMounts" . | nindent 12 }}
      volumes:
        {{- include "relaygate-agent.volumes" . | nindent 8 }}
"""


def check_parent_chart(bins):
    """The documented use: a parent chart with relaygate-agent as a dependency pastes the sidecar."""
    import helm_python as helm
    import kubernetes_validate.utils as kv

    what = "relaygate-agent as a dependency (include \"relaygate-agent.sidecar\" .)"
    with tempfile.TemporaryDirectory() as d:
        parent = Path(d) / "mynode"
        (parent / "templates").mkdir(parents=True)
        (parent / "charts").mkdir()
        shutil.copytree(ROOT / "helm" / "relaygate-agent", parent / "charts" / "relaygate-agent")
        (parent / "Chart.yaml").write_text("apiVersion: v2\nname: mynode\nversion: 0.1.0\n")
        (parent / "templates" / "node.yaml").write_text(PARENT_TEMPLATE)
        values = {"relaygate-agent": {"example": {"enabled": False}, "identity": {"source": "secret"},
                                      "secrets": {"joinToken": "rgt_x", "identityKey": "ab" * 32}}}
        (parent / "values.yaml").write_text(yaml.safe_dump(values))
        try:
            docs, _ = render_chart(helm, parent, None)
        except Exception as e:  # noqa: BLE001
            fail(what, e)
            return
    kinds = sorted(d["kind"] for _, d in docs)
    if kinds != ["ConfigMap", "Deployment", "Secret"]:
        fail(what, f"rendered {kinds}")
        return
    k8s_validate(kv, docs, what)
    agent_values = merged_values(ROOT / "helm" / "relaygate-agent", values["relaygate-agent"])
    cross_check(docs, what, "relaygate-agent", agent_values)
    config_check(bins, docs, what, "relaygate-agent", agent_values)


# ---------------------------------------------------------------------------------------------
# compose and example configs


def check_compose_and_examples(bins):
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    svc = compose["services"]
    peer = run_bin(bins / "relaygate-gateway", ["--data-dir", tempfile.mkdtemp(), "peer-id"]).stdout.strip()
    subst = {"RELAYGATE_GATEWAY__TOKEN": "rgt_check", "GATEWAY_PEER_ID": peer, "PUBLIC_HOST": "gw.example.com"}

    def interp(v):
        # ${NAME}, ${NAME:-default}, ${NAME:?message}, as compose does.
        def one(m):
            name, op, arg = m.group(1), m.group(2), m.group(3)
            if name in subst:
                return subst[name]
            return arg if op == ":-" else ""
        return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, str(v))

    for name, binary, extra in [("gateway", "relaygate-gateway", []),
                                ("agent", "relaygate-agent", svc["agent"].get("command", []))]:
        env = {k: interp(v) for k, v in svc[name].get("environment", {}).items()}
        with tempfile.TemporaryDirectory() as d:
            env["RELAYGATE_DATA_DIR"] = d
            p = run_bin(bins / binary, [*extra, "check-config"], env=env, check=False)
        if p.returncode == 0:
            ok(f"docker/compose.yaml: {name}'s environment passes {binary} check-config")
        else:
            fail(f"docker/compose.yaml: {name}", p.stderr.strip())
        hc = svc[name].get("healthcheck", {}).get("test", [])
        if hc[:1] != ["CMD"] or not hc[1].endswith(binary) or hc[2:] != ["health"]:
            fail(f"docker/compose.yaml: {name} healthcheck", f"want [CMD, .../{binary}, health], got {hc}")
    if shutil.which("docker-compose"):
        env = clean_env()
        env.update(subst)
        p = subprocess.run(["docker-compose", "-f", str(ROOT / "docker" / "compose.yaml"), "config", "-q"],
                           env=env, capture_output=True, text=True, timeout=60)
        if p.returncode == 0:
            ok("docker/compose.yaml: docker-compose config accepts it")
        else:
            fail("docker/compose.yaml: docker-compose config", p.stderr.strip())
    else:
        skip("docker/compose.yaml: docker-compose config", "docker-compose not installed (Debian package docker-compose)")

    for f, binary, extra in [
        ("deploy/gateway.toml.example", "relaygate-gateway", []),
        ("deploy/agent.toml.example", "relaygate-agent", []),
    ]:
        text = (ROOT / f).read_text().replace("GATEWAY_PEER_ID", peer)
        with tempfile.TemporaryDirectory() as d:
            cfg = Path(d) / "c.toml"
            cfg.write_text(text)
            p = run_bin(bins / binary, ["--config", str(cfg), "--data-dir", d, *extra, "check-config"],
                        check=False)
        if p.returncode == 0:
            ok(f"{f}: {binary} check-config accepts it")
        else:
            fail(f, p.stderr.strip())


# ---------------------------------------------------------------------------------------------
# metrics

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "inf", "nan", "atan2",
}


def metric_names(expr):
    """Metric names a PromQL expression reads (or a Grafana label_values(...) query)."""
    m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", expr, re.S)
    if m:
        expr = m.group(1)
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    e = re.sub(r"\$\w+", " ", e)  # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*(\s*\()?", e):
        tok, call = m.group(0).rstrip("( \t\n"), m.group(1)
        if call or tok.lower() in PROMQL_WORDS:
            continue
        if re.fullmatch(r"\d+[smhdwy]?", tok):
            continue
        names.add(tok)
    return names


def expressions():
    out = []
    rules = yaml.safe_load((ROOT / "deploy" / "monitoring" / "alerts.yaml").read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            out.append((f"alerts.yaml {r.get('alert') or r.get('record')}", r["expr"]))
    dash = json.loads((ROOT / "deploy" / "monitoring" / "grafana-dashboard.json").read_text())

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"dashboard panel '{p.get('title')}'", t["expr"]))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") == "query" and q:
            out.append((f"dashboard variable {v['name']}", q))
    return out


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=2):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def wait_ready(url, proc, what, seconds=40):
    deadline = time.monotonic() + seconds
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            status, _ = http_get(url)
            if status == 200:
                return
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}: {e.read().decode().strip()}"
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {seconds}s ({last})")


def exported_families(text):
    """Sample names each `# TYPE` line allows (counters' TYPE omits _total)."""
    names = set()
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "summary": ["", "_sum", "_count", "_created"],
        "gaugehistogram": ["_bucket", "_gsum", "_gcount"],
        "info": ["_info"],
        "stateset": [""],
        "gauge": [""],
        "unknown": [""],
    }
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            fam, typ = m.groups()
            for s in suffixes.get(typ, [""]):
                names.add(fam + s)
    return names


class _Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)


class _UdpEcho(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        sock.sendto(data, self.client_address)


def echo_servers():
    """A TCP and a UDP echo server on one port number (a tunnel with proto=both has one target)."""
    for _ in range(50):
        tcp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
        tcp.daemon_threads = True
        try:
            udp = socketserver.ThreadingUDPServer(("127.0.0.1", tcp.server_address[1]), _UdpEcho)
        except OSError:
            tcp.server_close()
            continue
        udp.daemon_threads = True
        return tcp, udp
    raise RuntimeError("no port free on both TCP and UDP for the echo servers")


def free_port_both():
    """A loopback port free on TCP and on UDP: a lease for a tunnel with proto=both binds both."""
    for _ in range(50):
        p = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", p))
            except OSError:
                continue
        return p
    raise RuntimeError("no port free on both TCP and UDP for the lease")


def exercise(lease):
    """Traffic that gives labelled families a series: one echoed connection through the tunnel."""
    with socket.create_connection(("127.0.0.1", lease), timeout=10) as s:
        s.sendall(b"relaygate-check\n")
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(64)
            if not chunk:
                break
            got += chunk
    if got != b"relaygate-check\n":
        raise RuntimeError(f"echo through the tunnel returned {got!r}")


def exercise_udp(lease, seconds=20):
    """One datagram echoed through the tunnel's leased UDP port (once the agent's datagram channel is up:
    until then the gateway drops what arrives)."""
    deadline = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        while time.monotonic() < deadline:
            s.sendto(b"relaygate-check-udp", ("127.0.0.1", lease))
            try:
                got, _ = s.recvfrom(64)
            except (socket.timeout, ConnectionRefusedError):
                continue
            if got == b"relaygate-check-udp":
                return
            raise RuntimeError(f"UDP echo through the tunnel returned {got!r}")
    raise RuntimeError(f"no UDP echo through leased port {lease} within {seconds}s (datagram channel down?)")


def refused_connection(lease):
    """A connection while the target is down: the agent's dial fails, the gateway counts a refusal."""
    try:
        with socket.create_connection(("127.0.0.1", lease), timeout=10) as s:
            s.settimeout(10)
            s.sendall(b"x")
            s.recv(16)
    except OSError:
        pass  # reset: expected


def scrape_metrics(bins):
    """Starts a gateway and an agent, drives some traffic, returns both /metrics texts."""
    tmp = Path(tempfile.mkdtemp(prefix="relaygate-check-"))
    procs, logs = [], []
    echo = udp_echo = None
    try:
        gw_data, ag_data = tmp / "gw", tmp / "agent"
        tcp, udp, admin_gw, admin_ag = free_port(), free_port(socket.SOCK_DGRAM), free_port(), free_port()
        channel = free_port(socket.SOCK_DGRAM)
        lease = free_port_both()
        echo, udp_echo = echo_servers()
        target = echo.server_address[1]
        threading.Thread(target=echo.serve_forever, daemon=True).start()
        threading.Thread(target=udp_echo.serve_forever, daemon=True).start()

        def start(name, args, env):
            log = open(tmp / f"{name}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
            return procs[-1]

        gw = bins / "relaygate-gateway"
        peer = run_bin(gw, ["--data-dir", str(gw_data), "peer-id"]).stdout.strip()
        token = run_bin(gw, ["--data-dir", str(gw_data), "token"]).stdout.strip()
        gw_env = clean_env()
        gw_env["RELAYGATE_UDP__LISTEN"] = f"127.0.0.1:{channel}"  # the datagram channel (not 0.0.0.0:4002)
        g = start("gateway", [
            str(gw), "--data-dir", str(gw_data), "--listen", f"/ip4/127.0.0.1/tcp/{tcp}",
            "--listen", f"/ip4/127.0.0.1/udp/{udp}/quic-v1", "--admin-listen", f"127.0.0.1:{admin_gw}",
            "--port-range", f"{lease}-{lease}"], gw_env)
        wait_ready(f"http://127.0.0.1:{admin_gw}/health/ready", g, "gateway")
        env = clean_env()
        env["RELAYGATE_GATEWAY__TOKEN"] = token  # not on the command line
        a = start("agent", [
            str(bins / "relaygate-agent"), "--data-dir", str(ag_data),
            "--gateway", f"/ip4/127.0.0.1/udp/{udp}/quic-v1/p2p/{peer}",
            "--gateway", f"/ip4/127.0.0.1/tcp/{tcp}/p2p/{peer}",
            "--tunnel", f"node=127.0.0.1:{target},proto=both", "--admin-listen", f"127.0.0.1:{admin_ag}"], env)
        wait_ready(f"http://127.0.0.1:{admin_ag}/health/ready", a, "agent")
        exercise(lease)
        exercise_udp(lease)
        for server in (echo, udp_echo):
            server.shutdown()
            server.server_close()
        echo = udp_echo = None
        refused_connection(lease)
        # An agent with a wrong token: the gateway refuses it (not_admitted).
        bad_env = clean_env()
        bad_env["RELAYGATE_GATEWAY__TOKEN"] = "rgt_wrong"
        b = start("agent-bad-token", [
            str(bins / "relaygate-agent"), "--data-dir", str(tmp / "agent2"),
            "--gateway", f"/ip4/127.0.0.1/tcp/{tcp}/p2p/{peer}",
            "--tunnel", "other=127.0.0.1:9", "--admin-listen", f"127.0.0.1:{free_port()}"], bad_env)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            _, gw_text = http_get(f"http://127.0.0.1:{admin_gw}/metrics")
            if "not_admitted" in gw_text:
                break
            time.sleep(0.2)
        b.terminate()
        _, gw_text = http_get(f"http://127.0.0.1:{admin_gw}/metrics")
        _, ag_text = http_get(f"http://127.0.0.1:{admin_ag}/metrics")
        return gw_text, ag_text
    except Exception:
        for f in sorted(tmp.glob("*.log")):
            print(f"----- {f.name}\n" + f.read_text()[-3000:])
        raise
    finally:
        for server in (echo, udp_echo):
            if server is not None:
                server.shutdown()
                server.server_close()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def registered_families():
    """Sample names the binaries register: the shared families of common/src/metrics.rs
    (`Core`, under each binary's prefix) plus each binary's own, from its src/metrics.rs and its modules'
    metrics.rs (gateway/src/udp/metrics.rs registers on the gateway's registry).

    prometheus-client (0.25) leaves a labelled family out of /metrics entirely, TYPE line included,
    until a label set was used; a family that the traffic above cannot reach (bad_input needs a
    misbehaving libp2p peer) is checked against its registration instead, and reported as such.
    """
    reg = re.compile(r'register\(\s*"(\w+)",\s*"[^"]*",\s*(?:\w+\.)?(\w+)\.clone\(\)')
    field_re = re.compile(r"pub (\w+): ([^\n]+),")

    def sample_names(prefix, pairs, fields):
        out = set()
        for name, field in pairs:
            typ = fields.get(field, "")
            fam = f"{prefix}_{name}"
            if "Counter" in typ:
                out.add(fam + "_total")
            elif "Histogram" in typ:
                out |= {fam + "_bucket", fam + "_sum", fam + "_count"}
            else:
                out.add(fam)
        return out

    core = (ROOT / "common" / "src" / "metrics.rs").read_text()
    core_pairs = reg.findall(core)
    core_fields = dict(field_re.findall(core))
    names = set()
    for binary in ("gateway", "agent"):
        src_dir = ROOT / binary / "src"
        prefix = re.search(r'(?:Core::new|Registry::with_prefix)\(\s*"(\w+)"\s*\)', (src_dir / "metrics.rs").read_text())
        if not prefix:
            continue
        names |= sample_names(prefix.group(1), core_pairs, core_fields)
        # src/metrics.rs, and modules registering their own on the same registry (gateway/src/udp/metrics.rs).
        for f in sorted(src_dir.rglob("metrics.rs")):
            src = f.read_text()
            names |= sample_names(prefix.group(1), reg.findall(src), dict(field_re.findall(src)))
    return names


def check_metrics(bins):
    try:
        gw_text, ag_text = scrape_metrics(bins)
    except Exception as e:  # noqa: BLE001
        fail("metrics: start gateway and agent, echo through the tunnel", e)
        return
    exported = exported_families(gw_text) | exported_families(ag_text)
    where_bins = bins.relative_to(ROOT) if bins.is_relative_to(ROOT) else bins
    ok(f"metrics: gateway and agent from {where_bins} on loopback: tunnel (proto=both) echoed over TCP and UDP, "
       f"{len(exported)} sample names on /metrics")
    registered = registered_families()
    bad = 0
    used = set()
    for where, expr in expressions():
        for name in metric_names(expr):
            used.add(name)
            if name.startswith("relaygate_"):
                if name not in exported and name not in registered:
                    fail(f"metrics: {where}", f"{name} is neither on /metrics nor registered in */src/metrics.rs")
                    bad += 1
            elif name not in EXTERNAL_METRICS:
                fail(f"metrics: {where}", f"{name} is neither relaygate's nor a known external metric")
                bad += 1
    ours = sorted(n for n in used if n.startswith("relaygate_"))
    unseen = [n for n in ours if n not in exported]
    if not bad:
        ok(f"metrics: all {len(ours)} relaygate metric names in alerts.yaml and grafana-dashboard.json exist "
           f"(external: {', '.join(sorted(used - set(ours)))})")
    if unseen:
        print(f"note  metrics registered but without a series in this run (empty labelled families): "
              f"{', '.join(unseen)}")


# ---------------------------------------------------------------------------------------------
# tools that may be missing: promtool, systemd-analyze, podman (through docker/check-image.sh)

skipped = 0


def skip(what, why):
    global skipped
    skipped += 1
    print(f"skip  {what}: {why}")


def check_promtool():
    if not shutil.which("promtool"):
        skip("promtool check rules", "promtool not installed (Debian package prometheus)")
        return
    p = subprocess.run(["promtool", "check", "rules", str(ROOT / "deploy/monitoring/alerts.yaml")],
                       capture_output=True, text=True, timeout=60)
    if p.returncode == 0:
        ok(f"deploy/monitoring/alerts.yaml: promtool check rules ({p.stdout.strip().splitlines()[-1].strip()})")
    else:
        fail("deploy/monitoring/alerts.yaml: promtool check rules", (p.stdout + p.stderr).strip())


def check_systemd(bins):
    if not shutil.which("systemd-analyze"):
        skip("systemd-analyze verify", "systemd-analyze not installed")
        return
    units = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
    with tempfile.TemporaryDirectory() as d:
        # verify resolves ExecStart: point it at the binaries under test (units name /usr/local/bin).
        for u in units:
            text = u.read_text()
            if bins is not None:
                text = text.replace("/usr/local/bin/", f"{bins}/")
            (Path(d) / u.name).write_text(text)
        env = dict(os.environ, SYSTEMD_LOG_LEVEL="notice")
        p = subprocess.run(["systemd-analyze", "verify", "--man=no", *[str(Path(d) / u.name) for u in units]],
                           capture_output=True, text=True, timeout=120, env=env)
    out = (p.stdout + p.stderr).strip()
    if p.returncode == 0 and not out:
        ok(f"deploy/systemd: systemd-analyze verify {', '.join(u.name for u in units)}")
    else:
        fail("deploy/systemd: systemd-analyze verify", out or f"exit {p.returncode}")


def check_image(bins):
    env = dict(os.environ)
    if bins is not None:
        env["RELAYGATE_BIN_DIR"] = str(bins)
    p = subprocess.run(["bash", str(ROOT / "docker" / "check-image.sh")], capture_output=True, text=True,
                       timeout=600, env=env)
    last = (p.stdout.strip().splitlines() or [""])[-1]
    if p.returncode != 0:
        fail("docker/check-image.sh", (p.stdout + p.stderr).strip()[-2000:])
    elif "SKIPPED" in last:
        skip("docker/check-image.sh", last)
    else:
        ok(last)


# ---------------------------------------------------------------------------------------------


def main():
    bins = find_bins()
    if bins is None:
        fail("binaries", "no relaygate-gateway and relaygate-agent in $RELAYGATE_BIN_DIR, target/release "
             "or target/debug (cargo build -p relaygate-gateway -p relaygate-agent)")
    steps = [("charts", check_charts), ("chart as a dependency", check_parent_chart)]
    if bins is not None:
        steps += [("compose and example configs", check_compose_and_examples), ("metrics", check_metrics)]
    steps += [("promtool", lambda _: check_promtool()), ("systemd units", check_systemd), ("image", check_image)]
    for name, step in steps:
        try:
            step(bins)
        except Exception as e:  # noqa: BLE001 - report and go on with the other checks
            fail(name, f"{type(e).__name__}: {e}")
    print(f"deploy-check: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
