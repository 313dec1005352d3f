{{/*
Every template here works from this chart (`.Values` are the agent's) and from a parent chart that has
this one as a dependency named relaygate-agent (`.Values.relaygate-agent` are the agent's), so a parent
can write {{ include "relaygate-agent.sidecar" . }} with its own context.
*/}}
{{- define "relaygate-agent.values" -}}
{{- if hasKey .Values "relaygate-agent" }}{{ index .Values "relaygate-agent" | toJson }}{{ else }}{{ .Values | toJson }}{{ end }}
{{- end }}

{{- define "relaygate-agent.fullname" -}}
{{- $v := include "relaygate-agent.values" . | fromJson }}
{{- if $v.fullnameOverride }}
{{- $v.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains "relaygate-agent" .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (default "relaygate-agent" $v.nameOverride) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The image tag by default; keep equal to appVersion in Chart.yaml (deploy/check.sh checks). */}}
{{- define "relaygate-agent.appVersion" -}}
0.1.0
{{- end }}

{{- define "relaygate-agent.labels" -}}
app.kubernetes.io/name: relaygate-agent
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "relaygate-agent.appVersion" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "relaygate-agent.secretName" -}}
{{- $v := include "relaygate-agent.values" . | fromJson }}
{{- default (include "relaygate-agent.fullname" .) $v.secrets.existingSecret }}
{{- end }}

{{/* "true" when any tunnel delivers transparently: only then does the agent get NET_ADMIN and NET_RAW. */}}
{{- define "relaygate-agent.transparent" -}}
{{- $v := include "relaygate-agent.values" . | fromJson }}
{{- range $v.config.tunnels }}{{ if eq (default "plain" .deliver) "transparent" }}true{{ end }}{{ end }}
{{- end }}

{{/* "true" when any tunnel carries UDP (proto udp or both): the example node then listens on UDP too. */}}
{{- define "relaygate-agent.udp" -}}
{{- $v := include "relaygate-agent.values" . | fromJson }}
{{- range $v.config.tunnels }}{{ if has (default "tcp" .proto) (list "udp" "both") }}true{{ end }}{{ end }}
{{- end }}

{{/* "true" when a tunnel target names $(POD_IP) or another variable: tunnels then go on the command line. */}}
{{- define "relaygate-agent.tunnelArgs" -}}
{{- $v := include "relaygate-agent.values" . | fromJson }}
{{- range $v.config.tunnels }}{{ if contains "$(" .target }}true{{ end }}{{ end }}
{{- end }}

{{/* "true" when the agent presents a join token (from the chart's Secret or an existing one). */}}
{{- define "relaygate-agent.hasToken" -}}
{{- $v := include "relaygate-agent.values" . | fromJson }}
{{- if or $v.secrets.existingSecret $v.secrets.joinToken }}true{{ end }}
{{- end }}

{{- define "relaygate-agent.adminPort" -}}
{{- $v := include "relaygate-agent.values" . | fromJson }}
{{- regexFind "[0-9]+$" $v.config.admin.listen }}
{{- end }}

{{/* One tunnel as the --tunnel flag: NAME=HOST:PORT[@PUBLIC_PORT][,deliver=MODE][,proto=P][,node_peer_id=ID][,advertise_file=PATH] */}}
{{- define "relaygate-agent.tunnelFlag" -}}
{{- .name }}={{ .target }}{{ with .port }}@{{ int . }}{{ end }}
{{- with .deliver }},deliver={{ . }}{{ end }}
{{- if and .proto (ne .proto "tcp") }},proto={{ .proto }}{{ end }}
{{- with .node_peer_id }},node_peer_id={{ . }}{{ end }}
{{- with .advertise_file }},advertise_file={{ . }}{{ end }}
{{- end }}

