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
  rendered K8S_VERSION NAME=FILE... structural checks of rendered manifests,
                                    plus kubernetes-validate when installed

Needs PyYAML and jsonschema (Debian: python3-yaml, python3-jsonschema).
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
# Rendered manifests


def cmd_rendered(k8s_version, *named_files):
    try:
        import kubernetes_validate
    except ImportError:
        kubernetes_validate = None
        print("  SKIP kubernetes-validate (python package not installed: "
              "pip install kubernetes-validate)")
    for named in named_files:
        name, _, path = named.partition("=")
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
        check_coordinator(name, by_kind)
        check_worker(name, by_kind)
        check_monitoring(name, by_kind)
        if kubernetes_validate is not None:
            n = 0
            for d in docs:
                group = d.get("apiVersion", "").rpartition("/")[0]
                if group not in CORE_GROUPS:
                    continue  # CRDs (ServiceMonitor, PrometheusRule): no schema offline
                try:
                    kubernetes_validate.validate(d, k8s_version, strict=True)
                    n += 1
                except Exception as e:  # ValidationError, InvalidSchemaError, ...
                    msg = getattr(e, "message", str(e))
                    path_ = ".".join(str(p) for p in getattr(e, "path", []))
                    fail(f"{name}: {d.get('kind')} {d['metadata'].get('name')}: "
                         f"kubernetes {k8s_version} schema: {path_}: {msg}")
            ok(f"{name}: {n} core objects pass kubernetes-validate {k8s_version} --strict")


CORE_GROUPS = {"", "apps", "policy", "batch", "networking.k8s.io", "rbac.authorization.k8s.io"}


def container(obj, name):
    for c in obj["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c
    raise KeyError(name)


def check_coordinator(name, by_kind):
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
    args = c.get("args", [])
    grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    metrics_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics")
    want = ["--listen", f"0.0.0.0:{grpc_port}", "--data-dir", "/data",
            "--metrics-listen", f"0.0.0.0:{metrics_port}"]
    if args[:6] != want:
        fail(f"{name}: coordinator args {args}, want {want} first")
    if not any(m["mountPath"] == "/data" and m["name"] == vct[0]["metadata"]["name"]
               for m in c.get("volumeMounts", [])):
        fail(f"{name}: coordinator does not mount its claim at /data")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c.get(probe, {})
        g = p.get("grpc")
        if not g or g.get("port") != grpc_port or not isinstance(g.get("port"), int):
            fail(f"{name}: coordinator {probe} must be grpc on numeric port {grpc_port}: {p}")
        elif g.get("service", ""):
            fail(f"{name}: coordinator {probe} must use the empty health service name")
    svcs = {x["metadata"]["name"]: x for x in by_kind.get("Service", [])}
    headless = svcs.get(spec.get("serviceName"))
    if not headless or headless["spec"].get("clusterIP") != "None":
        fail(f"{name}: StatefulSet serviceName {spec.get('serviceName')} is not a headless Service")
    cip = svcs.get(s["metadata"]["name"])
    if not cip or cip["spec"].get("clusterIP") == "None":
        fail(f"{name}: no ClusterIP Service {s['metadata']['name']}")
    if len(FAILURES) == before:
        ok(f"{name}: coordinator StatefulSet (1 replica, RWO /data, args, gRPC probes, services)")


def check_worker(name, by_kind):
    before = len(FAILURES)
    deps = [d for d in by_kind.get("Deployment", []) if d["metadata"]["name"].endswith("-worker")]
    if len(deps) != 1:
        fail(f"{name}: want one worker Deployment, got {len(deps)}")
        return
    d = deps[0]
    c = container(d, "worker")
    args = c.get("args", [])
    coord = [s for s in by_kind.get("Service", [])
             if s["metadata"]["labels"].get("app.kubernetes.io/component") == "coordinator"
             and s["spec"].get("clusterIP") != "None"]
    grpc_port = coord[0]["spec"]["ports"][0]["port"] if coord else None
    metrics_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics")
    coord_addr = f"{coord[0]['metadata']['name']}:{grpc_port}" if coord else "?"
    want = ["--coordinator", coord_addr, "--device", args[3] if len(args) > 3 else "?",
            "--name", "$(POD_NAME)", "--scratch-dir", "/scratch",
            "--metrics-listen", f"0.0.0.0:{metrics_port}"]
    if args[:10] != want:
        fail(f"{name}: worker args {args}, want {want} first")
    env = {e["name"]: e for e in c.get("env", [])}
    if env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
        fail(f"{name}: worker POD_NAME must come from the downward API (metadata.name)")
    res = c.get("resources", {})
    if str(args[3]).startswith("cuda"):
        if res.get("limits", {}).get("nvidia.com/gpu") != 1:
            fail(f"{name}: worker limits nvidia.com/gpu must be 1: {res}")
        req = res.get("requests", {}).get("nvidia.com/gpu")
        if req not in (None, 1):
            fail(f"{name}: worker requests nvidia.com/gpu must equal the limit")
        tol = d["spec"]["template"]["spec"].get("tolerations", [])
        if not any(t.get("key") == "nvidia.com/gpu" for t in tol):
            fail(f"{name}: worker lacks the nvidia.com/gpu toleration")
    if not any(m["mountPath"] == "/scratch" for m in c.get("volumeMounts", [])):
        fail(f"{name}: worker does not mount /scratch")
    pdbs = by_kind.get("PodDisruptionBudget", [])
    if len(pdbs) != 1 or pdbs[0]["spec"].get("maxUnavailable") != 1:
        fail(f"{name}: want one worker PodDisruptionBudget with maxUnavailable 1")
    elif pdbs[0]["spec"]["selector"]["matchLabels"] != d["spec"]["selector"]["matchLabels"]:
        fail(f"{name}: the PDB selector does not match the worker Deployment")
    if len(FAILURES) == before:
        ok(f"{name}: worker Deployment (args, POD_NAME, GPU limit, toleration, /scratch, PDB)")


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
