{{/*
Names. The full name leaves room for the longest suffix ("-prefill") within 63 characters.
*/}}
{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 55 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 55 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 55 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component (decode, prefill, router); context: dict root, component. */}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* modelArtifacts.name as a label value: lower case, [a-z0-9_.-], alphanumeric at both ends. */}}
{{- define "tandem.modelLabel" -}}
{{- $n := .Values.modelArtifacts.name | toString | lower | trim -}}
{{- $n = regexReplaceAll "[^a-z0-9_.-]" $n "-" -}}
{{- $n = trunc 63 $n -}}
{{- $n = regexReplaceAll "^[^a-z0-9]+" $n "" -}}
{{- $n = regexReplaceAll "[^a-z0-9]+$" $n "" -}}
{{- $n -}}
{{- end }}

{{/*
Labels of a model pod, as YAML; context: dict root, role, spec. User labels (modelArtifacts.labels,
then <role>.labels) may override the llm-d defaults; the role and selector labels always win.
*/}}
{{- define "tandem.modelPodLabels" -}}
{{- $labels := dict "llm-d.ai/inferenceServing" "true" "llm-d.ai/model" (include "tandem.modelLabel" .root) -}}
{{- $labels = mergeOverwrite $labels (deepCopy (.root.Values.modelArtifacts.labels | default dict)) (deepCopy (.spec.labels | default dict)) -}}
{{- $labels = mergeOverwrite $labels (fromYaml (include "tandem.selectorLabels" (dict "root" .root "component" .role))) (dict "llm-d.ai/role" .role) -}}
{{- toYaml $labels -}}
{{- end }}

{{/* The port vLLM listens on; context: dict root, role. */}}
{{- define "tandem.vllmPort" -}}
{{- if and (eq .role "decode") .root.Values.routing.proxy.enabled -}}
{{- .root.Values.routing.proxy.targetPort | int -}}
{{- else -}}
{{- .root.Values.routing.servicePort | int -}}
{{- end -}}
{{- end }}

{{/*
What vLLM is given as the model: the hf:// repo id, or the path inside the mounted PVC. The URI may
hold a template, as llm-d-modelservice's default does ("hf://{{ .Values.modelArtifacts.name }}").
*/}}
{{- define "tandem.modelPath" -}}
{{- $uri := tpl (.Values.modelArtifacts.uri | toString) . -}}
{{- if hasPrefix "hf://" $uri -}}
{{- trimPrefix "hf://" $uri -}}
{{- else if hasPrefix "pvc://" $uri -}}
{{- $parts := splitn "/" 2 (trimPrefix "pvc://" $uri) -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.modelArtifacts.mountPath) ($parts._1 | default "") | trimSuffix "/" -}}
{{- else -}}
{{- fail (printf "modelArtifacts.uri %q: only hf:// and pvc:// are supported" $uri) -}}
{{- end -}}
{{- end }}

{{/* "true" when .args already holds .flag (as `--flag value` or `--flag=value`). */}}
{{- define "tandem.hasFlag" -}}
{{- $flag := .flag -}}
{{- $found := false -}}
{{- range .args -}}
{{- $a := toString . -}}
{{- if or (eq $a $flag) (hasPrefix (printf "%s=" $flag) $a) -}}
{{- $found = true -}}
{{- end -}}
{{- end -}}
{{- if $found -}}true{{- end -}}
{{- end }}

{{/* Parallelism with llm-d's defaults; context: a parallelism map (or nil). */}}
{{- define "tandem.tensor" -}}
{{- if and . .tensor }}{{ .tensor | int }}{{ else }}1{{ end -}}
{{- end }}
{{- define "tandem.dataLocal" -}}
{{- if and . .dataLocal }}{{ .dataLocal | int }}{{ else if and . .data .workers }}{{ div (.data | int) (.workers | int) }}{{ else if and . .data }}{{ .data | int }}{{ else }}1{{ end -}}
{{- end }}
{{- define "tandem.data" -}}
{{- if and . .data }}{{ .data | int }}{{ else if and . .dataLocal .workers }}{{ mul (.dataLocal | int) (.workers | int) }}{{ else if and . .dataLocal }}{{ .dataLocal | int }}{{ else }}1{{ end -}}
{{- end }}

