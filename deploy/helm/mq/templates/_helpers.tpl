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
