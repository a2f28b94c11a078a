{{/* Names, labels and shared values of the sims chart. */}}

{{- define "sims.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name; stage workloads are named after the run instead (sims.io/run). */}}
{{- define "sims.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sims.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sims.run" -}}
{{- required "pipeline.name is required (it names the run)" .Values.pipeline.name }}
{{- end }}

{{/* Labels on every object: app.kubernetes.io/* plus the run. */}}
{{- define "sims.labels" -}}
helm.sh/chart: {{ include "sims.chart" . }}
{{ include "sims.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sims
sims.io/run: {{ include "sims.run" . }}
{{- end }}

{{- define "sims.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sims.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sims.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sims.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sims.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "sims.mlflowName" -}}
{{- printf "%s-mlflow" (include "sims.fullname" .) }}
{{- end }}

{{/* MLFLOW_TRACKING_URI of every pod: the in-release server when enabled, else mlflow.trackingUri. */}}
{{- define "sims.mlflowUri" -}}
{{- if .Values.mlflow.server.enabled }}
{{- printf "http://%s.%s.svc:%v" (include "sims.mlflowName" .) .Release.Namespace .Values.mlflow.server.port }}
{{- else }}
{{- .Values.mlflow.trackingUri }}
{{- end }}
{{- end }}

{{- define "sims.dataClaim" -}}
{{- if .Values.storage.persistentVolumeClaim.create }}
{{- printf "%s-data" (include "sims.fullname" .) }}
{{- else }}
{{- .Values.storage.persistentVolumeClaim.existingClaim }}
{{- end }}
{{- end }}

{{/* Pod security shared by the driver and the MLflow server (stage pods get the same from the driver). */}}
{{- define "sims.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "sims.containerSecurityContext" -}}
allowPrivilegeEscalation: false
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}
