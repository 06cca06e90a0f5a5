#!/usr/bin/env python3
"""Offline checks of deploy/ used by tests/deploy/check_deploy.sh.

Subcommands (each prints what it checked and exits non-zero on a failure):
  schema CHART_DIR VALUES_FILE...   values.yaml and each file merged over it
                                    validate against values.schema.json
  values-paths CHART_DIR            every .Values.x.y in templates exists in
                                    values.yaml, and every value is used
  dashboard DASHBOARD METRICS OUT   dashboard invariants; writes each expr as a
                                    recording rule to OUT for promtool
  rules-metrics METRICS RULES...    rule exprs use only listed metrics
  rendered K8S_VERSION NAMESPACE CHART NAME=VALUES=MANIFESTS=NOTES...
                                    checks of helm-rendered manifests (flags,
                                    TLS, NetworkPolicies, NOTES.txt) and
                                    kubernetes-validate of every core object
  render-failures HELM CHART VALUES settings the chart must refuse at render
                                    time, each with its message

Needs PyYAML and jsonschema (Debian: python3-yaml, python3-jsonschema) and,
for `rendered`, kubernetes-validate (PyPI).
"""

import copy
import json
import re
import sys
from pathlib import Path

import yaml

FAILURES = []


def fail(msg):
    FAILURES.append(msg)
    print(f"  FAIL: {msg}")


def ok(msg):
    print(f"  ok: {msg}")


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def deep_merge(dst, src):
    """Merges src over dst the way helm merges -f files over values.yaml."""
    for k, v in src.items():
        if v is None:
            dst.pop(k, None)
        elif isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


# --------------------------------------------------------------------------
# values.schema.json


def cmd_schema(chart, *value_files):
    import jsonschema

    chart = Path(chart)
    schema = json.loads((chart / "values.schema.json").read_text(encoding="utf-8"))
    try:
        jsonschema.Draft7Validator.check_schema(schema)
        ok("values.schema.json is a valid draft-07 schema")
    except jsonschema.SchemaError as e:
        fail(f"values.schema.json is not a valid draft-07 schema: {e.message}")
        return
    validator = jsonschema.Draft7Validator(schema)
    defaults = load_yaml(chart / "values.yaml")

    def validate(name, values):
        errors = sorted(validator.iter_errors(values), key=lambda e: list(e.path))
        for e in errors:
            where = ".".join(str(p) for p in e.path) or "(root)"
            fail(f"{name}: {where}: {e.message}")
        if not errors:
            ok(f"{name} validates against values.schema.json")

    validate("values.yaml", defaults)
    for f in value_files:
        override = load_yaml(f) or {}
        validate(f"values.yaml + {f}", deep_merge(copy.deepcopy(defaults), override))

    # The schema must not be vacuous: known-bad values must be rejected.
    bad_cases = {
        "unknown top-level key": {"workers": {"replicas": 2}},
        "typo inside a group": {"worker": {"replica": 2}},
        "bad device": {"worker": {"device": "gpu0"}},
        "fractional GPU": {"worker": {"resources": {"limits": {"nvidia.com/gpu": 0.5}}}},
        "named probe port": {"coordinator": {"grpc": {"port": "grpc"}}},
        "ReadWriteMany state volume": {"coordinator": {"persistence": {"accessModes": ["ReadWriteMany"]}}},
        "bad scratch type": {"worker": {"scratch": {"type": "hostPath"}}},
        "relative allowed root": {"paths": {"allowRead": ["data"]}},
        "relative storage mountPath": {"storage": {"mountPath": "data"}},
        "gang port 0": {"worker": {"gang": {"port": 0}}},
        "bad Secret name": {"auth": {"tokensSecret": "My_Tokens"}},
        "unknown NetworkPolicy peer key": {"networkPolicy": {"clients": [{"pods": {}}]}},
        "empty NetworkPolicy peer": {"networkPolicy": {"metrics": [{}]}},
        "issuer kind typo": {"tls": {"certManager": {"issuerRef": {"kind": "CAIssuer"}}}},
    }
    for name, override in bad_cases.items():
        values = deep_merge(copy.deepcopy(defaults), override)
        if validator.is_valid(values):
            fail(f"schema accepts invalid values ({name}): {override}")
        else:
            ok(f"schema rejects {name}")


# --------------------------------------------------------------------------
# .Values paths in templates <-> values.yaml

VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def value_leaves(node, prefix=()):
    """Paths of the leaves of values.yaml (a non-empty map is not a leaf)."""
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from value_leaves(v, prefix + (str(k),))
    else:
        yield prefix


def cmd_values_paths(chart):
    chart = Path(chart)
    values = load_yaml(chart / "values.yaml")
    refs = {}
    for tpl in sorted((chart / "templates").rglob("*")):
        if not tpl.is_file():
            continue
        for lineno, line in enumerate(tpl.read_text(encoding="utf-8").splitlines(), 1):
            for m in VALUES_REF.finditer(line):
                path = tuple(m.group(1).lstrip(".").split("."))
                refs.setdefault(path, f"{tpl.relative_to(chart)}:{lineno}")
    if not refs:
        fail("no .Values references found in templates (wrong directory?)")
        return
    missing = 0
    for path, where in sorted(refs.items()):
        node = values
        for i, key in enumerate(path):
            if not isinstance(node, dict) or key not in node:
                fail(f"{where}: .Values.{'.'.join(path)} is not in values.yaml "
                     f"(no '{key}' under .Values{''.join('.' + p for p in path[:i])})")
                missing += 1
                break
            node = node[key]
    if not missing:
        ok(f"all {len(refs)} .Values paths used in templates exist in values.yaml")
    unused = [leaf for leaf in value_leaves(values)
              if not any(leaf[:len(r)] == r for r in refs)]
    for leaf in unused:
        fail(f"values.yaml: {'.'.join(leaf)} is not used by any template")
    if not unused:
        ok("every value in values.yaml is used by a template")


