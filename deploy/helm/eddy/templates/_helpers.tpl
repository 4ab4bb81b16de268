{{/* Names, labels, the image, and the pod every eddy stage runs in. */}}

{{- define "eddy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "eddy.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "eddy.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "eddy.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The spec-derived values; rendering stops here when they were not passed. */}}
{{- define "eddy.pipeline" -}}
{{- $p := .Values.pipeline -}}
{{- if not (and $p $p.name $p.topics $p.groups $p.kafkaAcls $p.spec) -}}
{{- fail "pipeline values are missing: python -m deploy.k8s.values_from_spec SPEC.yaml > values-spec.yaml, then -f values-spec.yaml" -}}
{{- end -}}
{{- $p.name -}}
{{- end -}}

{{- define "eddy.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "eddy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: eddy
eddy.io/pipeline: {{ include "eddy.pipeline" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* selector labels of one component: (dict "ctx" $ "component" "scorer") */}}
{{- define "eddy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eddy.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "eddy.componentLabels" -}}
{{ include "eddy.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "eddy.tag" -}}
{{- $tag := toString (default .ctx.Chart.AppVersion .image.tag) -}}
{{- if eq $tag "latest" -}}
{{- fail (printf "image %s: the tag \"latest\" is refused; pin a version" .image.repository) -}}
{{- end -}}
{{- $tag -}}
{{- end -}}

{{/* eddy's image reference: repository:tag, or repository@digest when a digest is set */}}
{{- define "eddy.image" -}}
{{- $img := .Values.image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (include "eddy.tag" (dict "ctx" . "image" $img)) -}}
{{- end -}}
{{- end -}}

{{- define "eddy.redisImage" -}}
{{- $img := .Values.redis.internal.image -}}
{{- if not $img.tag -}}{{- fail "redis.internal.image.tag is required (no latest)" -}}{{- end -}}
{{- printf "%s:%s" $img.repository (include "eddy.tag" (dict "ctx" . "image" $img)) -}}
{{- end -}}

{{- define "eddy.kafkaCluster" -}}
{{- if eq .Values.kafka.mode "strimzi" -}}{{ include "eddy.fullname" . }}-kafka{{- else -}}{{ .Values.kafka.external.strimziCluster }}{{- end -}}
{{- end -}}

{{/* true when KafkaTopics/KafkaUsers go to a Strimzi cluster (ours or a named external one) */}}
{{- define "eddy.strimziManaged" -}}
{{- if or (eq .Values.kafka.mode "strimzi") .Values.kafka.external.strimziCluster -}}true{{- end -}}
{{- end -}}

{{- define "eddy.kafkaBootstrap" -}}
{{- if eq .Values.kafka.mode "strimzi" -}}
{{- printf "%s-kafka-bootstrap:%d" (include "eddy.kafkaCluster" .) (int .Values.kafka.strimzi.listenerPort) -}}
{{- else -}}
{{- required "kafka.external.bootstrap is required in external mode" .Values.kafka.external.bootstrap -}}
{{- end -}}
{{- end -}}

{{- define "eddy.kafkaUser" -}}
{{- printf "%s-%s" (include "eddy.fullname" .ctx) .role -}}
{{- end -}}

{{- define "eddy.redisHost" -}}
{{- if eq .Values.redis.mode "internal" -}}{{ include "eddy.fullname" . }}-redis{{- else -}}{{ required "redis.external.host is required in external mode" .Values.redis.external.host }}{{- end -}}
{{- end -}}

{{- define "eddy.redisSecret" -}}
{{- required "redis.existingSecret is required: a Secret with one password per role" .Values.redis.existingSecret -}}
{{- end -}}

{{- define "eddy.redisUrl" -}}
{{- $ctx := .ctx -}}
{{- $scheme := ternary "rediss" "redis" (and (eq $ctx.Values.redis.mode "external") $ctx.Values.redis.external.tls) -}}
{{- $port := ternary 6379 (int $ctx.Values.redis.external.port) (eq $ctx.Values.redis.mode "internal") -}}
{{- $db := ternary 0 (int $ctx.Values.redis.external.db) (eq $ctx.Values.redis.mode "internal") -}}
{{- printf "%s://%s:$(EDDY_REDIS_PASSWORD)@%s:%d/%d" $scheme .role (include "eddy.redisHost" $ctx) $port $db -}}
{{- end -}}

{{/* Does this role hold Kafka client properties? strimzi mode always; external when a Secret is named */}}
{{- define "eddy.hasKafkaConfig" -}}
{{- if or (eq .ctx.Values.kafka.mode "strimzi") (index .ctx.Values.kafka.external.clientSecrets .role) -}}true{{- end -}}
{{- end -}}

{{/* The EDDY_* environment of a stage: (dict "ctx" $ "role" "scorer" "extra" (dict ...)) */}}
{{- define "eddy.env" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values -}}
{{- $extra := default (dict) .extra -}}
- name: EDDY_HOME
  value: /var/lib/eddy/home
- name: EDDY_PIPELINE
  value: /etc/eddy/pipeline/{{ $v.pipeline.specFile }}
- name: EDDY_KAFKA_BOOTSTRAP
  value: {{ include "eddy.kafkaBootstrap" $ctx | quote }}
{{- if include "eddy.hasKafkaConfig" . }}
- name: EDDY_KAFKA_CONFIG
  value: /etc/eddy/kafka/client.properties
{{- end }}
- name: EDDY_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "eddy.redisSecret" $ctx }}
      key: {{ .role }}
- name: EDDY_REDIS_URL
  value: {{ include "eddy.redisUrl" . | quote }}
- name: EDDY_LAKEHOUSE
  value: {{ $v.objectStorage.lakehouse | quote }}
- name: EDDY_ENGINE
  value: {{ $v.engine.type | quote }}
- name: EDDY_STAGES
  value: {{ $v.engine.stages | quote }}
- name: EDDY_PARTITIONS   # Faust sizes its changelog by it: it must match the topics' partitions
  value: {{ $v.kafka.topics.partitions | quote }}
- name: EDDY_INGEST
  value: "off"
- name: {{ $v.metrics.env }}
  value: {{ $v.metrics.port | quote }}
{{- range $name, $value := $v.settings }}
{{- if not (hasKey $extra $name) }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- range $name, $value := $extra }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- if .modelTrust }}
- name: EDDY_MODEL_TRUST
  value: {{ required "modelKey.trusted is required: the public keys scorers trust (eddy model-key prints them)" $v.modelKey.trusted | quote }}
{{- end }}
{{- if .modelKey }}
- name: EDDY_MODEL_KEY
  valueFrom:
    secretKeyRef:
      name: {{ required "modelKey.existingSecret is required: a Secret holding the model key" $v.modelKey.existingSecret }}
      key: {{ $v.modelKey.key }}
{{- end }}
{{- if and .objectStorage $v.objectStorage.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ $v.objectStorage.credentialsSecret }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ $v.objectStorage.credentialsSecret }}, key: AWS_SECRET_ACCESS_KEY}
{{- end }}
{{- if and .objectStorage $v.objectStorage.endpoint }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ $v.objectStorage.endpoint | quote }}
- name: EDDY_S3_ENDPOINT
  value: {{ $v.objectStorage.endpoint | quote }}
{{- end }}
{{- end -}}

