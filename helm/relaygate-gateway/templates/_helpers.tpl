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

{{/* "true" when leases live in etcd (a fleet, or one gateway of a fleet run elsewhere). */}}
{{- define "relaygate-gateway.etcd" -}}
{{- if eq (toString .Values.config.store.kind) "etcd" }}true{{ end }}
{{- end }}

{{/* Where secrets.etcd.existingSecret is mounted; files are named as in a TLS Secret, whatever its keys. */}}
{{- define "relaygate-gateway.etcdDir" -}}
/etc/relaygate/etcd
{{- end }}

{{/* "true" when the etcd endpoints come from the Secret (secrets.etcd.keys.endpoints). */}}
{{- define "relaygate-gateway.etcdEndpointsFromSecret" -}}
{{- if and (include "relaygate-gateway.etcd" .) .Values.secrets.etcd.existingSecret .Values.secrets.etcd.keys.endpoints }}true{{ end }}
{{- end }}

{{/*
The files of secrets.etcd.existingSecret the gateway reads, as a JSON list of Secret volume items
({"key": <Secret key>, "path": <file under etcdDir>}): the CA (TLS on), the client certificate and key
(only with the CA: without it the gateway ignores them), the password (with config.store.etcd.user).
*/}}
{{- define "relaygate-gateway.etcdItems" -}}
{{- $items := list }}
{{- $k := .Values.secrets.etcd.keys }}
{{- if and (include "relaygate-gateway.etcd" .) .Values.secrets.etcd.existingSecret }}
{{- if $k.ca }}
{{- $items = append $items (dict "key" $k.ca "path" "ca.crt") }}
{{- if and $k.cert $k.key }}
{{- $items = append $items (dict "key" $k.cert "path" "tls.crt") }}
{{- $items = append $items (dict "key" $k.key "path" "tls.key") }}
{{- end }}
{{- end }}
{{- if and .Values.config.store.etcd.user $k.password }}
{{- $items = append $items (dict "key" $k.password "path" "password") }}
{{- end }}
{{- end }}
{{- toJson $items }}
{{- end }}

{{/*
How the join token from the Secret reaches the gateway. Embedded store: a file (admission.token_file) on
the Secret's read-only mount. etcd: inline (admission.token, RELAYGATE_ADMISSION__TOKEN from the Secret),
because a gateway on etcd adopts the fleet's token when etcd holds another one and rewrites its token
file with it, which fails on a read-only mount; an inline token is kept and only published when etcd
holds none (gateway/src/fleet/token.rs).
*/}}
{{- define "relaygate-gateway.joinTokenMounted" -}}
{{- if and (include "relaygate-gateway.hasJoinToken" .) (not (include "relaygate-gateway.etcd" .)) }}true{{ end }}
{{- end }}
{{- define "relaygate-gateway.joinTokenInline" -}}
{{- if and (include "relaygate-gateway.hasJoinToken" .) (include "relaygate-gateway.etcd" .) }}true{{ end }}
{{- end }}

{{/* "true" when identity.key comes from the Secret: never for a fleet of several (one key each). */}}
{{- define "relaygate-gateway.identityFromSecret" -}}
{{- if and (or .Values.secrets.existingSecret .Values.secrets.identityKey) (not (and .Values.fleet.enabled (gt (int .Values.fleet.replicas) 1))) }}true{{ end }}
{{- end }}

{{/* The pod (and per-replica Service) name of replica N: (dict "root" $ "ordinal" N). */}}
{{- define "relaygate-gateway.replicaName" -}}
{{- printf "%s-%d" (include "relaygate-gateway.fullname" .root) (int .ordinal) }}
{{- end }}

