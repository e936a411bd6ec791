"""`python tools/kube_play.py IMAGE`: the CPU Deployment of deploy/cpu run on this machine with `podman kube play`.

A way to try the manifests without a cluster. The rendered ConfigMap and Deployment (`kubectl kustomize deploy/cpu`)
are changed only where one machine differs from a cluster, each for its reason below; the result is written to
``--out`` and played, and the command to take it down is printed. The tests play the same manifest
(tests/test_deploy.py).

    make container-cpu                                   # prints the image's tag
    python tools/kube_play.py image-classifier-service-cpu:TAG --port 3000
    curl -F image=@photo.jpg 127.0.0.1:3000/classify
    podman kube down kube-play/deployment.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVICE_UID = 1034  # the image's user (deploy/cpu's securityContext): the log folder must be its own


def render(folder: str) -> list[dict]:
    """The objects ``kubectl kustomize deploy/<folder>`` prints."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl is missing: it renders the kustomizations (`kubectl kustomize DIR`)")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy" / folder)], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return [obj for obj in yaml.safe_load_all(out.stdout) if obj]


def local_deployment(image: str, port: int, log_root: Path) -> tuple[list[dict], str]:
    """The CPU overlay's ConfigMap and Deployment, changed for one machine; and the name podman gives the pod."""
    objects = [json.loads(json.dumps(o)) for o in render("cpu") if o["kind"] in ("ConfigMap", "Deployment")]
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    deployment["spec"]["replicas"] = 1  # no autoscaler here
    pod_name = f"{deployment['metadata']['name']}-pod-0"  # podman's name for the Deployment's first pod
    box = deployment["spec"]["template"]["spec"]["containers"][0]
    box["image"] = image  # the image built here, not the placeholder tag
    box["ports"][0].update(hostIP="127.0.0.1", hostPort=port)  # no Service here: reach the pod on the host
    for env in box["env"]:
        # Kubernetes expands $(POD_NAME) from the variable defined before it; podman 4.3 sets POD_NAME but leaves
        # the reference as it is (the log folder would be named `$(POD_NAME)`), so expand it here.
        if "value" in env:
            env["value"] = env["value"].replace("$(POD_NAME)", pod_name)
    for volume in deployment["spec"]["template"]["spec"]["volumes"]:
        if "persistentVolumeClaim" in volume:  # the shared log volume: a host folder
            del volume["persistentVolumeClaim"]
            volume["hostPath"] = {"path": str(log_root.resolve()), "type": "Directory"}
    return objects, pod_name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/kube_play.py", description=__doc__.split("\n\n")[0],
                                epilog="Exit status: 0 played; 1 kubectl, podman or the play failed.")  # fmt: skip
    p.add_argument("image", help="the CPU image (make container-cpu prints its tag); localhost/ is added")
    p.add_argument("--port", type=int, default=3000, help="the host port on 127.0.0.1 (%(default)s)")
    p.add_argument("--out", type=Path, default=Path("kube-play"),
                   help="folder for the manifest and, under log/, the pod's inference log (%(default)s)")  # fmt: skip
    args = p.parse_args(argv)
    image = args.image if "/" in args.image else f"localhost/{args.image}"
    log_root = args.out / "log"
    log_root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # a fresh volume's root, as the pod's fsGroup makes it on a cluster
        os.chown(log_root, SERVICE_UID, SERVICE_UID)
    try:
        objects, pod_name = local_deployment(image, args.port, log_root)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    manifest = args.out / "deployment.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    played = subprocess.run(["podman", "kube", "play", str(manifest)], text=True)
    if played.returncode != 0:
        return 1
    print(f"\npod {pod_name}: http://127.0.0.1:{args.port}/readyz answers 200 once it is ready (a few seconds)\n"
          f"its inference log: {log_root / pod_name}\n"
          f"stop it gracefully: podman pod stop -t 30 {pod_name}; then podman kube down {manifest}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
