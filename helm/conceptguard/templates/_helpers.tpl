{{- define "conceptguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "conceptguard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "conceptguard.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "conceptguard.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "conceptguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "conceptguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "conceptguard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "conceptguard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "conceptguard.secretName" -}}
{{- default (include "conceptguard.fullname" .) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "conceptguard.claimName" -}}
{{- default (printf "%s-registry" (include "conceptguard.fullname" .)) .Values.registry.persistence.existingClaim }}
{{- end }}

{{- /* The server config file: ServerConfig's fields (server/config.py). */ -}}
{{- /* The registry is a PostgreSQL database (its URL from a Secret) rather than the volume. */ -}}
{{- define "conceptguard.usesDatabase" -}}
{{- if .Values.registry.database.existingSecret -}}true{{- end -}}
{{- end }}

{{- define "conceptguard.configFile" -}}
{{- if not (include "conceptguard.usesDatabase" .) -}}
registry: {{ .Values.registry.mountPath }}
{{ end -}}
limits:
{{- toYaml .Values.config.limits | nindent 2 }}
batching:
{{- toYaml .Values.config.batching | nindent 2 }}
{{- range $block := list "admission" "http" "supervision" }}
{{- with index $.Values.config $block }}
{{ $block }}:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
max_patch_bytes: {{ int64 .Values.config.max_patch_bytes }}
{{- end }}

{{- /* `serve --registry-create`: never where several pods share the registry (it is then
created once, by the install's Job), so no pod starts a registry of its own. */ -}}
{{- define "conceptguard.registryCreate" -}}
{{- if ne .Values.registry.create "auto" -}}
{{ .Values.registry.create }}
{{- else if or (ne .Values.autoscaling.mode "none") (gt (int .Values.replicaCount) 1) -}}
never
{{- else -}}
if-missing
{{- end }}
{{- end }}

{{- /* Average queued requests per pod: Little's law on the queue-wait histogram. */ -}}
{{- define "conceptguard.queueQuery" -}}
sum(rate(conceptguard_queue_wait_seconds_sum{namespace="{{ .Release.Namespace }}",service="{{ include "conceptguard.fullname" . }}"}[{{ .Values.autoscaling.keda.window }}]))
{{- end }}

{{- /* $CONCEPTGUARD_REGISTRY from the database Secret, for the pods and the init Job. */ -}}
{{- define "conceptguard.registryEnv" -}}
- name: CONCEPTGUARD_REGISTRY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.registry.database.existingSecret }}
      key: {{ .Values.registry.database.key }}
{{- end }}
