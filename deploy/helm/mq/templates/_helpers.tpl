{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "mq.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name, prefixed with the chart name unless it already
contains it. Component names append "-coordinator" / "-worker", so keep room.
*/}}
{{- define "mq.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "mq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: stable across upgrades (a Deployment's selector is immutable).
*/}}
{{- define "mq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Common labels (Helm best practices).
*/}}
{{- define "mq.labels" -}}
helm.sh/chart: {{ include "mq.chart" . }}
{{ include "mq.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mq
{{- end }}

{{- define "mq.coordinator.fullname" -}}
{{- printf "%s-coordinator" (include "mq.fullname" .) }}
{{- end }}

{{- define "mq.worker.fullname" -}}
{{- printf "%s-worker" (include "mq.fullname" .) }}
{{- end }}

{{- define "mq.coordinator.selectorLabels" -}}
{{ include "mq.selectorLabels" . }}
app.kubernetes.io/component: coordinator
{{- end }}

{{- define "mq.worker.selectorLabels" -}}
{{ include "mq.selectorLabels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "mq.coordinator.labels" -}}
{{ include "mq.labels" . }}
app.kubernetes.io/component: coordinator
{{- end }}

{{- define "mq.worker.labels" -}}
{{ include "mq.labels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{/*
Address the workers dial: the coordinator's ClusterIP Service.
*/}}
{{- define "mq.coordinator.address" -}}
{{- printf "%s:%d" (include "mq.coordinator.fullname" .) (int .Values.coordinator.grpc.port) }}
{{- end }}

{{- define "mq.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mq.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mq.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The Secret holding the coordinator's tls.crt, tls.key and ca.crt.
*/}}
{{- define "mq.tls.secretName" -}}
{{- if .Values.tls.existingSecret }}
{{- .Values.tls.existingSecret }}
{{- else }}
{{- printf "%s-tls" (include "mq.coordinator.fullname" .) }}
{{- end }}
{{- end }}

{{/*
The Secret holding the workers' client certificate (mTLS).
*/}}
{{- define "mq.workerTls.secretName" -}}
{{- if .Values.tls.workerClientCert.existingSecret }}
{{- .Values.tls.workerClientCert.existingSecret }}
{{- else }}
{{- printf "%s-tls" (include "mq.worker.fullname" .) }}
{{- end }}
{{- end }}

{{/*
DNS names the coordinator is reached at: its ClusterIP Service, short and
qualified, plus its pod's name under the headless Service.
*/}}
{{- define "mq.coordinator.dnsNames" -}}
{{- $svc := include "mq.coordinator.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) }}
{{- $names = append $names (printf "%s-0.%s-headless.%s.svc.%s" $svc $svc $ns .Values.clusterDomain) }}
{{- $names = append $names "localhost" }}
{{- concat $names .Values.tls.certManager.extraDnsNames | uniq | toYaml }}
{{- end }}

{{/*
Settings that the schema cannot check; every template includes this, so a
bad combination fails the render with one clear message.
*/}}
{{- define "mq.validate" -}}
{{- $tls := .Values.tls }}
{{- if $tls.enabled }}
{{- if and (not $tls.existingSecret) (not $tls.certManager.enabled) }}
{{- fail "tls.enabled is true but no certificate is configured: set tls.existingSecret (a Secret with tls.crt, tls.key, ca.crt) or tls.certManager.enabled with tls.certManager.issuerRef.name, or tls.enabled=false for an insecure demo" }}
{{- end }}
{{- if and $tls.existingSecret $tls.certManager.enabled }}
{{- fail "tls.existingSecret and tls.certManager.enabled are both set: choose one" }}
{{- end }}
{{- if and $tls.certManager.enabled (not $tls.certManager.issuerRef.name) }}
{{- fail "tls.certManager.enabled is true but tls.certManager.issuerRef.name is empty: name the cert-manager Issuer or ClusterIssuer that signs the coordinator's certificate" }}
{{- end }}
{{- if and $tls.workerClientCert.enabled (not $tls.workerClientCert.existingSecret) (not $tls.certManager.enabled) }}
{{- fail "tls.workerClientCert.enabled is true but no client certificate is configured: set tls.workerClientCert.existingSecret (tls.crt, tls.key) or tls.certManager.enabled" }}
{{- end }}
{{- if not .Values.auth.tokensSecret }}
{{- fail "tls.enabled is true but auth.tokensSecret is empty: create a Secret with key `tokens` (mq-coordinator add-token --tokens-file tokens --principal NAME --role ROLE) and name it here" }}
{{- end }}
{{- if not .Values.auth.workerTokenSecret }}
{{- fail "tls.enabled is true but auth.workerTokenSecret is empty: create a Secret with key `token` holding a token of role worker and name it here" }}
{{- end }}
{{- if or (not .Values.paths.allowRead) (not .Values.paths.allowWrite) }}
{{- fail "tls.enabled is true but paths.allowRead or paths.allowWrite is empty: the coordinator needs the absolute directories jobs may read from and write to" }}
{{- end }}
{{- end }}
{{- if and .Values.storage.existingClaim .Values.storage.readOnly }}
{{- $mount := trimSuffix "/" .Values.storage.mountPath }}
{{- range .Values.paths.allowWrite }}
{{- if or (eq (trimSuffix "/" .) $mount) (hasPrefix (printf "%s/" $mount) .) }}
{{- fail (printf "paths.allowWrite %s lies on storage mounted read-only at %s (storage.readOnly is true)" . $mount) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
