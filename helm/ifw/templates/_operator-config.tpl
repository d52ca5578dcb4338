{{- /*
operator.yaml as a JSON object (ifw.operator.config.OperatorSettings, snake_case keys; Kubernetes
objects verbatim). The operator's ConfigMap renders it, and the pool Deployment reads its runner
section, so a pool worker and a runner Job get their env, model cache, HF token, result store and
security from the same rendered settings and cannot disagree.
*/ -}}
{{- define "ifw.operator.config" -}}
{{- include "ifw.oneSource.check" . }}
{{- $op := .Values.operator }}
{{- $runner := .Values.runner }}
{{- $diarization := .Values.diarization }}
{{- $cache := dict "mount_path" $runner.modelCache.mountPath "read_only" $runner.modelCache.readOnly "hub_offline" $runner.modelCache.hubOffline "volume" nil }}
{{- if eq $runner.modelCache.type "persistentVolumeClaim" }}
{{- $_ := set $cache "volume" (dict "persistentVolumeClaim" (dict "claimName" (required "runner.modelCache.claimName is required when runner.modelCache.type is persistentVolumeClaim" $runner.modelCache.claimName) "readOnly" $runner.modelCache.readOnly)) }}
{{- else if eq $runner.modelCache.type "hostPath" }}
{{- $_ := set $cache "volume" (dict "hostPath" (dict "path" (required "runner.modelCache.hostPath is required when runner.modelCache.type is hostPath" $runner.modelCache.hostPath) "type" "Directory")) }}
{{- end }}
{{- /* The runner's own settings plus the result store's, which every component gets alike. */}}
{{- $env := mustMergeOverwrite (deepCopy (default dict $runner.env)) (include "ifw.results.env" . | fromJson) }}
{{- /* Diarization and models: the values the gateway gets too (see ifw.oneSource.check). */}}
{{- if $diarization.enabled }}
{{- $_ := set $env "IFW_DIARIZATION_PIPELINE" $diarization.pipeline }}
{{- end }}
{{- with $op.allowedModels }}
{{- $_ := set $env "IFW_ALLOWED_MODELS" (toJson .) }}
{{- end }}
{{- if and .Values.gateway.enabled .Values.gateway.uploads.enabled }}
{{- /* Runners fetch uploads from the gateway's Service, a private address their SSRF guard refuses unless allowed. */}}
{{- if not (hasKey $env "IFW_FETCH_ALLOWLIST") }}
{{- $_ := set $env "IFW_FETCH_ALLOWLIST" (list (printf "%s.%s.svc" (include "ifw.gateway.fullname" .) .Release.Namespace) | toJson) }}
{{- end }}
{{- end }}
{{- $pod := dict
  "image" (include "ifw.imageRef" (list $runner.image .))
  "image_pull_policy" $runner.image.pullPolicy
  "image_pull_secrets" (default list $runner.imagePullSecrets)
  "resources" (include "ifw.resources" (list $runner.resources $runner.gpu) | fromJson)
  "node_selector" (default dict $runner.nodeSelector)
  "tolerations" (default list $runner.tolerations)
  "affinity" (default nil $runner.affinity)
  "runtime_class_name" (default nil $runner.runtimeClassName)
  "priority_class_name" (default nil $runner.priorityClassName)
  "pod_security_context" $runner.podSecurityContext
  "security_context" $runner.securityContext
  "termination_grace_period_seconds" $runner.terminationGracePeriodSeconds
  "work_dir_size_limit" $runner.workDirSizeLimit
  "model_cache" $cache
  "hf_token_secret" nil
  "s3_credentials_secret" (include "ifw.results.credentialsSecret" . | default nil)
  "env" $env
  "labels" (default dict $runner.podLabels)
  "annotations" (default dict $runner.podAnnotations)
}}
{{- if and $diarization.enabled $diarization.hfTokenSecret.name }}
{{- $_ := set $pod "hf_token_secret" (dict "name" $diarization.hfTokenSecret.name "key" $diarization.hfTokenSecret.key "optional" false) }}
{{- end }}
{{- $config := dict
  "namespaces" (include "ifw.operator.namespaces" . | fromJsonArray)
  "max_active_jobs" $op.maxActiveJobs
  "max_active_jobs_per_namespace" $op.maxActiveJobsPerNamespace
  "default_ttl_seconds_after_finished" $op.defaultTtlSecondsAfterFinished
  "startup_deadline_seconds" $op.startupDeadlineSeconds
  "image_pull_grace_seconds" $op.imagePullGraceSeconds
  "default_model" $op.defaultModel
  "resync_interval_seconds" $op.resyncIntervalSeconds
  "watch_server_timeout_seconds" $op.watchServerTimeoutSeconds
  "watch_client_timeout_seconds" $op.watchClientTimeoutSeconds
  "api_threads" $op.apiThreads
  "liveness_port" $op.livenessPort
  "metrics_port" $op.metricsPort
  "log_format" $op.logFormat
  "runner" $pod
  "webhook" (dict
    "timeout_seconds" $op.webhook.timeoutSeconds
    "max_attempts" $op.webhook.maxAttempts
    "backoff_initial_seconds" $op.webhook.backoffInitialSeconds
    "backoff_max_seconds" $op.webhook.backoffMaxSeconds
    "allowlist" (default list $op.webhook.allowlist))
  "pool" (dict "wait_seconds" .Values.pool.waitSeconds "ack_seconds" .Values.pool.ackSeconds)
  "gitops" (dict "labels" $op.gitops.labels "annotations" $op.gitops.annotations)
  "sharding" (dict "auto_above_seconds" $op.sharding.autoAboveSeconds "min_shard_seconds" $op.sharding.minShardSeconds "max_shards" $op.sharding.maxShards)
}}
{{- toJson (mustMergeOverwrite $config (deepCopy (default dict $op.extraConfig))) }}
{{- end }}

{{/* Container resources with the GPUs added to the limits: include "ifw.resources" (list $resources $gpu) | fromJson */}}
{{- define "ifw.resources" -}}
{{- $resources := index . 0 }}
{{- $gpu := index . 1 }}
{{- $limits := deepCopy (default dict $resources.limits) }}
{{- if gt (int $gpu.count) 0 }}
{{- $_ := set $limits $gpu.resourceName (toString (int $gpu.count)) }}
{{- end }}
{{- toJson (merge (dict "limits" $limits) (deepCopy $resources)) }}
{{- end }}
