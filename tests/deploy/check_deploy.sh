#!/usr/bin/env bash
# Offline checks of deploy/ (Helm chart, Grafana dashboard, Prometheus rules).
# Run: bash tests/deploy/check_deploy.sh   (ctest -L deploy runs it too)
#
# Needs (installed by scripts/setup.sh, never by this script):
#   Debian: prometheus (promtool), yamllint, python3-yaml, python3-jsonschema
#   optional, Debian: golang-go golang-github-masterminds-sprig-dev
#     golang-gopkg-yaml.v3-dev (approximate helm-less render of the chart)
#   optional, PyPI: kubernetes-validate (schema check of rendered objects)
#   optional: helm, kubeconform (not in Debian; used when on PATH)
# Exits non-zero if any check fails. Missing optional tools print SKIP lines.
set -euo pipefail

SRC="${MQ_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
HERE="$SRC/tests/deploy"
CHART="$SRC/deploy/helm/mq"
DASHBOARD="$SRC/deploy/grafana/mq.json"
RULES="$SRC/deploy/prometheus/mq-rules.yaml"
RULES_TEST="$SRC/deploy/prometheus/mq-rules.test.yaml"
METRICS="$HERE/metrics.txt"
K8S_VERSION=1.27.0
# The ServiceMonitor/PrometheusRule templates render only where the cluster
# serves these APIs; CI renders as if it does.
API_VERSIONS=(monitoring.coreos.com/v1/ServiceMonitor monitoring.coreos.com/v1/PrometheusRule)

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

passed=0
failed=0
skipped=0
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

skip() {
  echo "SKIP $*"
  skipped=$((skipped + 1))
}

# ---------------------------------------------------------------- tools
missing=()
command -v promtool >/dev/null || missing+=("promtool (Debian package 'prometheus')")
command -v yamllint >/dev/null || missing+=("yamllint (Debian package 'yamllint')")
PY=""
for py in "${MQ_PYTHON:-}" python3 /usr/bin/python3; do
  if [[ -n "$py" ]] && command -v "$py" >/dev/null \
      && "$py" -c 'import yaml, jsonschema' 2>/dev/null; then
    PY="$py"
    break
  fi
done
[[ -n "$PY" ]] || missing+=("python3 with yaml and jsonschema (Debian packages 'python3-yaml python3-jsonschema')")
if ((${#missing[@]})); then
  echo "ERROR: tools needed by the deploy checks are missing:" >&2
  for m in "${missing[@]}"; do echo "  - $m" >&2; done
  echo "Run the setup script (scripts/setup.sh) to install them; this check installs nothing." >&2
  exit 1
fi
echo "tools: $(promtool --version 2>&1 | head -n1); yamllint $(yamllint --version | awk '{print $2}'); python $("$PY" -c 'import sys; print(sys.version.split()[0])') ($PY)"
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
ci_files=("$CHART"/ci/*.yaml)
rendered_args=()

if command -v helm >/dev/null; then
  helm_checks() {
    local f name api=()
    for v in "${API_VERSIONS[@]}"; do api+=(--api-versions "$v"); done
    for f in "${ci_files[@]}"; do
      name=$(basename "$f" .yaml)
      helm lint --strict "$CHART" -f "$f"
      helm template mq "$CHART" -f "$f" "${api[@]}" --kube-version "$K8S_VERSION" >"$WORK/helm-$name.yaml"
      echo "  ok: helm lint --strict and helm template with ci/$name.yaml"
      if command -v kubeconform >/dev/null; then
        kubeconform -strict -summary -ignore-missing-schemas \
          -kubernetes-version "$K8S_VERSION" "$WORK/helm-$name.yaml"
      fi
    done
  }
  before=$failed
  step "helm lint and helm template (ci/*.yaml)" helm_checks
  if ((failed == before)); then
    for f in "${ci_files[@]}"; do
      rendered_args+=("helm:$(basename "$f" .yaml)=$WORK/helm-$(basename "$f" .yaml).yaml")
    done
  fi
  command -v kubeconform >/dev/null || skip "kubeconform (not installed)"
else
  skip "helm (not installed)"
fi

# An approximate renderer (NOT helm) so the templates execute even without
# helm: Go text/template + sprig from Debian packages, built offline.
GOSRC=/usr/share/gocode/src
if command -v go >/dev/null && [[ -d $GOSRC/github.com/Masterminds/sprig && -d $GOSRC/gopkg.in/yaml.v3 ]]; then
  approx_render() {
    local f name api=()
    # GOPATH mode against Debian's Go sources: no module download, no network.
    local gocache="${GOCACHE:-${HOME:+$HOME/.cache/go-build}}"
    (cd "$SRC" && GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS= \
      GOCACHE="${gocache:-$WORK/gocache}" go build -o "$WORK/render" ./tests/deploy/render)
    for v in "${API_VERSIONS[@]}"; do api+=(-api-versions "$v"); done
    for f in "${ci_files[@]}"; do
      name=$(basename "$f" .yaml)
      "$WORK/render" -chart "$CHART" -f "$f" "${api[@]}" -release mq -namespace mq \
        -notes "$WORK/approx-$name-NOTES.txt" >"$WORK/approx-$name.yaml"
      "$PY" -c 'import sys, yaml; list(yaml.safe_load_all(open(sys.argv[1])))' "$WORK/approx-$name.yaml"
      [[ -s "$WORK/approx-$name-NOTES.txt" ]]
      echo "  ok: rendered ci/$name.yaml and NOTES.txt (approximate, not helm)"
    done
  }
  before=$failed
  step "approximate render of the chart (not helm)" approx_render
  if ((failed == before)); then
    for f in "${ci_files[@]}"; do
      rendered_args+=("approx:$(basename "$f" .yaml)=$WORK/approx-$(basename "$f" .yaml).yaml")
    done
  fi
else
  skip "approximate render (needs Debian golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v3-dev)"
fi

if ((${#rendered_args[@]})); then
  step "rendered manifests (structure, labels, kubernetes $K8S_VERSION schema)" \
    "${CHECK[@]}" rendered "$K8S_VERSION" "${rendered_args[@]}"
elif ((failed)); then
  echo "(rendered manifest checks not run: rendering failed)"
else
  skip "rendered manifest checks (no renderer)"
fi

# ---------------------------------------------------------------- summary
echo
if ((failed)); then
  echo "failed checks:"
  for n in "${failed_names[@]}"; do echo "  - $n"; done
fi
echo "deploy_checks: $passed passed, $failed failed, $skipped skipped"
((failed == 0))
