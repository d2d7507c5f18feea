{{/* Names and labels shared by every object of the chart. */}}

{{- define "cloudfs.name" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "cloudfs.labels" -}}
app.kubernetes.io/name: cloudfs
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "cloudfs.selector" -}}
app.kubernetes.io/name: cloudfs
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* An image of the project: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "cloudfs.image" -}}
{{- $image := index .root.Values.image .which -}}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) -}}
{{- end -}}

{{- define "cloudfs.secretName" -}}
{{- .Values.swift.secret.name -}}
{{- end -}}

{{/* The parameters that hand the Swift Secret to every CSI call of a sidecar. */}}
{{- define "cloudfs.secretParameters" -}}
{{- $name := include "cloudfs.secretName" . -}}
{{- range $call := list "provisioner" "controller-expand" "node-publish" }}
csi.storage.k8s.io/{{ $call }}-secret-name: {{ $name }}
csi.storage.k8s.io/{{ $call }}-secret-namespace: {{ $.Release.Namespace }}
{{- end }}
{{- end -}}

{{/* A resource map as NAME=QUANTITY pairs, comma-separated, for cloudfs-controller's flags. */}}
{{- define "cloudfs.quantities" -}}
{{- $pairs := list -}}
{{- range $name, $quantity := . -}}
{{- $pairs = append $pairs (printf "%s=%v" $name $quantity) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/* The container security context of everything but the node plugin. */}}
{{- define "cloudfs.restricted" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}