{{/*
Replica N's advertise addresses as a JSON list: fleet.perReplica[N].advertise if given, else
config.advertise with "{ordinal}" replaced by N. (dict "root" $ "ordinal" N)
*/}}
{{- define "relaygate-gateway.advertiseFor" -}}
{{- $root := .root }}
{{- $i := int .ordinal }}
{{- $out := list }}
{{- $per := $root.Values.fleet.perReplica | default list }}
{{- if and (lt $i (len $per)) (index $per $i).advertise }}
{{- $out = (index $per $i).advertise }}
{{- else }}
{{- range $root.Values.config.advertise }}
{{- $out = append $out (replace "{ordinal}" (toString $i) .) }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* Pod affinity: .Values.affinity, plus in a fleet an anti-affinity spreading the replicas over nodes. */}}
{{- define "relaygate-gateway.affinity" -}}
{{- $a := deepCopy (default (dict) .Values.affinity) }}
{{- $mode := toString .Values.fleet.podAntiAffinity }}
{{- if and .Values.fleet.enabled (not (hasKey $a "podAntiAffinity")) (ne $mode "none") }}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (include "relaygate-gateway.selectorLabels" . | fromYaml)) }}
{{- if eq $mode "required" }}
{{- $_ := set $a "podAntiAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (list $term)) }}
{{- else }}
{{- $_ := set $a "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" 100 "podAffinityTerm" $term))) }}
{{- end }}
{{- end }}
{{- if $a }}
{{- toYaml $a }}
{{- end }}
{{- end }}

