#!/bin/sh
# Runs as root while the image is built (bentofile docker.setup_script), after BentoML has created its
# non-root user `bentoml` (uid 1034) that the container runs as: the inference-log folder the bentofiles
# point IMGCLS_LOG_DIR at must be writable by it. Mount a volume there to keep the log (docs/deploy.md).
set -eu
mkdir -p /data/inference_log
chown -R bentoml:bentoml /data
