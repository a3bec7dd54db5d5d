{{/* The sidecar snippet: what to add to an existing workload's pod template. */}}

{{- define "convocore-gateway.sidecar.initContainers" -}}
{{ include "convocore-gateway.container" (dict "ctx" . "sidecar" true) }}
{{- end }}

{{/* A strategic-merge patch for a Deployment, StatefulSet, DaemonSet or Job:
kubectl patch deployment APP --patch-file patch.yaml. Merges by container and volume name,
so applying it again after a config change updates the sidecar and restarts the pods. */}}
{{- define "convocore-gateway.sidecar.patch" -}}
spec:
  template:
    metadata:
      annotations:
        checksum/convocore-gateway-config: {{ include "convocore-gateway.configToml" . | sha256sum }}
    spec:
      initContainers:
        {{- include "convocore-gateway.sidecar.initContainers" . | nindent 8 }}
      volumes:
        {{- include "convocore-gateway.volumes" . | nindent 8 }}
{{- end }}