{{/* Checks that cannot be written in values.schema.json; included by the workload. */}}
{{- define "relaygate-gateway.validate" -}}
{{- if and (include "relaygate-gateway.adminLoopback" .) (not .Values.hostNetwork) }}
{{- fail "config.admin.listen on loopback works only with hostNetwork: true (the kubelet probes the pod's address)" }}
{{- end }}
{{- if not (hasPrefix (trimSuffix "/" .Values.persistence.mountPath) .Values.config.data_dir) }}
{{- fail (printf "config.data_dir %s must lie under persistence.mountPath %s" .Values.config.data_dir .Values.persistence.mountPath) }}
{{- end }}
{{- $etcd := include "relaygate-gateway.etcd" . }}
{{- $replicas := int .Values.fleet.replicas }}
{{- if and (gt $replicas 1) (not .Values.fleet.enabled) }}
{{- fail (printf "fleet.replicas=%d needs fleet.enabled=true (a StatefulSet, one volume per replica) and config.store.kind=etcd: one Deployment runs one gateway" $replicas) }}
{{- end }}
{{- if and .Values.fleet.enabled (not $etcd) }}
{{- fail (printf "fleet.enabled with config.store.kind=%s: %d replicas on the embedded store would each keep their own leases and hand out the same ports twice. Set config.store.kind=etcd and config.store.etcd.endpoints (docs/fleet.md)" (toString .Values.config.store.kind) $replicas) }}
{{- end }}
{{- if $etcd }}
{{- $e := .Values.config.store.etcd }}
{{- $s := .Values.secrets.etcd }}
{{- if not (or $e.endpoints (include "relaygate-gateway.etcdEndpointsFromSecret" .)) }}
{{- fail "config.store.kind=etcd needs config.store.etcd.endpoints, or secrets.etcd.existingSecret with secrets.etcd.keys.endpoints" }}
{{- end }}
{{- if and $e.user (not (and $s.existingSecret $s.keys.password)) }}
{{- fail "config.store.etcd.user needs its password from a Secret: secrets.etcd.existingSecret and secrets.etcd.keys.password" }}
{{- end }}
{{- if $s.existingSecret }}
{{- if ne (empty $s.keys.cert) (empty $s.keys.key) }}
{{- fail "secrets.etcd.keys.cert and secrets.etcd.keys.key go together (the client certificate and its key); set both or neither" }}
{{- end }}
{{- if and $s.keys.cert (not $s.keys.ca) }}
{{- fail "secrets.etcd.keys.cert needs secrets.etcd.keys.ca: the gateway speaks TLS to etcd, and presents a client certificate, only with the CA" }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.fleet.enabled }}
{{- if and (gt $replicas 1) .Values.secrets.identityKey }}
{{- fail (printf "secrets.identityKey with fleet.replicas=%d: every replica would have the same peer id. Leave it empty: each replica creates identity.key on its own volume" $replicas) }}
{{- end }}
{{- if .Values.persistence.existingClaim }}
{{- fail "persistence.existingClaim with fleet.enabled: each replica needs its own volume (its identity); the StatefulSet creates data-<name>-<N>" }}
{{- end }}
{{- $seen := dict }}
{{- range $i := until $replicas }}
{{- $adv := include "relaygate-gateway.advertiseFor" (dict "root" $ "ordinal" $i) | fromJsonArray }}
{{- if and (not $adv) (not $.Values.hostNetwork) }}
{{- fail (printf "replica %d has no advertise address: a fleet tells agents each gateway's advertise addresses (without them, its pod IP). Put {ordinal} in config.advertise (/dns4/gw-{ordinal}.example.com/tcp/4001) or list fleet.perReplica[%d].advertise" $i $i) }}
{{- end }}
{{- $key := toJson $adv }}
{{- if and $adv (hasKey $seen $key) }}
{{- fail (printf "replicas %s and %d advertise the same addresses %s: a dial names one gateway's peer id, so each replica needs its own address. Put {ordinal} in config.advertise or list fleet.perReplica[N].advertise" (get $seen $key) $i $key) }}
{{- end }}
{{- $_ := set $seen $key (toString $i) }}
{{- end }}
{{- else }}
{{- range .Values.config.advertise }}
{{- if contains "{ordinal}" . }}
{{- fail (printf "config.advertise %q: {ordinal} is replaced only with fleet.enabled" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.config.udp.enabled }}
{{- $ch := include "relaygate-gateway.channelPort" . | int }}
{{- range (include "relaygate-gateway.listenPorts" . | fromJsonArray) }}
{{- if and (eq .protocol "UDP") (eq (int .port) $ch) }}
{{- fail (printf "config.udp.listen port %d is also a UDP port of config.listen: the datagram channel needs a port of its own (4002 by default)" $ch) }}
{{- end }}
{{- end }}
{{- end }}
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
The UDP tunnels' datagram channel (config.udp): its port in the pod, from config.udp.listen
("0.0.0.0:4002", "[::]:4002"), and its public port: config.udp.advertise_port, else the same. The Service
listens on the public port (with NodePort: the node port) and forwards to the pod's.
*/}}
{{- define "relaygate-gateway.channelPort" -}}
{{- regexFind "[0-9]+$" .Values.config.udp.listen }}
{{- end }}
{{- define "relaygate-gateway.channelPublicPort" -}}
{{- default (include "relaygate-gateway.channelPort" . | int) (.Values.config.udp.advertise_port | int) }}
{{- end }}

{{/*
The udp.advertise_port a config file tells agents, or "" for the gateway's own default (listen's port):
(dict "root" $ ["ordinal" N]). A fleet's replica N behind NodePort Services: the public port + N, its
Service's node port (node ports are unique in the cluster, see service.yaml).
*/}}
{{- define "relaygate-gateway.channelAdvertisePortFor" -}}
{{- $v := .root.Values }}
{{- if and (hasKey . "ordinal") $v.fleet.enabled $v.service.enabled (eq $v.service.type "NodePort") }}
{{- add (include "relaygate-gateway.channelPublicPort" .root | int) .ordinal }}
{{- else if $v.config.udp.advertise_port }}
{{- $v.config.udp.advertise_port | int }}
{{- end }}
{{- end }}

