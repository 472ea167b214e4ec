#!/usr/bin/env bash
# Smoke test of the CPU container image, end to end, on a machine that may have no Docker engine running
# and no reachable image registry:
#   1. a Docker engine: starts dockerd (vfs storage, host networking only) when none answers, installing
#      docker.io with apt first where it is missing;
#   2. a base image: python:3.12-slim when it is present or can be pulled, else a Debian bookworm root file
#      system made by debootstrap from this machine's own apt mirror, imported as focalserve-base:bookworm
#      (made once, reused);
#   3. docker build --target cpu (pip in the build gets the machine's CA bundle as the pipcert secret);
#   4. docker run on free ports, waits for the image's HEALTHCHECK to say healthy;
#   5. the README example through the Python client (.venv): loss 0.65782464;
#   6. docker stop (SIGTERM) and the container's exit code must be 0.
# Prints one "==>" line per step; exits non-zero on the first failure; removes its container.
#
# Environment: BASE_IMAGE (skip the base-image step), IMAGE (default focalserve:smoke), DEBIAN_MIRROR
# (default: read from /etc/apt/sources.list.d/* or /etc/apt/sources.list), PIP_CA_BUNDLE (default
# /etc/ssl/certs/ca-certificates.crt), DOCKER_LOG (default /tmp/focalserve-dockerd.log), KEEP_IMAGE=0 to
# delete the image afterwards.
set -Eeuo pipefail

cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-focalserve:smoke}
LOCAL_BASE=focalserve-base:bookworm
OFFICIAL_BASE=python:3.12-slim
PIP_CA_BUNDLE=${PIP_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
DOCKER_LOG=${DOCKER_LOG:-/tmp/focalserve-dockerd.log}
CONTAINER=focalserve-smoke-$$
EXPECTED_LOSS=0.65782464
STARTED=$(date +%s)

step() { printf '==> [%4ss] %s\n' "$(($(date +%s) - STARTED))" "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" -eq 0 ]; then
    step "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  step "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

cleanup() {
  local rc=$?
  if docker container inspect "$CONTAINER" >/dev/null 2>&1; then
    if [ "$rc" -ne 0 ]; then
      echo "---- container log (last 40 lines) ----" >&2
      docker logs --tail 40 "$CONTAINER" >&2 || true
    fi
    docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
  fi
  if [ "${KEEP_IMAGE:-1}" = 0 ]; then docker image rm -f "$IMAGE" >/dev/null 2>&1 || true; fi
  [ "$rc" -eq 0 ] || echo "SMOKE FAILED (exit $rc)" >&2
}
trap cleanup EXIT

# ---- 1. Docker engine ---------------------------------------------------------------------------------
step "docker engine"
if ! command -v docker >/dev/null 2>&1 || ! command -v dockerd >/dev/null 2>&1; then
  apt_install docker.io
fi
if docker info >/dev/null 2>&1; then
  echo "    a daemon answers already: $(docker version --format 'server {{.Server.Version}}')"
else
  echo "    no daemon answers: starting dockerd (vfs, no iptables, no bridge), log in $DOCKER_LOG"
  as_root sh -c "nohup dockerd --storage-driver=vfs --iptables=false --bridge=none >'$DOCKER_LOG' 2>&1 &"
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { tail -n 20 "$DOCKER_LOG" >&2; fail "dockerd did not answer within 60 s"; }
  echo "    dockerd $(docker version --format '{{.Server.Version}}') is up (left running for later runs)"
fi

# `docker build` with BuildKit (RUN --mount, --secret): a client with the buildx plugin, or a client older
# than 23 whose BuildKit is built in (Debian's docker.io); a newer client without buildx cannot.
BUILD=()
for client in docker /usr/bin/docker; do
  command -v "$client" >/dev/null 2>&1 || continue
  if "$client" buildx version >/dev/null 2>&1; then
    BUILD=("$client" build); break
  fi
  major=$("$client" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)
  if [ -n "$major" ] && [ "$major" -lt 23 ] 2>/dev/null; then
    BUILD=(env DOCKER_BUILDKIT=1 "$client" build); break
  fi
done
[ "${#BUILD[@]}" -gt 0 ] || fail "no docker client can build with BuildKit (install the buildx plugin)"
echo "    building with: ${BUILD[*]} ($("${BUILD[@]:0:${#BUILD[@]}-1}" version --format 'client {{.Client.Version}}'))"

# ---- 2. Base image ------------------------------------------------------------------------------------
debian_mirror() {
  # The first enabled Debian source whose suites include bookworm (or, failing that, the first plain suite,
  # neither -security nor -updates nor -backports), from deb822 files or one-line sources.
  local files=()
  shopt -s nullglob
  files=(/etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list)
  shopt -u nullglob
  local f
  for f in "${files[@]}"; do
    [ -r "$f" ] || continue
    case "$f" in
      *.sources)
        awk 'function flush() { if (uri != "" && types ~ /(^| )deb( |$)/ && enabled != "no") print uri "\t" suites;
                                uri = ""; suites = ""; types = ""; enabled = "" }
             /^[[:space:]]*#/ { next }
             /^[[:space:]]*$/ { flush(); next }
             tolower($1) == "uris:"    { uri = $2 }
             tolower($1) == "suites:"  { $1 = ""; suites = $0 }
             tolower($1) == "types:"   { $1 = ""; types = $0 " " }
             tolower($1) == "enabled:" { enabled = tolower($2) }
             END { flush() }' "$f" ;;
      *)
        awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                           print $i "\t " $(i + 1) }' "$f" ;;
    esac
  done | awk -F'\t' '
      { n = split($2, s, " "); for (k = 1; k <= n; k++) {
          if (s[k] == "bookworm" && exact == "") exact = $1
          if (s[k] !~ /-(security|updates|backports)$/ && plain == "" && $1 ~ /debian\/?$/) plain = $1 } }
      END { if (exact != "") print exact; else if (plain != "") print plain }'
}

