#!/usr/bin/env bash
# Builds and runs the Docker image for real, on CPU, and compares it with the same runs on bare metal:
#   1. a Docker engine: installs docker.io and starts dockerd if none answers (and stops it at the end);
#   2. a local base image (no registry needed): debootstrap of Debian bookworm with python3, imported
#      with `docker import` (skipped when the image exists);
#   3. the project image from docker/Dockerfile on that base (host network; the host's CA bundle as a
#      build secret, never stored in the image); prints its size;
#   4. the quickstart, briefly, in a container with a host run directory mounted, and the same on bare metal;
#   5. the two-node compose job (docker/compose.yaml + compose.cpu.yaml) with expert parallelism for a few
#      steps, then resumed in fresh containers; its loss trace must equal one uninterrupted run of the same
#      two torchrun nodes on bare metal.
# Every container uses the host's network. Prints the time of every stage. Opt-in in CI: CI_DOCKER=1 .ci/run.
# Environment: WORK (build root and run dirs; default /var/tmp/msmoe_docker), BASE_IMAGE (default
# msmoe-debian:bookworm), IMAGE (msmoe_dist:cpu), PYTHON (bare-metal interpreter; default .venv/bin/python),
# STEPS (4) and RESUME_STEPS (8): the compose job stops at STEPS with a checkpoint and resumes to RESUME_STEPS.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=${WORK:-/var/tmp/msmoe_docker}
BASE_IMAGE=${BASE_IMAGE:-msmoe-debian:bookworm}
IMAGE=${IMAGE:-msmoe_dist:cpu}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
STEPS=${STEPS:-4}
RESUME_STEPS=${RESUME_STEPS:-8}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
IMAGE_UID=1000  # docker/Dockerfile's default UID: the mounted run dirs must be writable by it
START=$SECONDS
STAGE_START=$SECONDS
DOCKERD_PID=
COMPOSE_UP=0

say() { echo "[test_docker $(date -u +%H:%M:%S)] $*"; }
die() { echo "[test_docker] FAILED: $*" >&2; exit 1; }
stage_done() { say "$1: $((SECONDS - STAGE_START)) s"; STAGE_START=$SECONDS; }
apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }

cleanup() {
    local rc=$?
    if [[ "$COMPOSE_UP" == 1 ]]; then compose down --remove-orphans >/dev/null 2>&1 || true; fi
    if [[ -n "$DOCKERD_PID" ]]; then
        say "stopping the dockerd this script started (pid $DOCKERD_PID)"
        kill -TERM "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    fi
    exit "$rc"
}
trap cleanup EXIT

mkdir -p "$WORK"
# --- 1. engine -------------------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || { say "installing docker.io"; apt_install docker.io; }
    say "starting dockerd (log: $WORK/dockerd.log)"
    nice -n 10 dockerd >"$WORK/dockerd.log" 2>&1 &  # niced: containers and builds inherit it
    DOCKERD_PID=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || die "dockerd did not answer within 60 s (see $WORK/dockerd.log)"
fi
# BuildKit (for the build secret): the docker CLI's buildx plugin, else the classic client of docker.io,
# whose BuildKit is built in.
BUILD_DOCKER=docker
if ! docker buildx version >/dev/null 2>&1 && [[ -x /usr/bin/docker ]]; then BUILD_DOCKER=/usr/bin/docker; fi
if docker compose version >/dev/null 2>&1; then
    COMPOSE_CMD=(docker compose)
else
    command -v docker-compose >/dev/null || { say "installing docker-compose"; apt_install docker-compose; }
    COMPOSE_CMD=(docker-compose)
fi
compose() { "${COMPOSE_CMD[@]}" -p msmoe_test -f docker/compose.yaml -f docker/compose.cpu.yaml "$@"; }
say "engine: $(docker version --format 'server {{.Server.Version}}'), compose: $("${COMPOSE_CMD[@]}" version --short)"
stage_done "engine"

# --- 2. local base image ----------------------------------------------------------------------------
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "base image $BASE_IMAGE exists: not rebuilt"
else
    command -v debootstrap >/dev/null || { say "installing debootstrap"; apt_install debootstrap; }
    ROOTFS="$WORK/rootfs"
    rm -rf "$ROOTFS"
    say "debootstrap bookworm into $ROOTFS"
    nice debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$ROOTFS" >"$WORK/debootstrap.log" 2>&1 || die "debootstrap failed (see $WORK/debootstrap.log)"
    tar -C "$ROOTFS" -c . | docker import -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$ROOTFS"
fi
stage_done "base image"

# --- 3. project image -------------------------------------------------------------------------------
[[ -s "$CA_BUNDLE" ]] || die "no CA bundle at $CA_BUNDLE (CA_BUNDLE=...)"
say "building $IMAGE on $BASE_IMAGE (log: $WORK/build.log)"
DOCKER_BUILDKIT=1 "$BUILD_DOCKER" build --network host --progress plain \
    --secret id=pip_cert,src="$CA_BUNDLE" --build-arg BASE_IMAGE="$BASE_IMAGE" \
    -f docker/Dockerfile -t "$IMAGE" . >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; die "docker build"; }
SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE")
say "image $IMAGE: $((SIZE / 1000000)) MB"
in_image() { docker run --rm --network host "$IMAGE" "$@"; }
# The CA bundle was a build secret: it must not be in the image, nor named in its environment.
in_image bash -c 'test ! -e /run/secrets/pip_cert && ! env | grep -q PIP_CERT' || die "the build secret leaked into the image"
[[ "$(in_image id -u)" == "$IMAGE_UID" ]] || die "the image does not run as uid $IMAGE_UID"
VERSIONS=$(in_image python -c 'import torch, deepspeed, msmoe_dist; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -n 1)
say "in the image: $VERSIONS"
stage_done "project image"

trace() {  # trace RUN_DIR: one "step loss" line per training row of metrics.jsonl
    "$PYTHON" -c 'import json, sys
for line in open(sys.argv[1] + "/metrics.jsonl"):
    r = json.loads(line)
    if "loss" in r:
        print(r["step"], repr(r["loss"]))' "$1"
}
same_trace() {  # same_TRACE NAME A B: the two traces are identical, step for step, bit for bit
    local a b
    a=$(trace "$2") b=$(trace "$3")
    [[ -n "$a" && "$a" == "$b" ]] || { diff <(echo "$a") <(echo "$b") || true; die "$1: loss traces differ ($2 vs $3)"; }
    say "$1: the loss traces are equal ($(echo "$a" | wc -l) rows):"
    printf '    %s\n' "${a//$'\n'/$'\n    '}"
}
fresh_dir() { rm -rf "$1"; mkdir -p "$1"; chown "$IMAGE_UID:$IMAGE_UID" "$1"; }

# --- 4. the quickstart, briefly, in a container and on bare metal --------------------------------------
QS_ARGS=(train.max_steps=10 logging.log_every=2 train.progress=false data.synthetic_lines=4000)
fresh_dir "$WORK/qs_runs"
fresh_dir "$WORK/qs_data"
docker run --rm --network host -v "$WORK/qs_runs:/runs" -v "$WORK/qs_data:/data" "$IMAGE" \
    msmoe-train --config configs/quickstart.yaml "${QS_ARGS[@]}" >"$WORK/qs_docker.log" 2>&1 \
    || { tail -20 "$WORK/qs_docker.log"; die "the quickstart in a container"; }
[[ -f "$WORK/qs_runs/quickstart/checkpoints/step_00000010/complete.json" ]] || die "no sealed checkpoint in the host run dir"
stage_done "quickstart in a container"
rm -rf "$WORK/qs_bare"
nice "$PYTHON" -m msmoe_dist.cli train --config configs/quickstart.yaml "${QS_ARGS[@]}" \
    train.run_dir="$WORK/qs_bare/quickstart" data.path="$WORK/qs_bare/data" >"$WORK/qs_bare.log" 2>&1 \
    || { tail -20 "$WORK/qs_bare.log"; die "the quickstart on bare metal"; }
stage_done "quickstart on bare metal"
same_trace "quickstart (container vs bare metal)" "$WORK/qs_runs/quickstart" "$WORK/qs_bare/quickstart"

# --- 5. two-node compose, resumed in fresh containers, vs the same two nodes on bare metal -------------
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
EP_ARGS="train.progress=false logging.log_every=1 data.synthetic_lines=4000 model.num_layers=2 checkpoint.every_steps=$STEPS"
export MSMOE_RUNS="$WORK/compose_runs" MSMOE_DATA="$WORK/compose_data" MSMOE_BASE_IMAGE="$BASE_IMAGE"
fresh_dir "$MSMOE_RUNS"
fresh_dir "$MSMOE_DATA"
compose_job() {  # compose_job ARGS...: up, wait for both nodes, check both exit codes, down
    export MSMOE_ARGS="$EP_ARGS $*" MSMOE_RDZV_PORT
    MSMOE_RDZV_PORT=$(free_port)
    COMPOSE_UP=1
    compose up -d --no-build --force-recreate >/dev/null 2>&1 || die "compose up"
    local ids codes
    mapfile -t ids < <(compose ps -q)
    codes=$(timeout 900 docker wait "${ids[@]}" | tr '\n' ' ') || die "the compose job did not finish within 900 s"
    compose logs --no-color >>"$WORK/compose.log" 2>&1
    compose down >/dev/null 2>&1
    COMPOSE_UP=0
    [[ "$codes" == "0 0 " ]] || { tail -30 "$WORK/compose.log"; die "compose nodes exited with $codes"; }
}
: >"$WORK/compose.log"
compose_job "train.max_steps=$STEPS"
[[ -f "$MSMOE_RUNS/compose/checkpoints/step_$(printf %08d "$STEPS")/complete.json" ]] || die "no sealed checkpoint at step $STEPS"
stage_done "compose: 2 nodes x 1 rank, expert parallel, steps 1-$STEPS"
compose_job "train.max_steps=$RESUME_STEPS train.resume=true"
grep -q "resuming from step $STEPS" "$WORK/compose.log" || die "the second compose job did not resume from step $STEPS"
stage_done "compose: resumed in fresh containers, steps $((STEPS + 1))-$RESUME_STEPS"

rm -rf "$WORK/ep_bare"
PORT=$(free_port)
pids=()
for node in 0 1; do
    # shellcheck disable=SC2086  # EP_ARGS is a list of words
    OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo NPROC=1 NNODES=2 NODE_RANK=$node RDZV_ENDPOINT=127.0.0.1:$PORT \
        RDZV_ID=msmoe-bare PYTHON="$PYTHON" nice launch/torchrun.sh --config configs/quickstart.yaml \
        train.run_dir="$WORK/ep_bare/compose" data.path="$WORK/ep_bare/data" parallel.ep_size=2 $EP_ARGS \
        train.max_steps="$RESUME_STEPS" >"$WORK/ep_bare_$node.log" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || { tail -20 "$WORK"/ep_bare_*.log; die "bare-metal two-node run"; }; done
stage_done "bare metal: the same 2 torchrun nodes, steps 1-$RESUME_STEPS uninterrupted"
same_trace "two-node compose + resume (containers vs bare metal)" "$MSMOE_RUNS/compose" "$WORK/ep_bare/compose"

say "image $IMAGE: $((SIZE / 1000000)) MB; total $((SECONDS - START)) s; logs and run dirs in $WORK"
say "PASSED"