{{/* Strimzi mode: write the role's client.properties from its KafkaUser Secret (SCRAM) and the cluster CA. */}}
{{- define "eddy.kafkaConfigInit" -}}
{{- $ctx := .ctx -}}
{{- if eq $ctx.Values.kafka.mode "strimzi" }}
- name: kafka-client-config
  image: {{ include "eddy.image" $ctx }}
  imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
  command: ["/bin/sh", "-ec"]
  args:
    - |
      umask 077
      cat > /etc/eddy/kafka/client.properties <<EOF
      security.protocol=SASL_SSL
      sasl.mechanism=SCRAM-SHA-512
      sasl.username=${KAFKA_USERNAME}
      sasl.password=${KAFKA_PASSWORD}
      ssl.ca.location=/etc/eddy/kafka-ca/ca.crt
      EOF
  env:
    - name: KAFKA_USERNAME
      value: {{ include "eddy.kafkaUser" . }}
    - name: KAFKA_PASSWORD
      valueFrom:
        secretKeyRef: {name: {{ include "eddy.kafkaUser" . }}, key: password}
  securityContext:
    {{- toYaml $ctx.Values.containerSecurityContext | nindent 4 }}
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {cpu: 100m, memory: 32Mi}
  volumeMounts:
    - {name: kafka-config, mountPath: /etc/eddy/kafka}
{{- end }}
{{- end -}}

{{- define "eddy.volumeMounts" -}}
- {name: home, mountPath: /var/lib/eddy/home}
- {name: tmp, mountPath: /tmp}
- {name: pipeline, mountPath: /etc/eddy/pipeline, readOnly: true}
{{- if include "eddy.hasKafkaConfig" . }}
- {name: kafka-config, mountPath: /etc/eddy/kafka, readOnly: true}
{{- end }}
{{- if or (eq .ctx.Values.kafka.mode "strimzi") .ctx.Values.kafka.external.caSecret }}
- {name: kafka-ca, mountPath: /etc/eddy/kafka-ca, readOnly: true}
{{- end }}
{{- if .artifacts }}
- {name: artifacts, mountPath: {{ .ctx.Values.artifacts.mountPath }}}
{{- end }}
{{- end -}}

{{- define "eddy.volumes" -}}
{{- $v := .ctx.Values -}}
- name: home
  emptyDir: {sizeLimit: {{ $v.homeSizeLimit }}}
