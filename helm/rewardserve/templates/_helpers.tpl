{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "rewardserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: release name, plus the chart name unless the release name contains it.
*/}}
{{- define "rewardserve.fullname" -}}
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

{{- define "rewardserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rewardserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rewardserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rewardserve.labels" -}}
helm.sh/chart: {{ include "rewardserve.chart" . }}
{{ include "rewardserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: inference
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "rewardserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rewardserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Server image: repository@digest when a digest is given, else repository:tag where the tag defaults
to "<appVersion>-cpu" or "<appVersion>-gpu".
*/}}
{{- define "rewardserve.image" -}}
{{- $img := .Values.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- $flavour := ternary "gpu" "cpu" (.Values.gpu.enabled | default false) }}
{{- printf "%s:%s" $img.repository (default (printf "%s-%s" .Chart.AppVersion $flavour) $img.tag) }}
{{- end }}
{{- end }}

{{- define "rewardserve.bundleImage" -}}
{{- $img := .Values.bundle.initContainer.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{/*
REWARDSERVE_PROVIDER: explicit config.PROVIDER, else cuda with a GPU and cpu without.
*/}}
{{- define "rewardserve.provider" -}}
{{- if .Values.config.PROVIDER }}
{{- .Values.config.PROVIDER }}
{{- else if .Values.gpu.enabled }}
{{- "cuda" }}
{{- else }}
{{- "cpu" }}
{{- end }}
{{- end }}

{{/*
Drain timeout in whole seconds, rounded up (DRAIN_TIMEOUT_S may be fractional).
The service's own default is 20 s.
*/}}
{{- define "rewardserve.drainSeconds" -}}
{{- $drain := 20.0 }}
{{- if hasKey .Values.config "DRAIN_TIMEOUT_S" }}
{{- $drain = float64 (toString .Values.config.DRAIN_TIMEOUT_S) }}
{{- end }}
{{- int (ceil $drain) }}
{{- end }}

{{/*
terminationGracePeriodSeconds: at least preStop sleep + drain timeout, so that queued work is
answered before the kubelet sends SIGKILL.
*/}}
{{- define "rewardserve.terminationGracePeriodSeconds" -}}
{{- $sleep := int .Values.lifecycle.preStopSleepSeconds }}
{{- $drain := int (include "rewardserve.drainSeconds" .) }}
{{- $minimum := add $sleep $drain }}
{{- $explicit := int (.Values.lifecycle.terminationGracePeriodSeconds | default 0) }}
{{- if gt $explicit 0 }}
{{- if lt $explicit $minimum }}
{{- fail (printf "lifecycle.terminationGracePeriodSeconds=%d is less than preStopSleepSeconds (%d) + DRAIN_TIMEOUT_S (%d): in-flight requests would be killed" $explicit $sleep $drain) }}
{{- end }}
{{- $explicit }}
{{- else }}
{{- add $minimum (int .Values.lifecycle.terminationGraceBufferSeconds) }}
{{- end }}
{{- end }}

{{/*
Guard rails that apply to the whole release.
*/}}
{{- define "rewardserve.validate" -}}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled are mutually exclusive: KEDA creates its own HorizontalPodAutoscaler" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.queueDepth.enabled) (kindIs "invalid" .Values.autoscaling.targetCPUUtilizationPercentage) }}
{{- fail "autoscaling.enabled needs a metric: set autoscaling.targetCPUUtilizationPercentage and/or autoscaling.queueDepth.enabled" }}
{{- end }}
{{- range $key := list "HOST" "PORT" "BUNDLE" "API_KEYS_FILE" }}
{{- if hasKey $.Values.config $key }}
{{- fail (printf "config.%s is set by the chart (containerPort, bundle.mountPath, apiKeys); remove it from config" $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A config value as ConfigMap text. Helm reads numbers from values files as float64, which would
print 2000000 as "2e+06": whole numbers are printed as integers.
*/}}
{{- define "rewardserve.scalar" -}}
{{- $v := . }}
{{- if and (kindIs "float64" $v) (eq $v (floor $v)) }}
{{- int64 $v }}
{{- else }}
{{- toString $v }}
{{- end }}
{{- end }}
