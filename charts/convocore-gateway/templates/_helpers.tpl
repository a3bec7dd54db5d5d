{{/* Names, labels and the few fixed paths the chart and the rendered config share. */}}

{{- define "convocore-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "convocore-gateway.fullname" -}}
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

{{- define "convocore-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "convocore-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "convocore-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "convocore-gateway.labels" -}}
helm.sh/chart: {{ include "convocore-gateway.chart" . }}
{{ include "convocore-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ (include "convocore-gateway.imageTag" .) | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: convocore-gateway
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "convocore-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "convocore-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "convocore-gateway.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "convocore-gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "convocore-gateway.imageTag" .) }}
{{- end }}
{{- end }}

{{/* The Secret mounted under secretsDir: existingSecret, else one named like the release. */}}
{{- define "convocore-gateway.secretName" -}}
{{- if and .Values.existingSecret .Values.secretFiles }}
{{- fail "set either existingSecret (recommended) or secretFiles (trials), not both" }}
{{- end }}
{{- default (include "convocore-gateway.fullname" .) .Values.existingSecret }}
{{- end }}

{{/*
Fixed paths inside the container. The ConfigMap (config.toml) and the Secret are separate
volumes in sibling folders, so the Secret never sits inside the read-only ConfigMap mount.
*/}}
{{- define "convocore-gateway.configDir" -}}/etc/convocore-gateway/config{{- end }}
{{- define "convocore-gateway.secretsDir" -}}/etc/convocore-gateway/secrets{{- end }}
{{- define "convocore-gateway.configPath" -}}{{ include "convocore-gateway.configDir" . }}/config.toml{{- end }}

{{/* Volume names: prefixed, because in the sidecar shape they join someone else's pod. */}}
{{- define "convocore-gateway.configVolume" -}}convocore-gateway-config{{- end }}
{{- define "convocore-gateway.secretsVolume" -}}convocore-gateway-secrets{{- end }}

{{/* The port number of a "host:port" listen address ("0.0.0.0:8080", "[::]:8080"). */}}
{{- define "convocore-gateway.port" -}}
{{- $port := splitList ":" . | last }}
{{- if not (regexMatch "^[0-9]+$" $port) }}
{{- fail (printf "cannot read a port from the listen address %q" .) }}
{{- end }}
{{- $port }}
{{- end }}

{{/*
Seconds in a duration string, for terminationGracePeriodSeconds. Go's time.ParseDuration
(through dateModify) reads "30s", "1m30s", "1h", "250ms"; spaces are dropped first. Returns ""
when the string is something else the gateway accepts ("2days"), so the caller can ask for an
explicit value.
*/}}
{{- define "convocore-gateway.seconds" -}}
{{- $d := nospace (toString .) }}
{{- if regexMatch "^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$" $d }}
{{- $t0 := toDate "2006-01-02" "2000-01-01" }}
{{- $t1 := dateModify $d $t0 }}
{{- sub ($t1 | unixEpoch | int64) ($t0 | unixEpoch | int64) }}
{{- end }}
{{- end }}

{{- define "convocore-gateway.terminationGracePeriodSeconds" -}}
{{- $config := fromYaml (include "convocore-gateway.config" .) }}
{{- $grace := include "convocore-gateway.seconds" ($config.server.shutdown_grace | default "30s") }}
{{- $sleep := int (.Values.preStopSleepSeconds | default 0) }}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) }}
{{- $tgps := int .Values.terminationGracePeriodSeconds }}
{{- if and $grace (le $tgps (add (int $grace) $sleep)) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be above preStopSleepSeconds + server.shutdown_grace (%d s)" $tgps (add (int $grace) $sleep)) }}
{{- end }}
{{- $tgps }}
{{- else if $grace }}
{{- add (int $grace) $sleep 10 }}
{{- else }}
{{- fail (printf "cannot read server.shutdown_grace %q in seconds; set terminationGracePeriodSeconds explicitly" $config.server.shutdown_grace) }}
{{- end }}
{{- end }}

{{/*
The files the config reads from the mounted Secret, one "key" (file name) per line: the keys
the Secret must have.
*/}}
{{- define "convocore-gateway.secretKeys" -}}
{{- $config := fromYaml (include "convocore-gateway.config" .) }}
{{- $dir := printf "%s/" (include "convocore-gateway.secretsDir" .) }}
{{- $files := list }}
{{- $up := $config.upstream | default dict }}
{{- $files = append $files $up.token_file }}
{{- $files = append $files $up.ca_file }}
{{- range $name, $region := $config.regions | default dict }}
{{- if $region }}{{ $files = append $files $region.token_file }}{{ end }}
{{- end }}
{{- range $key := ($config.auth | default dict).keys | default list }}
{{- $files = concat $files (list $key.public_key_file $key.secret_file $key.jwks_file) }}
{{- end }}
{{- with ($config.server | default dict).tls }}
{{- $files = concat $files (list .cert_file .key_file) }}
{{- end }}
{{- $keys := list }}
{{- range $files }}
{{- if and . (hasPrefix $dir (toString .)) }}
{{- $keys = append $keys (trimPrefix $dir .) }}
{{- end }}
{{- end }}
{{- $keys | uniq | join "\n" }}
{{- end }}
