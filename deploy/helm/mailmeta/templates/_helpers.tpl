{{- define "mailmeta.fullname" -}}
{{- printf "%s-mailmeta" .Release.Name | trunc 53 | trimSuffix "-" -}}
{{- end -}}

{{- define "mailmeta.labels" -}}
app.kubernetes.io/name: mailmeta
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "mailmeta.selector" -}}
app.kubernetes.io/name: mailmeta
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .stage }}
{{- end -}}

{{- define "mailmeta.storeSecret" -}}
{{- .Values.clickhouse.existingSecret | default (printf "%s-store" (include "mailmeta.fullname" .)) -}}
{{- end -}}

{{/* Environment shared by every container: settings, then the store DSN where needed. */}}
{{- define "mailmeta.env" -}}
- name: MAILMETA_KAFKA_BOOTSTRAP
  value: {{ .root.Values.kafka.bootstrap | quote }}
- name: MAILMETA_DATA_DIR
  value: /var/lib/mailmeta
- name: MAILMETA_REGION
  value: {{ .root.Values.region | quote }}
{{- if .root.Values.customers }}
- name: MAILMETA_CONFIG
  value: /etc/mailmeta/customers.yaml
{{- end }}
{{- range $name, $value := .root.Values.settings }}
- name: {{ printf "MAILMETA_%s" $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- if .store }}
- name: MAILMETA_CLICKHOUSE_DSN
  valueFrom:
    secretKeyRef:
      name: {{ include "mailmeta.storeSecret" .root }}
      key: dsn
- name: MAILMETA_API_AUTH
  value: "true"
{{- with .root.Values.clickhouse.cluster }}
- name: MAILMETA_CLICKHOUSE_CLUSTER
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Pod-level hardening and the writable volumes of a read-only root filesystem. */}}
{{- define "mailmeta.podSecurity" -}}
automountServiceAccountToken: false
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile: { type: RuntimeDefault }
{{- end -}}

{{- define "mailmeta.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: { drop: [ALL] }
{{- end -}}

{{- define "mailmeta.volumeMounts" -}}
- { name: state, mountPath: /var/lib/mailmeta }
- { name: tmp, mountPath: /tmp }
{{- if .Values.customers }}
- { name: customers, mountPath: /etc/mailmeta, readOnly: true }
{{- end }}
{{- end -}}

{{/* Pod volumes; args: root, persistentState (the state volume comes from a claim). */}}
{{- define "mailmeta.volumes" -}}
{{- if not .persistentState }}
- name: state
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir: {}
{{- if .root.Values.customers }}
- name: customers
  configMap:
    name: {{ include "mailmeta.fullname" .root }}-customers
{{- end }}
{{- end -}}