{{/* Hardened container securityContext of pd-sidecar and pd-router. */}}
{{- define "tandem.hardenedSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
One vLLM container, as YAML; context: dict root, role, spec, container.
*/}}
{{- define "tandem.vllmContainer" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $c := .container -}}
{{- $p := .spec.parallelism -}}
{{- $port := include "tandem.vllmPort" (dict "root" $root "role" .role) | int -}}
{{- $tp := include "tandem.tensor" $p | int -}}
{{- $dp := include "tandem.data" $p | int -}}
{{- $dpl := include "tandem.dataLocal" $p | int -}}
{{- $mode := $c.modelCommand | default (ternary "vllmServe" "custom" (empty $c.command)) -}}
{{- $userArgs := list -}}
{{- range ($c.args | default list) }}{{ $userArgs = append $userArgs (toString .) }}{{ end -}}
{{- $out := dict "name" ($c.name | default "vllm") "image" (required (printf "%s.containers[].image is required" .role) $c.image) -}}
{{- /* command and args */ -}}
{{- if or (eq $mode "vllmServe") (eq $mode "imageDefault") -}}
{{- $args := list -}}
{{- if eq $mode "vllmServe" -}}
{{- $_ := set $out "command" (list "vllm" "serve") -}}
{{- $args = append $args (include "tandem.modelPath" $root) -}}
{{- else -}}
{{- $args = concat $args (list "--model" (include "tandem.modelPath" $root)) -}}
{{- end -}}
{{- if not (include "tandem.hasFlag" (dict "args" $userArgs "flag" "--port")) -}}
{{- $args = concat $args (list "--port" (toString $port)) -}}
{{- end -}}
{{- if not (include "tandem.hasFlag" (dict "args" $userArgs "flag" "--served-model-name")) -}}
{{- $args = concat $args (list "--served-model-name" (toString $v.modelArtifacts.name)) -}}
{{- end -}}
{{- if not (or (include "tandem.hasFlag" (dict "args" $userArgs "flag" "--tensor-parallel-size")) (include "tandem.hasFlag" (dict "args" $userArgs "flag" "-tp"))) -}}
{{- $args = concat $args (list "--tensor-parallel-size" (toString $tp)) -}}
{{- end -}}
{{- if and (gt $dp 1) (not (include "tandem.hasFlag" (dict "args" $userArgs "flag" "--data-parallel-size"))) -}}
{{- $args = concat $args (list "--data-parallel-size" (toString $dp)) -}}
{{- end -}}
{{- if and (gt $dpl 1) (not (include "tandem.hasFlag" (dict "args" $userArgs "flag" "--data-parallel-size-local"))) -}}
{{- $args = concat $args (list "--data-parallel-size-local" (toString $dpl)) -}}
{{- end -}}
{{- $kvConfig := include "tandem.kvTransferConfig" $v -}}
{{- if and $kvConfig (not (include "tandem.hasFlag" (dict "args" $userArgs "flag" "--kv-transfer-config"))) -}}
{{- $kv := fromJson $kvConfig -}}
{{- if hasKey $kv "Error" -}}
{{- fail (printf "kvTransfer.config is not a JSON object: %s" $kvConfig) -}}
{{- end -}}
{{- /* vLLM 0.26 deprecates kv_both: producer for prefill, consumer for decode, unless the config names a role */ -}}
{{- if not (hasKey $kv "kv_role") -}}
{{- $_ := set $kv "kv_role" (index ($v.kvTransfer.roles | default dict) .role | default "kv_both") -}}
{{- end -}}
{{- $args = concat $args (list "--kv-transfer-config" (toJson $kv)) -}}
{{- end -}}
{{- $_ := set $out "args" (concat $args $userArgs) -}}
{{- else if eq $mode "custom" -}}
{{- if empty $c.command -}}
{{- fail (printf "%s.containers[%s]: modelCommand custom needs a command" .role ($c.name | default "vllm")) -}}
{{- end -}}
{{- $_ := set $out "command" $c.command -}}
{{- if $userArgs }}{{ $_ := set $out "args" $userArgs }}{{ end -}}
{{- else -}}
{{- fail (printf "%s.containers[].modelCommand %q: expected vllmServe, imageDefault or custom" .role $mode) -}}
{{- end -}}
{{- /* env: the user's first; defaults only for names the user did not set */ -}}
{{- $env := list -}}
{{- $names := dict -}}
{{- range ($c.env | default list) }}{{ $env = append $env . }}{{ $_ := set $names (toString .name) true }}{{ end -}}
{{- $defaults := list (dict "name" "VLLM_NIXL_SIDE_CHANNEL_HOST" "valueFrom" (dict "fieldRef" (dict "fieldPath" "status.podIP"))) (dict "name" "VLLM_NIXL_SIDE_CHANNEL_PORT" "value" (toString ($v.kvTransfer.sideChannelPort | int))) -}}
{{- $hf := hasPrefix "hf://" (toString $v.modelArtifacts.uri) -}}
{{- if and $hf $c.mountModelVolume -}}
{{- $defaults = append $defaults (dict "name" "HF_HOME" "value" (toString $v.modelArtifacts.mountPath)) -}}
{{- end -}}
{{- with $v.modelArtifacts.authSecretName -}}
{{- $defaults = append $defaults (dict "name" "HF_TOKEN" "valueFrom" (dict "secretKeyRef" (dict "name" . "key" "HF_TOKEN"))) -}}
{{- end -}}
{{- if eq (toString ($v.kvTransfer.connector | default "nixl")) "tandem" -}}
{{- $defaults = concat $defaults (list (dict "name" "TANDEM_KV_HOST" "valueFrom" (dict "fieldRef" (dict "fieldPath" "status.podIP"))) (dict "name" "TANDEM_KV_PORT" "value" (toString ($v.kvTransfer.tandemPort | default 5700 | int)))) -}}
{{- end -}}
{{- $ipc := $v.kvTransfer.cudaIpc | default dict -}}
{{- if $ipc.enabled -}}
{{- $defaults = concat $defaults (list (dict "name" "TANDEM_CUDA_IPC_DIR" "value" (toString $ipc.mountPath)) (dict "name" "TANDEM_CUDA_SHARE" "value" (toString $ipc.share)) (dict "name" "TANDEM_KV_BACKEND" "value" "auto")) -}}
{{- end -}}
{{- range $defaults }}{{ if not (hasKey $names .name) }}{{ $env = append $env . }}{{ end }}{{ end -}}
{{- $_ := set $out "env" $env -}}
{{- with $c.envFrom }}{{ $_ := set $out "envFrom" . }}{{ end -}}
{{- /* ports: the user's, plus vLLM's and the NIXL side channel when not declared */ -}}
{{- $ports := list -}}
{{- $numbers := dict -}}
{{- $portNames := dict -}}
{{- range ($c.ports | default list) }}{{ $ports = append $ports . }}{{ $_ := set $numbers (toString (.containerPort | int)) true }}{{ with .name }}{{ $_ := set $portNames . true }}{{ end }}{{ end -}}
{{- $side := $v.kvTransfer.sideChannelPort | int -}}
{{- if not (or (hasKey $numbers (toString $port)) (hasKey $portNames "vllm")) -}}
{{- $ports = append $ports (dict "name" "vllm" "containerPort" $port "protocol" "TCP") -}}
{{- end -}}
{{- if not (or (hasKey $numbers (toString $side)) (hasKey $portNames "nixl")) -}}
{{- $ports = append $ports (dict "name" "nixl" "containerPort" $side "protocol" "TCP") -}}
{{- end -}}
{{- $tkv := $v.kvTransfer.tandemPort | default 5700 | int -}}
{{- if and (eq (toString ($v.kvTransfer.connector | default "nixl")) "tandem") (not (or (hasKey $numbers (toString $tkv)) (hasKey $portNames "tandem-kv"))) -}}
{{- $ports = append $ports (dict "name" "tandem-kv" "containerPort" $tkv "protocol" "TCP") -}}
{{- end -}}
{{- $_ := set $out "ports" $ports -}}
{{- /* resources: accelerators = tensor * dataLocal unless the user named the resource */ -}}
{{- $res := deepCopy ($c.resources | default dict) -}}
{{- $limits := $res.limits | default dict -}}
{{- $requests := $res.requests | default dict -}}
{{- $accType := $v.accelerator.type | default "nvidia" -}}
{{- $accName := "" -}}
{{- if and (ne $accType "cpu") (not (contains "llm-d-inference-sim" (toString $c.image))) -}}
{{- $accName = index ($v.accelerator.resources | default dict) $accType | default "nvidia.com/gpu" -}}
{{- end -}}
{{- if and $accName (not (hasKey $limits $accName)) (not (hasKey $requests $accName)) -}}
{{- $_ := set $limits $accName (toString (mul $tp $dpl)) -}}
{{- $_ := set $requests $accName (toString (mul $tp $dpl)) -}}
{{- end -}}
{{- if $limits }}{{ $_ := set $res "limits" $limits }}{{ end -}}
{{- if $requests }}{{ $_ := set $res "requests" $requests }}{{ end -}}
{{- $_ := set $out "resources" $res -}}
{{- /* volume mounts */ -}}
{{- $mounts := list -}}
{{- range ($c.volumeMounts | default list) }}{{ $mounts = append $mounts . }}{{ end -}}
{{- if $c.mountModelVolume -}}
{{- $m := dict "name" "model-storage" "mountPath" (toString $v.modelArtifacts.mountPath) -}}
{{- if hasPrefix "pvc://" (toString $v.modelArtifacts.uri) }}{{ $_ := set $m "readOnly" true }}{{ end -}}
{{- $mounts = append $mounts $m -}}
{{- end -}}
{{- if $ipc.enabled -}}
{{- $mounts = append $mounts (dict "name" "tandem-kv-ipc" "mountPath" (toString $ipc.mountPath)) -}}
{{- end -}}
{{- if $mounts }}{{ $_ := set $out "volumeMounts" $mounts }}{{ end -}}
{{- /* probes: the user's, else readiness on vLLM's /health */ -}}
{{- if $c.readinessProbe -}}
{{- $_ := set $out "readinessProbe" $c.readinessProbe -}}
{{- else -}}
{{- $_ := set $out "readinessProbe" (dict "httpGet" (dict "path" "/health" "port" $port) "periodSeconds" 5 "timeoutSeconds" 2 "failureThreshold" 3) -}}
{{- end -}}
{{- with $c.livenessProbe }}{{ $_ := set $out "livenessProbe" . }}{{ end -}}
{{- with $c.startupProbe }}{{ $_ := set $out "startupProbe" . }}{{ end -}}
{{- range $key := list "imagePullPolicy" "securityContext" "lifecycle" "workingDir" "stdin" "tty" -}}
{{- if hasKey $c $key }}{{ with index $c $key }}{{ $_ := set $out $key . }}{{ end }}{{ end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end }}

