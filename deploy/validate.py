#!/usr/bin/env python3
"""Checks pgtether's deployment files. Run through deploy/validate.sh, which installs the tools
(kubernetes-validate, check-jsonschema, dockerfile from PyPI; promtool from Debian) and passes
promtool's path in PROMTOOL (empty: rules get a structural check only).

Every problem is reported; the exit status is 1 if there was any.
"""

import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import dockerfile
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
PROMTOOL = os.environ.get("PROMTOOL", "")
# The oldest Kubernetes the manifests support (native sidecars and the preStop sleep action) and
# the newest one kubernetes-validate has schemas for.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]

errors = []


def fail(where, message):
    errors.append(f"{rel(where)}: {message}")


def rel(path):
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return str(path)


def say(message):
    print(f"validate: {message}", flush=True)


def run(cmd, where):
    """Runs a checker; its output is shown only when it fails."""
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        out = (p.stdout + p.stderr).strip()
        fail(where, f"`{' '.join(str(c) for c in cmd)}` failed:\n{out}")
        return False
    return True


def load_yaml_docs(path):
    try:
        with open(path) as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except yaml.YAMLError as e:
        fail(path, f"not valid YAML: {e}")
        return []


# ---------------------------------------------------------------------------------------------
# Metric names, from src/metrics.rs: every pgtether_* name an expression uses must exist.


def known_metrics():
    text = (ROOT / "src/metrics.rs").read_text()
    names = set(re.findall(r'"(pgtether_[a-z0-9_]+)"', text))
    for h in re.findall(r'HistogramOpts::new\(\s*"(pgtether_[a-z0-9_]+)"', text):
        names.discard(h)
        names.update({f"{h}_bucket", f"{h}_sum", f"{h}_count"})
    if len(names) < 10:
        fail("src/metrics.rs", f"found only {len(names)} metric names; has the file changed shape?")
    return names


METRICS = known_metrics()


def check_metric_names(expr, where):
    for name in set(re.findall(r"\bpgtether_[a-z0-9_]+", expr)):
        if name not in METRICS:
            fail(where, f"unknown metric {name} (not in src/metrics.rs) in: {expr}")


# ---------------------------------------------------------------------------------------------
# pgtether configuration files: TOML, keys from the README's configuration reference, and
# `pgtether check` when PGTETHER_BIN names a binary.


def config_keys():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration reference", 1)[-1].split("\n## ", 1)[0]
    keys = set(re.findall(r"^\| `([a-z_.A-Z*]+)` \|", section, re.M))
    if len(keys) < 10:
        fail("README.md", "could not read the configuration reference table")
    return keys


CONFIG_KEYS = config_keys()
ENUMS = {
    "pool.mode": {"session", "transaction", "statement"},
    "pool.on_pin": {"pin", "reject"},
    "auth.method": {"trust", "md5", "scram-sha-256"},
    "log.format": {"text", "json"},
}


def flatten(table, prefix=""):
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from flatten(v, f"{key}.")
        else:
            yield key, v


def generic_key(key):
    parts = key.split(".")
    if parts[0] in ("databases", "users") and len(parts) > 2:
        parts[1] = "NAME"
    if parts[:3] == ["databases", "NAME", "pool"] and len(parts) == 4:
        return "pool." + parts[3], "databases.NAME.pool.*"
    return ".".join(parts), None


def check_pgtether_config(text, where):
    """Returns the parsed config (or None)."""
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        fail(where, f"pgtether config is not valid TOML: {e}")
        return None
    for key, value in flatten(config):
        g, via = generic_key(key)
        if g not in CONFIG_KEYS or (via and via not in CONFIG_KEYS):
            fail(where, f"pgtether config key `{key}` is not in README.md's configuration reference")
        if g in ENUMS and value not in ENUMS[g]:
            fail(where, f"pgtether config `{key}` = {value!r}: expected one of {sorted(ENUMS[g])}")
    if not config.get("databases"):
        fail(where, "pgtether config has no [databases.NAME] table")
    binary = os.environ.get("PGTETHER_BIN")
    if binary:
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
            f.write(text)
            f.flush()
            run([binary, "check", "--config", f.name], where)
    return config