{{/* The agent's config file. Keys are the README's. */}}
{{- define "relaygate-agent.config" -}}
{{- $v := include "relaygate-agent.values" . | fromJson }}
{{- $c := $v.config -}}
{{- range $c.tunnels }}
{{- if and (has (default "tcp" .proto) (list "udp" "both")) (hasPrefix "proxy-" (default "plain" .deliver)) }}
{{- fail (printf "tunnel %s: deliver=%s cannot carry UDP (QUIC reads no PROXY header); use deliver plain or transparent, or proto tcp" .name .deliver) }}
{{- end }}
{{- end -}}
# Rendered by the relaygate-agent chart; keys as in the README's configuration table.
data_dir = {{ printf "%s/data" $v.dataVolume.mountPath | toJson }}
connect_timeout = {{ $c.connect_timeout | toJson }}
shutdown_grace = {{ $c.shutdown_grace | toJson }}

[gateway]
addresses = {{ $c.gateway.addresses | toJson }}
{{- if include "relaygate-agent.hasToken" . }}
token_file = "/etc/relaygate/secret/join-token"
{{- end }}
dial_timeout = {{ $c.gateway.dial_timeout | toJson }}
{{- if include "relaygate-agent.tunnelArgs" . }}

# tunnels: on the command line (a target names $(POD_IP), which only Kubernetes expands).
{{- else }}
{{- range $c.tunnels }}

[[tunnels]]
name = {{ .name | toJson }}
target = {{ .target | toJson }}
{{- with .port }}
port = {{ int . }}
{{- end }}
{{- with .node_peer_id }}
node_peer_id = {{ . | toJson }}
{{- end }}
{{- with .advertise_file }}
advertise_file = {{ . | toJson }}
{{- end }}
deliver = {{ default "plain" .deliver | toJson }}
{{- if and .proto (ne .proto "tcp") }}
proto = {{ .proto | toJson }}
{{- end }}
{{- end }}
{{- end }}

[reconnect]
initial = {{ $c.reconnect.initial | toJson }}
max = {{ $c.reconnect.max | toJson }}

[admin]
listen = {{ $c.admin.listen | toJson }}
token_file = "/etc/relaygate/secret/admin-token"
open_paths = {{ $c.admin.open_paths | toJson }}

[log]
format = {{ $c.log.format | toJson }}
level = {{ $c.log.level | toJson }}
{{- end }}

