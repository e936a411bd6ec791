#!/usr/bin/env bash
# Build the Bento described by a bentofile, turn it into a container image tagged with the Bento's tag, and
# print the line that runs it. What `make container` (bentofile.yaml, GPU) and `make container-cpu` run.
#
#   container/build.sh [BENTOFILE]        BENTOFILE: bentofile.yaml (default) or bentofile.cpu.yaml
#
# Docker when a Docker daemon answers, else podman (container/base.sh makes sure it and the base image are here).
# The last line of output is the image tag, for scripts (tests/test_container.py reads it).
set -euo pipefail
cd "$(dirname "$0")/.."
BENTOFILE=${1:-bentofile.yaml}
BIN=${BIN:-.venv/bin}

bash container/base.sh
if docker info >/dev/null 2>&1; then
  engine=docker
  build_opts=()
else
  engine=podman
  build_opts=(--backend podman --opt network=host)  # build steps reach the package index the way the host does
fi

start=$SECONDS
tag=$("$BIN/bentoml" build -f "$BENTOFILE" -o tag | sed -n 's/^__tag__://p')
[ -n "$tag" ] || { echo "bentoml build -f $BENTOFILE printed no tag" >&2; exit 1; }
echo "built Bento $tag in $((SECONDS - start)) s"

start=$SECONDS
"$BIN/bentoml" containerize "$tag" "${build_opts[@]}" -t "$tag"
size=$("$engine" image inspect --format '{{.Size}}' "$tag")
echo "built image $tag with $engine in $((SECONDS - start)) s, $((size / 1000000)) MB"

# The GPU image on a GPU host: docker's --gpus, or podman's CDI device (both from the NVIDIA Container Toolkit).
[ "$engine" = docker ] && gpu_opt="--gpus all" || gpu_opt="--device nvidia.com/gpu=all"
gpu_image=$(grep -c '^ *- "onnxruntime-gpu' "$BENTOFILE" || true)
gpu_flag=""
[ "$gpu_image" != 0 ] && [ -e /proc/driver/nvidia/version ] && gpu_flag="$gpu_opt "
cat <<EOF

Run it (serves on 127.0.0.1:3000; the inference log goes to the volume imgcls-inference-log):
  $engine run --rm ${gpu_flag}-p 127.0.0.1:3000:3000 -v imgcls-inference-log:/data/inference_log $tag
EOF
if [ "$gpu_image" != 0 ] && [ -z "$gpu_flag" ]; then
  echo "(No NVIDIA driver here, so it runs int8 on the CPU. On a GPU host add: $gpu_opt)"
fi
cat <<EOF
Then: curl -F image=@photo.jpg 127.0.0.1:3000/classify
$tag
EOF