if [ -n "${BASE_IMAGE:-}" ]; then
  step "base image: $BASE_IMAGE (from BASE_IMAGE)"
elif docker image inspect "$OFFICIAL_BASE" >/dev/null 2>&1; then
  BASE_IMAGE=$OFFICIAL_BASE
  step "base image: $BASE_IMAGE (present)"
elif timeout 60 docker pull -q "$OFFICIAL_BASE" >/dev/null 2>&1; then
  BASE_IMAGE=$OFFICIAL_BASE
  step "base image: $BASE_IMAGE (pulled)"
elif docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
  BASE_IMAGE=$LOCAL_BASE
  step "base image: $OFFICIAL_BASE cannot be pulled; $LOCAL_BASE exists already (cached)"
else
  step "base image: $OFFICIAL_BASE cannot be pulled; building $LOCAL_BASE with debootstrap"
  command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
  MIRROR=${DEBIAN_MIRROR:-$(debian_mirror)}
  [ -n "$MIRROR" ] || fail "no Debian mirror found in /etc/apt/sources.list.d/* or /etc/apt/sources.list (set DEBIAN_MIRROR)"
  ROOTFS=$(mktemp -d /var/tmp/focalserve-rootfs.XXXXXX)
  echo "    debootstrap --variant=minbase bookworm $ROOTFS <the machine's apt mirror>"
  as_root debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
    || { tail -n 20 "$ROOTFS.log" >&2; fail "debootstrap failed (log: $ROOTFS.log)"; }
  as_root rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  as_root chmod 0755 "$ROOTFS"  # mktemp made it 0700, and it becomes the image's /
  as_root tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
  as_root rm -rf "$ROOTFS" "$ROOTFS.log"
  BASE_IMAGE=$LOCAL_BASE
  echo "    imported $LOCAL_BASE: $(docker run --rm --network none "$LOCAL_BASE" python3 --version)"
fi