# --------------------------------------------------------------------------
# PromQL scanning (enough for metric names, labels and ranges)

PROMQL_FUNCS = {
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan",
    "atanh", "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "cos", "cosh", "count_over_time", "day_of_month", "day_of_week", "day_of_year",
    "days_in_month", "deg", "delta", "deriv", "exp", "floor", "histogram_count",
    "histogram_fraction", "histogram_quantile", "histogram_sum", "holt_winters", "hour",
    "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time", "ln",
    "log10", "log2", "max_over_time", "min_over_time", "minute", "month", "pi",
    "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets",
    "round", "scalar", "sgn", "sin", "sinh", "sort", "sort_desc", "sqrt",
    "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh", "time",
    "timestamp", "vector", "year",
}
PROMQL_AGGS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
               "count_values", "bottomk", "topk", "quantile"}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
OTHER_KEYWORDS = {"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"}
# Labels Prometheus attaches at scrape time (plus the operator's).
TARGET_LABELS = {"instance", "job", "pod", "namespace", "service", "container", "endpoint"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<brace>\{)
  | (?P<range>\[[^\]]*\])
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<num>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+|[a-zA-Z]+)?)
  | (?P<punct>[(),])
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=])
""", re.VERBOSE)
MATCHER = re.compile(r"""\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')\s*,?""")


def load_metrics(path):
    """Reads metrics.txt: {name: (type, {label: set(values) or None})}."""
    metrics = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) < 2 or fields[1] not in ("counter", "gauge", "histogram"):
            raise SystemExit(f"{path}:{lineno}: expected 'NAME TYPE [LABEL[=v|v]]...'")
        labels = {}
        for f in fields[2:]:
            name, _, vals = f.partition("=")
            labels[name] = set(vals.split("|")) if vals else None
        metrics[fields[0]] = (fields[1], labels)
    return metrics


def resolve_metric(name, metrics):
    """Returns (base name, labels) for a series name, or None if unknown."""
    if name in metrics:
        mtype, labels = metrics[name]
        return name, dict(labels)
    for suffix in HISTOGRAM_SUFFIXES:
        base = name[: -len(suffix)]
        if name.endswith(suffix) and metrics.get(base, ("",))[0] == "histogram":
            labels = dict(metrics[base][1])
            if suffix == "_bucket":
                labels["le"] = None
            return base, labels
    return None


def scan_promql(expr):
    """Yields ('metric', name, matchers) / ('labels', [names]) / ('range', text) /
    ('func', name) / ('error', text) items for one PromQL expression."""
    pos, toks = 0, []
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            yield ("error", f"cannot scan at: {expr[pos:pos + 20]!r}")
            return
        kind = m.lastgroup
        if kind == "brace":
            end, matchers = m.end(), []
            while True:
                mm = MATCHER.match(expr, end)
                if not mm:
                    break
                matchers.append((mm.group(1), mm.group(2), mm.group(3)[1:-1]))
                end = mm.end()
            close = re.compile(r"\s*\}").match(expr, end)
            if not close:
                yield ("error", f"cannot parse label matchers at: {expr[m.start():m.start() + 30]!r}")
                return
            toks.append(("matchers", matchers))
            pos = close.end()
            continue
        if kind != "ws":
            toks.append((kind, m.group()))
        pos = m.end()

    i = 0
    while i < len(toks):
        kind, val = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else (None, None)
        if kind == "range":
            yield ("range", val[1:-1])
        elif kind == "matchers":
            yield ("error", "label matchers without a metric name")
        elif kind == "ident":
            if val in LABEL_LIST_KEYWORDS:
                if nxt == ("punct", "("):
                    j, names = i + 2, []
                    while j < len(toks) and toks[j] != ("punct", ")"):
                        if toks[j][0] == "ident":
                            names.append(toks[j][1])
                        j += 1
                    yield ("labels", names)
                    i = j
            elif val in OTHER_KEYWORDS:
                pass
            elif nxt == ("punct", "("):
                if val in PROMQL_FUNCS or val in PROMQL_AGGS:
                    yield ("func", val)
                else:
                    yield ("error", f"unknown function {val}()")
            elif val in PROMQL_AGGS and nxt[0] == "ident" and nxt[1] in ("by", "without"):
                yield ("func", val)
            else:
                matchers = []
                if nxt[0] == "matchers":
                    matchers = nxt[1]
                    i += 1
                yield ("metric", val, matchers)
        i += 1