- name: tmp
  emptyDir: {sizeLimit: {{ $v.tmpSizeLimit }}}
- name: pipeline
  configMap: {name: {{ include "eddy.fullname" .ctx }}-spec}
{{- if eq $v.kafka.mode "strimzi" }}
- name: kafka-config
  emptyDir: {medium: Memory, sizeLimit: 1Mi}
- name: kafka-ca
  secret: {secretName: {{ include "eddy.kafkaCluster" .ctx }}-cluster-ca-cert, items: [{key: ca.crt, path: ca.crt}]}
{{- else }}
{{- with index $v.kafka.external.clientSecrets .role }}
- name: kafka-config
  secret: {secretName: {{ . }}, items: [{key: client.properties, path: client.properties}]}
{{- end }}
{{- with $v.kafka.external.caSecret }}
- name: kafka-ca
  secret: {secretName: {{ . }}, items: [{key: ca.crt, path: ca.crt}]}
{{- end }}
{{- end }}
{{- if .artifacts }}
- name: artifacts
  persistentVolumeClaim: {claimName: {{ default (printf "%s-artifacts" (include "eddy.fullname" .ctx)) $v.artifacts.claimName }}}
{{- end }}
{{- end -}}

{{- define "eddy.probes" -}}
{{- $v := .Values -}}
ports:
  - {name: metrics, containerPort: {{ $v.metrics.port }}, protocol: TCP}
startupProbe:
  httpGet: {path: {{ $v.metrics.metricsPath }}, port: metrics}
  {{- toYaml $v.probes.startup | nindent 2 }}
readinessProbe:
  httpGet: {path: {{ $v.metrics.readyPath }}, port: metrics}
  {{- toYaml $v.probes.readiness | nindent 2 }}
livenessProbe:
  httpGet: {path: {{ $v.metrics.metricsPath }}, port: metrics}
  {{- toYaml $v.probes.liveness | nindent 2 }}
{{- end -}}

{{/*
The pod spec of an eddy stage. The image's entry point is `eddy run`: a stage's args are its name; a
command (`eddy retrain`, `eddy lakehouse optimize`) sets "command" (list "eddy").
(dict "ctx" $ "component" "scorer" "role" "scorer" "args" (list ...) "command" (list ...)
  "resources" .. "extra" (dict EDDY_X "v") "modelKey" bool (the private key: publishers only) "modelTrust" bool (the public keys) "objectStorage" bool "artifacts" bool
  "serving" bool (probes and the metrics port) "restartPolicy" "Never" "nodeSelector" .. "tolerations" ..)
*/}}
{{- define "eddy.podSpec" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values -}}
serviceAccountName: {{ include "eddy.fullname" $ctx }}
automountServiceAccountToken: false
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- if and .serving $v.priorityClassName }}
priorityClassName: {{ $v.priorityClassName }}
{{- end }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
{{- with .restartPolicy }}
restartPolicy: {{ . }}
{{- end }}
terminationGracePeriodSeconds: 30
{{- $init := include "eddy.kafkaConfigInit" . }}
{{- if $init }}
initContainers:
{{- $init | nindent 2 }}
{{- end }}
containers:
  - name: {{ .component }}
    image: {{ include "eddy.image" $ctx }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    {{- with .command }}
    command:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    args:
      {{- toYaml .args | nindent 6 }}
    {{- if .artifacts }}
    workingDir: {{ $v.artifacts.mountPath }}
    {{- end }}
    env:
      {{- include "eddy.env" . | nindent 6 }}
    {{- if .serving }}
    {{- include "eddy.probes" $ctx | nindent 4 }}
    {{- end }}
    resources:
      {{- toYaml .resources | nindent 6 }}
    securityContext:
      {{- toYaml $v.containerSecurityContext | nindent 6 }}
    volumeMounts:
      {{- include "eddy.volumeMounts" . | nindent 6 }}
volumes:
  {{- include "eddy.volumes" . | nindent 2 }}
{{- with (default $v.nodeSelector .nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $v.tolerations .tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod template metadata: labels, the spec hash (a new spec rolls the pods), annotations */}}
{{- define "eddy.podMetadata" -}}
labels:
  {{- include "eddy.componentLabels" . | nindent 2 }}
  eddy.io/role: {{ .role }}
  {{- if .serving }}
  eddy.io/metrics: "true"
  {{- end }}
annotations:
  eddy.io/spec-hash: {{ .ctx.Values.pipeline.specHash | quote }}
  {{- with .ctx.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* role -> topic name, from the spec-derived topics (a YAML map; use with fromYaml) */}}
{{- define "eddy.topicsByRole" -}}
{{- range .Values.pipeline.topics }}
{{ .role }}: {{ .name | quote }}
{{- end }}
{{- end -}}
