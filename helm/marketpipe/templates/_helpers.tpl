{{/*
Names. Every object is "<fullname>-<component>", cut to 63 characters.
*/}}
{{- define "marketpipe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "marketpipe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<suffix>"; call with (dict "ctx" $ "suffix" "worker"). */}}
{{- define "marketpipe.componentName" -}}
{{- printf "%s-%s" (include "marketpipe.fullname" .ctx) .suffix | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "marketpipe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "marketpipe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "marketpipe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "marketpipe.labels" -}}
helm.sh/chart: {{ include "marketpipe.chart" . }}
{{ include "marketpipe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: marketpipe
{{- end }}

{{/* Labels of one component; call with (dict "ctx" $ "component" "worker"). */}}
{{- define "marketpipe.componentLabels" -}}
{{ include "marketpipe.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "marketpipe.componentSelectorLabels" -}}
{{ include "marketpipe.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The pods that talk to InfluxDB and the Prefect API: the worker, the flow runs, the setup Job and the
realtime Deployment (realtime.enabled).
Flow-run pods carry these labels through the base job template (Prefect sets app.kubernetes.io/name
to the deployment's name there, so the selector leaves it out).
*/}}
{{- define "marketpipe.clientPodSelector" -}}
matchLabels:
  app.kubernetes.io/instance: {{ .Release.Name }}
matchExpressions:
  - key: app.kubernetes.io/component
    operator: In
    values:
      - worker
      - flow-run
      - setup
      - realtime
{{- end }}

{{- define "marketpipe.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}

{{- define "marketpipe.workerServiceAccountName" -}}
{{- include "marketpipe.componentName" (dict "ctx" . "suffix" "worker") }}
{{- end }}

{{- define "marketpipe.flowRunServiceAccountName" -}}
{{- include "marketpipe.componentName" (dict "ctx" . "suffix" "flow-run") }}
{{- end }}

{{- define "marketpipe.setupServiceAccountName" -}}
{{- include "marketpipe.componentName" (dict "ctx" . "suffix" "setup") }}
{{- end }}

{{- define "marketpipe.realtimeName" -}}
{{- include "marketpipe.componentName" (dict "ctx" . "suffix" "realtime") }}
{{- end }}

{{- define "marketpipe.realtimeServiceAccountName" -}}
{{- include "marketpipe.realtimeName" . }}
{{- end }}

{{- define "marketpipe.baseJobTemplateName" -}}
{{- include "marketpipe.componentName" (dict "ctx" . "suffix" "base-job-template") }}
{{- end }}

{{- define "marketpipe.influxdbName" -}}
{{- include "marketpipe.componentName" (dict "ctx" . "suffix" "influxdb") }}
{{- end }}

{{- define "marketpipe.influxdbHeadlessName" -}}
{{- include "marketpipe.componentName" (dict "ctx" . "suffix" "influxdb-headless") }}
{{- end }}

{{/* The Secret with the in-chart InfluxDB's admin password and token. */}}
{{- define "marketpipe.influxdbAuthSecretName" -}}
{{- if .Values.influxdb.auth.existingSecret }}
{{- .Values.influxdb.auth.existingSecret }}
{{- else }}
{{- include "marketpipe.componentName" (dict "ctx" . "suffix" "influxdb-auth") }}
{{- end }}
{{- end }}

{{/* True ("true") when the chart generates the InfluxDB credentials itself. */}}
{{- define "marketpipe.generatesInfluxdbAuth" -}}
{{- if and .Values.influxdb.enabled (not .Values.influxdb.auth.existingSecret) }}true{{ end }}
{{- end }}

{{/*
True ("true") when the setup Job creates the flow runs' bucket-scoped InfluxDB token and writes it
into the flow-run env Secret: the chart generates both InfluxDB's credentials and that Secret.
*/}}
{{- define "marketpipe.createsScopedToken" -}}
{{- if and (include "marketpipe.generatesInfluxdbAuth" .) (not .Values.workPool.jobDefaults.envSecret) }}true{{ end }}
{{- end }}

{{/*
The Secret flow runs and the setup Job take INFLUXDB_TOKEN (and optionally ALPHA_VANTAGE_API_KEY)
from, as environment variables (envFrom).
*/}}
{{- define "marketpipe.envSecretName" -}}
{{- if .Values.workPool.jobDefaults.envSecret }}
{{- .Values.workPool.jobDefaults.envSecret }}
{{- else if include "marketpipe.generatesInfluxdbAuth" . }}
{{- include "marketpipe.componentName" (dict "ctx" . "suffix" "flow-run-env") }}
{{- else }}
{{- fail "workPool.jobDefaults.envSecret is required when InfluxDB is external or uses influxdb.auth.existingSecret: name an existing Secret with the key INFLUXDB_TOKEN (and optionally ALPHA_VANTAGE_API_KEY)" }}
{{- end }}
{{- end }}

{{- define "marketpipe.influxdbUrl" -}}
{{- if .Values.influxdb.enabled }}
{{- printf "http://%s.%s.svc:8086" (include "marketpipe.influxdbName" .) .Release.Namespace }}
{{- else }}
{{- required "influxdb.external.url is required when influxdb.enabled is false, e.g. https://influxdb.example.com:8086" .Values.influxdb.external.url }}
{{- end }}
{{- end }}

{{/* Checks across values that the schema cannot express; included by every workload template. */}}
{{- define "marketpipe.validate" -}}
{{- $_ := required "prefect.apiUrl is required: the Prefect API URL, e.g. http://prefect-server.prefect.svc:4200/api or a Prefect Cloud workspace URL (https://api.prefect.cloud/api/accounts/<account>/workspaces/<workspace>)" .Values.prefect.apiUrl }}
{{- if and .Values.prefect.cloud.enabled (not .Values.prefect.cloud.apiKeySecret.name) }}
{{- fail "prefect.cloud.apiKeySecret.name is required when prefect.cloud.enabled: an existing Secret holding the Prefect Cloud API key" }}
{{- end }}
{{- if and .Values.prefect.cloud.enabled (not (hasPrefix "https://" .Values.prefect.apiUrl)) }}
{{- fail "prefect.apiUrl must be an https:// Prefect Cloud workspace URL when prefect.cloud.enabled" }}
{{- end }}
{{- if and .Values.influxdb.enabled .Values.influxdb.external.url }}
{{- fail "influxdb.external.url is set but influxdb.enabled is true: disable the in-chart InfluxDB to use an external one" }}
{{- end }}
{{- $_ := include "marketpipe.influxdbUrl" . }}
{{- $_ := include "marketpipe.envSecretName" . }}
{{- if and (include "marketpipe.createsScopedToken" .) (not .Values.setup.enabled) }}
{{- fail "setup.enabled=false leaves the flow runs without an InfluxDB token: the setup Job creates their bucket-scoped token when the chart generates InfluxDB's credentials. Keep setup.enabled, or set workPool.jobDefaults.envSecret to an existing Secret whose INFLUXDB_TOKEN may read and write the bucket" }}
{{- end }}
{{- if and (eq .Values.environment "production") (not .Values.spool.existingClaim) }}
{{- fail "environment is production but spool.existingClaim is empty: set spool.existingClaim to a ReadWriteMany PersistentVolumeClaim. On an emptyDir the spool (the batches InfluxDB could not take, which `marketpipe replay` stores later) is lost with its pod" }}
{{- end }}
{{- if and .Values.realtime.enabled (not .Values.realtime.symbols) }}
{{- fail "realtime.symbols is required when realtime.enabled: the symbols the realtime Deployment follows, e.g. [AAPL, MSFT] (--set 'realtime.symbols={AAPL,MSFT}')" }}
{{- end }}
{{- if .Values.networkPolicy.enabled }}
{{- $api := .Values.networkPolicy.prefectApi }}
{{- if not (or $api.cidrs $api.namespaceSelector $api.podSelector) }}
{{- fail "networkPolicy.prefectApi needs cidrs or a namespaceSelector/podSelector locating the Prefect API (or set networkPolicy.enabled=false)" }}
{{- end }}
{{- if and (not .Values.influxdb.enabled) (not .Values.influxdb.external.cidrs) }}
{{- fail "influxdb.external.cidrs is required with networkPolicy.enabled and an external InfluxDB: the addresses of the server (use [\"0.0.0.0/0\"] to allow any)" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pod-level securityContext of the marketpipe image's pods (uid 10001). */}}
{{- define "marketpipe.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level securityContext; call with the uid. */}}
{{- define "marketpipe.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
{{- end }}

{{/* Prefect API settings of the worker and the setup Job. */}}
{{- define "marketpipe.prefectEnv" -}}
- name: PREFECT_API_URL
  value: {{ .Values.prefect.apiUrl | quote }}
{{- if .Values.prefect.cloud.enabled }}
- name: PREFECT_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.prefect.cloud.apiKeySecret.name }}
      key: {{ .Values.prefect.cloud.apiKeySecret.key }}
{{- end }}
- name: PREFECT_HOME
  value: /tmp/prefect
{{- end }}

{{/* A list of one NetworkPolicyPeer made of the namespaceSelector and podSelector given. */}}
{{- define "marketpipe.selectorPeer" -}}
{{- $peer := dict }}
{{- with .namespaceSelector }}
{{- $_ := set $peer "namespaceSelector" . }}
{{- end }}
{{- with .podSelector }}
{{- $_ := set $peer "podSelector" . }}
{{- end }}
{{- toYaml (list $peer) }}
{{- end }}
