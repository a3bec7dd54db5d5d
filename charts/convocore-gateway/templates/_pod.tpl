{{/*
The gateway container, shared by the Deployment and the sidecar snippet so the two shapes
cannot drift apart. Call with (dict "ctx" $ "sidecar" bool).
*/}}
{{- define "convocore-gateway.container" -}}
{{- $ := .ctx }}
{{- $sidecar := .sidecar }}
{{- $config := fromYaml (include "convocore-gateway.config" $) }}
{{- $apiPort := include "convocore-gateway.port" $config.server.listen | int }}
{{- $adminPort := include "convocore-gateway.port" $config.server.admin_listen | int -}}
- name: convocore-gateway
  image: {{ include "convocore-gateway.image" $ | quote }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  {{- if $sidecar }}
  # A native sidecar: starts before the app's containers, stops after them.
  restartPolicy: Always
  {{- end }}
  args:
    - --config
    - {{ include "convocore-gateway.configPath" $ }}
  {{- with $.Values.extraEnv }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $.Values.extraEnvFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    {{- if $sidecar }}
    # The API listens on {{ $config.server.listen }} (loopback): no port to publish.
    - name: gw-admin
      containerPort: {{ $adminPort }}
      protocol: TCP
    {{- else }}
    - name: http
      containerPort: {{ $apiPort }}
      protocol: TCP
    - name: admin
      containerPort: {{ $adminPort }}
      protocol: TCP
    {{- end }}
  {{- $probes := dict "livenessProbe" $.Values.livenessProbe "readinessProbe" $.Values.readinessProbe "startupProbe" $.Values.startupProbe }}
  {{- if and $sidecar (not $.Values.startupProbe) }}
  {{- /* The app's containers start once the sidecar is ready to serve. */}}
  {{- $_ := set $probes "startupProbe" (dict "httpGet" (dict "path" "/readyz" "port" "admin") "periodSeconds" 1 "failureThreshold" 30) }}
  {{- end }}
  {{- range $name := list "startupProbe" "livenessProbe" "readinessProbe" }}
  {{- $probe := deepCopy (get $probes $name) }}
  {{- if $probe }}
  {{- /* In someone else's pod the port name "admin" may be taken: use the number. */}}
  {{- if and $sidecar $probe.httpGet (eq (toString $probe.httpGet.port) "admin") }}
  {{- $_ := set $probe.httpGet "port" $adminPort }}
  {{- end }}
  {{ $name }}:
    {{- toYaml $probe | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- if and (not $sidecar) (gt (int $.Values.preStopSleepSeconds) 0) (semverCompare ">=1.30.0-0" $.Capabilities.KubeVersion.Version) }}
  lifecycle:
    # Keep serving while endpoints and load balancers drop this pod; SIGTERM comes after.
    preStop:
      sleep:
        seconds: {{ int $.Values.preStopSleepSeconds }}
  {{- end }}
  resources:
    {{- toYaml (ternary $.Values.sidecar.resources $.Values.resources $sidecar) | nindent 4 }}
  securityContext:
    {{- toYaml $.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: {{ include "convocore-gateway.configVolume" $ }}
      mountPath: {{ include "convocore-gateway.configDir" $ }}
      readOnly: true
    - name: {{ include "convocore-gateway.secretsVolume" $ }}
      mountPath: {{ include "convocore-gateway.secretsDir" $ }}
      readOnly: true
    {{- with $.Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* The gateway's volumes: the ConfigMap and the Secret, each mounted as a directory (never
through subPath, whose files the kubelet does not update), so a changed config.toml or a rotated
Secret reaches the running gateway, which reloads it. */}}
{{- define "convocore-gateway.volumes" -}}
- name: {{ include "convocore-gateway.configVolume" . }}
  configMap:
    name: {{ include "convocore-gateway.fullname" . }}
- name: {{ include "convocore-gateway.secretsVolume" . }}
  secret:
    secretName: {{ include "convocore-gateway.secretName" . }}
    defaultMode: 292 # 0444: readable whatever user the pod runs as
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The pod annotation that restarts pods when config.toml changes: only with
rollOnConfigChange, since the gateway reloads a changed config.toml in place. */}}
{{- define "convocore-gateway.configChecksum" -}}
checksum/config: {{ include "convocore-gateway.configToml" . | sha256sum }}
{{- end }}