def addr_port(addr):
    return int(addr.rsplit(":", 1)[1])


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests.


def crd_schema(doc):
    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    if api.startswith("monitoring.coreos.com/"):
        path = K8S / "schemas" / f"{kind.lower()}-monitoring-{api.split('/')[1]}.json"
        if path.exists():
            return json.loads(path.read_text())
    return None


def selects(selector, labels):
    match = (selector or {}).get("matchLabels", {})
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def pod_containers(pod_spec):
    return pod_spec.get("initContainers", []) + pod_spec.get("containers", [])


def check_kubernetes():
    files = sorted(K8S.glob("*.yaml"))
    if not files:
        fail(K8S, "no manifests")
    resources = []  # (path, doc)
    for path in files:
        for doc in load_yaml_docs(path):
            resources.append((path, doc))
            name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            schema = crd_schema(doc)
            if schema is not None:
                for e in jsonschema.Draft202012Validator(schema).iter_errors(doc):
                    loc = "/".join(str(p) for p in e.absolute_path)
                    fail(path, f"{name}: {loc}: {e.message}")
                continue
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.SchemaNotFoundError:
                    fail(path, f"{name}: no schema for {doc.get('apiVersion')} {doc.get('kind')}")
                    break
                except kubernetes_validate.ValidationError as e:
                    loc = "/".join(str(p) for p in e.path)
                    fail(path, f"{name}: Kubernetes {version}: {loc}: {e.message}")
    say(f"Kubernetes: {len(resources)} resources in {len(files)} files checked against the "
        f"Kubernetes {' and '.join(K8S_VERSIONS)} schemas (strict) and deploy/kubernetes/schemas/")
    cross_check_kubernetes(resources)


def cross_check_kubernetes(resources):
    by_kind = {}
    for path, doc in resources:
        by_kind.setdefault(doc.get("kind"), []).append((path, doc))

    def find(kind, name):
        for _, d in by_kind.get(kind, []):
            if d["metadata"]["name"] == name:
                return d
        return None

    def data_of(doc):
        return {**doc.get("data", {}), **doc.get("stringData", {})}

    workloads = []  # (path, name, pod labels, pod spec)
    for path, d in by_kind.get("Deployment", []):
        tpl = d["spec"]["template"]
        labels = tpl.get("metadata", {}).get("labels", {})
        name = f"Deployment/{d['metadata']['name']}"
        if not selects(d["spec"].get("selector"), labels):
            fail(path, f"{name}: selector.matchLabels does not match the pod template's labels")
        workloads.append((path, name, labels, tpl["spec"]))

    for path, name, labels, spec in workloads:
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in pod_containers(spec):
            where = f"{name} container {c['name']}"
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            env = {}
            for ref in c.get("envFrom", []):
                cm = ref.get("configMapRef", {}).get("name")
                if cm:
                    doc = find("ConfigMap", cm)
                    if doc is None:
                        fail(path, f"{where}: envFrom ConfigMap {cm} is not defined")
                    else:
                        env.update(data_of(doc))
            for e in c.get("env", []):
                if "value" in e:
                    env[e["name"]] = e["value"]
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    doc = find("Secret", ref["name"])
                    if doc is None or ref["key"] not in data_of(doc):
                        fail(path, f"{where}: env {e['name']}: Secret {ref['name']} has no key {ref['key']}")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports:
                    fail(path, f"{where}: {probe} port {port} is not a port of the container")
            mounts = {}
            for m in c.get("volumeMounts", []):
                v = volumes.get(m["name"])
                if v is None:
                    fail(path, f"{where}: volumeMount {m['name']} has no volume")
                    continue
                mounts[m["mountPath"].rstrip("/")] = v
            if "pgtether" in c.get("image", ""):
                check_pgtether_container(path, where, c, env, ports, mounts, find, data_of)

    for path, d in by_kind.get("Service", []):
        name = f"Service/{d['metadata']['name']}"
        targets = [w for w in workloads if selects({"matchLabels": d["spec"].get("selector", {})}, w[2])]
        if not targets:
            fail(path, f"{name}: selector matches no pod template")
        for _, _, _, spec in targets:
            names = {p.get("name") for c in pod_containers(spec) for p in c.get("ports", [])}
            for p in d["spec"].get("ports", []):
                t = p.get("targetPort")
                if isinstance(t, str) and t not in names:
                    fail(path, f"{name}: targetPort {t} is not a port of the selected pods")

    for path, d in by_kind.get("PodDisruptionBudget", []):
        if not any(selects(d["spec"].get("selector"), w[2]) for w in workloads):
            fail(path, f"PodDisruptionBudget/{d['metadata']['name']}: selector matches no pod template")

    for path, d in by_kind.get("ServiceMonitor", []):
        name = f"ServiceMonitor/{d['metadata']['name']}"
        services = [s for _, s in by_kind.get("Service", [])
                    if selects(d["spec"].get("selector"), s["metadata"].get("labels", {}))]
        if not services:
            fail(path, f"{name}: selector matches no Service's labels")
        for s in services:
            names = {p.get("name") for p in s["spec"].get("ports", [])}
            for e in d["spec"]["endpoints"]:
                if e.get("port") and e["port"] not in names:
                    fail(path, f"{name}: port {e['port']} is not a port of Service/{s['metadata']['name']}")

    for path, d in by_kind.get("PodMonitor", []):
        name = f"PodMonitor/{d['metadata']['name']}"
        pods = [w for w in workloads if selects(d["spec"].get("selector"), w[2])]
        if not pods:
            fail(path, f"{name}: selector matches no pod template")
        for _, wname, _, spec in pods:
            names = {p.get("name") for c in pod_containers(spec) for p in c.get("ports", [])}
            for e in d["spec"]["podMetricsEndpoints"]:
                if e.get("port") and e["port"] not in names:
                    fail(path, f"{name}: port {e['port']} is not a port of {wname}'s pods")

    rules = by_kind.get("PrometheusRule", [])
    if not rules:
        fail(K8S, "no PrometheusRule")
    alerts = yaml.safe_load((PROM / "alerts.yml").read_text())
    for path, d in rules:
        name = f"PrometheusRule/{d['metadata']['name']}"
        if d["spec"] != alerts:
            fail(path, f"{name}: spec differs from deploy/prometheus/alerts.yml (keep them equal)")
        with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
            yaml.safe_dump(d["spec"], f)
            f.flush()
            check_rule_file(Path(f.name), f"{rel(path)} {name}")