{{/* pd-sidecar's serving scheme for probes and pd-router. */}}
{{- define "tandem.proxyScheme" -}}
{{- if .Values.routing.proxy.secure }}HTTPS{{ else }}HTTP{{ end -}}
{{- end }}

{{/* pd-sidecar's arguments, as a YAML list. */}}
{{- define "tandem.proxyArgs" -}}
{{- $r := .Values.routing -}}
{{- $x := $r.proxy -}}
{{- $args := list
  (printf "--port=%d" ($r.servicePort | int))
  (printf "--model-server-port=%d" ($x.targetPort | int))
  (printf "--kv-connector=%s" ($x.connector | default "nixlv2"))
  (printf "--secure-proxy=%t" (not (not $x.secure)))
-}}
{{- if $x.certPath }}{{ $args = append $args (printf "--cert-path=%s" $x.certPath) }}{{ end -}}
{{- $args = append $args (printf "--prefiller-use-tls=%t" (not (not $x.prefillerUseTLS))) -}}
{{- $args = append $args (printf "--metrics-port=%d" (($x.metricsPort | default 0) | int)) -}}
{{- if not (kindIs "invalid" $x.debugLevel) }}{{ $args = append $args (printf "--v=%d" ($x.debugLevel | int)) }}{{ end -}}
{{- /* llm-d-modelservice's zap keys, passed the way it passes them */ -}}
{{- range $key, $flag := dict "zapDevel" "--zap-devel" "zapEncoder" "--zap-encoder" "zapLogLevel" "--zap-log-level" "zapStacktraceLevel" "--zap-stacktrace-level" "zapTimeEncoding" "--zap-time-encoding" -}}
{{- if hasKey $x $key }}{{ $args = append $args (printf "%s=%v" $flag (index $x $key)) }}{{ end -}}
{{- end -}}
{{- $ssrf := $x.ssrfProtection | default dict -}}
{{- if $ssrf.enabled -}}
{{- $args = append $args "--enable-ssrf-protection=true" -}}
{{- if $ssrf.inferencePool -}}
{{- $args = append $args (printf "--inference-pool=%s" $ssrf.inferencePool) -}}
{{- $args = append $args (printf "--pool-group=%s" ($ssrf.poolGroup | default "inference.networking.k8s.io")) -}}
{{- else if .Values.prefill.create -}}
{{- $sel := list -}}
{{- range $k, $val := fromYaml (include "tandem.selectorLabels" (dict "root" . "component" "prefill")) -}}
{{- $sel = append $sel (printf "%s=%s" $k $val) -}}
{{- end -}}
{{- $sel = append $sel "llm-d.ai/role=prefill" -}}
{{- $args = append $args (printf "--prefill-pod-selector=%s" (join "," $sel)) -}}
{{- $args = append $args (printf "--prefill-pod-ports=%d" ($r.servicePort | int)) -}}
{{- else if not $ssrf.allowlist -}}
{{- fail "routing.proxy.ssrfProtection: with prefill.create false, name the allowed prefill targets (inferencePool or allowlist) or set enabled: false" -}}
{{- end -}}
{{- with $ssrf.allowlist }}{{ $args = append $args (printf "--prefill-allowlist=%s" (join "," .)) }}{{ end -}}
{{- end -}}
{{- if (.Values.tracing | default dict).enabled }}{{ $args = append $args "--tracing=true" }}{{ end -}}
{{- range ($x.args | default list) }}{{ $args = append $args (toString .) }}{{ end -}}
{{- range ($x.extraArgs | default list) }}{{ $args = append $args (toString .) }}{{ end -}}
{{- toYaml $args -}}
{{- end }}