def check_promql(where, expr, metrics, extra_labels=()):
    """Checks metric names, label names and enumerated label values."""
    items = list(scan_promql(expr))
    used_labels = set(TARGET_LABELS) | set(extra_labels)
    n_metrics = 0
    good = True
    for item in items:
        if item[0] == "error":
            fail(f"{where}: {item[1]} in: {expr}")
            good = False
        elif item[0] == "metric":
            n_metrics += 1
            name, matchers = item[1], item[2]
            resolved = resolve_metric(name, metrics)
            if resolved is None:
                fail(f"{where}: metric {name} is not in tests/deploy/metrics.txt")
                good = False
                continue
            _, labels = resolved
            used_labels |= set(labels)
            for label, op, value in matchers:
                if label not in labels and label not in TARGET_LABELS:
                    fail(f"{where}: {name} has no label {label}")
                    good = False
                    continue
                allowed = labels.get(label)
                if not allowed:
                    continue
                if op in ("=", "!="):
                    values = [value]
                elif re.fullmatch(r"[A-Za-z0-9_]+(\|[A-Za-z0-9_]+)*", value):
                    values = value.split("|")
                else:
                    values = []
                for v in values:
                    if v not in allowed:
                        fail(f"{where}: {name}{{{label}}} never takes value {v!r} "
                             f"(allowed: {', '.join(sorted(allowed))})")
                        good = False
    for item in items:
        if item[0] == "labels":
            for label in item[1]:
                if label not in used_labels:
                    fail(f"{where}: label {label} in by/on/group_* is on none of the metrics used")
                    good = False
    if n_metrics == 0:
        fail(f"{where}: no metric found in: {expr}")
        good = False
    return items, good


# --------------------------------------------------------------------------
# Grafana dashboard

DS_REF = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def iter_panels(panels):
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []))


def cmd_dashboard(dash_path, metrics_path, out_rules):
    before = len(FAILURES)
    metrics = load_metrics(metrics_path)
    ok(f"{len(metrics)} metrics in {metrics_path}")
    dash = json.loads(Path(dash_path).read_text(encoding="utf-8"))

    for key, want in (("schemaVersion", 39), ("id", None), ("uid", "mq-overview")):
        if dash.get(key) != want:
            fail(f"{dash_path}: {key} is {dash.get(key)!r}, want {want!r}")
        else:
            ok(f"{key} = {want!r}")
    if "__inputs" in dash:
        fail("__inputs is only resolved by the import wizard; use the DS_PROMETHEUS variable")

    variables = dash.get("templating", {}).get("list", [])
    ds_vars = [v for v in variables if v.get("name") == "DS_PROMETHEUS"]
    if (len(ds_vars) != 1 or ds_vars[0].get("type") != "datasource"
            or ds_vars[0].get("query") != "prometheus"):
        fail("templating needs one {name: DS_PROMETHEUS, type: datasource, query: prometheus}")
    else:
        ok("templating defines the DS_PROMETHEUS datasource variable")
        if ds_vars[0].get("current"):
            fail("DS_PROMETHEUS.current must be empty (no hard-coded datasource)")
    var_names = {v.get("name") for v in variables}
    for v in variables:
        if v.get("type") != "query":
            continue
        if v.get("datasource") != DS_REF:
            fail(f"variable {v.get('name')}: datasource must be {DS_REF}")
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", q)
        if not m:
            fail(f"variable {v.get('name')}: query {q!r} is not label_values(metric, label)")
            continue
        resolved = resolve_metric(m.group(1), metrics)
        if resolved is None:
            fail(f"variable {v.get('name')}: metric {m.group(1)} is not in metrics.txt")
        elif m.group(2) not in resolved[1]:
            fail(f"variable {v.get('name')}: {m.group(1)} has no label {m.group(2)}")
        else:
            ok(f"variable {v.get('name')}: {q}")

    panels = list(iter_panels(dash.get("panels", [])))
    ids = [p.get("id") for p in panels]
    if len(set(ids)) != len(ids) or None in ids:
        fail(f"panel ids must be present and unique: {ids}")
    rules, n_targets = [], 0
    for p in panels:
        title = f"panel {p.get('id')} '{p.get('title')}'"
        if p.get("datasource") != DS_REF:
            fail(f"{title}: datasource is {p.get('datasource')!r}, want {DS_REF}")
        if "gridPos" not in p:
            fail(f"{title}: no gridPos")
        if p.get("type") != "row" and not p.get("targets"):
            fail(f"{title}: no targets")
        for t in p.get("targets", []):
            n_targets += 1
            where = f"{title} target {t.get('refId')}"
            if t.get("datasource") != DS_REF:
                fail(f"{where}: datasource is {t.get('datasource')!r}, want {DS_REF}")
            expr = t.get("expr", "")
            if not expr.strip():
                fail(f"{where}: empty expr")
                continue
            for r in re.findall(r"\[([^\]]*)\]", expr):
                if r != "$__rate_interval":
                    fail(f"{where}: range [{r}] must be [$__rate_interval]")
            for var in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expr):
                if var != "__rate_interval" and var not in var_names:
                    fail(f"{where}: ${var} is not a dashboard variable")
            promql = expr.replace("$__rate_interval", "5m")
            promql = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", promql)
            check_promql(where, promql, metrics)
            record = f"dashboard:panel_{p.get('id')}_{t.get('refId')}"
            rules.append({"record": record, "expr": promql})
    if len(FAILURES) == before:
        ok(f"{len(panels)} panels, {n_targets} targets: all use ${{DS_PROMETHEUS}}, ranges are "
           "[$__rate_interval], metrics/labels/values are in metrics.txt")
    Path(out_rules).write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard_exprs", "rules": rules}]},
                       sort_keys=False, width=1000),
        encoding="utf-8")
    ok(f"wrote {len(rules)} dashboard exprs as recording rules to {out_rules}")


