#!/usr/bin/env python3
"""Prints the PromQL that tokengate's dashboard and alerts evaluate, one expression a line,
ready to be sent to a real Prometheus (`/api/v1/query`) by an end-to-end script.

    python3 .ci/e2e/lib/queries.py [--labelled] [--var NAME=VALUE]... FILE...

FILE is either
- a Grafana dashboard JSON (deploy/kubernetes/base/grafana-dashboard.json): every panel
  target's `expr` (rows and nested panels included), with Grafana's variables replaced so
  that Prometheus can evaluate it, and every query variable's `label_values(METRIC, LABEL)`
  as METRIC (the series the variable lists must exist too); or
- a Prometheus rule file (.ci/e2e/prometheus-alerts.yml) or a PrometheusRule
  (deploy/kubernetes/base/prometheusrule.yaml; a kustomize build with several documents
  works too): every rule's `expr` with its trailing threshold comparison removed
  (`a / b > 0.05` -> `a / b`, `x == 0` -> `x`), the same rule .ci/e2e/prometheus.sh applies.
  An alert whose expr has no trailing comparison is an error (exit 1).

Variables: `$__rate_interval`, `$__interval` -> 1m, `$__range` -> 5m, and every dashboard
template variable -> `.+` (they are used as `label=~"$var"`), unless --var sets them. Both
`$name` and `${name}` / `${name:format}` are replaced. An expression still holding a `$` after
that is an error (exit 1): Prometheus would reject it.

--labelled prints `<where>\t<expr>` (panel title / refId, or alert name) instead of the bare
expression. Exits 1 when a file yields no expression at all.

Only the standard library and PyYAML (Debian python3-yaml; kubernetes-validate's venv has
it) are needed; PyYAML only for rule files.
"""

import argparse
import json
import re
import sys

# A trailing comparison with a number: the same as prometheus.sh's
#   sed -E 's/[[:space:]]+(==|!=|>=|<=|>|<)[[:space:]]+[-+0-9.eE]+[[:space:]]*$//'
THRESHOLD = re.compile(r"\s+(==|!=|>=|<=|>|<)\s+[-+0-9.eE]+\s*$")
DEFAULT_VARS = {"__rate_interval": "1m", "__interval": "1m", "__range": "5m"}
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$")


class Failure(Exception):
    pass


def one_line(expr):
    """A multi-line expression (a YAML block scalar) as one line; PromQL ignores the breaks."""
    return re.sub(r"\s*\n\s*", " ", expr.strip())


def substitute(expr, variables, where):
    def repl(m):
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise Failure("%s: unknown variable $%s in %s" % (where, name, expr))
        return variables[name]

    out = re.sub(r"\$\{([A-Za-z0-9_]+)(?::[^}]*)?\}|\$([A-Za-z0-9_]+)", repl, expr)
    if "$" in out:
        raise Failure("%s: a '$' is left in %s" % (where, out))
    return out


def panels_of(panels):
    for p in panels or []:
        yield p
        # Collapsed rows keep their panels inside the row.
        yield from panels_of(p.get("panels"))


def dashboard_queries(dash, overrides):
    variables = dict(DEFAULT_VARS)
    templating = (dash.get("templating") or {}).get("list") or []
    for v in templating:
        variables[v["name"]] = ".+"
    variables.update(overrides)
    out = []
    for v in templating:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        q = q or v.get("definition") or ""
        m = LABEL_VALUES.match(q)
        where = "variable $%s" % v["name"]
        if m:
            out.append((where, substitute(m.group(1), variables, where)))
        elif q.strip():
            out.append((where, substitute(q, variables, where)))
    for p in panels_of(dash.get("panels")):
        for t in p.get("targets") or []:
            expr = t.get("expr")
            if not expr:
                continue
            where = "panel %r %s" % (p.get("title", ""), t.get("refId", ""))
            out.append((where, substitute(one_line(expr), variables, where)))
    return out


def rule_queries(docs):
    out = []
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        if doc.get("kind") == "PrometheusRule":
            groups = (doc.get("spec") or {}).get("groups") or []
        elif "groups" in doc and "kind" not in doc:
            groups = doc["groups"]
        else:
            continue  # another Kubernetes object of a kustomize build
        for g in groups:
            for r in g.get("rules") or []:
                expr = one_line(str(r["expr"]))
                if "alert" in r:
                    where = "alert %s" % r["alert"]
                    signal = THRESHOLD.sub("", expr)
                    if signal == expr:
                        raise Failure("%s: expr does not end in a threshold comparison: %s" % (where, expr))
                    out.append((where, signal))
                else:
                    out.append(("record %s" % r.get("record", "?"), expr))
    return out


def queries_of(path, overrides):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        return dashboard_queries(json.loads(text), overrides)
    import yaml  # only rule files need it

    return rule_queries(list(yaml.safe_load_all(text)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", metavar="FILE")
    ap.add_argument("--labelled", action="store_true", help="print <where>\\t<expr>")
    ap.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                    help="value for a dashboard variable (default: .+; $__rate_interval 1m)")
    args = ap.parse_args()
    overrides = {}
    for kv in args.var:
        name, sep, value = kv.partition("=")
        if not sep:
            ap.error("--var wants NAME=VALUE, got %r" % kv)
        overrides[name.lstrip("$")] = value
    try:
        for path in args.files:
            found = queries_of(path, overrides)
            if not found:
                raise Failure("%s: no PromQL expression found" % path)
            for where, expr in found:
                print("%s\t%s" % (where, expr) if args.labelled else expr)
    except Failure as e:
        sys.exit("queries.py: %s" % e)
    except (OSError, ValueError, KeyError) as e:
        sys.exit("queries.py: %s" % e)


if __name__ == "__main__":
    main()