{{/* Whether pd-sidecar watches the API (SSRF protection from pods or an InferencePool). */}}
{{- define "tandem.proxyWatches" -}}
{{- $x := .Values.routing.proxy -}}
{{- $ssrf := $x.ssrfProtection | default dict -}}
{{- if and $x.enabled .Values.decode.create $ssrf.enabled (or $ssrf.inferencePool .Values.prefill.create) -}}true{{- end -}}
{{- end }}

{{/* The decode pods' ServiceAccount when the chart creates one for pd-sidecar's watch. */}}
{{- define "tandem.decodeServiceAccountName" -}}
{{- $sa := (.Values.routing.proxy.ssrfProtection | default dict).serviceAccount | default dict -}}
{{- $sa.name | default (printf "%s-decode" (include "tandem.fullname" .)) -}}
{{- end }}

{{/* The routing-proxy native sidecar (decode pods only), as YAML. */}}
{{- define "tandem.routingProxy" -}}
{{- $r := .Values.routing -}}
{{- $x := $r.proxy -}}
{{- $scheme := include "tandem.proxyScheme" . -}}
{{- if and $x.certSecretName (not $x.certPath) -}}
{{- fail "routing.proxy.certSecretName needs routing.proxy.certPath (where to mount it)" -}}
{{- end -}}
name: routing-proxy
image: {{ include "tandem.image" (dict "root" . "image" $x.image) | quote }}
imagePullPolicy: {{ $x.imagePullPolicy | default "IfNotPresent" }}
{{- with $x.command }}
command:
  {{- toYaml . | nindent 2 }}
{{- end }}
args:
  {{- include "tandem.proxyArgs" . | nindent 2 }}
