{{/* Labels every object carries (as the kustomize bases). */}}
{{- define "ambit.labels" -}}
app.kubernetes.io/name: ambit
app.kubernetes.io/component: node
{{- end }}
