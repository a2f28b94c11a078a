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
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* The run's driver settings (driver.yaml) without the ConfigMap's own name, which is derived from them. */}}
{{- define "sims.driverSettings" -}}
release: {{ .Release.Name | quote }}
namespace: {{ .Release.Namespace | quote }}
chart: {{ include "sims.chart" . | quote }}
image: {{ include "sims.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy | quote }}
imagePullSecrets: {{ .Values.imagePullSecrets | toJson }}
backend: {{ .Values.training.backend | quote }}
{{- if eq .Values.training.backend "trainjob" }}
trainingRuntime: {{ include "sims.runtimeName" . | quote }}
{{- end }}
{{- with .Values.serviceAccount.stagePods }}
serviceAccount: {{ . | quote }}
{{- end }}
{{- with .Values.queue }}
queue: {{ . | quote }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClass: {{ . | quote }}
{{- end }}
{{- if not (kindIs "invalid" .Values.ttlSecondsAfterFinished) }}
ttlSecondsAfterFinished: {{ .Values.ttlSecondsAfterFinished }}
{{- end }}
backoffLimit: {{ .Values.backoffLimit }}
backoffLimitPerIndex: {{ .Values.backoffLimitPerIndex }}
gang:
  enabled: {{ .Values.gang.enabled }}
  {{- with .Values.gang.schedulerName }}
  schedulerName: {{ . | quote }}
  {{- end }}
  {{- with .Values.gang.scheduleTimeoutSeconds }}
  scheduleTimeoutSeconds: {{ . }}
  {{- end }}
{{- with .Values.s3.secretName }}
s3Secret: {{ . | quote }}
{{- end }}
{{- with .Values.mlflow.auth.secretName }}
mlflowAuthSecret: {{ . | quote }}
{{- end }}
{{- with (include "sims.mlflowUri" .) }}
mlflowUri: {{ . | quote }}
{{- end }}
{{- with (include "sims.dataClaim" .) }}
dataClaim: {{ . | quote }}
dataMountPath: {{ $.Values.storage.mountPath | quote }}
{{- end }}
env: {{ .Values.env | toJson }}
pollSeconds: {{ .Values.driver.pollSeconds }}
pendingTimeoutSeconds: {{ .Values.driver.pendingTimeoutSeconds }}
stages:
  {{- toYaml .Values.stages | nindent 2 }}
{{- end }}

{{/* The run's ConfigMap is named after its content and immutable: a helm upgrade that changes the values
     creates a new one, and the workloads owned by the old one are garbage-collected with it, so no pod of
     the run ever reads a config its driver does not run. */}}
{{- define "sims.configName" -}}
{{- $content := printf "%s\n---\n%s" (toYaml .Values.pipeline) (include "sims.driverSettings" .) }}
{{- printf "%s-config-%s" (include "sims.fullname" .) ($content | sha256sum | trunc 8) }}
{{- end }}

{{/* One driver Job per release revision: `helm upgrade` (even with --reuse-values and nothing changed)
     starts a fresh driver, which adopts what exists; the Job's immutable pod template is never patched. */}}
{{- define "sims.driverName" -}}
{{- printf "%s-driver-r%d" (include "sims.fullname" .) (int .Release.Revision) }}
{{- end }}

{{- define "sims.runtimeName" -}}
{{- printf "%s-torch" (include "sims.fullname" .) }}
{{- end }}