# ---- 3. Build -----------------------------------------------------------------------------------------
step "docker build --target cpu -t $IMAGE (BASE_IMAGE=$BASE_IMAGE)"
SECRET=()
if [ -s "$PIP_CA_BUNDLE" ]; then SECRET=(--secret "id=pipcert,src=$PIP_CA_BUNDLE"); fi
BUILD_LOG=$(mktemp /tmp/focalserve-build.XXXXXX.log)
if ! "${BUILD[@]}" --progress=plain --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" "${SECRET[@]}" \
    --target cpu -t "$IMAGE" . >"$BUILD_LOG" 2>&1; then
  tail -n 40 "$BUILD_LOG" >&2
  fail "docker build failed (full log: $BUILD_LOG)"
fi
rm -f "$BUILD_LOG"
echo "    built $IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}'), user $(docker image inspect -f '{{.Config.User}}' "$IMAGE")"

# ---- 4. Run and wait for the HEALTHCHECK ----------------------------------------------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
METRICS_PORT=$(free_port)
while [ "$METRICS_PORT" = "$PORT" ]; do METRICS_PORT=$(free_port); done
step "docker run $IMAGE (host network, gRPC :$PORT, metrics :$METRICS_PORT)"
docker run -d --name "$CONTAINER" --network host \
  -e FOCALSERVE_PORT="$PORT" -e FOCALSERVE_METRICS_PORT="$METRICS_PORT" -e FOCALSERVE_WORKERS=2 \
  "$IMAGE" >/dev/null || fail "docker run failed"

step "waiting for the container's HEALTHCHECK"
health=starting
for _ in $(seq 1 120); do
  health=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$CONTAINER")
  running=$(docker inspect -f '{{.State.Running}}' "$CONTAINER")
  [ "$health" = healthy ] && break
  [ "$running" = true ] || fail "container exited (code $(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")) before healthy"
  [ "$health" = unhealthy ] && fail "container is unhealthy"
  sleep 1
done
[ "$health" = healthy ] || fail "container not healthy after 120 s (status: $health)"
echo "    health: $health ($(docker inspect -f '{{with index .State.Health.Log 0}}{{.Output}}{{end}}' "$CONTAINER" | tr -d '\n'))"
SERVING_LINE=$(docker logs "$CONTAINER" 2>&1 | grep -m1 serving || true)
echo "    log: $SERVING_LINE"
# the image must carry the compiled CPU kernel, not fall back to NumPy ufuncs
case "$SERVING_LINE" in *cpu_kernel=compiled*) ;; *) fail "the image serves without its compiled CPU kernel" ;; esac

# ---- 5. The README example through the Python client ------------------------------------------------------
step "README example through focalserve_client"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import focalserve_client' 2>/dev/null; then
  make setup >/dev/null
fi
OUT=$(.venv/bin/python -c '
import sys
import numpy as np
from focalserve_client import FocalLossClient
with FocalLossClient(sys.argv[1]) as client:
    r = client.compute(np.array([[0.97, 0.91, 0.03], [0.55, 0.43, 0.71]], np.float32),
                       np.array([[1., 0, 0], [0, 1, 0]], np.float32), normalizer=2.0, compute_grad=True)
print(f"loss {float(r.loss):.8f}")
print(f"grad {r.grad.dtype}{list(r.grad.shape)} backend {r.backend}")
' "127.0.0.1:$PORT")
while IFS= read -r line; do echo "    $line"; done <<<"$OUT"
grep -qx "loss $EXPECTED_LOSS" <<<"$OUT" || fail "expected loss $EXPECTED_LOSS"
if METRICS=$(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())' \
    "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null); then
  echo "    metrics :$METRICS_PORT answers, $(grep -c '^focalloss_\|^grpc_server_' <<<"$METRICS" || true) focalloss_/grpc_server_ samples"
else
  echo "    metrics :$METRICS_PORT does not answer (informational only)"
fi

# ---- 6. SIGTERM and the exit code -----------------------------------------------------------------------
step "docker stop (SIGTERM)"
docker stop -t 40 "$CONTAINER" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")
echo "    exit code $code; last log line: $(docker logs "$CONTAINER" 2>&1 | tail -n 1)"
[ "$code" = 0 ] || fail "container exited with $code after SIGTERM, expected 0"

step "SMOKE OK"
