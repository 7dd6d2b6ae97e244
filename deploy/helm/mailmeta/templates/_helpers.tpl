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
{{- if or .root.Values.customers .root.Values.customersExistingSecret }}
- name: MAILMETA_CONFIG
  value: /etc/mailmeta/customers.yaml
{{- end }}
{{- with .root.Values.kafka }}
- name: MAILMETA_KAFKA_SECURITY_PROTOCOL
  value: {{ .securityProtocol | quote }}
{{- if hasPrefix "SASL" .securityProtocol }}
- name: MAILMETA_KAFKA_SASL_MECHANISM
  value: {{ .saslMechanism | quote }}
- name: MAILMETA_KAFKA_SASL_USERNAME
  value: {{ required "kafka.saslUsername: the SASL user of the stages" .saslUsername | quote }}
{{- end }}
{{- if .existingSecret }}
{{- range $setting, $key := dict "MAILMETA_KAFKA_SSL_CA_FILE" .keys.ca "MAILMETA_KAFKA_SSL_CERT_FILE" .keys.cert "MAILMETA_KAFKA_SSL_KEY_FILE" .keys.key "MAILMETA_KAFKA_SASL_PASSWORD_FILE" .keys.saslPassword }}
{{- if $key }}
- name: {{ $setting }}
  value: /run/secrets/kafka/{{ $key }}
{{- end }}
{{- end }}
{{- end }}
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

{{/* Every secret volume is mounted read-only. Args: root, stage ("" for the init Job). */}}
{{- define "mailmeta.volumeMounts" -}}
- { name: state, mountPath: /var/lib/mailmeta }
- { name: tmp, mountPath: /tmp }
{{- if or .root.Values.customers .root.Values.customersExistingSecret }}
- { name: customers, mountPath: /etc/mailmeta, readOnly: true }
{{- end }}
{{- if .root.Values.kafka.existingSecret }}
- { name: kafka-secret, mountPath: /run/secrets/kafka, readOnly: true }
{{- end }}
{{- if .root.Values.hmacKeys.existingSecret }}
- { name: hmac-keys, mountPath: /run/secrets/hmac, readOnly: true }
{{- end }}
{{- if and (eq .stage "ingest") .root.Values.smtp.tls.existingSecret }}
- { name: smtp-tls, mountPath: /run/secrets/smtp-tls, readOnly: true }
{{- end }}
{{- end -}}

{{- define "mailmeta.customersSecret" -}}
{{- .Values.customersExistingSecret | default (printf "%s-customers" (include "mailmeta.fullname" .)) -}}
{{- end -}}

{{/* Pod volumes; args: root, persistentState (the state volume comes from a claim), stage. */}}
{{- define "mailmeta.volumes" -}}
{{- if not .persistentState }}
- name: state
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir: {}
{{- if or .root.Values.customers .root.Values.customersExistingSecret }}
- name: customers
  secret:
    secretName: {{ include "mailmeta.customersSecret" .root }}
    items: [{ key: customers.yaml, path: customers.yaml }]
    defaultMode: 0440
{{- end }}
{{- with .root.Values.kafka }}
{{- if .existingSecret }}
- name: kafka-secret
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 0440
    items:
      {{- range $key := list .keys.ca .keys.cert .keys.key .keys.saslPassword | compact | uniq }}
      - { key: {{ $key | quote }}, path: {{ $key | quote }} }
      {{- end }}
{{- end }}
{{- end }}
{{- with .root.Values.hmacKeys.existingSecret }}
- name: hmac-keys
  secret: { secretName: {{ . }}, defaultMode: 0440 }
{{- end }}
{{- if and (eq .stage "ingest") .root.Values.smtp.tls.existingSecret }}
- name: smtp-tls
  secret: { secretName: {{ .root.Values.smtp.tls.existingSecret }}, defaultMode: 0440 }
{{- end }}
{{- if and (eq .stage "api") .root.Values.api.tls.existingSecret }}
- name: api-tls
  secret:
    secretName: {{ .root.Values.api.tls.existingSecret }}
    defaultMode: 0440
    items: [{ key: tls.crt, path: api_tls_cert }, { key: tls.key, path: api_tls_key }]
- name: api-tls-config
  configMap: { name: {{ include "mailmeta.fullname" .root }}-api-tls }
- name: api-tls-tmp
  emptyDir: {}
{{- end }}
{{- end -}}

{{/* A hash of the configuration the chart itself renders (settings, customers, the store
  Secret, the proxy's configuration): a change rolls the pods. Secrets named by
  existingSecret are not the chart's: roll after changing them (deploy/README.md). */}}
{{- define "mailmeta.configChecksum" -}}
{{- $config := include (print .Template.BasePath "/config.yaml") . -}}
{{- list $config (toJson .Values.settings) (toJson .Values.kafka) .Values.region | toJson | sha256sum -}}
{{- end -}}
