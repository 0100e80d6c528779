#!/usr/bin/env python3
"""The checks .ci/e2e/deploy.sh runs on the output of `kubectl kustomize` (a multi-document
YAML file), one subcommand each. Each prints `PASS: ...` / `FAIL: ...` lines, which deploy.sh
counts, and exits 1 if anything failed.

  validate BUILD --k8s 1.29.0 [--k8s ...]   built-in kinds against the Kubernetes schemas of
                                            kubernetes-validate (pinned by deploy.sh), strict;
                                            PodMonitor / PrometheusRule: their required fields
  shape BUILD native|ordinary               tokengate as a native sidecar (initContainer with
                                            restartPolicy Always, startupProbe on /readyz) or as
                                            an ordinary container; probes, security context,
                                            resources, scraping, mounts
  config BUILD OUTDIR                       writes the ConfigMap's tokengate.toml to
                                            OUTDIR/tokengate.toml with every { file = ... } moved
                                            under OUTDIR and a placeholder file created there;
                                            checks that each such path is a key of a mounted
                                            Secret directory; every { env = NAME } must be set
                                            on the container from a Secret's key (secretKeyRef),
                                            and OUTDIR/env gets NAME=<that key's value, its URL
                                            password swapped for a placeholder>; prints the
                                            placeholder values to OUTDIR/placeholders (one a line)
  fleet BUILD BASE_TOML                     the fleet overlay: its tokengate.toml is BASE_TOML
                                            plus the fleet keys, redis_url comes from a Secret,
                                            several replicas, a NetworkPolicy that lets the pod
                                            reach Redis (6379), DNS (53) and HTTPS (443)
  rules BUILD OUT [--same-as FILE]          writes the PrometheusRule's groups to OUT (a rule
                                            file for promtool) and checks they equal FILE's
  metrics BUILD TELEMETRY_RS [--skip-missing PREFIX]
                                            every tokengate_* metric the dashboard and the rules
                                            use is one tokengate registers (src/telemetry.rs);
                                            names with PREFIX that are not there print SKIP
                                            instead of FAIL (deploy.sh: a binary from before
                                            fleet mode)
  systemd-config TOML OUTDIR                deploy/systemd/tokengate.toml with its
                                            /run/credentials paths moved under OUTDIR, for
                                            `tokengate check`; checks each credential name has
                                            a LoadCredential= line in the unit next to it

Needs PyYAML (kubernetes-validate's venv has it) and Python >= 3.11 (tomllib).
"""

import argparse
import base64
import json
import os
import re
import secrets
import sys
import tomllib
import urllib.parse

import yaml

FAILED = 0
NATIVE_MIN = "1.29"


def ok(msg):
    print("PASS: %s" % msg)


def bad(msg):
    global FAILED
    FAILED += 1
    print("FAIL: %s" % msg)


def check(cond, msg, detail=""):
    if cond:
        ok(msg)
    else:
        bad(msg + (" (%s)" % detail if detail else ""))
    return cond


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def one(docs, kind, name=None, prefix=None):
    found = [
        d for d in docs
        if d.get("kind") == kind
        and (name is None or d["metadata"]["name"] == name)
        and (prefix is None or d["metadata"]["name"].startswith(prefix))
    ]
    if len(found) != 1:
        raise SystemExit("FAIL: expected one %s %s, found %d" % (kind, name or prefix or "", len(found)))
    return found[0]


def is_custom(doc):
    return doc.get("apiVersion", "").startswith("monitoring.coreos.com/")


# ---- validate -------------------------------------------------------------------------------

