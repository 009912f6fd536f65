#!/usr/bin/env bash
# Build the CPU images from docker/Dockerfile with a real container engine and run the `cpu`
# profile of docker-compose.yml on it: teacher-server-cpu until healthy, an authenticated
# inference from the host over 127.0.0.1, the trainer-cpu job (compose waits for the health
# check, the job writes to the named volume), then a graceful stop.
#
# Made for a Debian bookworm host with no registry access and no systemd (this project's CI
# machines): podman with runc + cgroupfs, a base image built with debootstrap, pip reaching the
# package index through the host network, torch from the local wheel folder, docker-compose
# talking to podman's Docker-compatible API. docs/deployment.md explains every step.
#
#   apt-get install -y podman runc debootstrap docker-compose curl
#   scripts/podman_smoke.sh          # env: WORK=/tmp/podman-smoke PORT=18000 KEEP=1 (keep it running)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/podman-smoke}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
WHEELS=${WHEELS:-/opt/wheels}                     # holds torch-2.13.0+cpu (pip's find-links here)
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
BASE_IMAGE=localbase:bookworm
PROJECT=dkd-smoke
SERVER=${PROJECT}_teacher-server-cpu_1

# What `docker compose --profile cpu up` reads (docker-compose.yml's knobs).
export IMAGE_TAG=smoke TEACHER_PORT=${PORT:-18000} STUDENT_NUM_LAYERS=1
export TEACHER_MODELS_DIR=$WORK/models DATA_DIR=$WORK/data
export TEACHER_API_KEY=${TEACHER_API_KEY:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}

for tool in podman runc debootstrap docker-compose curl; do
    command -v "$tool" >/dev/null ||
        { echo "missing $tool: apt-get install -y podman runc debootstrap docker-compose curl" >&2; exit 2; }
done
mkdir -p "$WORK"
# Containers may not raise their ulimits here and systemd is not PID 1: runc + cgroupfs, for the
# podman CLI (flags) and for the API service docker-compose talks to (the [engine] section).
cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
podman() { command podman --runtime runc --cgroup-manager=cgroupfs "$@"; }
compose() { command docker-compose -p "$PROJECT" -f "$REPO/docker-compose.yml" --profile cpu "$@"; }

timed() {  # timed LABEL COMMAND...: run it, print its wall time
    local start=$SECONDS
    "${@:2}"
    echo "[smoke] $1: $((SECONDS - start)) s"
}

pids=()
cleanup() {
    if [ "${KEEP:-0}" != 1 ] && [ -n "${DOCKER_HOST:-}" ]; then
        compose down -v --remove-orphans >/dev/null 2>&1 || true
    fi
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# 1. No registry is reachable: a minimal Debian with Python 3.11 as the base image.
build_base_image() {
    [ -x "$WORK/rootfs/usr/bin/python3" ] ||
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs"
    tar -C "$WORK/rootfs" -c . | podman import - "$BASE_IMAGE"
}
podman image exists "$BASE_IMAGE" || timed "base image (debootstrap + import)" build_base_image

# 2. The images, tagged as the compose file names them. pip reaches the index through the host
# network with the host's CA bundle, and finds torch 2.13.0+cpu in the mounted wheel folder (the
# CPU variant's production index, download.pytorch.org, is not reachable here). Docker image
# format: the OCI format has no HEALTHCHECK.
printf '[global]\ncert = /etc/pip-ca.crt\nfind-links = /wheels\n' >"$WORK/pip.conf"
build() {  # build TARGET IMAGE
    podman build --format docker --network host \
        -v "$WHEELS:/wheels:ro" -v "$CA_BUNDLE:/etc/pip-ca.crt:ro" -v "$WORK/pip.conf:/etc/pip.conf:ro" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
        -f "$REPO/docker/Dockerfile" --target "$1" -t "$2" "$REPO"
}
timed "build teacher-server (CPU)" build teacher-server "dynamic-kd/teacher-server-cpu:$IMAGE_TAG"
timed "build student-trainer (CPU)" build student-trainer "dynamic-kd/student-trainer-cpu:$IMAGE_TAG"
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "dynamic-kd.*:$IMAGE_TAG|localbase"

# 3. Tiny teachers (+ the student's initial model) and a tiny SST-2 folder, for the compose mounts.
rm -rf "$WORK/models" "$WORK/data"
(cd "$REPO" && "$PYTHON" - "$WORK" <<'EOF'
import sys
from pathlib import Path

from tests.tiny_models import save_tiny_bert

work = Path(sys.argv[1])
save_tiny_bert(work / "models/small", num_layers=2, hidden_size=32, seed=1)
save_tiny_bert(work / "models/large", num_layers=4, hidden_size=48, num_heads=4, seed=2)
save_tiny_bert(work / "models/student-init", num_layers=2, hidden_size=32, seed=3)
rows = ["a good fun movie\t1", "an awful boring film\t0", "great acting\t1", "the worst plot\t0"]
(work / "data").mkdir()
for split, repeat in (("train", 8), ("dev", 2)):
    (work / "data" / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows * repeat) + "\n")
EOF
)
chmod -R a+rX "$WORK/models" "$WORK/data"  # the containers run as uid 10001

