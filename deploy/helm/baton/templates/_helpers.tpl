{{/* Resource name prefix: <release>-baton, or the release name when it already says baton. */}}
{{- define "baton.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "baton.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: baton
{{- end -}}

{{/* Selector labels for one component; call with (dict "root" $ "component" "router"). */}}
{{- define "baton.selectorLabels" -}}
app.kubernetes.io/name: {{ default .root.Chart.Name .root.Values.nameOverride }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "baton.image" -}}
{{- $tag := .image.tag | default (printf "%s%s" .root.Chart.AppVersion .suffix) -}}
image: {{ printf "%s:%s" .image.repository $tag | quote }}
imagePullPolicy: {{ .image.pullPolicy }}
{{- end -}}

{{- define "baton.redisHost" -}}
{{- printf "%s-redis" (include "baton.fullname" .) -}}
{{- end -}}

{{/* REDIS_URL env var; commands pass it on as --redis-url $(REDIS_URL). */}}
{{- define "baton.redisUrlEnv" -}}
- name: REDIS_URL
{{- if .Values.redis.enabled }}
  value: {{ printf "redis://%s:%d/0" (include "baton.redisHost" .) (int .Values.redis.port) | quote }}
{{- else if .Values.redis.externalUrlSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.externalUrlSecret.name }}
      key: {{ .Values.redis.externalUrlSecret.key }}
{{- else if .Values.redis.externalUrl }}
  value: {{ .Values.redis.externalUrl | quote }}
{{- else }}
{{- fail "redis.enabled is false: set redis.externalUrl or redis.externalUrlSecret.name" }}
{{- end }}
{{- end -}}

{{- define "baton.apiKeySecretName" -}}
{{- .Values.router.apiKey.existingSecret | default (printf "%s-api-key" (include "baton.fullname" .)) -}}
{{- end -}}

{{- define "baton.adminSecretName" -}}
{{- .Values.controlPlane.adminToken.existingSecret | default (printf "%s-admin" (include "baton.fullname" .)) -}}
{{- end -}}

{{/* The Role the control plane's Kubernetes backend needs, and nothing more. */}}
{{- define "baton.controlPlaneRules" -}}
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch]
- apiGroups: [apps]
  resources: [deployments/scale]
  verbs: [get, patch]
{{- end -}}

{{/* What the capacity probe reads across the cluster: nodes' allocatable GPUs and pods' requests. */}}
{{- define "baton.controlPlaneCapacityRules" -}}
- apiGroups: [""]
  resources: [nodes, pods]
  verbs: [get, list]
{{- end -}}

{{- define "baton.modelVolume" -}}
- name: model
{{- if .Values.model.createPVC.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "baton.fullname" . }}-models
    readOnly: {{ not .Values.model.hub.id }}
{{- else }}
{{- toYaml .Values.model.volume | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The worker pools this release runs, as a JSON list: prefill and decode, and embed when enabled. */}}
{{- define "baton.workerPools" -}}
{{- $pools := list "prefill" "decode" }}
{{- if .Values.embed.enabled }}{{ $pools = append $pools "embed" }}{{ end }}
{{- toJson $pools }}
{{- end -}}

{{/* preStop sleep: lets load balancers and routers stop sending before SIGTERM starts the drain. */}}
{{- define "baton.preStop" -}}
lifecycle:
  preStop:
    exec:
      command: ["sleep", {{ . | quote }}]
{{- end -}}

{{/* The policy as the control plane reads it: a kubernetes cluster without kube_context is this
     cluster, whose namespace and Deployment names only the chart knows. */}}
{{- define "baton.policy" -}}
{{- $policy := deepCopy .Values.controlPlane.policy }}
{{- $clusters := list }}
{{- range $cl := ($policy.clusters | default list) }}
{{- if and (kindIs "map" $cl) (eq (toString $cl.backend) "kubernetes") (not $cl.kube_context) }}
{{- $cl = merge (dict) $cl (dict "namespace" $.Release.Namespace "deployment_name" (printf "%s-{pool}" (include "baton.fullname" $))) }}
{{- end }}
{{- $clusters = append $clusters $cl }}
{{- end }}
{{- $_ := set $policy "clusters" $clusters }}
{{- toYaml $policy }}
{{- end -}}

{{/* --model: the Hub id (and --revision) when model.hub.id is set, else the directory on the model volume. */}}
{{- define "baton.modelArgs" -}}
- --model
{{- if .Values.model.hub.id }}
- {{ .Values.model.hub.id | quote }}
{{- with .Values.model.hub.revision }}
- --revision
- {{ . | quote }}
{{- end }}
{{- else }}
- {{ .Values.model.dir | quote }}
{{- end }}
{{- end -}}

{{/* With a Hub id, the Hub cache lives on the model volume; serving containers read it offline. */}}
{{- define "baton.hubHome" -}}
- name: HF_HOME
  value: {{ printf "%s/huggingface" (trimSuffix "/" .Values.model.mountPath) | quote }}
{{- end -}}

{{- define "baton.hubEnv" -}}
{{- if .Values.model.hub.id }}
{{ include "baton.hubHome" . }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- end -}}

{{/* An init container that downloads model.hub.id into the model volume before the pod starts serving;
     call with (dict "root" $ "image" ... "suffix" ...). Renders nothing without a Hub id. */}}
{{- define "baton.fetchModel" -}}
{{- $hub := .root.Values.model.hub }}
{{- if $hub.id }}
initContainers:
  - name: fetch-model
    {{- include "baton.image" (dict "root" .root "image" .image "suffix" .suffix) | nindent 4 }}
    command: ["baton"]
    args:
      - fetch-model
      - {{ $hub.id | quote }}
      {{- with $hub.revision }}
      - --revision
      - {{ . | quote }}
      {{- end }}
    env:
      {{- include "baton.hubHome" .root | nindent 6 }}
      {{- with $hub.tokenSecret }}
      - name: HF_TOKEN
        valueFrom: {secretKeyRef: {name: {{ . }}, key: token}}
      {{- end }}
    securityContext:
      {{- toYaml .root.Values.securityContext | nindent 6 }}
    volumeMounts:
      - {name: model, mountPath: {{ .root.Values.model.mountPath | quote }}}
{{- end }}
{{- end -}}

{{/* Engine flags the router and every worker must agree on. */}}
{{- define "baton.engineArgs" -}}
- --block-size
- {{ .Values.engine.blockSize | int | quote }}
{{- with .Values.engine.maxModelLen }}
- --max-model-len
- {{ . | int | quote }}
{{- end }}
{{- end -}}
