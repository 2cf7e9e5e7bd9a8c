{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "rlhf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every resource name: "<release>-<chart>", or the release name when it
already contains the chart name. Truncated so that suffixes like "-schedule" fit. */}}
{{- define "rlhf.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Standard labels (app.kubernetes.io/*); pass (dict "ctx" $ "component" "mlflow"). */}}
{{- define "rlhf.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "rlhf.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: rlhf-pipeline
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "rlhf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlhf.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Image reference; pass (dict "ctx" $ "override" .Values.mlflow.image) or (dict "ctx" $). */}}
{{- define "rlhf.image" -}}
{{- $override := .override | default dict -}}
{{- $repo := $override.repository | default .ctx.Values.image.repository -}}
{{- $tag := $override.tag | default .ctx.Values.image.tag | default .ctx.Chart.AppVersion -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "rlhf.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "rlhf.fullname" .) -}}
{{- end -}}

{{- define "rlhf.mlflow.serviceAccountName" -}}
{{- .Values.mlflow.serviceAccount.name | default (include "rlhf.mlflow.fullname" .) -}}
{{- end -}}

{{- define "rlhf.schedule.serviceAccountName" -}}
{{- .Values.schedule.serviceAccount.name | default (printf "%s-schedule" (include "rlhf.fullname" .)) -}}
{{- end -}}

{{- define "rlhf.pipelineRunner.serviceAccountName" -}}
{{- .Values.pipelineRunner.serviceAccount.name | default (printf "%s-pipeline-runner" (include "rlhf.fullname" .)) -}}
{{- end -}}

{{/* In-cluster URL of the MLflow server. */}}
{{- define "rlhf.mlflow.url" -}}
{{- printf "http://%s.%s.svc.%s:%d" (include "rlhf.mlflow.fullname" .) .Release.Namespace .Values.mlflow.clusterDomain (int .Values.mlflow.service.port) -}}
{{- end -}}

{{/* Name of the Secret of MLflow's admin login and Flask key: the user's, or the one the
chart generates. */}}
{{- define "rlhf.mlflow.authSecretName" -}}
{{- .Values.mlflow.auth.existingSecret | default (printf "%s-auth" (include "rlhf.mlflow.fullname" .)) -}}
{{- end -}}

{{/* Name of the ConfigMap of the chart's basic_auth.ini (generated Secret only). */}}
{{- define "rlhf.mlflow.authConfigMapName" -}}
{{- printf "%s-auth" (include "rlhf.mlflow.fullname" .) -}}
{{- end -}}

{{/* Where the basic-auth app's users database is, checked: "secret" (the URL in
mlflow.auth.database.existingSecret), "sqlite" (a file on an emptyDir of each pod), or
"ini" (an existing auth Secret's basic_auth.ini names it). "" with auth off. */}}
{{- define "rlhf.mlflow.authDatabase" -}}
{{- $a := .Values.mlflow.auth -}}
{{- if and .Values.mlflow.enabled $a.enabled -}}
{{- if $a.existingSecret -}}
{{- if $a.database.existingSecret -}}
{{- fail (printf "mlflow.auth.database.existingSecret (%s) is used with the generated auth Secret only: the basic_auth.ini of mlflow.auth.existingSecret (%s, key %s) names its own database_uri; set one of the two" $a.database.existingSecret $a.existingSecret $a.configKey) -}}
{{- end -}}
ini
{{- else if $a.database.existingSecret -}}
secret
{{- else -}}
{{- if gt (int .Values.mlflow.replicas) 1 -}}
{{- fail (printf "mlflow.auth: the users database is a sqlite file in each MLflow pod (mlflow.auth.database.existingSecret is empty), so mlflow.replicas=%d would give every replica its own users and passwords. Set mlflow.replicas to 1, or mlflow.auth.database.existingSecret to a Secret holding the URL of a shared database (PostgreSQL, MySQL), or mlflow.auth.existingSecret to a Secret whose basic_auth.ini names one" (int .Values.mlflow.replicas)) -}}
{{- end -}}
sqlite
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Directory of the per-pod sqlite users database (an emptyDir). */}}
{{- define "rlhf.mlflow.authDbDir" -}}/var/lib/mlflow-auth{{- end -}}

{{/* The basic-auth app's ini as the chart renders it (generated Secret only): no
password in it, the admin's comes from MLFLOW_AUTH_ADMIN_PASSWORD. With a database
Secret, database_uri is left out and written at start by the auth-config init container. */}}
{{- define "rlhf.mlflow.authIni" -}}
{{- $a := .Values.mlflow.auth -}}
[mlflow]
default_permission = {{ $a.defaultPermission }}
{{- if eq (include "rlhf.mlflow.authDatabase" .) "sqlite" }}
database_uri = sqlite:///{{ include "rlhf.mlflow.authDbDir" . }}/basic_auth.db
{{- end }}
admin_username = {{ $a.adminUsername }}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
{{- end -}}

{{/* The data of the generated auth Secret: the admin user from the values; the password
and Flask key of `existing` (the Secret as `lookup` finds it on an upgrade) when it has
them, else new random ones. Pass (dict "ctx" $ "existing" (lookup ...)). */}}
{{- define "rlhf.mlflow.authSecretData" -}}
{{- $a := .ctx.Values.mlflow.auth -}}
{{- $old := (.existing | default dict).data | default dict -}}
{{ $a.adminUsernameKey }}: {{ b64enc $a.adminUsername }}
{{ $a.adminPasswordKey }}: {{ get $old $a.adminPasswordKey | default (randAlphaNum 32 | b64enc) }}
{{ $a.flaskSecretKeyKey }}: {{ get $old $a.flaskSecretKeyKey | default (randAlphaNum 64 | b64enc) }}
{{- end -}}

{{/* The MLflow login the chart gives the steps, as a profile `secrets` entry (JSON; {}
when this release's MLflow has no auth): the admin's keys of the auth Secret. */}}
{{- define "rlhf.mlflow.loginSecret" -}}
{{- $a := .Values.mlflow.auth -}}
{{- if and .Values.mlflow.enabled $a.enabled -}}
{{- dict "name" (include "rlhf.mlflow.authSecretName" .) "env" (dict "MLFLOW_TRACKING_USERNAME" $a.adminUsernameKey "MLFLOW_TRACKING_PASSWORD" $a.adminPasswordKey) | toJson -}}
{{- else -}}
{}
{{- end -}}
{{- end -}}

{{/* `--allowed-hosts` of the MLflow server: setting it replaces MLflow's defaults
(localhost, private IPs), so those are listed again, then the Service's names, then the
user's extra hosts. */}}
{{- define "rlhf.mlflow.allowedHosts" -}}
{{- $svc := include "rlhf.mlflow.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $hosts := list "localhost" "localhost:*" "127.0.0.1" "127.0.0.1:*" "10.*" "192.168.*" -}}
{{- range $i := untilStep 16 32 1 -}}
{{- $hosts = append $hosts (printf "172.%d.*" $i) -}}
{{- end -}}
{{- range $name := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns $.Values.mlflow.clusterDomain) -}}
{{- $hosts = append $hosts $name -}}
{{- $hosts = append $hosts (printf "%s:*" $name) -}}
{{- end -}}
{{- concat $hosts .Values.mlflow.allowedHosts | uniq | join "," -}}
{{- end -}}

{{/* Pod-level security context shared by every pod. */}}
{{- define "rlhf.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security context shared by every container. */}}
{{- define "rlhf.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Writable scratch for a read-only root filesystem: /tmp and $HOME (caches). On the
MLflow server /tmp holds the artifacts that pass through it, each whole for the time of
its request: only files under the clients' 64 MiB multipart threshold (larger ones go
straight to S3 through presigned URLs), so 2Gi is some 30 concurrent transfers. */}}
{{- define "rlhf.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 2Gi
- name: home
  emptyDir:
    sizeLimit: 1Gi
{{- end -}}

{{- define "rlhf.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/rlhf
{{- end -}}

{{- define "rlhf.scratchEnv" -}}
- name: HOME
  value: /home/rlhf
- name: XDG_CACHE_HOME
  value: /home/rlhf/.cache
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: TMPDIR
  value: /tmp
{{- end -}}

{{/* S3 endpoint, region and credentials (secretKeyRef, never a literal). */}}
{{- define "rlhf.s3Env" -}}
{{- with .Values.s3.endpoint }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.credentials.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.credentials.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.credentials.secretAccessKeyKey }}
{{- end }}
{{- end -}}

{{/* Name of the ConfigMap the chart renders the inline schedule profile into. */}}
{{- define "rlhf.schedule.profileConfigMap" -}}
{{- printf "%s-schedule-profile" (include "rlhf.fullname" .) -}}
{{- end -}}

{{/* Where the compile init container sees the profile (one file, whatever the key). */}}
{{- define "rlhf.schedule.profileDir" -}}/etc/rlhf/profile{{- end -}}

{{/* The schedule's profile source, checked: "inline" or "configMap". A scheduled run
without a profile would have no GPUs, node pools or credentials, so there is no
profile-less schedule. */}}
{{- define "rlhf.schedule.profileSource" -}}
{{- $p := .Values.schedule.profile -}}
{{- $cm := $p.existingConfigMap.name -}}
{{- if and $p.inline $cm -}}
{{- fail "schedule.profile: set either inline or existingConfigMap.name, not both" -}}
{{- else if $p.inline -}}
inline
{{- else if $cm -}}
{{- if $p.secrets -}}
{{- fail (printf "schedule.profile.secrets is added to the inline profile only: list those Secrets under `secrets` in the profile of ConfigMap %s" $cm) -}}
{{- end -}}
configMap
{{- else -}}
{{- fail "schedule.profile: the scheduled pipeline needs a cluster profile (GPUs, node selectors, tolerations, /dev/shm, S3 and MLflow Secrets): set schedule.profile.inline to a profile mapping (see profiles/*.yaml) or schedule.profile.existingConfigMap.name to a ConfigMap holding one" -}}
{{- end -}}
{{- end -}}

{{/* The `secrets` of the inline schedule profile (JSON list): the profile's own, then
schedule.profile.secrets, then, when neither gives MLFLOW_TRACKING_USERNAME or
MLFLOW_TRACKING_PASSWORD (nor `env` the username), this release's MLflow login. */}}
{{- define "rlhf.schedule.profileSecrets" -}}
{{- $inline := .Values.schedule.profile.inline -}}
{{- $secrets := concat ($inline.secrets | default list) .Values.schedule.profile.secrets -}}
{{- $given := hasKey ($inline.env | default dict) "MLFLOW_TRACKING_USERNAME" -}}
{{- range $secrets -}}
{{- if or (hasKey .env "MLFLOW_TRACKING_USERNAME") (hasKey .env "MLFLOW_TRACKING_PASSWORD") -}}{{- $given = true -}}{{- end -}}
{{- end -}}
{{- $login := include "rlhf.mlflow.loginSecret" . | fromJson -}}
{{- if and $login (not $given) -}}
{{- $secrets = append $secrets $login -}}
{{- end -}}
{{- $secrets | default list | toJson -}}
{{- end -}}

{{/* The MLflow login of the schedule Job's containers, as env entries: the one the steps
get (an inline profile's secrets), or this release's (a ConfigMap profile, which the
chart does not read). */}}
{{- define "rlhf.schedule.loginEnv" -}}
{{- $secrets := list -}}
{{- if eq (include "rlhf.schedule.profileSource" .) "inline" -}}
{{- $secrets = include "rlhf.schedule.profileSecrets" . | fromJsonArray -}}
{{- else -}}
{{- with include "rlhf.mlflow.loginSecret" . | fromJson -}}
{{- $secrets = list . -}}
{{- end -}}
{{- end -}}
{{- range $s := $secrets -}}
{{- range $var := list "MLFLOW_TRACKING_USERNAME" "MLFLOW_TRACKING_PASSWORD" -}}
{{- if hasKey $s.env $var }}
- name: {{ $var }}
  valueFrom:
    secretKeyRef:
      name: {{ $s.name }}
      key: {{ get $s.env $var }}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The inline schedule profile as a YAML file: the user's mapping, then what the chart
knows and the profile leaves unset (service account, user, pull secrets, this release's
MLflow URL), and schedule.profile.secrets (and the MLflow login) appended to its
`secrets`. */}}
{{- define "rlhf.schedule.inlineProfile" -}}
{{- $p := deepCopy .Values.schedule.profile.inline -}}
{{- $secrets := include "rlhf.schedule.profileSecrets" . | fromJsonArray -}}
{{- $_ := set $p "secrets" $secrets -}}
{{- if not (hasKey $p "service_account") -}}
{{- $_ := set $p "service_account" (include "rlhf.pipelineRunner.serviceAccountName" .) -}}
{{- end -}}
{{- if not (hasKey $p "run_as_user") -}}
{{- $_ := set $p "run_as_user" (int .Values.podSecurity.runAsUser) -}}
{{- end -}}
{{- if and .Values.imagePullSecrets (not (hasKey $p "image_pull_secrets")) -}}
{{- $_ := set $p "image_pull_secrets" .Values.imagePullSecrets -}}
{{- end -}}
{{- if .Values.mlflow.enabled -}}
{{- $env := deepCopy ($p.env | default dict) -}}
{{- $given := hasKey $env "MLFLOW_TRACKING_URI" -}}
{{- range $secrets -}}
{{- if hasKey .env "MLFLOW_TRACKING_URI" -}}{{- $given = true -}}{{- end -}}
{{- end -}}
{{- if not $given -}}
{{- $_ := set $env "MLFLOW_TRACKING_URI" (include "rlhf.mlflow.url" .) -}}
{{- $_ := set $p "env" $env -}}
{{- end -}}
{{- end -}}
{{- toYaml $p -}}
{{- end -}}

{{/* API version of the step pods' MutatingAdmissionPolicy, or "" when none is rendered
(stepPodSecurity.admissionPolicy.enabled: auto picks the served version, GA first). */}}
{{- define "rlhf.stepPolicy.apiVersion" -}}
{{- $p := .Values.stepPodSecurity.admissionPolicy -}}
{{- if eq (toString $p.enabled) "true" -}}
{{- $p.apiVersion -}}
{{- else if eq (toString $p.enabled) "auto" -}}
{{- if .Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy" -}}
admissionregistration.k8s.io/v1
{{- else if .Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1beta1/MutatingAdmissionPolicy" -}}
admissionregistration.k8s.io/v1beta1
{{- end -}}
{{- end -}}
{{- end -}}