def cmd_rules_metrics(metrics_path, *rule_files):
    metrics = load_metrics(metrics_path)
    for f in rule_files:
        data = load_yaml(f)
        recorded = {}
        n = 0
        for g in data.get("groups", []):
            for r in g.get("rules", []):
                if "record" in r:
                    recorded[r["record"]] = ("gauge", {})
        # Recording rules may use each other; their labels are any exported label.
        any_label = {l: None for _, labels in metrics.values() for l in labels}
        known = dict(metrics)
        for name in recorded:
            known[name] = ("gauge", any_label)
        for g in data.get("groups", []):
            for r in g.get("rules", []):
                name = r.get("record") or r.get("alert")
                check_promql(f"{f}: {name}", r["expr"], known)
                n += 1
        ok(f"{f}: {n} rule exprs use only metrics from metrics.txt (or recorded series)")


# --------------------------------------------------------------------------
# Rendered manifests (helm template)

NAMESPACE_DEFAULT = "mq"


def parse_args(args):
    """A container's args as {flag: [values]}; a flag without a value maps to [None]."""
    flags, i = {}, 0
    while i < len(args):
        a = str(args[i])
        if a.startswith("--"):
            value = None
            if i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
                value = str(args[i + 1])
                i += 1
            flags.setdefault(a, []).append(value)
        i += 1
    return flags


def cmd_rendered(k8s_version, namespace, chart, *specs):
    """specs: NAME=VALUES_FILE=RENDERED_FILE=NOTES_FILE."""
    import kubernetes_validate

    defaults = load_yaml(Path(chart) / "values.yaml")
    for spec in specs:
        name, values_file, path, notes_file = spec.split("=")
        values = deep_merge(copy.deepcopy(defaults), load_yaml(values_file) or {})
        docs = [d for d in yaml.safe_load_all(Path(path).read_text(encoding="utf-8")) if d]
        by_kind = {}
        for d in docs:
            by_kind.setdefault(d.get("kind"), []).append(d)
            if "namespace" in d.get("metadata", {}):
                fail(f"{name}: {d['kind']} {d['metadata'].get('name')} sets metadata.namespace")
            labels = d.get("metadata", {}).get("labels", {})
            for l in ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                      "app.kubernetes.io/managed-by", "helm.sh/chart", "app.kubernetes.io/version"):
                if l not in labels:
                    fail(f"{name}: {d.get('kind')} {d['metadata'].get('name')} lacks label {l}")
        ok(f"{name}: {len(docs)} objects: " + ", ".join(f"{k} x{len(v)}" for k, v in sorted(by_kind.items())))
        check_coordinator(name, by_kind, values)
        check_worker(name, by_kind, values)
        check_certificates(name, by_kind, values, namespace)
        check_network_policies(name, by_kind, values)
        check_notes(name, Path(notes_file).read_text(encoding="utf-8"), values)
        check_monitoring(name, by_kind)
        n = 0
        for d in docs:
            group = d.get("apiVersion", "").rpartition("/")[0]
            if group not in CORE_GROUPS:
                continue  # CRDs (Certificate, ServiceMonitor, PrometheusRule): no schema offline
            try:
                kubernetes_validate.validate(d, k8s_version, strict=True)
                n += 1
            except Exception as e:  # ValidationError, InvalidSchemaError, ...
                msg = getattr(e, "message", str(e))
                path_ = ".".join(str(p) for p in getattr(e, "path", []))
                fail(f"{name}: {d.get('kind')} {d['metadata'].get('name')}: "
                     f"kubernetes {k8s_version} schema: {path_}: {msg}")
        ok(f"{name}: {n} core objects pass kubernetes-validate {k8s_version} (strict)")


CORE_GROUPS = {"", "apps", "policy", "batch", "networking.k8s.io", "rbac.authorization.k8s.io"}