env:
  # Where the InferencePool and the prefill pods are looked up.
  - name: INFERENCE_POOL_NAMESPACE
    value: {{ .Release.Namespace | quote }}
  {{- include "tandem.otelEnv" . | nindent 2 }}
# A native sidecar: starts before vLLM, runs for the pod's life, stops after it.
restartPolicy: Always
ports:
  - name: http
    containerPort: {{ $r.servicePort | int }}
    protocol: TCP
  {{- if $x.metricsPort }}
  - name: metrics
    containerPort: {{ $x.metricsPort | int }}
    protocol: TCP
  {{- end }}
# Startup checks the sidecar alone: vLLM starts only after this probe passes, so it must not wait
# for the engine (/ready would never pass).
startupProbe:
  httpGet:
    path: /health
    port: http
    scheme: {{ $scheme }}
  periodSeconds: 1
  failureThreshold: 30
# Ready only when the local engine's /health answers 200.
readinessProbe:
  httpGet:
    path: /ready
    port: http
    scheme: {{ $scheme }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
livenessProbe:
  httpGet:
    path: /health
    port: http
    scheme: {{ $scheme }}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
resources:
  {{- toYaml ($x.resources | default dict) | nindent 2 }}
securityContext:
  {{- include "tandem.hardenedSecurityContext" . | nindent 2 }}
{{- if and $x.secure $x.certSecretName }}
volumeMounts:
  - name: routing-proxy-certs
    mountPath: {{ $x.certPath }}
    readOnly: true
{{- end }}
{{- end }}

{{/* An image value, or Tandem's image (image.repository:image.tag, tag defaulting to the chart's
appVersion) when it is empty; context: dict root, image. */}}
{{- define "tandem.image" -}}
{{- if .image -}}
{{- .image -}}
{{- else -}}
{{- $i := .root.Values.image | default dict -}}
{{- printf "%s:%s" (required "image.repository is required" $i.repository) ($i.tag | default .root.Chart.AppVersion) -}}
{{- end -}}
{{- end }}

{{/* Decode endpoint for pd-router: the decode headless Service. */}}
{{- define "tandem.decodeURL" -}}
{{- printf "%s://%s-decode.%s.svc:%d" (include "tandem.proxyScheme" . | lower) (include "tandem.fullname" .) .Release.Namespace (.Values.routing.servicePort | int) -}}
{{- end }}

{{- define "tandem.prefillHostPort" -}}
{{- printf "%s-prefill.%s.svc:%d" (include "tandem.fullname" .) .Release.Namespace (.Values.routing.servicePort | int) -}}
{{- end }}

{{- define "tandem.routerServiceAccountName" -}}
{{- if .Values.router.serviceAccount.create -}}
{{- .Values.router.serviceAccount.name | default (printf "%s-router" (include "tandem.fullname" .)) -}}
{{- else -}}
{{- .Values.router.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end }}

{{/* pd-router's arguments, as a YAML list. */}}
{{- define "tandem.routerArgs" -}}
{{- $v := .Values -}}
{{- $args := list
  (printf "--port=%d" ($v.router.port | int))
  (printf "--metrics-port=%d" (($v.router.metricsPort | default 0) | int))
  "--config=/etc/pd-router/config.yaml"
  (printf "--decode-dns=%s" (include "tandem.decodeURL" .))
  (printf "--dns-refresh-interval=%s" ($v.router.dnsRefreshInterval | default "5s"))
  (printf "--log-level=%s" ($v.router.logLevel | default "info"))
-}}
{{- if $v.routing.proxy.enabled -}}
{{- /* /ready on a pd-sidecar also checks its engine */ -}}
{{- $args = append $args "--decode-health-path=/ready" -}}
{{- if $v.prefill.create }}{{ $args = append $args (printf "--prefill-dns=%s" (include "tandem.prefillHostPort" .)) }}{{ end -}}
{{- if and $v.routing.proxy.secure $v.router.tlsInsecureSkipVerify }}{{ $args = append $args "--tls-insecure-skip-verify=true" }}{{ end -}}
{{- else -}}
{{- /* no pd-sidecar in decode pods: nothing would run a prefill leg */ -}}
{{- $args = append $args "--threshold-tokens=0" -}}
{{- end -}}
{{- if ($v.tracing | default dict).enabled }}{{ $args = append $args "--tracing=true" }}{{ end -}}
{{- range ($v.router.extraArgs | default list) }}{{ $args = append $args (toString .) }}{{ end -}}
{{- toYaml $args -}}
{{- end }}

{{/* OpenTelemetry's variables for pd-sidecar and pd-router (env list items; none when off). */}}
{{- define "tandem.otelEnv" -}}
{{- $t := .Values.tracing | default dict -}}
{{- if $t.enabled }}
{{- if $t.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $t.otlpEndpoint | quote }}
{{- end }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $t.sampler | default "parentbased_traceidratio" | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $t.samplerArg | default "0.1" | quote }}
{{- end }}
{{- end }}