{{/*
The protocols of leased ports as a JSON list ("TCP", "UDP"): service.leaseProtocols, without UDP while
config.udp.enabled is false (the gateway then binds leases on TCP only).
*/}}
{{- define "relaygate-gateway.leaseProtocols" -}}
{{- $out := list }}
{{- range .Values.service.leaseProtocols }}
{{- $p := upper (toString .) }}
{{- if and (or (ne $p "UDP") $.Values.config.udp.enabled) (not (has $p $out)) }}
{{- $out = append $out $p }}
{{- end }}
{{- end }}
{{- if not $out }}
{{- fail "service.leaseProtocols is [UDP] with config.udp.enabled false: no leased port would be published. Add TCP" }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
Lease ports as a JSON list of numbers: service.leasePorts if given, else every port of
config.leases.port_range and config.leases.allowed_ports. Entries are numbers or "LOW-HIGH".
Each is one Service entry per lease protocol: service.maxPorts bounds ports times protocols.
*/}}
{{- define "relaygate-gateway.leasePorts" -}}
{{- $protos := include "relaygate-gateway.leaseProtocols" . | fromJsonArray }}
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
{{- if gt (mul (add (sub $high $low) 1 (len $ports)) (len $protos)) (int $.Values.service.maxPorts) }}
{{- fail (printf "%s: more than service.maxPorts (%d) lease entries; each port is one Service entry per protocol (%s). Narrow config.leases.port_range, list the ports in service.leasePorts, drop UDP from service.leaseProtocols if no tunnel carries it, or use hostNetwork" $s (int $.Values.service.maxPorts) (join "+" $protos)) }}
{{- end }}
{{- range $p := untilStep $low (int (add $high 1)) 1 }}
{{- if not (has $p $ports) }}
{{- $ports = append $ports $p }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $ports }}
{{- end }}

{{/*
What to open in a firewall (NOTES.txt): the libp2p ports, the datagram channel, and the lease ranges on
each lease protocol, e.g. "TCP 4001, UDP 4001, UDP 4002 (datagram channel), TCP+UDP 20000-20009".
*/}}
{{- define "relaygate-gateway.firewall" -}}
{{- $out := list }}
{{- range (include "relaygate-gateway.listenPorts" . | fromJsonArray) }}
{{- $out = append $out (printf "%s %d" .protocol (int .port)) }}
{{- end }}
{{- if .Values.config.udp.enabled }}
{{- $out = append $out (printf "UDP %d (datagram channel)" (include "relaygate-gateway.channelPublicPort" . | int)) }}
{{- end }}
{{- $p := join "+" (include "relaygate-gateway.leaseProtocols" . | fromJsonArray) }}
{{- range (prepend .Values.config.leases.allowed_ports .Values.config.leases.port_range) }}
{{- $out = append $out (printf "%s %s" $p (toString .)) }}
{{- end }}
{{- join ", " $out }}
{{- end }}

{{/* The gateway's config file (one gateway, or a fleet's with this chart's advertise list). */}}
{{- define "relaygate-gateway.config" -}}
{{- include "relaygate-gateway.configFor" (dict "root" . "advertise" .Values.config.advertise) }}
{{- end }}

{{/* Replica N's config file in fleet mode: (dict "root" $ "ordinal" N). */}}
{{- define "relaygate-gateway.replicaConfig" -}}
{{- $adv := include "relaygate-gateway.advertiseFor" . | fromJsonArray }}
{{- include "relaygate-gateway.configFor" (dict "root" .root "advertise" $adv "ordinal" .ordinal) }}
{{- end }}

{{/* What the pod annotation checksums: every config file the ConfigMap holds. */}}
{{- define "relaygate-gateway.configChecksum" -}}
{{- if .Values.fleet.enabled }}
{{- $all := list }}
{{- range $i := until (int .Values.fleet.replicas) }}
{{- $all = append $all (include "relaygate-gateway.replicaConfig" (dict "root" $ "ordinal" $i)) }}
{{- end }}
{{- join "\n" $all | sha256sum }}
{{- else }}
{{- include "relaygate-gateway.config" . | sha256sum }}
{{- end }}
{{- end }}

