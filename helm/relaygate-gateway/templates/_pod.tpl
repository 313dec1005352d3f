{{/*
The gateway's pod template: the Deployment's (one gateway) and the StatefulSet's (fleet.enabled).
*/}}
{{- define "relaygate-gateway.podTemplate" -}}
{{- $secret := include "relaygate-gateway.secretName" . }}
{{- $optionalKeys := not (empty .Values.secrets.existingSecret) }}
{{- $fleet := .Values.fleet.enabled }}
{{- $etcdItems := include "relaygate-gateway.etcdItems" . | fromJsonArray -}}
metadata:
  labels:
    {{- include "relaygate-gateway.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "relaygate-gateway.configChecksum" . }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "relaygate-gateway.serviceAccountName" . }}
  automountServiceAccountToken: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .Values.hostNetwork }}
  hostNetwork: true
  dnsPolicy: ClusterFirstWithHostNet
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . | quote }}
  {{- end }}
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: gateway
      image: {{ include "relaygate-gateway.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["run"]
      env:
        {{- if $fleet }}
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        # Each replica reads its own file (its own advertise addresses): <pod name>.toml. Read by every
        # subcommand, so `kubectl exec <pod> -- relaygate-gateway token` (or peer-id) sees that replica's.
        - name: RELAYGATE_CONFIG
          value: /etc/relaygate/config/$(POD_NAME).toml
        {{- else }}
        # Read by every subcommand, so `kubectl exec ... -- relaygate-gateway token` (or peer-id)
        # sees the same configuration as the running gateway.
        - name: RELAYGATE_CONFIG
          value: /etc/relaygate/gateway.toml
        {{- end }}
        # Wins over the image's RELAYGATE_DATA_DIR (the environment beats the config file).
        - name: RELAYGATE_DATA_DIR
          value: {{ .Values.config.data_dir | quote }}
        {{- if include "relaygate-gateway.identityFromSecret" . }}
        - name: RELAYGATE_IDENTITY__KEY
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: identity-key
              optional: {{ $optionalKeys }}
        {{- end }}
        {{- if include "relaygate-gateway.joinTokenInline" . }}
        # On etcd the join token is given inline, not as a file (see joinTokenMounted in _helpers.tpl).
        - name: RELAYGATE_ADMISSION__TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: join-token
              optional: {{ $optionalKeys }}
        {{- end }}
        {{- if include "relaygate-gateway.etcdEndpointsFromSecret" . }}
        # Comma-separated; wins over store.etcd.endpoints of the config file.
        - name: RELAYGATE_STORE__ETCD__ENDPOINTS
          valueFrom:
            secretKeyRef:
              name: {{ .Values.secrets.etcd.existingSecret }}
              key: {{ .Values.secrets.etcd.keys.endpoints }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        {{- range (include "relaygate-gateway.listenPorts" . | fromJsonArray) }}
        - name: p2p-{{ lower .protocol }}-{{ int .port }}
          containerPort: {{ int .port }}
          protocol: {{ .protocol }}
        {{- end }}
        {{- if .Values.config.udp.enabled }}
        # UDP tunnels' datagram channel (config.udp.listen). Leased ports are bound at run time and
        # need no container port: Services and the NetworkPolicy name them by number.
        - name: udp-channel
          containerPort: {{ include "relaygate-gateway.channelPort" . | int }}
          protocol: UDP
        {{- end }}
        - name: admin
          containerPort: {{ include "relaygate-gateway.adminPort" . | int }}
          protocol: TCP
      {{- $probeHost := include "relaygate-gateway.adminLoopback" . }}
      startupProbe:
        httpGet:
          path: /health/ready
          port: admin
          {{- if $probeHost }}
          host: 127.0.0.1
          {{- end }}
        periodSeconds: {{ .Values.probes.startup.periodSeconds }}
        failureThreshold: {{ .Values.probes.startup.failureThreshold }}
      livenessProbe:
        httpGet:
          path: /health/live
          port: admin
          {{- if $probeHost }}
          host: 127.0.0.1
          {{- end }}
        periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
        failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
      readinessProbe:
        httpGet:
          path: /health/ready
          port: admin
          {{- if $probeHost }}
          host: 127.0.0.1
          {{- end }}
        periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
        failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      volumeMounts:
        {{- if $fleet }}
        - name: config
          mountPath: /etc/relaygate/config
          readOnly: true
        {{- else }}
        - name: config
          mountPath: /etc/relaygate/gateway.toml
          subPath: gateway.toml
          readOnly: true
        {{- end }}
        - name: secret
          mountPath: {{ include "relaygate-gateway.adminTokenFile" . | dir }}
          readOnly: true
        {{- if $etcdItems }}
        - name: etcd
          mountPath: {{ include "relaygate-gateway.etcdDir" . }}
          readOnly: true
        {{- end }}
        - name: data
          mountPath: {{ .Values.persistence.mountPath }}
  volumes:
    - name: config
      configMap:
        name: {{ include "relaygate-gateway.fullname" . }}
    {{- if include "relaygate-gateway.etcd" . }}
    # admin.token_file (the join token, on etcd, is the environment variable above).
    {{- else }}
    # admin.token_file, and admission.token_file when the join token comes from the Secret
    # (files, not environment variables: `relaygate-gateway token` then prints the right token).
    {{- end }}
    - name: secret
      secret:
        secretName: {{ $secret }}
        defaultMode: 0440
        items:
          - key: admin-token
            path: {{ include "relaygate-gateway.adminTokenFile" . | base }}
          {{- if include "relaygate-gateway.joinTokenMounted" . }}
          - key: join-token
            path: {{ include "relaygate-gateway.joinTokenFile" . | base }}
          {{- end }}
    {{- if $etcdItems }}
    # store.etcd.ca / cert / key / password_file. 0440: the files belong to root and the pod's fsGroup
    # (the gateway's group); 0400 would leave them readable by root only.
    - name: etcd
      secret:
        secretName: {{ .Values.secrets.etcd.existingSecret }}
        defaultMode: 0440
        items:
          {{- toYaml $etcdItems | nindent 10 }}
    {{- end }}
    {{- if not (and $fleet .Values.persistence.enabled) }}
    - name: data
      {{- if .Values.persistence.enabled }}
      persistentVolumeClaim:
        claimName: {{ default (include "relaygate-gateway.fullname" .) .Values.persistence.existingClaim }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (include "relaygate-gateway.affinity" .) }}
  affinity:
    {{- . | nindent 4 }}
  {{- end }}
{{- end }}