{{/*
A model-server Deployment (decode or prefill); context: dict root, role, spec.
*/}}
{{- define "tandem.modelDeployment" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $spec := .spec -}}
{{- $role := .role -}}
{{- $withProxy := and (eq $role "decode") $v.routing.proxy.enabled -}}
{{- $name := printf "%s-%s" (include "tandem.fullname" $root) $role -}}
{{- $podLabels := include "tandem.modelPodLabels" . -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "tandem.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ $role }}
    llm-d.ai/role: {{ $role }}
spec:
  replicas: {{ $spec.replicas | int }}
  selector:
    matchLabels:
      {{- include "tandem.selectorLabels" (dict "root" $root "component" $role) | nindent 6 }}
      llm-d.ai/role: {{ $role }}
  template:
    metadata:
      labels:
        {{- $podLabels | nindent 8 }}
      {{- with $spec.annotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- with $spec.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- $sa := $spec.serviceAccountName | default $v.serviceAccountOverride -}}
      {{- if and (not $sa) $withProxy (include "tandem.proxyWatches" $root) -}}
      {{- $sa = include "tandem.decodeServiceAccountName" $root -}}
      {{- end }}
      {{- with $sa }}
      serviceAccountName: {{ . }}
      {{- end }}
      {{- with $spec.schedulerName }}
      schedulerName: {{ . }}
      {{- end }}
      {{- with $spec.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $spec.terminationGracePeriodSeconds }}
      terminationGracePeriodSeconds: {{ . }}
      {{- end }}
      {{- if or $withProxy $spec.initContainers }}
      initContainers:
        {{- if $withProxy }}
        - {{- include "tandem.routingProxy" $root | nindent 10 }}
        {{- end }}
        {{- with $spec.initContainers }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      containers:
        {{- range $c := (required (printf "%s.containers must list at least one container" $role) $spec.containers) }}
        - {{- include "tandem.vllmContainer" (dict "root" $root "role" $role "spec" $spec "container" $c) | nindent 10 }}
        {{- end }}
      {{- $volumes := list -}}
      {{- $volumeNames := dict -}}
      {{- range ($spec.volumes | default list) }}{{ $volumes = append $volumes . }}{{ $_ := set $volumeNames (toString .name) true }}{{ end -}}
      {{- $modelVolume := false -}}
      {{- range $spec.containers }}{{ if .mountModelVolume }}{{ $modelVolume = true }}{{ end }}{{ end -}}
      {{- if and $modelVolume (not (hasKey $volumeNames "model-storage")) -}}
      {{- $uri := toString $v.modelArtifacts.uri -}}
      {{- if hasPrefix "pvc://" $uri -}}
      {{- $claim := index (splitList "/" (trimPrefix "pvc://" $uri)) 0 -}}
      {{- $volumes = append $volumes (dict "name" "model-storage" "persistentVolumeClaim" (dict "claimName" $claim "readOnly" true)) -}}
      {{- else -}}
      {{- $volumes = append $volumes (dict "name" "model-storage" "emptyDir" (dict "sizeLimit" (toString ($v.modelArtifacts.size | default "20Gi")))) -}}
      {{- end -}}
      {{- end -}}
      {{- if and ($v.kvTransfer.cudaIpc | default dict).enabled (not (hasKey $volumeNames "tandem-kv-ipc")) -}}
      {{- $volumes = append $volumes (dict "name" "tandem-kv-ipc" "hostPath" (dict "path" (toString $v.kvTransfer.cudaIpc.hostPath) "type" "DirectoryOrCreate")) -}}
      {{- end -}}
      {{- if and $withProxy $v.routing.proxy.secure $v.routing.proxy.certSecretName -}}
      {{- $volumes = append $volumes (dict "name" "routing-proxy-certs" "secret" (dict "secretName" $v.routing.proxy.certSecretName)) -}}
      {{- end -}}
      {{- with $volumes }}
      volumes:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $spec.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $spec.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $spec.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/* A headless Service over one role's pods, so each pod is addressable; context: dict root, role. */}}
{{- define "tandem.headlessService" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "tandem.fullname" .root }}-{{ .role }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "tandem.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .role }}
    llm-d.ai/role: {{ .role }}
spec:
  clusterIP: None
  selector:
    {{- include "tandem.selectorLabels" (dict "root" .root "component" .role) | nindent 4 }}
    llm-d.ai/role: {{ .role }}
  ports:
    - name: http
      port: {{ .root.Values.routing.servicePort | int }}
      targetPort: {{ .root.Values.routing.servicePort | int }}
      protocol: TCP
{{- end }}

{{/* A PodMonitor; context: dict root, component, endpoints. */}}
{{- define "tandem.podMonitor" -}}
{{- $pm := .podmonitor -}}
apiVersion: monitoring.coreos.com/v1
kind: PodMonitor
metadata:
  name: {{ include "tandem.fullname" .root }}-{{ .component }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "tandem.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with $pm.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $pm.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "tandem.selectorLabels" (dict "root" .root "component" .component) | nindent 6 }}
  podMetricsEndpoints:
    {{- range .ports }}
    - port: {{ . }}
      path: {{ $pm.path | default "/metrics" }}
      interval: {{ $pm.interval | default "30s" }}
      {{- with $pm.scrapeTimeout }}
      scrapeTimeout: {{ . }}
      {{- end }}
      {{- with $pm.relabelings }}
      relabelings:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pm.metricRelabelings }}
      metricRelabelings:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- end }}
{{- end }}

{{/* vLLM's --kv-transfer-config before roles: kvTransfer.config, else the connector's default. */}}
{{- define "tandem.kvTransferConfig" -}}
{{- if .kvTransfer.config -}}
{{- toString .kvTransfer.config -}}
{{- else if eq (toString (.kvTransfer.connector | default "nixl")) "tandem" -}}
{"kv_connector":"TandemConnector","kv_connector_module_path":"tandem_kv.vllm","kv_load_failure_policy":"recompute"}
{{- else if eq (toString (.kvTransfer.connector | default "nixl")) "nixl" -}}
{"kv_connector":"NixlConnector"}
{{- end -}}
{{- end }}