def container(obj, name):
    for c in obj["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c
    raise KeyError(name)


def port_of(c, port_name):
    return next((p["containerPort"] for p in c.get("ports", []) if p["name"] == port_name), None)


def secret_file(obj, c, path):
    """(secretName, key) of the Secret volume item mounted at file `path`, or None."""
    vols = {v["name"]: v for v in obj["spec"]["template"]["spec"].get("volumes", [])}
    for m in c.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/") + "/"
        if not path.startswith(mount):
            continue
        secret = vols.get(m["name"], {}).get("secret")
        if not secret:
            return None
        rel = path[len(mount):]
        items = secret.get("items")
        if items is None:
            return secret["secretName"], rel
        for it in items:
            if it["path"] == rel:
                return secret["secretName"], it["key"]
        return None
    return None


def check_file_flag(name, who, obj, c, flags, flag, secret, key):
    """flag names one file, mounted from key `key` of Secret `secret`."""
    vals = flags.get(flag, [])
    if len(vals) != 1 or not vals[0]:
        fail(f"{name}: {who} needs exactly one {flag} FILE, got {vals}")
        return
    got = secret_file(obj, c, vals[0])
    if got != (secret, key):
        fail(f"{name}: {who} {flag} {vals[0]} is mounted from {got}, want Secret {secret} key {key}")


def tls_secret(values):
    tls = values["tls"]
    return tls["existingSecret"] or "mq-coordinator-tls"


def worker_tls_secret(values):
    return values["tls"]["workerClientCert"]["existingSecret"] or "mq-worker-tls"


def check_coordinator(name, by_kind, values):
    before = len(FAILURES)
    sts = [s for s in by_kind.get("StatefulSet", []) if s["metadata"]["name"].endswith("-coordinator")]
    if len(sts) != 1:
        fail(f"{name}: want one coordinator StatefulSet, got {len(sts)}")
        return
    s = sts[0]
    spec = s["spec"]
    if spec.get("replicas") != 1:
        fail(f"{name}: coordinator replicas {spec.get('replicas')}, want 1")
    vct = spec.get("volumeClaimTemplates", [])
    if not vct or vct[0]["spec"]["accessModes"] != ["ReadWriteOnce"]:
        fail(f"{name}: coordinator needs an RWO volumeClaimTemplate")
    c = container(s, "coordinator")
    flags = parse_args(c.get("args", []))
    grpc_port, health_port, metrics_port = (port_of(c, p) for p in ("grpc", "health", "metrics"))
    if len({grpc_port, health_port, metrics_port}) != 3:
        fail(f"{name}: coordinator ports grpc {grpc_port}, health {health_port}, metrics "
             f"{metrics_port} must be three different ports")
    for flag, want in (("--listen", f"0.0.0.0:{grpc_port}"),
                       ("--health-listen", f"0.0.0.0:{health_port}"),
                       ("--metrics-listen", f"0.0.0.0:{metrics_port}"),
                       ("--data-dir", "/var/lib/mq")):
        if flags.get(flag) != [want]:
            fail(f"{name}: coordinator {flag} {flags.get(flag)}, want [{want!r}]")
    if not any(m["mountPath"] == "/var/lib/mq" and m["name"] == vct[0]["metadata"]["name"]
               for m in c.get("volumeMounts", [])):
        fail(f"{name}: coordinator does not mount its claim at its --data-dir /var/lib/mq")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c.get(probe, {})
        g = p.get("grpc")
        if not g or g.get("port") != health_port or not isinstance(g.get("port"), int):
            fail(f"{name}: coordinator {probe} must be grpc on the numeric health port "
                 f"{health_port} (plaintext; probes cannot speak TLS): {p}")
        elif g.get("service", ""):
            fail(f"{name}: coordinator {probe} must use the empty health service name")

    tls = values["tls"]
    if tls["enabled"]:
        if "--insecure" in flags:
            fail(f"{name}: coordinator has --insecure while tls.enabled")
        check_file_flag(name, "coordinator", s, c, flags, "--tls-cert", tls_secret(values), "tls.crt")
        check_file_flag(name, "coordinator", s, c, flags, "--tls-key", tls_secret(values), "tls.key")
        check_file_flag(name, "coordinator", s, c, flags, "--tokens-file",
                        values["auth"]["tokensSecret"], "tokens")
        if tls["workerClientCert"]["enabled"]:
            check_file_flag(name, "coordinator", s, c, flags, "--tls-ca", tls_secret(values), "ca.crt")
        elif "--tls-ca" in flags:
            fail(f"{name}: coordinator has --tls-ca (mTLS) while tls.workerClientCert.enabled is false")
    else:
        if flags.get("--insecure") != [None]:
            fail(f"{name}: coordinator needs --insecure (and nothing after it) while tls.enabled is false")
        for flag in ("--tls-cert", "--tls-key", "--tls-ca", "--tokens-file"):
            if flag in flags:
                fail(f"{name}: coordinator has {flag} while tls.enabled is false")
    s3 = values.get("s3", {})
    s3_root = []
    if s3.get("enabled") and s3.get("bucket"):  # s3.bucket/prefix is allowed both ways
        s3_root = ["s3://" + s3["bucket"] + ("/" + s3["prefix"] if s3.get("prefix") else "")]
    for flag, key in (("--allow-read", "allowRead"), ("--allow-write", "allowWrite")):
        if flags.get(flag, []) != values["paths"][key] + s3_root:
            fail(f"{name}: coordinator {flag} {flags.get(flag, [])}, want paths.{key} "
                 f"{values['paths'][key]}")

    svcs = {x["metadata"]["name"]: x for x in by_kind.get("Service", [])}
    headless = svcs.get(spec.get("serviceName"))
    if not headless or headless["spec"].get("clusterIP") != "None":
        fail(f"{name}: StatefulSet serviceName {spec.get('serviceName')} is not a headless Service")
    cip = svcs.get(s["metadata"]["name"])
    if not cip or cip["spec"].get("clusterIP") == "None":
        fail(f"{name}: no ClusterIP Service {s['metadata']['name']}")
    elif any(p.get("targetPort") == "health" for p in cip["spec"]["ports"]):
        fail(f"{name}: the coordinator Service exposes the health port")
    if len(FAILURES) == before:
        mode = "TLS" if tls["enabled"] else "--insecure"
        ok(f"{name}: coordinator StatefulSet (1 replica, RWO state, {mode}, allowed roots, "
           "gRPC probes on the health port, services)")


def check_worker(name, by_kind, values):
    before = len(FAILURES)
    deps = [d for d in by_kind.get("Deployment", []) if d["metadata"]["name"].endswith("-worker")]
    if len(deps) != 1:
        fail(f"{name}: want one worker Deployment, got {len(deps)}")
        return
    d = deps[0]
    pod = d["spec"]["template"]["spec"]
    c = container(d, "worker")
    flags = parse_args(c.get("args", []))
    coord = [s for s in by_kind.get("Service", [])
             if s["metadata"]["labels"].get("app.kubernetes.io/component") == "coordinator"
             and s["spec"].get("clusterIP") != "None"]
    grpc_port = coord[0]["spec"]["ports"][0]["port"] if coord else None
    coord_addr = f"{coord[0]['metadata']['name']}:{grpc_port}" if coord else "?"
    metrics_port, gang_port = port_of(c, "metrics"), port_of(c, "gang")
    want = {"--coordinator": [coord_addr], "--name": ["$(POD_NAME)"], "--scratch-dir": ["/scratch"],
            "--metrics-listen": [f"0.0.0.0:{metrics_port}"],
            "--gang-host": ["$(POD_IP)"], "--gang-port": [str(gang_port)]}
    for flag, v in want.items():
        if flags.get(flag) != v:
            fail(f"{name}: worker {flag} {flags.get(flag)}, want {v}")
    if gang_port != values["worker"]["gang"]["port"]:
        fail(f"{name}: worker container port 'gang' is {gang_port}, want worker.gang.port")
    env = {e["name"]: e for e in c.get("env", [])}
    for var, field in (("POD_NAME", "metadata.name"), ("POD_IP", "status.podIP")):
        if env.get(var, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != field:
            fail(f"{name}: worker {var} must come from the downward API ({field})")

    tls = values["tls"]
    if tls["enabled"]:
        if "--insecure" in flags:
            fail(f"{name}: worker has --insecure while tls.enabled")
        check_file_flag(name, "worker", d, c, flags, "--tls-ca", tls_secret(values), "ca.crt")
        check_file_flag(name, "worker", d, c, flags, "--token-file",
                        values["auth"]["workerTokenSecret"], "token")
        if tls["serverName"]:
            if flags.get("--tls-server-name") != [tls["serverName"]]:
                fail(f"{name}: worker --tls-server-name {flags.get('--tls-server-name')}, "
                     f"want [{tls['serverName']!r}]")
        elif "--tls-server-name" in flags:
            fail(f"{name}: worker has --tls-server-name while tls.serverName is empty")
        if tls["workerClientCert"]["enabled"]:
            check_file_flag(name, "worker", d, c, flags, "--tls-cert", worker_tls_secret(values), "tls.crt")
            check_file_flag(name, "worker", d, c, flags, "--tls-key", worker_tls_secret(values), "tls.key")
        elif "--tls-cert" in flags or "--tls-key" in flags:
            fail(f"{name}: worker has a client certificate while tls.workerClientCert.enabled is false")
    else:
        if flags.get("--insecure") != [None]:
            fail(f"{name}: worker needs --insecure while tls.enabled is false")
        for flag in ("--tls-ca", "--tls-cert", "--tls-key", "--tls-server-name", "--token-file"):
            if flag in flags:
                fail(f"{name}: worker has {flag} while tls.enabled is false")
    # The coordinator's private key never reaches a worker pod.
    for v in pod.get("volumes", []):
        sec = v.get("secret")
        if sec and sec["secretName"] == tls_secret(values):
            keys = [it["key"] for it in sec.get("items") or [{"key": "(all keys)"}]]
            if keys != ["ca.crt"]:
                fail(f"{name}: worker volume {v['name']} mounts {keys} of the coordinator's "
                     "TLS Secret; workers may mount only ca.crt")

    storage = values["storage"]
    mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts", [])}
    if storage["existingClaim"]:
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        m = mounts.get(storage["mountPath"].rstrip("/"))
        claim = vols.get(m["name"], {}).get("persistentVolumeClaim", {}) if m else {}
        if claim.get("claimName") != storage["existingClaim"]:
            fail(f"{name}: worker does not mount PVC {storage['existingClaim']} at {storage['mountPath']}")
        elif bool(m.get("readOnly")) != storage["readOnly"] or bool(claim.get("readOnly")) != storage["readOnly"]:
            fail(f"{name}: worker storage mount readOnly is {m.get('readOnly')}, want {storage['readOnly']}")
        # Every allowed root lies on a volume the workers mount.
        for key in ("allowRead", "allowWrite"):
            for root in values["paths"][key]:
                on = [p for p in mounts if root == p or root.startswith(p + "/")]
                if not on:
                    fail(f"{name}: paths.{key} {root} is on no volume the workers mount "
                         f"({', '.join(sorted(mounts))})")
                elif key == "allowWrite" and mounts[max(on, key=len)].get("readOnly"):
                    fail(f"{name}: paths.allowWrite {root} is on a read-only mount")

    res = c.get("resources", {})
    device = flags.get("--device", ["?"])[0]
    if str(device).startswith("cuda"):
        if res.get("limits", {}).get("nvidia.com/gpu") != 1:
            fail(f"{name}: worker limits nvidia.com/gpu must be 1: {res}")
        req = res.get("requests", {}).get("nvidia.com/gpu")
        if req not in (None, 1):
            fail(f"{name}: worker requests nvidia.com/gpu must equal the limit")
        tol = pod.get("tolerations", [])
        if not any(t.get("key") == "nvidia.com/gpu" for t in tol):
            fail(f"{name}: worker lacks the nvidia.com/gpu toleration")
    if "/scratch" not in mounts:
        fail(f"{name}: worker does not mount /scratch")
    pdbs = by_kind.get("PodDisruptionBudget", [])
    if len(pdbs) != 1 or pdbs[0]["spec"].get("maxUnavailable") != 1:
        fail(f"{name}: want one worker PodDisruptionBudget with maxUnavailable 1")
    elif pdbs[0]["spec"]["selector"]["matchLabels"] != d["spec"]["selector"]["matchLabels"]:
        fail(f"{name}: the PDB selector does not match the worker Deployment")
    if len(FAILURES) == before:
        mode = "TLS" if tls["enabled"] else "--insecure"
        ok(f"{name}: worker Deployment (--gang-host $(POD_IP), gang port {gang_port}, {mode}, "
           "storage, GPU limit, toleration, /scratch, PDB)")


def check_certificates(name, by_kind, values, namespace):
    before = len(FAILURES)
    certs = {c["metadata"]["name"]: c for c in by_kind.get("Certificate", [])}
    tls = values["tls"]
    cm = tls["certManager"]
    if not (tls["enabled"] and cm["enabled"]):
        if certs:
            fail(f"{name}: Certificates rendered without tls.certManager.enabled: {sorted(certs)}")
        return
    issuer = cm["issuerRef"]
    want_certs = {"mq-coordinator": ("mq-coordinator-tls", "server auth")}
    if tls["workerClientCert"]["enabled"] and not tls["workerClientCert"]["existingSecret"]:
        want_certs["mq-worker"] = ("mq-worker-tls", "client auth")
    if sorted(certs) != sorted(want_certs):
        fail(f"{name}: Certificates {sorted(certs)}, want {sorted(want_certs)}")
        return
    for cname, (secret, usage) in want_certs.items():
        spec = certs[cname]["spec"]
        if spec.get("secretName") != secret:
            fail(f"{name}: Certificate {cname} writes Secret {spec.get('secretName')}, want {secret}")
        if spec.get("issuerRef") != issuer:
            fail(f"{name}: Certificate {cname} issuerRef {spec.get('issuerRef')}, want {issuer}")
        if usage not in spec.get("usages", []):
            fail(f"{name}: Certificate {cname} lacks usage {usage!r}")
    dns = certs["mq-coordinator"]["spec"].get("dnsNames", [])
    svc = "mq-coordinator"
    domain = values["clusterDomain"]
    for n in (svc, f"{svc}.{namespace}", f"{svc}.{namespace}.svc",
              f"{svc}.{namespace}.svc.{domain}", *cm["extraDnsNames"]):
        if n not in dns:
            fail(f"{name}: the coordinator's Certificate does not cover {n}: {dns}")
    if len(FAILURES) == before:
        ok(f"{name}: cert-manager Certificates {sorted(certs)} (issuer {issuer['kind']}/"
           f"{issuer['name']}, the coordinator Service's DNS names, mounted Secrets)")


def peers_are_workers_only(peers):
    want = {"app.kubernetes.io/name": "mq", "app.kubernetes.io/instance": "mq",
            "app.kubernetes.io/component": "worker"}
    return bool(peers) and all(set(p) == {"podSelector"}
                               and p["podSelector"] == {"matchLabels": want} for p in peers)


def rule_admits_port(rule, port_name, port_number):
    ports = rule.get("ports")
    if not ports:
        return True
    for p in ports:
        if "port" not in p or p["port"] in (port_name, port_number):
            return True
        if isinstance(p["port"], int) and p.get("endPort") and p["port"] <= port_number <= p["endPort"]:
            return True
    return False


def check_network_policies(name, by_kind, values):
    before = len(FAILURES)
    nps = {n["metadata"]["name"]: n for n in by_kind.get("NetworkPolicy", [])}
    np_values = values["networkPolicy"]
    if not np_values["enabled"]:
        if nps:
            fail(f"{name}: NetworkPolicies rendered while networkPolicy.enabled is false")
        return
    if sorted(nps) != ["mq-coordinator", "mq-worker"]:
        fail(f"{name}: NetworkPolicies {sorted(nps)}, want mq-coordinator and mq-worker")
        return
    for n in nps.values():
        if "Ingress" not in n["spec"].get("policyTypes", []):
            fail(f"{name}: NetworkPolicy {n['metadata']['name']} does not restrict ingress")
        for r in n["spec"].get("ingress", []):
            if not r.get("from"):
                fail(f"{name}: NetworkPolicy {n['metadata']['name']} has a rule without `from` "
                     f"(admits every source): {r}")
    gang_port = values["worker"]["gang"]["port"]
    worker_np = nps["mq-worker"]["spec"]
    if worker_np["podSelector"] != {"matchLabels": {"app.kubernetes.io/name": "mq",
                                                   "app.kubernetes.io/instance": "mq",
                                                   "app.kubernetes.io/component": "worker"}}:
        fail(f"{name}: NetworkPolicy mq-worker does not select the worker pods")
    gang_rules = [r for r in worker_np.get("ingress", []) if rule_admits_port(r, "gang", gang_port)]
    if not gang_rules:
        fail(f"{name}: no rule admits the gang port {gang_port} between workers")
    for r in gang_rules:
        if not peers_are_workers_only(r.get("from")):
            fail(f"{name}: a rule admitting the gang port {gang_port} admits more than the "
                 f"release's worker pods: {r.get('from')}")
    metrics_peers = np_values["metrics"]
    coord_np = nps["mq-coordinator"]["spec"]
    for who, spec, port in (("worker", worker_np, values["worker"]["metrics"]["port"]),
                            ("coordinator", coord_np, values["coordinator"]["metrics"]["port"])):
        rules = [r for r in spec.get("ingress", []) if r.get("ports")
                 and rule_admits_port(r, "metrics", port)]
        got = rules[0]["from"] if len(rules) == 1 else None
        if metrics_peers and got != metrics_peers:
            fail(f"{name}: {who} metrics port admits {got}, want networkPolicy.metrics {metrics_peers}")
        if not metrics_peers and rules:
            fail(f"{name}: {who} metrics port is open while networkPolicy.metrics is empty")
    grpc_port = values["coordinator"]["grpc"]["port"]
    grpc_rules = [r for r in coord_np.get("ingress", []) if rule_admits_port(r, "grpc", grpc_port)]
    peers = [p for r in grpc_rules for p in r["from"]]
    worker_peer = [p for p in peers if peers_are_workers_only([p])]
    if not worker_peer:
        fail(f"{name}: the coordinator's gRPC port does not admit the workers")
    if [p for p in peers if p not in worker_peer] != np_values["clients"]:
        fail(f"{name}: the coordinator's gRPC port admits {peers}, want the workers and "
             f"networkPolicy.clients {np_values['clients']}")
    health = values["coordinator"]["health"]["port"]
    if any(rule_admits_port(r, "health", health) for r in coord_np.get("ingress", [])
           if r.get("ports")):
        fail(f"{name}: a NetworkPolicy rule names the health port (kubelet probes need none)")
    if len(FAILURES) == before:
        ok(f"{name}: NetworkPolicies (gang port {gang_port} and collectives only between "
           "worker pods, gRPC from workers and clients, metrics from networkPolicy.metrics)")


def check_notes(name, notes, values):
    insecure = "WARNING: INSECURE" in notes
    if values["tls"]["enabled"] == insecure:
        fail(f"{name}: NOTES.txt {'says' if insecure else 'does not say'} INSECURE while "
             f"tls.enabled is {values['tls']['enabled']}")
    elif not notes.strip():
        fail(f"{name}: NOTES.txt is empty")
    else:
        ok(f"{name}: NOTES.txt ({'insecure warning' if insecure else 'TLS and tokens'})")


def cmd_render_failures(helm, chart, base_values):
    """Settings the chart must refuse, each with its message, rendered by helm."""
    import subprocess

    cases = [
        ("TLS on without a certificate", [],
         "tls.enabled is true but no certificate is configured: set tls.existingSecret"),
        ("TLS on without the tokens Secret", ["--set", "tls.existingSecret=mq-tls"],
         "tls.enabled is true but auth.tokensSecret is empty"),
        ("TLS on without the worker token Secret",
         ["--set", "tls.existingSecret=mq-tls", "--set", "auth.tokensSecret=t"],
         "tls.enabled is true but auth.workerTokenSecret is empty"),
        ("existingSecret and cert-manager both",
         ["-f", base_values, "--set", "tls.certManager.enabled=true",
          "--set", "tls.certManager.issuerRef.name=ca"],
         "tls.existingSecret and tls.certManager.enabled are both set"),
        ("cert-manager without an issuer",
         ["-f", base_values, "--set", "tls.existingSecret=", "--set", "tls.certManager.enabled=true"],
         "tls.certManager.issuerRef.name is empty"),
        ("mTLS without a client certificate",
         ["-f", base_values, "--set", "tls.workerClientCert.enabled=true"],
         "tls.workerClientCert.enabled is true but no client certificate is configured"),
        ("TLS on without allowed roots", ["-f", base_values, "--set-json", "paths.allowWrite=[]"],
         "paths.allowRead or paths.allowWrite is empty"),
        ("allowWrite on read-only storage",
         ["-f", base_values, "--set", "storage.existingClaim=models", "--set", "storage.readOnly=true"],
         "paths.allowWrite /data/out lies on storage mounted read-only at /data"),
        ("relative allowed root (schema)", ["-f", base_values, "--set-json", 'paths.allowRead=["data"]'],
         "allowRead"),
    ]
    for what, args, want in cases:
        r = subprocess.run([helm, "template", "mq", chart, *args], capture_output=True, text=True)
        if r.returncode == 0:
            fail(f"helm template renders ({what}); want a failure saying {want!r}")
        elif want not in r.stderr:
            fail(f"helm template ({what}) failed without {want!r}: {r.stderr.strip()}")
        else:
            ok(f"refused ({what}): {want}")
    r = subprocess.run([helm, "template", "mq", chart, "-f", base_values], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"helm template with {base_values} fails: {r.stderr.strip()}")
    else:
        ok(f"renders with {base_values} (the control)")


def check_monitoring(name, by_kind):
    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"]["selector"]["matchLabels"]
        port = sm["spec"]["endpoints"][0]["port"]
        targets = [s for s in by_kind.get("Service", [])
                   if all(s["metadata"]["labels"].get(k) == v for k, v in sel.items())
                   and any(p.get("name") == port for p in s["spec"]["ports"])]
        if len(targets) != 1:
            fail(f"{name}: ServiceMonitor {sm['metadata']['name']} matches {len(targets)} "
                 f"Services with port {port}, want exactly 1")
    for cm in by_kind.get("ConfigMap", []):
        if cm["metadata"]["labels"].get("grafana_dashboard") != "1":
            continue
        for key, text in cm.get("data", {}).items():
            try:
                dash = json.loads(text)
                if dash.get("uid") != "mq-overview":
                    fail(f"{name}: ConfigMap {key} is not the mq dashboard")
            except json.JSONDecodeError as e:
                fail(f"{name}: ConfigMap {key} is not JSON: {e}")
    if by_kind.get("ServiceMonitor") or by_kind.get("ConfigMap"):
        ok(f"{name}: ServiceMonitor selectors / dashboard ConfigMap checked")


# --------------------------------------------------------------------------


def main(argv):
    cmds = {
        "schema": cmd_schema,
        "values-paths": cmd_values_paths,
        "dashboard": cmd_dashboard,
        "rules-metrics": cmd_rules_metrics,
        "rendered": cmd_rendered,
        "render-failures": cmd_render_failures,
    }
    if len(argv) < 2 or argv[1] not in cmds:
        print(__doc__)
        return 2
    cmds[argv[1]](*argv[2:])
    if FAILURES:
        print(f"  {len(FAILURES)} failure(s)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