def check_pgtether_container(path, where, c, env, ports, mounts, find, data_of):
    """The pgtether config a container reads exists, is valid, and fits the probes and ports."""
    config_path = env.get("PGTETHER_CONFIG")
    if not config_path:
        fail(path, f"{where}: PGTETHER_CONFIG is not set (env or envFrom)")
        return
    directory, _, file = config_path.rpartition("/")
    volume = mounts.get(directory)
    if volume is None:
        fail(path, f"{where}: PGTETHER_CONFIG={config_path}: no volume is mounted at {directory}")
        return
    src = volume.get("secret", {}).get("secretName") or volume.get("configMap", {}).get("name")
    kind = "Secret" if "secret" in volume else "ConfigMap"
    doc = find(kind, src)
    if doc is None:
        fail(path, f"{where}: volume {volume['name']}: {kind} {src} is not defined")
        return
    items = (volume.get("secret") or volume.get("configMap")).get("items")
    key = next((i["key"] for i in items if i["path"] == file), None) if items else file
    text = data_of(doc).get(key) if key else None
    if text is None:
        fail(path, f"{where}: PGTETHER_CONFIG={config_path}: {kind} {src} has no such file")
        return
    config = check_pgtether_config(text, f"{rel(path)} {kind}/{src} {key}")
    if not config:
        return
    # PGTETHER_HTTP_ADDR overrides the file (peers in one pod need one port each).
    http = env.get("PGTETHER_HTTP_ADDR") or config.get("http", {}).get("addr")
    probed = any(p in c for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    if probed:
        if not http:
            fail(path, f"{where}: probes are set but the config has no http.addr")
        elif http.rsplit(":", 1)[0] in ("127.0.0.1", "localhost", "[::1]"):
            fail(path, f"{where}: http.addr {http} is loopback: the kubelet's probes cannot reach it")
        elif addr_port(http) not in ports.values():
            fail(path, f"{where}: http.addr port {addr_port(http)} is not a container port")


# ---------------------------------------------------------------------------------------------
# Prometheus rules and config.


def check_rule_file(path, where):
    if PROMTOOL:
        run([PROMTOOL, "check", "rules", str(path)], where)
    doc = yaml.safe_load(Path(path).read_text())
    schema = json.loads((K8S / "schemas/prometheusrule-monitoring-v1.json").read_text())
    groups_schema = schema["properties"]["spec"]
    for e in jsonschema.Draft202012Validator(groups_schema).iter_errors(doc):
        fail(where, f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}")
    for g in (doc or {}).get("groups", []):
        for r in g.get("rules", []):
            check_metric_names(str(r.get("expr", "")), where)


def check_prometheus():
    for path in (PROM / "prometheus.yml", PROM / "alerts.yml", PROM / "alerts_test.yml"):
        load_yaml_docs(path)
    check_rule_file(PROM / "alerts.yml", rel(PROM / "alerts.yml"))
    if PROMTOOL:
        run([PROMTOOL, "check", "config", str(PROM / "prometheus.yml")], PROM / "prometheus.yml")
        run([PROMTOOL, "test", "rules", str(PROM / "alerts_test.yml")], PROM / "alerts_test.yml")
        say("Prometheus: promtool check config, check rules, test rules")
    else:
        say("Prometheus: promtool unavailable: rule files got a structural check only")


# ---------------------------------------------------------------------------------------------
# docker-compose.yml.


def check_compose():
    path = ROOT / "docker-compose.yml"
    run([str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema",
         "vendor.compose-spec", str(path)], path)
    docs = load_yaml_docs(path)
    if not docs:
        return
    services = docs[0].get("services", {})
    mounts = {}  # (service, target) -> source
    for name, s in services.items():
        for v in s.get("volumes", []):
            if isinstance(v, str) and v.startswith("."):
                source, target = v.split(":")[:2]
                mounts[(name, target)] = source
                if not (ROOT / source).exists():
                    fail(path, f"service {name}: bind-mount source {source} does not exist")
        build = s.get("build")
        if build:
            context = build if isinstance(build, str) else build.get("context", ".")
            if not (ROOT / context / "Dockerfile").exists():
                fail(path, f"service {name}: no Dockerfile in build context {context}")
    # Prometheus: its config and every rule file it loads are mounted side by side.
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config_target = next((t for (s, t), src in mounts.items()
                          if s == "prometheus" and src.endswith("deploy/prometheus/prometheus.yml")), None)
    if config_target is None:
        fail(path, "prometheus does not mount deploy/prometheus/prometheus.yml")
    else:
        for rf in prom.get("rule_files", []):
            target = str(Path(config_target).parent / rf)
            if mounts.get(("prometheus", target), "").lstrip("./") != f"deploy/prometheus/{rf}":
                fail(path, f"prometheus: rule file {rf} is not mounted at {target}")
    for job in prom.get("scrape_configs", []):
        for sc in job.get("static_configs", []):
            for t in sc.get("targets", []):
                host, port = t.rsplit(":", 1)
                if host == "pgtether":
                    cfg = tomllib.loads((ROOT / "config/docker.toml").read_text())
                    if "pgtether" not in services:
                        fail(PROM / "prometheus.yml", f"target {t}: no pgtether service in compose")
                    elif addr_port(cfg["http"]["addr"]) != int(port):
                        fail(PROM / "prometheus.yml", f"target {t}: config/docker.toml serves http on another port")
    # Grafana: the provisioning directories and the dashboards directory are mounted.
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/pgtether.yml").read_text())
    for p in providers.get("providers", []):
        target = p.get("options", {}).get("path")
        if mounts.get(("grafana", target), "").lstrip("./") != "deploy/grafana/dashboards":
            fail(path, f"grafana: dashboard provider path {target} is not deploy/grafana/dashboards")
    for sub in ("datasources", "dashboards"):
        target = f"/etc/grafana/provisioning/{sub}"
        if mounts.get(("grafana", target), "").lstrip("./") != f"deploy/grafana/provisioning/{sub}":
            fail(path, f"grafana: {target} is not deploy/grafana/provisioning/{sub}")
    say("docker-compose.yml: compose-spec schema (check-jsonschema), mounts and ports")


# ---------------------------------------------------------------------------------------------
# Grafana provisioning and dashboard.

BUILTIN_VARS = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s", "__all"}


def check_grafana():
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    if ds.get("apiVersion") != 1 or not ds.get("datasources"):
        fail(GRAFANA / "provisioning/datasources/prometheus.yml", "expected apiVersion: 1 and datasources")
    for d in ds.get("datasources", []):
        if d.get("type") != "prometheus" or not d.get("url") or not d.get("uid"):
            fail(GRAFANA / "provisioning/datasources/prometheus.yml", f"datasource {d.get('name')}: needs type prometheus, uid, url")
    prov = yaml.safe_load((GRAFANA / "provisioning/dashboards/pgtether.yml").read_text())
    if prov.get("apiVersion") != 1 or not prov.get("providers"):
        fail(GRAFANA / "provisioning/dashboards/pgtether.yml", "expected apiVersion: 1 and providers")

    dashboards = sorted((GRAFANA / "dashboards").glob("*.json"))
    if not dashboards:
        fail(GRAFANA / "dashboards", "no dashboard")
    exprs = []
    for path in dashboards:
        try:
            dash = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            fail(path, f"not valid JSON: {e}")
            continue
        for key in ("uid", "title", "panels", "schemaVersion"):
            if key not in dash:
                fail(path, f"no {key}")
        variables = {v["name"] for v in dash.get("templating", {}).get("list", [])} | BUILTIN_VARS
        ids = []
        panels = list(dash.get("panels", []))
        for p in list(panels):
            panels.extend(p.get("panels", []))
        for p in panels:
            ids.append(p.get("id"))
            where = f"{rel(path)} panel {p.get('id')} ({p.get('title')})"
            if "gridPos" not in p:
                fail(where, "no gridPos")
            if p.get("type") == "row":
                continue
            if not p.get("targets"):
                fail(where, "no targets")
            refs = [t.get("refId") for t in p.get("targets", [])]
            if len(set(refs)) != len(refs) or None in refs:
                fail(where, "targets need distinct refIds")
            for t in p.get("targets", []):
                expr = t.get("expr", "")
                if not expr:
                    fail(where, f"target {t.get('refId')} has no expr")
                check_metric_names(expr, where)
                exprs.append((where, t.get("refId"), expr))
            text = json.dumps(p)
            for var in sorted(set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))):
                if var not in variables:
                    fail(where, f"uses undefined variable ${var}")
        if len(set(ids)) != len(ids):
            fail(path, "panel ids are not unique")
    # PromQL syntax: every panel expression, with the variables filled in, as a recording rule.
    if PROMTOOL and exprs:
        rules = []
        for i, (_, ref, expr) in enumerate(exprs):
            e = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
            e = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", e)
            rules.append({"record": f"dashboard:expr_{i}", "expr": e})
        with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
            yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
            f.flush()
            if not run([PROMTOOL, "check", "rules", f.name], "deploy/grafana/dashboards"):
                for i, (where, ref, expr) in enumerate(exprs):
                    print(f"  dashboard:expr_{i} = {where} {ref}: {expr}", file=sys.stderr)
    say(f"Grafana: provisioning files, {len(dashboards)} dashboard(s), {len(exprs)} queries"
        + (" (PromQL parsed by promtool)" if PROMTOOL else ""))