def cr_required(doc):
    """The fields the Prometheus Operator's CRDs require, and the ones it needs to do anything."""
    kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
    errs = []
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        errs.append("apiVersion %r is not monitoring.coreos.com/v1" % doc.get("apiVersion"))
    if not name:
        errs.append("metadata.name missing")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return errs + ["spec missing"]
    if kind == "PodMonitor":
        sel = spec.get("selector")
        if not isinstance(sel, dict) or not (sel.get("matchLabels") or sel.get("matchExpressions")):
            errs.append("spec.selector must select something (matchLabels/matchExpressions)")
        eps = spec.get("podMetricsEndpoints")
        if not isinstance(eps, list) or not eps:
            errs.append("spec.podMetricsEndpoints must be a non-empty list")
        for i, ep in enumerate(eps or []):
            if not (ep.get("port") or ep.get("portNumber") or ep.get("targetPort")):
                errs.append("podMetricsEndpoints[%d] names no port" % i)
            for j, r in enumerate(ep.get("relabelings") or []):
                if r.get("action", "replace") == "replace" and not r.get("targetLabel"):
                    errs.append("podMetricsEndpoints[%d].relabelings[%d]: replace needs targetLabel" % (i, j))
    elif kind == "PrometheusRule":
        groups = spec.get("groups")
        if not isinstance(groups, list) or not groups:
            errs.append("spec.groups must be a non-empty list")
        names = set()
        for i, g in enumerate(groups or []):
            if not g.get("name"):
                errs.append("groups[%d].name missing" % i)
            if g.get("name") in names:
                errs.append("groups[%d].name %r repeated" % (i, g.get("name")))
            names.add(g.get("name"))
            rules = g.get("rules")
            if not isinstance(rules, list) or not rules:
                errs.append("groups[%d].rules must be a non-empty list" % i)
            for j, r in enumerate(rules or []):
                if not isinstance(r.get("expr"), (str, int)) or not str(r.get("expr")).strip():
                    errs.append("groups[%d].rules[%d].expr missing" % (i, j))
                if bool(r.get("alert")) == bool(r.get("record")):
                    errs.append("groups[%d].rules[%d] needs exactly one of alert/record" % (i, j))
                for k in ("labels", "annotations"):
                    if k in r and not all(isinstance(v, str) for v in (r[k] or {}).values()):
                        errs.append("groups[%d].rules[%d].%s values must be strings" % (i, j, k))
    else:
        errs.append("unexpected custom resource kind %r" % kind)
    return errs


def cmd_validate(args):
    import kubernetes_validate.utils as kv

    docs = load(args.build)
    check(docs, "%s: the build has resources" % args.label)
    for doc in docs:
        what = "%s: %s/%s" % (args.label, doc.get("kind"), (doc.get("metadata") or {}).get("name"))
        if is_custom(doc):
            errs = cr_required(doc)
            check(not errs, "%s has the custom resource's required fields" % what, "; ".join(errs))
            continue
        for version in args.k8s:
            try:
                kv.validate(doc, version, strict=True)
                ok("%s validates against Kubernetes %s (strict)" % (what, version))
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                bad("%s against Kubernetes %s: %s: %s" % (what, version, path, e.message))
            except (kv.SchemaNotFoundError, kv.VersionNotSupportedError) as e:
                # A built-in kind must have a schema: a miss means a typo in apiVersion/kind.
                bad("%s: %s" % (what, getattr(e, "message", e)))


# ---- shape ----------------------------------------------------------------------------------

def find_tokengate(pod):
    init = [c for c in pod.get("initContainers") or [] if c["name"] == "tokengate"]
    main = [c for c in pod.get("containers") or [] if c["name"] == "tokengate"]
    return init, main


def port_named(c, name):
    for p in c.get("ports") or []:
        if p.get("name") == name:
            return p.get("containerPort")
    return None


def probe_path(c, probe):
    return ((c.get(probe) or {}).get("httpGet") or {}).get("path"), ((c.get(probe) or {}).get("httpGet") or {}).get("port")


