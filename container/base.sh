#!/usr/bin/env bash
# Make sure a container engine and the base image of the Bento's generated Dockerfile (python:3.11-slim) are here.
# With a Docker daemon there is nothing to do (Docker pulls the base itself). Otherwise podman: pull the base, and
# where no registry serves it, build a stand-in under that name from Debian packages with stand-in-base.sh
# (once per machine, about 2 minutes; installs podman, runc and debootstrap with apt, so it needs root), and
# catatonit for `podman kube play`.
# `make container`, `make container-cpu` and `make test-container` run this first. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
BASE=docker.io/library/python:3.11-slim

docker info >/dev/null 2>&1 && exit 0
if command -v podman >/dev/null && podman image exists "$BASE"; then
  :
elif command -v podman >/dev/null && timeout 120 podman pull -q "$BASE" >/dev/null 2>&1; then
  echo "pulled $BASE"
else
  echo "No Docker daemon, and no registry serves $BASE here: building a stand-in base image from Debian packages"
  echo "with container/stand-in-base.sh (once per machine, about 2 minutes; installs podman, runc and debootstrap)."
  if [ "$(id -u)" != 0 ]; then
    echo "stand-in-base.sh installs Debian packages and runs podman as root: run it once as root, then try again." >&2
    exit 1
  fi
  bash stand-in-base.sh
fi
# `podman kube play` (tests/test_deploy.py, docs/deploy.md) starts each pod with a pause container built around
# catatonit, which Debian's podman only recommends.
if ! command -v catatonit >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends catatonit >/dev/null 2>&1 ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends catatonit >/dev/null; }
  else
    echo "catatonit is missing: podman kube play cannot start pods (apt-get install catatonit, as root)" >&2
  fi
fi