{{/*
The agent container, as one item of a list: paste under initContainers (sidecar.mode native) or
containers (sidecar.mode container).
*/}}
{{- define "relaygate-agent.sidecar" -}}
{{- $v := include "relaygate-agent.values" . | fromJson }}
{{- $transparent := include "relaygate-agent.transparent" . }}
{{- $repo := ternary $v.image.transparentRepository $v.image.repository (not (empty $transparent)) }}
{{- $full := include "relaygate-agent.fullname" . -}}
{{- if and (eq $v.sidecar.mode "native") (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) -}}
{{- fail (printf "sidecar.mode native needs Kubernetes 1.29+ (this is %s): set sidecar.mode container" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
- name: {{ $v.sidecar.name }}
  image: {{ printf "%s:%s" $repo (default (include "relaygate-agent.appVersion" .) $v.image.tag) | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if eq $v.sidecar.mode "native" }}
  # A native sidecar: runs for the pod's whole life; the node starts after its startup probe passed.
  restartPolicy: Always
  {{- end }}
  args:
    - run
    {{- if include "relaygate-agent.tunnelArgs" . }}
    {{- range $v.config.tunnels }}
    - --tunnel
    - {{ include "relaygate-agent.tunnelFlag" . | quote }}
    {{- end }}
    {{- end }}
  env:
    # Every subcommand reads it: `kubectl exec ... -- relaygate-agent peer-id` sees this config.
    - name: RELAYGATE_CONFIG
      value: /etc/relaygate/agent/agent.toml
    # Wins over the image's RELAYGATE_DATA_DIR.
    - name: RELAYGATE_DATA_DIR
      value: {{ printf "%s/data" $v.dataVolume.mountPath | quote }}
    - name: POD_IP
      valueFrom:
        fieldRef:
          fieldPath: status.podIP
    {{- if eq $v.identity.source "secret" }}
    - name: RELAYGATE_IDENTITY__KEY
      valueFrom:
        secretKeyRef:
          name: {{ include "relaygate-agent.secretName" . }}
          key: identity-key
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: rg-admin
      containerPort: {{ include "relaygate-agent.adminPort" . | int }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: {{ $v.probes.startup.path }}
      port: rg-admin
    periodSeconds: {{ $v.probes.startup.periodSeconds }}
    failureThreshold: {{ $v.probes.startup.failureThreshold }}
  livenessProbe:
    httpGet:
      path: /health/live
      port: rg-admin
    periodSeconds: {{ $v.probes.liveness.periodSeconds }}
    failureThreshold: {{ $v.probes.liveness.failureThreshold }}
  {{- if $v.probes.readiness.enabled }}
  readinessProbe:
    httpGet:
      path: /health/ready
      port: rg-admin
    periodSeconds: {{ $v.probes.readiness.periodSeconds }}
    failureThreshold: {{ $v.probes.readiness.failureThreshold }}
  {{- end }}
  securityContext:
    {{- if $transparent }}
    # A tunnel delivers transparently: IP_TRANSPARENT sockets, SO_MARK and the agent's nftables table
    # and policy route need NET_ADMIN and NET_RAW. Kubernetes gives added capabilities only to root.
    runAsNonRoot: false
    runAsUser: 0
    runAsGroup: 0
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    privileged: false
    capabilities:
      drop: [ALL]
      add: [NET_ADMIN, NET_RAW]
    {{- else }}
    {{- toYaml $v.securityContext | nindent 4 }}
    {{- end }}
  resources:
    {{- toYaml $v.resources | nindent 4 }}
  volumeMounts:
    - name: {{ $v.sidecar.name }}-config
      mountPath: /etc/relaygate/agent
      readOnly: true
    - name: {{ $v.sidecar.name }}-secret
      mountPath: /etc/relaygate/secret
      readOnly: true
    - name: {{ $v.dataVolume.name }}
      mountPath: {{ $v.dataVolume.mountPath }}
    - name: {{ $v.sharedVolume.name }}
      mountPath: {{ $v.sharedVolume.mountPath }}
{{- end }}

{{/* The node container's mount of the shared volume (read-only): the advertise files. */}}
{{- define "relaygate-agent.nodeMounts" -}}
{{- $v := include "relaygate-agent.values" . | fromJson -}}
- name: {{ $v.sharedVolume.name }}
  mountPath: {{ $v.sharedVolume.mountPath }}
  readOnly: true
{{- end }}

{{/*
The pod volumes the sidecar needs. With identity.source volume, add a claim named dataVolume.name
yourself (the example StatefulSet uses volumeClaimTemplates).
*/}}
{{- define "relaygate-agent.volumes" -}}
{{- $v := include "relaygate-agent.values" . | fromJson }}
{{- $full := include "relaygate-agent.fullname" . -}}
- name: {{ $v.sidecar.name }}-config
  configMap:
    name: {{ $full }}
- name: {{ $v.sidecar.name }}-secret
  secret:
    secretName: {{ include "relaygate-agent.secretName" . }}
    defaultMode: 0440
    items:
      - key: admin-token
        path: admin-token
      {{- if include "relaygate-agent.hasToken" . }}
      - key: join-token
        path: join-token
      {{- end }}
- name: {{ $v.sharedVolume.name }}
  emptyDir:
    sizeLimit: 1Mi
{{- if eq $v.identity.source "secret" }}
- name: {{ $v.dataVolume.name }}
  emptyDir:
    sizeLimit: 1Mi
{{- end }}
{{- end }}