# ---------------------------------------------------------------------------------------------
# Dockerfile: parses; COPY sources exist, survive .dockerignore and hold what cargo needs.

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def dockerignored(path):
    ignore = ROOT / ".dockerignore"
    patterns = [l.strip() for l in ignore.read_text().splitlines()
                if l.strip() and not l.startswith("#")] if ignore.exists() else []
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes):
            ignored = not neg
    return ignored


def check_dockerfile():
    path = ROOT / "Dockerfile"
    try:
        cmds = dockerfile.parse_file(str(path))
    except dockerfile.GoParseError as e:
        fail(path, f"does not parse: {e}")
        return
    stages, copied, final_user, exposed = [], [], None, set()
    for c in cmds:
        where = f"Dockerfile:{c.start_line}"
        if c.cmd.upper() not in INSTRUCTIONS:
            fail(where, f"unknown instruction {c.cmd}")
            continue
        cmd = c.cmd.upper()
        if cmd == "FROM":
            if not c.value or not c.value[0]:
                fail(where, "FROM needs an image")
            stages.append(c.value[2] if len(c.value) >= 3 and c.value[1].upper() == "AS" else str(len(stages)))
            final_user, exposed = None, set()
        elif cmd in ("COPY", "ADD"):
            args = [v for v in c.value if not v.startswith("--")]
            if len(args) < 2:
                fail(where, f"{cmd} needs a source and a destination")
                continue
            source_stage = next((f.split("=", 1)[1] for f in c.flags if f.startswith("--from=")), None)
            if source_stage:
                if source_stage not in stages[:-1]:
                    fail(where, f"--from={source_stage} names no earlier stage")
                continue
            for src in args[:-1]:
                if not (ROOT / src).exists():
                    fail(where, f"{cmd} source {src} does not exist")
                elif dockerignored(src):
                    fail(where, f"{cmd} source {src} is excluded by .dockerignore")
                if len(stages) == 1:
                    copied.append(src.rstrip("/"))
        elif cmd == "USER":
            final_user = c.value[0]
        elif cmd == "EXPOSE":
            exposed |= {v.split("/")[0] for v in c.value}
    if final_user is None or final_user.split(":")[0] in ("root", "0"):
        fail(path, "the final stage must run as a non-root USER")
    cfg = tomllib.loads((ROOT / "config/docker.toml").read_text())
    for key in ("listen", "http"):
        port = str(addr_port(cfg[key]["addr"]))
        if port not in exposed:
            fail(path, f"EXPOSE lacks {port} (config/docker.toml {key}.addr)")

    def in_build(p):
        return any(p == c or p.startswith(c + "/") for c in copied)

    # What `cargo build --release --bin pgtether` reads: declared targets and include_*! files.
    manifest = tomllib.loads((ROOT / "Cargo.toml").read_text())
    for section, default_dir in (("bench", "benches"), ("bin", "src/bin"), ("test", "tests"), ("example", "examples")):
        for t in manifest.get(section, []):
            p = t.get("path") or f"{default_dir}/{t['name']}.rs"
            if not in_build(p):
                fail(path, f"Cargo.toml declares {section} {t['name']} at {p}, which the build stage does not COPY")
    for f in ["Cargo.toml", "Cargo.lock", "src/main.rs", "src/lib.rs"]:
        if (ROOT / f).exists() and not in_build(f):
            fail(path, f"the build stage does not COPY {f}")
    for rs in (ROOT / "src").rglob("*.rs"):
        for inc in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', rs.read_text()):
            target = os.path.normpath(os.path.join(rs.parent.relative_to(ROOT), inc))
            if not in_build(target):
                fail(path, f"{rs.relative_to(ROOT)} includes {target}, which the build stage does not COPY")
    say("Dockerfile: parses; COPY sources exist and pass .dockerignore; the build stage has the "
        "Cargo targets and include_str! files; non-root USER; EXPOSE matches config/docker.toml")


def main():
    check_pgtether_config((ROOT / "config/docker.toml").read_text(), "config/docker.toml")
    check_dockerfile()
    check_compose()
    check_prometheus()
    check_grafana()
    check_kubernetes()
    if not os.environ.get("PGTETHER_BIN"):
        say("pgtether configs: TOML and keys checked against README.md (set PGTETHER_BIN to also "
            "run `pgtether check` on them)")
    else:
        say(f"pgtether configs: also passed `{os.environ['PGTETHER_BIN']} check`")
    if errors:
        for e in errors:
            print(f"validate: FAILED: {e}", file=sys.stderr)
        print(f"validate: {len(errors)} problem(s)", file=sys.stderr)
        return 1
    say("all deployment files are valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
