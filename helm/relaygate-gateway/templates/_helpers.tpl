{{/* Names and labels. */}}
{{- define "relaygate-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "relaygate-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "relaygate-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "relaygate-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "relaygate-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "relaygate-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "relaygate-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "relaygate-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "relaygate-gateway.secretName" -}}
{{- default (include "relaygate-gateway.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "relaygate-gateway.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where the Secret's files are mounted. */}}
{{- define "relaygate-gateway.adminTokenFile" -}}
/etc/relaygate/secret/admin-token
{{- end }}
{{- define "relaygate-gateway.joinTokenFile" -}}
/etc/relaygate/secret/join-token
{{- end }}

{{/* "true" when the join token comes from a Secret (else the gateway generates <data_dir>/join-token). */}}
{{- define "relaygate-gateway.hasJoinToken" -}}
{{- if or .Values.secrets.existingSecret .Values.secrets.joinToken }}true{{ end }}
{{- end }}

{{/* The admin port, from config.admin.listen ("0.0.0.0:9600", "[::]:9600"). */}}
{{- define "relaygate-gateway.adminPort" -}}
{{- regexFind "[0-9]+$" .Values.config.admin.listen }}
{{- end }}

{{/* "true" when the admin API listens on loopback only. */}}
{{- define "relaygate-gateway.adminLoopback" -}}
{{- if or (hasPrefix "127." .Values.config.admin.listen) (hasPrefix "[::1]" .Values.config.admin.listen) }}true{{ end }}
{{- end }}

{{/*
libp2p ports from config.listen as a JSON list of {"protocol": "TCP"|"UDP", "port": N}, deduplicated.
*/}}
{{- define "relaygate-gateway.listenPorts" -}}
{{- $out := list }}
{{- $seen := dict }}
{{- range .Values.config.listen }}
{{- $m := regexFind "/(tcp|udp)/[0-9]+" . }}
{{- if not $m }}
{{- fail (printf "config.listen entry %q has no /tcp/PORT or /udp/PORT" .) }}
{{- end }}
{{- $parts := splitList "/" $m }}
{{- $proto := upper (index $parts 1) }}
{{- $port := atoi (index $parts 2) }}
{{- $key := printf "%s-%d" $proto $port }}
{{- if not (hasKey $seen $key) }}
{{- $_ := set $seen $key true }}
{{- $out = append $out (dict "protocol" $proto "port" $port) }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
Lease ports as a JSON list of numbers: service.leasePorts if given, else every port of
config.leases.port_range and config.leases.allowed_ports. Entries are numbers or "LOW-HIGH".
*/}}
{{- define "relaygate-gateway.leasePorts" -}}
{{- $specs := .Values.service.leasePorts }}
{{- if not $specs }}
{{- $specs = prepend .Values.config.leases.allowed_ports .Values.config.leases.port_range }}
{{- end }}
{{- $ports := list }}
{{- range $specs }}
{{- $s := toString . }}
{{- if not (regexMatch "^[0-9]+(-[0-9]+)?$" $s) }}
{{- fail (printf "lease port %q must be a port or LOW-HIGH" $s) }}
{{- end }}
{{- $b := splitList "-" $s }}
{{- $low := atoi (first $b) }}
{{- $high := atoi (last $b) }}
{{- if gt $low $high }}
{{- fail (printf "lease port range %q: low > high" $s) }}
{{- end }}
{{- if gt (add (sub $high $low) 1 (len $ports)) (int $.Values.service.maxPorts) }}
{{- fail (printf "%s: more than service.maxPorts (%d) lease ports; each port is one Service entry. Narrow config.leases.port_range, list the ports in service.leasePorts, or use hostNetwork" $s (int $.Values.service.maxPorts)) }}
{{- end }}
{{- range $p := untilStep $low (int (add $high 1)) 1 }}
{{- if not (has $p $ports) }}
{{- $ports = append $ports $p }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $ports }}
{{- end }}

{{/* The gateway's config file. Keys are the README's. */}}
{{- define "relaygate-gateway.config" -}}
{{- $c := .Values.config -}}
# Rendered by the relaygate-gateway chart; keys as in the README's configuration table.
data_dir = {{ $c.data_dir | toJson }}
listen = {{ $c.listen | toJson }}
advertise = {{ $c.advertise | toJson }}
shutdown_grace = {{ $c.shutdown_grace | toJson }}

[admission]
allow = {{ $c.admission.allow | toJson }}
tokens = {{ $c.admission.tokens }}
{{- if include "relaygate-gateway.hasJoinToken" . }}
token_file = {{ include "relaygate-gateway.joinTokenFile" . | toJson }}
{{- end }}

[leases]
port_range = {{ $c.leases.port_range | toString | toJson }}
allowed_ports = {{ $c.leases.allowed_ports | toStrings | toJson }}
max_tunnels_per_agent = {{ $c.leases.max_tunnels_per_agent | int }}

[proxy_protocol]
trusted = {{ $c.proxy_protocol.trusted | toJson }}
required = {{ $c.proxy_protocol.required }}

[session]
keepalive = {{ $c.session.keepalive | toJson }}
timeout = {{ $c.session.timeout | toJson }}
max_streams = {{ $c.session.max_streams | int }}

[admin]
listen = {{ $c.admin.listen | toJson }}
token_file = {{ include "relaygate-gateway.adminTokenFile" . | toJson }}
open_paths = {{ $c.admin.open_paths | toJson }}

[log]
format = {{ $c.log.format | toJson }}
level = {{ $c.log.level | toJson }}
{{- end }}