{{/* Keys are the README's. (dict "root" $ "advertise" LIST) */}}
{{- define "relaygate-gateway.configFor" -}}
{{- $root := .root -}}
{{- $c := $root.Values.config -}}
# Rendered by the relaygate-gateway chart; keys as in the README's configuration table.
data_dir = {{ $c.data_dir | toJson }}
listen = {{ $c.listen | toJson }}
advertise = {{ .advertise | toJson }}
shutdown_grace = {{ $c.shutdown_grace | toJson }}

[admission]
allow = {{ $c.admission.allow | toJson }}
tokens = {{ $c.admission.tokens }}
{{- if include "relaygate-gateway.joinTokenMounted" $root }}
token_file = {{ include "relaygate-gateway.joinTokenFile" $root | toJson }}
{{- end }}

[leases]
port_range = {{ $c.leases.port_range | toString | toJson }}
allowed_ports = {{ $c.leases.allowed_ports | toStrings | toJson }}
max_tunnels_per_agent = {{ $c.leases.max_tunnels_per_agent | int }}
{{- if include "relaygate-gateway.etcd" $root }}
{{- $e := $c.store.etcd }}
{{- $keys := $root.Values.secrets.etcd.keys }}
{{- $dir := include "relaygate-gateway.etcdDir" $root }}

[store]
kind = "etcd"

[store.etcd]
{{- if include "relaygate-gateway.etcdEndpointsFromSecret" $root }}
# From the Secret instead (RELAYGATE_STORE__ETCD__ENDPOINTS, which wins over this file).
{{- end }}
endpoints = {{ $e.endpoints | toJson }}
prefix = {{ $e.prefix | toJson }}
timeout = {{ $e.timeout | toJson }}
member_ttl = {{ $e.member_ttl | toJson }}
{{- if $root.Values.secrets.etcd.existingSecret }}
{{- if $keys.ca }}
ca = {{ printf "%s/ca.crt" $dir | toJson }}
{{- end }}
{{- if and $keys.cert $keys.key }}
cert = {{ printf "%s/tls.crt" $dir | toJson }}
key = {{ printf "%s/tls.key" $dir | toJson }}
{{- end }}
{{- end }}
{{- if $e.user }}
user = {{ $e.user | toJson }}
password_file = {{ printf "%s/password" $dir | toJson }}
{{- end }}

[fleet]
advertise = {{ $c.fleet.advertise | toJson }}
forward = {{ $c.fleet.forward }}
{{- end }}

[proxy_protocol]
trusted = {{ $c.proxy_protocol.trusted | toJson }}
required = {{ $c.proxy_protocol.required }}

[udp]
enabled = {{ $c.udp.enabled }}
listen = {{ $c.udp.listen | toJson }}
{{- with include "relaygate-gateway.channelAdvertisePortFor" . }}
advertise_port = {{ . }}
{{- end }}
idle_timeout = {{ $c.udp.idle_timeout | toJson }}
handshake_timeout = {{ $c.udp.handshake_timeout | toJson }}
max_flows = {{ $c.udp.max_flows | int }}
max_flows_per_tunnel = {{ $c.udp.max_flows_per_tunnel | int }}
max_flows_per_source = {{ $c.udp.max_flows_per_source | int }}
max_unvalidated_per_tunnel = {{ $c.udp.max_unvalidated_per_tunnel | int }}
new_flows_per_second = {{ $c.udp.new_flows_per_second | int }}
new_flows_burst = {{ $c.udp.new_flows_burst | int }}

[session]
keepalive = {{ $c.session.keepalive | toJson }}
timeout = {{ $c.session.timeout | toJson }}
max_streams = {{ $c.session.max_streams | int }}

[admin]
listen = {{ $c.admin.listen | toJson }}
token_file = {{ include "relaygate-gateway.adminTokenFile" $root | toJson }}
open_paths = {{ $c.admin.open_paths | toJson }}

[log]
format = {{ $c.log.format | toJson }}
level = {{ $c.log.level | toJson }}
{{- end }}
