{{/* Names: <release>-ifw unless the release name already contains the chart name. */}}
{{- define "ifw.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ifw.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ifw.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: include "ifw.selectorLabels" (list . "operator") */}}
{{- define "ifw.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "ifw.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "ifw.labels" -}}
{{- $root := index . 0 -}}
{{ include "ifw.selectorLabels" . }}
helm.sh/chart: {{ include "ifw.chart" $root }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: ifw
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest; the tag defaults to the chart's appVersion. */}}
{{- define "ifw.imageRef" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{- define "ifw.image" -}}
{{ include "ifw.imageRef" (list .Values.image .) }}
{{- end }}

{{- define "ifw.operator.fullname" -}}
{{ include "ifw.fullname" . }}-operator
{{- end }}

{{- define "ifw.gateway.fullname" -}}
{{ include "ifw.fullname" . }}-gateway
{{- end }}

{{- define "ifw.cleanup.fullname" -}}
{{ include "ifw.fullname" . }}-cleanup
{{- end }}

{{- define "ifw.pool.fullname" -}}
{{ include "ifw.fullname" . }}-pool
{{- end }}

{{- define "ifw.operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- include "ifw.operator.fullname" . }}
{{- else }}
{{- default (include "ifw.operator.fullname" .) .Values.serviceAccount.operatorName }}
{{- end }}
{{- end }}

{{- define "ifw.gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- include "ifw.gateway.fullname" . }}
{{- else }}
{{- default (include "ifw.gateway.fullname" .) .Values.serviceAccount.gatewayName }}
{{- end }}
{{- end }}

{{- define "ifw.pool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- include "ifw.pool.fullname" . }}
{{- else }}
{{- default (include "ifw.pool.fullname" .) .Values.serviceAccount.poolName }}
{{- end }}
{{- end }}

{{/*
The namespaces the operator watches (JSON list; empty: every namespace): operator.watchNamespaces,
plus the release namespace when the pool is on, because the workers' Leases live there and kopf
sees Leases only in the namespaces it watches. Its Roles, the hook's and the pool's follow it.
*/}}
{{- define "ifw.operator.namespaces" -}}
{{- $namespaces := default list .Values.operator.watchNamespaces }}
{{- if and .Values.pool.enabled $namespaces }}
{{- $namespaces = append $namespaces .Release.Namespace | uniq }}
{{- end }}
{{- toJson $namespaces }}
{{- end }}

{{/* Where the gateway creates jobs. */}}
{{- define "ifw.gateway.namespace" -}}
{{- default .Release.Namespace .Values.gateway.namespace }}
{{- end }}

{{/* Every namespace the gateway works in: its own plus one per tenant key (sorted, unique). */}}
{{- define "ifw.gateway.namespaces" -}}
{{- $namespaces := list (include "ifw.gateway.namespace" .) }}
{{- range $ns, $_ := .Values.gateway.auth.tenantKeys }}
{{- $namespaces = append $namespaces $ns }}
{{- end }}
{{- toJson ($namespaces | uniq | sortAlpha) }}
{{- end }}

{{- define "ifw.gateway.internalUrl" -}}
http://{{ include "ifw.gateway.fullname" . }}.{{ .Release.Namespace }}.svc:{{ .Values.gateway.service.port }}
{{- end }}

{{- define "ifw.webhookSecretName" -}}
{{- default (printf "%s-webhook" (include "ifw.fullname" .)) .Values.operator.webhook.existingSecret }}
{{- end }}

{{- define "ifw.gatewaySecretName" -}}
{{- default (include "ifw.gateway.fullname" .) .Values.gateway.auth.existingSecret }}
{{- end }}

{{- define "ifw.gateway.hasAdminKey" -}}
{{- if or .Values.gateway.auth.existingSecret .Values.gateway.auth.adminKey }}true{{ end }}
{{- end }}

{{/* Pod-level scheduling and security shared by the chart's own pods: (list . .Values.operator) */}}
{{- define "ifw.podScheduling" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $component.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $component.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $component.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $component.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
RBAC for a set of namespaced rules: one ClusterRole + ClusterRoleBinding when $namespaces is
empty (every namespace), else a Role + RoleBinding in each namespace.
include "ifw.rbac" (dict "root" . "name" "x" "component" "operator" "account" "sa" "rules" $rules "namespaces" (list) "hook" "")
*/}}
{{- define "ifw.rbac" -}}
{{- $root := .root }}
{{- $annotations := dict }}
{{- if .hook }}
{{- $annotations = dict "helm.sh/hook" .hook "helm.sh/hook-weight" "-10" "helm.sh/hook-delete-policy" "before-hook-creation,hook-succeeded" }}
{{- end }}
{{- $scopes := .namespaces }}
{{- if not $scopes }}{{ $scopes = list "" }}{{ end }}
{{- range $ns := $scopes }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: {{ if $ns }}Role{{ else }}ClusterRole{{ end }}
metadata:
  name: {{ $.name }}
  {{- with $ns }}
  namespace: {{ . }}
  {{- end }}
  labels:
    {{- include "ifw.labels" (list $root $.component) | nindent 4 }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
rules:
  {{- toYaml $.rules | nindent 2 }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: {{ if $ns }}RoleBinding{{ else }}ClusterRoleBinding{{ end }}
metadata:
  name: {{ $.name }}
  {{- with $ns }}
  namespace: {{ . }}
  {{- end }}
  labels:
    {{- include "ifw.labels" (list $root $.component) | nindent 4 }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: {{ if $ns }}Role{{ else }}ClusterRole{{ end }}
  name: {{ $.name }}
subjects:
  - kind: ServiceAccount
    name: {{ $.account }}
    namespace: {{ $root.Release.Namespace }}
{{- end }}
{{- end }}

{{/*
The result store's settings (ifw.core.results.ResultSettings, env prefix IFW_) as a JSON object
of env name -> value, for `fromJson`. The runner writes results, the operator deletes them on
TTL and reads them for webhook payloads, the gateway serves them: all of them must look in the
same place, so every one gets its result env from here and nowhere else.
*/}}
{{- define "ifw.results.env" -}}
{{- include "ifw.results.refuseOtherSources" . }}
{{- $results := .Values.results }}
{{- $env := dict "IFW_RESULT_STORE" $results.store }}
{{- if not (kindIs "invalid" $results.secretMaxBytes) }}
{{- $_ := set $env "IFW_RESULT_SECRET_MAX_BYTES" (toString (int64 $results.secretMaxBytes)) }}
{{- end }}
{{- if eq $results.store "s3" }}
{{- $s3 := $results.s3 }}
{{- $_ := set $env "IFW_S3_BUCKET" (required "results.s3.bucket is required when results.store is s3" $s3.bucket) }}
{{- $_ := set $env "IFW_S3_PREFIX" $s3.prefix }}
{{- $_ := set $env "IFW_S3_REGION" $s3.region }}
{{- /* Empty: AWS S3 itself (boto3's default endpoint). */}}
{{- with $s3.endpointUrl }}
{{- $_ := set $env "IFW_S3_ENDPOINT_URL" . }}
{{- end }}
{{- end }}
{{- toJson $env }}
{{- end }}

{{/* The same settings as entries of a container's env list. */}}
{{- define "ifw.results.envVars" -}}
{{- range $name, $value := include "ifw.results.env" . | fromJson }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}

{{/* The Secret whose keys (AWS_*) become env of every component; empty without the S3 store. */}}
{{- define "ifw.results.credentialsSecret" -}}
{{- if eq .Values.results.store "s3" }}{{ .Values.results.s3.credentialsSecret }}{{ end }}
{{- end }}

{{/* That Secret as a container's envFrom (nothing when there is none). */}}
{{- define "ifw.results.envFrom" -}}
{{- with include "ifw.results.credentialsSecret" . }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end }}

{{/*
Result-store env set anywhere else would reach one component only (a runner writing to a bucket
the gateway never reads) or silently lose to results: refuse it, naming the value to move.
ResultSettings reads env names case-insensitively, so the check does too.
*/}}
{{- define "ifw.results.refuseOtherSources" -}}
{{- $names := list }}
{{- range $name, $_ := .Values.runner.env }}
{{- $names = append $names (list "runner.env" $name) }}
{{- end }}
{{- range $name, $_ := dig "runner" "env" dict (default dict .Values.operator.extraConfig) }}
{{- $names = append $names (list "operator.extraConfig.runner.env" $name) }}
{{- end }}
{{- range (default list .Values.operator.extraEnv) }}
{{- $names = append $names (list "operator.extraEnv" .name) }}
{{- end }}
{{- range (default list .Values.gateway.extraEnv) }}
{{- $names = append $names (list "gateway.extraEnv" .name) }}
{{- end }}
{{- range $names }}
{{- $where := index . 0 }}
{{- $name := index . 1 }}
{{- if or (hasPrefix "IFW_RESULT_" (upper $name)) (hasPrefix "IFW_S3_" (upper $name)) }}
{{- fail (printf "%s sets %s: the result store is configured only by the chart's results section (results.store, results.secretMaxBytes, results.s3.*), which the operator, the gateway and the runner all get; set it there" $where $name) }}
{{- end }}
{{- end }}
{{- if hasKey (dig "runner" dict (default dict .Values.operator.extraConfig)) "s3_credentials_secret" }}
{{- fail "operator.extraConfig.runner.s3_credentials_secret is set: use results.s3.credentialsSecret, which the operator and the gateway get too" }}
{{- end }}
{{- end }}

{{/*
The models jobs may name: operator.defaultModel, then operator.allowedModels. The runners get
the latter as IFW_ALLOWED_MODELS (the default comes from the operator), the gateway both, to list
at /v1/models and to refuse any other by name before a job exists.
*/}}
{{- define "ifw.models.offered" -}}
{{- toJson (prepend (default list .Values.operator.allowedModels) .Values.operator.defaultModel | uniq) }}
{{- end }}

{{/*
Diarization and models are each set in one place (diarization.*, operator.defaultModel and
allowedModels) and given from there to the gateway and the runners: the same settings given
anywhere else would reach one of them only (a gateway offering diarization to runners without a
pipeline). Refuse them, naming the value to use. Settings read env names case-insensitively.
*/}}
{{- define "ifw.oneSource.check" -}}
{{- $runnerNames := list "IFW_DIARIZATION_PIPELINE" "HF_TOKEN" "IFW_HF_TOKEN" "IFW_ALLOWED_MODELS" }}
{{- $gatewayNames := list "IFW_GATEWAY_DIARIZATION_AVAILABLE" "HF_TOKEN" "IFW_GATEWAY_HF_TOKEN" "IFW_GATEWAY_ALLOWED_MODELS" }}
{{- $found := list }}
{{- range $name, $_ := .Values.runner.env }}
{{- $found = append $found (list "runner.env" $name $runnerNames) }}
{{- end }}
{{- range $name, $_ := dig "runner" "env" dict (default dict .Values.operator.extraConfig) }}
{{- $found = append $found (list "operator.extraConfig.runner.env" $name $runnerNames) }}
{{- end }}
{{- range (default list .Values.gateway.extraEnv) }}
{{- $found = append $found (list "gateway.extraEnv" .name $gatewayNames) }}
{{- end }}
{{- range $found }}
{{- if has (upper (index . 1)) (index . 2) }}
{{- fail (printf "%s sets %s: diarization is configured only by diarization.enabled, diarization.pipeline and diarization.hfTokenSecret, and models only by operator.defaultModel and operator.allowedModels, which the gateway and the runners both get; set it there" (index . 0) (index . 1)) }}
{{- end }}
{{- end }}
{{- $extraRunner := dig "runner" dict (default dict .Values.operator.extraConfig) }}
{{- if hasKey $extraRunner "hf_token_secret" }}
{{- fail "operator.extraConfig.runner.hf_token_secret is set: use diarization.hfTokenSecret" }}
{{- end }}
{{- if hasKey (default dict .Values.operator.extraConfig) "default_model" }}
{{- fail "operator.extraConfig.default_model is set: use operator.defaultModel, which the gateway gets too" }}
{{- end }}
{{- with .Values.gateway.defaultModel }}
{{- if not (has . (include "ifw.models.offered" $ | fromJsonArray)) }}
{{- fail (printf "gateway.defaultModel %s is neither operator.defaultModel nor in operator.allowedModels: the runners would refuse every job" .) }}
{{- end }}
{{- end }}
{{- end }}