def cmd_shape(args):
    docs = load(args.build)
    dep = one(docs, "Deployment")
    tpl = dep["spec"]["template"]
    pod = tpl["spec"]
    init, main = find_tokengate(pod)
    label = args.label
    if args.mode == "native":
        check(len(init) == 1 and not main,
              "%s: tokengate is an init container (native sidecar), not in containers" % label)
        if not init:
            return
        c = init[0]
        check(c.get("restartPolicy") == "Always", "%s: its restartPolicy is Always" % label,
              "restartPolicy=%r" % c.get("restartPolicy"))
        check(pod["initContainers"][0]["name"] == "tokengate",
              "%s: it is the first init container (the app waits only for those before it)" % label)
        sp = c.get("startupProbe") or {}
        check(probe_path(c, "startupProbe") == ("/readyz", "admin"),
              "%s: startupProbe is GET /readyz on port admin" % label, str(probe_path(c, "startupProbe")))
        budget = sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
        check(budget >= 120, "%s: startupProbe allows %ds (>= 120 s) for the first tokens" % (label, budget))
    else:
        check(not init and len(main) == 1,
              "%s: tokengate is an ordinary container, no init container" % label,
              "init=%d containers=%d" % (len(init), len(main)))
        if not main:
            return
        c = main[0]
        check("restartPolicy" not in c, "%s: no container-level restartPolicy (unknown before 1.28)" % label)
        check(not any(x.get("restartPolicy") for x in pod.get("initContainers") or []),
              "%s: no init container with restartPolicy" % label)
    check(probe_path(c, "livenessProbe") == ("/healthz", "admin"),
          "%s: livenessProbe is GET /healthz on port admin" % label, str(probe_path(c, "livenessProbe")))
    check(probe_path(c, "readinessProbe") == ("/readyz", "admin"),
          "%s: readinessProbe is GET /readyz on port admin" % label, str(probe_path(c, "readinessProbe")))
    admin_port = port_named(c, "admin")
    check(admin_port == 9464, "%s: named container port admin is 9464" % label, str(admin_port))

    sc = c.get("securityContext") or {}
    psc = pod.get("securityContext") or {}
    seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    want = {
        "runAsNonRoot": (sc.get("runAsNonRoot", psc.get("runAsNonRoot")), True),
        "runAsUser": (sc.get("runAsUser", psc.get("runAsUser")), 65532),
        "readOnlyRootFilesystem": (sc.get("readOnlyRootFilesystem"), True),
        "allowPrivilegeEscalation": (sc.get("allowPrivilegeEscalation"), False),
        "capabilities.drop": ((sc.get("capabilities") or {}).get("drop"), ["ALL"]),
        "seccompProfile.type": (seccomp, "RuntimeDefault"),
    }
    wrong = {k: v[0] for k, v in want.items() if v[0] != v[1]}
    check(not wrong, "%s: tokengate's securityContext (non-root 65532, read-only root, no "
          "escalation, no capabilities, RuntimeDefault seccomp)" % label, str(wrong))

    res = c.get("resources") or {}
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    check(req.get("cpu") and req.get("memory") and lim.get("memory") and "cpu" not in lim,
          "%s: resources: cpu/memory requests, memory limit, no CPU limit" % label, str(res))

    ann = tpl["metadata"].get("annotations") or {}
    check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == str(admin_port)
          and ann.get("prometheus.io/path") == "/metrics",
          "%s: prometheus.io/scrape|port|path annotations name the admin port" % label, str(ann))

    pm = one(docs, "PodMonitor")
    sel = pm["spec"]["selector"].get("matchLabels") or {}
    labels = tpl["metadata"].get("labels") or {}
    check(sel and all(labels.get(k) == v for k, v in sel.items()),
          "%s: the PodMonitor's selector matches the pod's labels" % label, "%s vs %s" % (sel, labels))
    check(any(ep.get("port") == "admin" and ep.get("path", "/metrics") == "/metrics"
              for ep in pm["spec"]["podMetricsEndpoints"]),
          "%s: the PodMonitor scrapes port admin, /metrics" % label)
    jobs = [r.get("replacement") for ep in pm["spec"]["podMetricsEndpoints"]
            for r in ep.get("relabelings") or [] if r.get("targetLabel") == "job"]
    check(jobs == ["tokengate"], "%s: the PodMonitor sets job=\"tokengate\" (the alerts' job)" % label, str(jobs))

    vols = {v["name"]: v for v in pod.get("volumes") or []}
    for m in c.get("volumeMounts") or []:
        v = vols.get(m["name"], {})
        if "secret" in v:
            check("subPath" not in m and "subPathExpr" not in m,
                  "%s: Secret %s is mounted as a directory (no subPath), so updates reach it"
                  % (label, v["secret"]["secretName"]))
    check(pod.get("automountServiceAccountToken") is False,
          "%s: no service account token is mounted" % label)
    dash = [d for d in docs if d.get("kind") == "ConfigMap"
            and (d["metadata"].get("labels") or {}).get("grafana_dashboard") == "1"]
    check(len(dash) == 1, "%s: one ConfigMap labelled grafana_dashboard: \"1\"" % label)
    for d in dash:
        for key, text in (d.get("data") or {}).items():
            try:
                j = json.loads(text)
                exprs = [t["expr"] for p in j.get("panels", []) for t in p.get("targets", []) if t.get("expr")]
                check(key.endswith(".json") and j.get("uid") and exprs,
                      "%s: dashboard %s is JSON with a uid and %d queries" % (label, key, len(exprs)))
            except ValueError as e:
                bad("%s: dashboard %s is not JSON: %s" % (label, key, e))


