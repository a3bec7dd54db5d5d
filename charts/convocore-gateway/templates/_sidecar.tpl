{{/* The sidecar snippet: what to add to an existing workload's pod template. */}}

{{- define "convocore-gateway.sidecar.initContainers" -}}
{{ include "convocore-gateway.container" (dict "ctx" . "sidecar" true) }}
{{- end }}

{{/* A strategic-merge patch for a Deployment, StatefulSet, DaemonSet or Job:
kubectl patch deployment APP --patch-file patch.yaml. Merges by container and volume name,
so applying it again updates the sidecar. A config change needs no new patch (the gateway
reloads the mounted config.toml), unless rollOnConfigChange adds the checksum annotation that
restarts the pods when the patch is applied again. */}}
{{- define "convocore-gateway.sidecar.patch" -}}
spec:
  template:
    {{- if .Values.rollOnConfigChange }}
    metadata:
      annotations:
        checksum/convocore-gateway-config: {{ include "convocore-gateway.configToml" . | sha256sum }}
    {{- end }}
    spec:
      initContainers:
        {{- include "convocore-gateway.sidecar.initContainers" . | nindent 8 }}
      volumes:
        {{- include "convocore-gateway.volumes" . | nindent 8 }}
{{- end }}
