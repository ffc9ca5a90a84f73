#!/bin/bash
# Health check for TensorFlow Serving that needs nothing but bash: the tensorflow/serving
# image is ubuntu:22.04 plus ca-certificates, with no curl or wget.
#
#   healthcheck.sh [MODEL] [PORT] [HOST]
#
# Sends GET /v1/models/MODEL (GetModelStatus over REST) to HOST:PORT and exits 0 (healthy)
# when the answer is 200 and lists at least one version in state AVAILABLE; exits 1
# (unhealthy) when nothing listens yet (TF Serving opens its ports only after the initial
# load), the model is unknown, no version is AVAILABLE, or the connection or an answer
# does not come within HEALTHCHECK_TIMEOUT seconds per step (default 3); exits 2 on bad
# arguments. One line on stdout says why (Docker keeps it in `docker inspect`).
# Defaults: MODEL=$MODEL_NAME or alexnet, PORT=8501, HOST=127.0.0.1. Used by the serving
# image's HEALTHCHECK and by the Kubernetes readiness probe (deploy/serving-deployment.yaml).
set -u
export LC_ALL=C  # read -N counts bytes

model="${1:-${MODEL_NAME:-alexnet}}"
port="${2:-8501}"
host="${3:-127.0.0.1}"
wait_s="${HEALTHCHECK_TIMEOUT:-3}"

usage_error() {
  echo "error: $1 (usage: healthcheck.sh [MODEL] [PORT] [HOST])" >&2
  exit 2
}
[[ "$model" =~ ^[A-Za-z0-9._-]+$ ]] ||
  usage_error "model name '$model' must be letters, digits, '.', '_' or '-'"
if [[ ! "$port" =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
  usage_error "port '$port' must be a number from 1 to 65535"
fi
[[ "$host" =~ ^[A-Za-z0-9.:-]+$ ]] || usage_error "host '$host' is not a host name or address"
[[ "$wait_s" =~ ^[0-9]+([.][0-9]+)?$ ]] ||
  usage_error "HEALTHCHECK_TIMEOUT '$wait_s' must be a number of seconds"

unhealthy() {
  echo "unhealthy: $1"
  exit 1
}

# bash's connect has no time limit of its own: a host that drops SYNs (or a listener whose
# accept queue is full) would hold it for minutes, past Docker's and Kubernetes' own
# timeouts, which then report a bare timeout instead of why. A watchdog interrupts it.
# Its sleep holds none of the script's descriptors: whoever reads the check's output (Docker,
# a kubelet exec probe) waits for every holder of that pipe, and killing the watchdog's
# subshell leaves its sleep running to the end.
trap 'timed_out=1' USR1
timed_out=0
(exec </dev/null >/dev/null 2>&1; sleep "$wait_s" && kill -USR1 $$) &
watchdog=$!
if ! { exec 3<>"/dev/tcp/${host}/${port}"; } 2>/dev/null; then
  kill "$watchdog" 2>/dev/null
  ((timed_out)) && unhealthy "no connection to ${host}:${port} within ${wait_s} s"
  unhealthy "nothing listening on ${host}:${port} (starting, or not serving REST there)"
fi
kill "$watchdog" 2>/dev/null
trap '' USR1  # a signal already on its way must not interrupt the reads below
# An IPv6 address goes in brackets in the Host header (RFC 7230, 5.4).
authority="${host}:${port}"
[[ "$host" == *:* ]] && authority="[${host}]:${port}"
printf 'GET /v1/models/%s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' \
  "$model" "$authority" >&3

IFS= read -r -t "$wait_s" status_line <&3 || unhealthy "no HTTP answer from ${host}:${port}"
status_line="${status_line%$'\r'}"
[[ "$status_line" =~ ^HTTP/[0-9.]+\ ([0-9]{3}) ]] ||
  unhealthy "not an HTTP answer from ${host}:${port}: ${status_line:0:80}"
code="${BASH_REMATCH[1]}"

length=""
while IFS= read -r -t "$wait_s" header <&3; do
  header="${header%$'\r'}"
  [[ -z "$header" ]] && break
  shopt -s nocasematch
  [[ "$header" =~ ^content-length:[[:space:]]*([0-9]+) ]] && length="${BASH_REMATCH[1]}"
  shopt -u nocasematch
done

# A status answer is a few hundred bytes; read at most 64 KiB of it.
body=""
if [[ -n "$length" ]]; then
  ((length > 65536)) && length=65536
  ((length > 0)) && IFS= read -r -t "$wait_s" -N "$length" body <&3
else
  IFS= read -r -t "$wait_s" -d '' body <&3
fi
exec 3<&-
flat="${body//[$'\r\n']/ }"

if [[ "$code" != 200 ]]; then
  unhealthy "GET /v1/models/${model} answered ${code}: ${flat:0:200}"
fi
available='"state"[[:space:]]*:[[:space:]]*"AVAILABLE"'
if [[ "$flat" =~ $available ]]; then
  version='"version"[[:space:]]*:[[:space:]]*"([0-9]+)"[[:space:]]*,[[:space:]]*'"$available"
  if [[ "$flat" =~ $version ]]; then
    echo "healthy: model ${model} version ${BASH_REMATCH[1]} is AVAILABLE"
  else
    echo "healthy: model ${model} has a version AVAILABLE"
  fi
  exit 0
fi
unhealthy "no version of model ${model} is AVAILABLE: ${flat:0:200}"