# ---- config ---------------------------------------------------------------------------------

def file_secrets(node, path=""):
    """(key path, file path) of every { file = ... } secret in a parsed TOML document."""
    if isinstance(node, dict):
        if set(node) == {"file"} and isinstance(node["file"], str):
            yield path, node["file"]
            return
        for k, v in node.items():
            yield from file_secrets(v, "%s.%s" % (path, k) if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from file_secrets(v, "%s[%d]" % (path, i))


def env_secrets(node, path=""):
    """(key path, variable name) of every { env = ... } secret in a parsed TOML document."""
    if isinstance(node, dict):
        if set(node) == {"env"} and isinstance(node["env"], str):
            yield path, node["env"]
            return
        for k, v in node.items():
            yield from env_secrets(v, "%s.%s" % (path, k) if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from env_secrets(v, "%s[%d]" % (path, i))


def secret_value(secret, key):
    """A key's value in a Secret of the build (stringData, or base64 data), or None."""
    if key in (secret.get("stringData") or {}):
        return secret["stringData"][key]
    if key in (secret.get("data") or {}):
        return base64.b64decode(secret["data"][key]).decode("utf-8")
    return None


def with_placeholder(value):
    """The value to hand tokengate check and the placeholder to look for in its output: a
    URL keeps its shape with its password swapped; anything else is replaced whole."""
    placeholder = "placeholder-%s" % secrets.token_hex(12)
    url = urllib.parse.urlsplit(value or "")
    if url.scheme and url.password is not None:
        host = url.hostname + (":%d" % url.port if url.port else "")
        netloc = "%s:%s@%s" % (url.username or "", placeholder, host)
        return urllib.parse.urlunsplit(url._replace(netloc=netloc)), placeholder
    return placeholder, placeholder


def cmd_config(args):
    docs = load(args.build)
    label = args.label
    cm = one(docs, "ConfigMap", prefix="tokengate-config")
    text = cm["data"]["tokengate.toml"]
    conf = tomllib.loads(text)
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    init, main = find_tokengate(pod)
    c = (init + main)[0]
    vols = {v["name"]: v for v in pod.get("volumes") or []}
    mounts = {m["mountPath"].rstrip("/"): (m, vols.get(m["name"], {})) for m in c.get("volumeMounts") or []}

    # --config names the mounted ConfigMap's file.
    cfg_arg = None
    argv = c.get("args") or []
    if "--config" in argv:
        cfg_arg = argv[argv.index("--config") + 1]
    cfg_dir = os.path.dirname(cfg_arg or "")
    m = mounts.get(cfg_dir)
    check(m and (m[1].get("configMap") or {}).get("name") == cm["metadata"]["name"]
          and os.path.basename(cfg_arg) in cm["data"],
          "%s: --config %s is the ConfigMap %s mounted at %s" % (label, cfg_arg, cm["metadata"]["name"], cfg_dir))

    admin = (conf.get("server") or {}).get("admin_listen", "")
    check(admin == "0.0.0.0:%s" % port_named(c, "admin") or admin == "[::]:%s" % port_named(c, "admin"),
          "%s: admin_listen %s listens on all addresses at the admin port" % (label, admin))
    for i, integ in enumerate(conf.get("integration") or []):
        check(integ.get("listen", "").startswith("127.0.0.1:"),
              "%s: integration[%d] (%s) listens on loopback" % (label, i, integ.get("name")))

    secrets_by_name = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Secret"}
    out = os.path.abspath(args.outdir)
    placeholders = []
    found = list(file_secrets(conf))
    check(found, "%s: the config reads its secrets from files" % label)
    for key, path in found:
        d, base = os.path.dirname(path), os.path.basename(path)
        m = mounts.get(d)
        secret = (m[1].get("secret") or {}) if m else {}
        if check(secret and "subPath" not in m[0],
                 "%s: %s = %s is in a mounted Secret directory" % (label, key, path)):
            sname = secret["secretName"]
            if sname in secrets_by_name:
                keys = set((secrets_by_name[sname].get("data") or {})) | set(
                    (secrets_by_name[sname].get("stringData") or {}))
                check(base in keys, "%s: Secret %s has the key %s" % (label, sname, base), str(sorted(keys)))
        local = out + path
        os.makedirs(os.path.dirname(local), exist_ok=True)
        value = "placeholder-%s" % secrets.token_hex(12)
        with open(local, "w", encoding="utf-8") as f:
            f.write(value + "\n")
        placeholders.append(value)
        text = text.replace('"%s"' % path, json.dumps(local))
    env_lines = []
    container_env = {e["name"]: e for e in c.get("env") or []}
    for key, name in env_secrets(conf):
        ref = ((container_env.get(name) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        if not check(ref.get("name") and ref.get("key"),
                     "%s: %s = { env = %s } is set on tokengate's container from a Secret (secretKeyRef)"
                     % (label, key, name), str(container_env.get(name))):
            continue
        value = None
        if ref["name"] in secrets_by_name:
            value = secret_value(secrets_by_name[ref["name"]], ref["key"])
            check(value is not None, "%s: Secret %s has the key %s" % (label, ref["name"], ref["key"]))
        value, placeholder = with_placeholder(value)
        env_lines.append("%s=%s" % (name, value))
        placeholders.append(placeholder)
    with open(os.path.join(out, "tokengate.toml"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out, "placeholders"), "w", encoding="utf-8") as f:
        f.write("\n".join(placeholders) + "\n")
    with open(os.path.join(out, "env"), "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in env_lines))


def cmd_systemd_config(args):
    text = open(args.toml, encoding="utf-8").read()
    unit = open(os.path.join(os.path.dirname(args.toml), "tokengate.service"), encoding="utf-8").read()
    creds = set(re.findall(r"^LoadCredential=([^:\s]+):", unit, re.M))
    out = os.path.abspath(args.outdir)
    placeholders = []
    found = list(file_secrets(tomllib.loads(text)))
    check(found, "systemd: tokengate.toml reads its secrets from files")
    for key, path in found:
        prefix = "/run/credentials/tokengate.service/"
        if check(path.startswith(prefix) and path[len(prefix):] in creds,
                 "systemd: %s = %s has a LoadCredential= in tokengate.service" % (key, path), str(sorted(creds))):
            local = out + path
            os.makedirs(os.path.dirname(local), exist_ok=True)
            value = "placeholder-%s" % secrets.token_hex(12)
            with open(local, "w", encoding="utf-8") as f:
                f.write(value + "\n")
            placeholders.append(value)
            text = text.replace('"%s"' % path, json.dumps(local))
    with open(os.path.join(out, "tokengate.toml"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out, "placeholders"), "w", encoding="utf-8") as f:
        f.write("\n".join(placeholders) + "\n")


# ---- fleet ----------------------------------------------------------------------------------

FLEET_INTEGRATION_KEYS = ("fleet", "fleet_id")


def without_fleet(conf):
    """A parsed tokengate.toml without [fleet] and the per-integration fleet keys."""
    conf = json.loads(json.dumps(conf))
    conf.pop("fleet", None)
    for table in [conf.get("defaults") or {}] + list(conf.get("integration") or []):
        for k in FLEET_INTEGRATION_KEYS:
            table.pop(k, None)
    return conf


def port_allowed(rule, port, protocol):
    return any(p.get("port") == port and p.get("protocol", "TCP") == protocol for p in rule.get("ports") or [])


def cmd_fleet(args):
    docs = load(args.build)
    cm = one(docs, "ConfigMap", prefix="tokengate-config")
    conf = tomllib.loads(cm["data"]["tokengate.toml"])
    with open(args.base_toml, "rb") as f:
        base = tomllib.load(f)
    fleet = conf.get("fleet")
    check(isinstance(fleet, dict), "fleet: tokengate.toml has a [fleet] section")
    fleet = fleet if isinstance(fleet, dict) else {}
    check(without_fleet(conf) == base,
          "fleet: its tokengate.toml is %s plus the fleet keys" % args.base_toml,
          "they differ outside [fleet], fleet and fleet_id")
    url = fleet.get("redis_url")
    env = url.get("env") if isinstance(url, dict) else None
    check(env, "fleet: [fleet] redis_url is read from the environment ({ env = ... })", repr(url))
    for k in ("wait_for_peer", "on_unavailable"):
        check(k in fleet, "fleet: [fleet] shows %s" % k)

    dep = one(docs, "Deployment")
    check((dep["spec"].get("replicas") or 1) > 1,
          "fleet: the Deployment has several replicas (%s)" % dep["spec"].get("replicas"))
    tpl = dep["spec"]["template"]
    init, main = find_tokengate(tpl["spec"])
    c = (init + main)[0]
    ref = {e["name"]: e for e in c.get("env") or []}.get(env) or {}
    check("value" not in ref and ((ref.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name"),
          "fleet: %s comes from a Secret (secretKeyRef), never a literal in the manifest" % env, str(ref))

    labels = tpl["metadata"].get("labels") or {}
    pols = [d for d in docs if d.get("kind") == "NetworkPolicy"
            and all(labels.get(k) == v for k, v in
                    ((d["spec"].get("podSelector") or {}).get("matchLabels") or {}).items())]
    if not check(len(pols) == 1, "fleet: one NetworkPolicy selects the pods", "%d" % len(pols)):
        return
    spec = pols[0]["spec"]
    check("Egress" in (spec.get("policyTypes") or []), "fleet: the NetworkPolicy limits egress")
    check("Ingress" not in (spec.get("policyTypes") or []),
          "fleet: it leaves ingress alone (probes, Prometheus's scrapes of the admin port)")
    egress = spec.get("egress") or []
    check(any(port_allowed(r, 6379, "TCP") and any("podSelector" in t for t in r.get("to") or [])
              for r in egress),
          "fleet: egress to Redis pods (a podSelector) on TCP 6379")
    check(any(port_allowed(r, 53, "UDP") for r in egress) and any(port_allowed(r, 53, "TCP") for r in egress),
          "fleet: egress to DNS on UDP and TCP 53")
    check(any(port_allowed(r, 443, "TCP") for r in egress),
          "fleet: egress to HTTPS (TCP 443) for the token endpoint and the API")


# ---- rules ----------------------------------------------------------------------------------

def cmd_rules(args):
    docs = load(args.build)
    rule = one(docs, "PrometheusRule")
    groups = rule["spec"]["groups"]
    with open(args.out, "w", encoding="utf-8") as f:
        yaml.safe_dump({"groups": groups}, f, sort_keys=False)
    if args.same_as:
        if not os.path.exists(args.same_as):
            bad("%s: %s is missing: the PrometheusRule must carry the same alerts as the "
                "operations script's rule file" % (args.label, args.same_as))
            return
        ref = load(args.same_as)[0]["groups"]
        names = [r.get("alert") for g in groups for r in g["rules"]]
        check(groups == ref, "%s: the PrometheusRule's %d alerts equal %s (names, exprs, for, labels, "
              "annotations)" % (args.label, len(names), args.same_as),
              "PrometheusRule %s vs %s" % (names, [r.get("alert") for g in ref for r in g["rules"]]))


# ---- metrics --------------------------------------------------------------------------------

METRIC = re.compile(r"\btokengate_[a-z0-9_]+")


def cmd_metrics(args):
    docs = load(args.build)
    registered = set(re.findall(r'"(tokengate_[a-z0-9_]+)"', open(args.telemetry, encoding="utf-8").read()))
    check(len(registered) >= 10, "%d metric names registered in %s" % (len(registered), args.telemetry))
    used = {}
    for d in docs:
        if d.get("kind") == "PrometheusRule":
            for g in d["spec"]["groups"]:
                for r in g["rules"]:
                    used.setdefault("alert %s" % r.get("alert"), set()).update(METRIC.findall(str(r["expr"])))
        if d.get("kind") == "ConfigMap" and (d["metadata"].get("labels") or {}).get("grafana_dashboard") == "1":
            for text in (d.get("data") or {}).values():
                j = json.loads(text)
                for v in (j.get("templating") or {}).get("list") or []:
                    q = v.get("query")
                    q = q.get("query") if isinstance(q, dict) else q
                    used.setdefault("variable $%s" % v["name"], set()).update(METRIC.findall(q or ""))
                for p in j.get("panels", []):
                    for t in p.get("targets", []):
                        used.setdefault("panel %r" % p.get("title"), set()).update(METRIC.findall(t.get("expr", "")))
    total = skipped = 0
    for where, names in sorted(used.items()):
        for n in sorted(names):
            total += 1
            base = re.sub(r"_(bucket|sum|count)$", "", n)
            if n in registered or base in registered:
                continue
            if args.skip_missing and n.startswith(args.skip_missing):
                skipped += 1
                print("SKIP: %s uses %s, not registered in %s yet" % (where, n, args.telemetry))
            else:
                bad("%s uses %s, which tokengate does not export" % (where, n))
    check(total > 0, "the dashboard and alerts use %d metric references, all registered by tokengate%s"
          % (total, " but %d skipped" % skipped if skipped else ""))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("validate")
    p.add_argument("build")
    p.add_argument("--k8s", action="append", required=True)
    p.add_argument("--label", default="build")
    p = sub.add_parser("shape")
    p.add_argument("build")
    p.add_argument("mode", choices=["native", "ordinary"])
    p.add_argument("--label", default="build")
    p = sub.add_parser("config")
    p.add_argument("build")
    p.add_argument("outdir")
    p.add_argument("--label", default="build")
    p = sub.add_parser("systemd-config")
    p.add_argument("toml")
    p.add_argument("outdir")
    p = sub.add_parser("rules")
    p.add_argument("build")
    p.add_argument("out")
    p.add_argument("--same-as")
    p.add_argument("--label", default="build")
    p = sub.add_parser("metrics")
    p.add_argument("build")
    p.add_argument("telemetry")
    p.add_argument("--skip-missing", metavar="PREFIX")
    p = sub.add_parser("fleet")
    p.add_argument("build")
    p.add_argument("base_toml")
    args = ap.parse_args()
    {"validate": cmd_validate, "shape": cmd_shape, "config": cmd_config,
     "systemd-config": cmd_systemd_config, "rules": cmd_rules, "metrics": cmd_metrics,
     "fleet": cmd_fleet}[args.cmd](args)
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