# 4. docker-compose drives podman through its Docker-compatible API socket.
rm -f "$WORK/podman.sock"
command podman system service --time=0 "unix://$WORK/podman.sock" 2>"$WORK/podman-service.log" &
pids+=($!)
export DOCKER_HOST=unix://$WORK/podman.sock
until curl -fs --unix-socket "$WORK/podman.sock" http://podman/_ping >/dev/null; do sleep 0.2; done
compose down -v --remove-orphans >/dev/null 2>&1 || true

start=$SECONDS
compose up --no-build -d teacher-server-cpu
# Podman schedules health checks with systemd timers; without systemd, this loop is the timer.
(while sleep 3; do podman healthcheck run "$SERVER" >/dev/null 2>&1 || true; done) &
pids+=($!)
until [ "$(podman inspect -f '{{.State.Health.Status}}' "$SERVER")" = healthy ]; do
    if [ "$(podman inspect -f '{{.State.Running}}' "$SERVER")" != true ] || ((SECONDS - start > 240)); then
        podman logs "$SERVER"; echo "[smoke] teacher-server-cpu did not become healthy" >&2; exit 1
    fi
    sleep 1
done
echo "[smoke] compose up -> container healthy (image HEALTHCHECK): $((SECONDS - start)) s"

# 5. From the host over 127.0.0.1: readiness, then no key -> 401, the key -> logits.
base=http://127.0.0.1:$TEACHER_PORT
curl -fsS -o /dev/null "$base/v2/health/ready"
echo "[smoke] GET $base/v2/health/ready: 200"
query='{"inputs":[{"name":"text","shape":[2],"datatype":"BYTES","data":["a good movie","an awful film"]}],
        "outputs":[{"name":"logits"}]}'
status=$(curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' -d "$query" \
    "$base/v2/models/small/infer")
[ "$status" = 401 ] || { echo "[smoke] expected 401 without the key, got $status" >&2; exit 1; }
echo "[smoke] POST /v2/models/small/infer without the key: 401"
curl -fsS -H "Authorization: Bearer $TEACHER_API_KEY" -H 'Content-Type: application/json' -d "$query" \
    "$base/v2/models/small/infer"
echo
echo "[smoke] POST /v2/models/small/infer with the key: 200"

# 6. The trainer-cpu job exactly as compose defines it (depends_on: service_healthy).
run_job() {
    compose up --no-build -d trainer-cpu
    local code
    code=$(podman wait "${PROJECT}_trainer-cpu_1")
    podman logs "${PROJECT}_trainer-cpu_1" 2>&1 | tail -n 15
    [ "$code" = 0 ] || { echo "[smoke] trainer-cpu exited with $code" >&2; exit 1; }
}
timed "trainer-cpu job (compose up -d, to its exit 0)" run_job
podman run --rm -v "${PROJECT}_trainer-outputs:/outputs:ro" --entrypoint python3 \
    "dynamic-kd/student-trainer-cpu:$IMAGE_TAG" -c '
import json
r = json.load(open("/outputs/distill/results.json"))
print("[smoke] results.json in the trainer-outputs volume: step", r["global_step"], "| eval", r["eval"],
      "| teacher FLOPs spent", r["flops"]["teacher_flops_spent"], "of", r["flops"]["teacher_flops_vanilla"])'

# 7. docker stop: SIGTERM, graceful drain, exit 0.
timed "compose stop teacher-server-cpu" compose stop teacher-server-cpu
code=$(podman inspect -f '{{.State.ExitCode}}' "$SERVER")
echo "[smoke] teacher-server-cpu exit code after SIGTERM: $code"
[ "$code" = 0 ]
echo "[smoke] OK"
