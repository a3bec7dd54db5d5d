{{/*
The gateway's config.toml: the chart's defaults, `.Values.config` merged over them, rendered
as TOML. Keys and value types follow the repo's config.toml; CI runs the rendered file through
`convocore-gateway check-config` for every tested shape.
*/}}

{{/* The chart's defaults, as YAML. Shape-dependent: listen addresses, cache size. */}}
{{- define "convocore-gateway.defaultConfig" -}}
{{- $user := .Values.config | default dict }}
{{- $userUpstream := get $user "upstream" | default dict }}
{{- $sidecar := .Values.sidecar.enabled }}
server:
  listen: {{ ternary "127.0.0.1:18080" "0.0.0.0:8080" $sidecar | quote }}
  admin_listen: {{ ternary "0.0.0.0:19090" "0.0.0.0:9090" $sidecar | quote }}
  shutdown_grace: "30s"
upstream:
  {{- /* A token source the user chose replaces the chart's (the gateway refuses both). */}}
  {{- if not (or (hasKey $userUpstream "token_env") (hasKey $userUpstream "token_file")) }}
  token_file: {{ printf "%s/convocore-token" (include "convocore-gateway.secretsDir" .) | quote }}
  {{- end }}
  connect_timeout: "2s"
  request_timeout: "30s"
  max_response_bytes: "32MiB"
regions:
  eu:
    base_url: "https://eu-gcp-api.vg-stuff.com/v3"
  na:
    base_url: "https://na-gcp-api.vg-stuff.com/v3"
routing:
  default_region: "eu"
  discover: true
  agents: {}
auth:
  issuers: ["https://idp.example.internal"]
  audiences: ["convocore-gateway"]
  leeway: "30s"
  team_claim: "team"
  keys:
    - algorithm: "RS256"
      public_key_file: {{ printf "%s/jwt-public-key.pem" (include "convocore-gateway.secretsDir" .) | quote }}
cache:
  enabled: true
  max_bytes: {{ ternary "64MiB" "256MiB" $sidecar | quote }}
  ttl: "5m"
  stale_if_error: "1h"
  stale_while_revalidate: "0s"
log:
  format: "json"
  level: "info"
{{- end }}

{{/* The merged configuration, as YAML (read it back with fromYaml). */}}
{{- define "convocore-gateway.config" -}}
{{- $defaults := fromYaml (include "convocore-gateway.defaultConfig" .) }}
{{- $merged := mergeOverwrite $defaults (deepCopy (.Values.config | default dict)) }}
{{- toYaml $merged }}
{{- end }}

{{/* config.toml itself. */}}
{{- define "convocore-gateway.configToml" -}}
{{- $config := fromYaml (include "convocore-gateway.config" .) -}}
# convocore-gateway configuration, rendered by the Helm chart {{ include "convocore-gateway.chart" . }}
# from its defaults and the release's `config` value. Edit the values, not this file.
{{- $order := list "server" "upstream" "regions" "routing" "auth" "teams" "cache" "log" }}
{{- include "convocore-gateway.toml.table" (dict "path" list "table" $config "header" false "order" $order) }}
{{- end }}

{{/* ---- a small TOML writer ---- */}}

{{/* A key: bare when it may be, else a quoted string. */}}
{{- define "convocore-gateway.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* A value: strings as basic strings (JSON escapes are TOML escapes), numbers, booleans,
arrays, and inline tables for maps inside arrays. */}}
{{- define "convocore-gateway.toml.value" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ ternary "true" "false" . }}
{{- else if kindIs "slice" . }}[{{ range $i, $e := . }}{{ if $i }}, {{ end }}{{ include "convocore-gateway.toml.value" $e }}{{ end }}]
{{- else if kindIs "map" . }}{ {{- $first := true }}{{ range $k, $v := . }}{{ if not (kindIs "invalid" $v) }}{{ if not $first }},{{ end }}{{ $first = false }} {{ include "convocore-gateway.toml.key" $k }} = {{ include "convocore-gateway.toml.value" $v }}{{ end }}{{ end }} }
{{- else if kindIs "invalid" . }}{{ fail "a null inside an array cannot be written as TOML" }}
{{- else }}{{ toJson . }}
{{- end }}
{{- end }}

{{/* "true" when the value is a non-empty list of maps: an array of tables ([[a.b]]). */}}
{{- define "convocore-gateway.toml.isTableArray" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) }}
{{- $all := true }}
{{- range . }}{{ if not (kindIs "map" .) }}{{ $all = false }}{{ end }}{{ end }}
{{- if $all }}true{{ end }}
{{- end }}
{{- end }}

{{/*
A table: its plain keys first, then its sub-tables and arrays of tables (TOML needs that
order). Takes path (the keys leading here), table, and header (whether to write [path]; an
array element's [[path]] is written by its parent). Null values are left out, so a null in
the values drops a default.
*/}}
{{- define "convocore-gateway.toml.table" -}}
{{- $path := .path }}
{{- $table := .table }}
{{- $order := .order | default list }}
{{- $keys := list }}
{{- range $k := $order }}{{ if hasKey $table $k }}{{ $keys = append $keys $k }}{{ end }}{{ end }}
{{- range $k := keys $table | sortAlpha }}{{ if not (has $k $keys) }}{{ $keys = append $keys $k }}{{ end }}{{ end }}
{{- $plain := list }}
{{- $live := 0 }}
{{- range $k := $keys }}
{{- $v := get $table $k }}
{{- if not (kindIs "invalid" $v) }}
{{- $live = add1 $live }}
{{- if not (or (kindIs "map" $v) (include "convocore-gateway.toml.isTableArray" $v)) }}
{{- $plain = append $plain $k }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .header (or $plain (eq $live 0)) }}

[{{ join "." $path }}]
{{- end }}
{{- range $k := $plain }}
{{ include "convocore-gateway.toml.key" $k }} = {{ include "convocore-gateway.toml.value" (get $table $k) }}
{{- end }}
{{- range $k := $keys }}
{{- $v := get $table $k }}
{{- $sub := append $path (include "convocore-gateway.toml.key" $k) }}
{{- if kindIs "map" $v }}
{{- include "convocore-gateway.toml.table" (dict "path" $sub "table" $v "header" true) }}
{{- else if include "convocore-gateway.toml.isTableArray" $v }}
{{- range $item := $v }}

[[{{ join "." $sub }}]]
{{- include "convocore-gateway.toml.table" (dict "path" $sub "table" $item "header" false) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
