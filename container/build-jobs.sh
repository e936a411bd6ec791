#!/usr/bin/env bash
# Build the jobs image (deploy/jobs/Containerfile: the drift job and Locust, no model, no onnxruntime), tagged
# imgcls-jobs:<project version>, and print its size. What `make container-jobs` runs. The last line of output is
# the tag, for scripts (tests/test_deploy.py reads it).
set -euo pipefail
cd "$(dirname "$0")/.."

bash container/base.sh
if docker info >/dev/null 2>&1; then engine=docker; else engine=podman; fi
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' imgcls/__init__.py)
tag=${JOBS_IMAGE:-imgcls-jobs:$version}

# Only what the Containerfile copies, so the build never reads .venv, caches or the model store.
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
tar -c --exclude=__pycache__ pyproject.toml imgcls drift loadtest | tar -x -C "$context"
start=$SECONDS
"$engine" build --network host -f deploy/jobs/Containerfile -t "$tag" "$context"
size=$("$engine" image inspect --format '{{.Size}}' "$tag")
echo "built image $tag with $engine in $((SECONDS - start)) s, $((size / 1000000)) MB"
echo "$tag"
