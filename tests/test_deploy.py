"""The Kubernetes manifests of deploy/: rendered, validated, and run as far as this machine allows.

- Always: ``kubectl kustomize`` renders every overlay and the jobs; every object validates strictly against the
  Kubernetes schemas of the versions we target; the PrometheusRule is monitoring/rules.yml and passes
  ``promtool check rules``; the objects agree with each other and with the service's settings.
- ``integration``: prometheus-adapter's query for the GPU overlay's autoscaler, run by a real Prometheus that
  scrapes the service under a short load.
- ``container`` (podman and root): ``podman kube play`` of the rendered CPU Deployment with the image from
  ``container/build.sh``, and of the drift CronJob's pod with the jobs image against that pod's log, pushing to a
  real Pushgateway; and of the Locust master and worker Deployments against a running service. Test-only changes
  to the manifests are made in :func:`tools.kube_play.local_deployment` (the user's command plays the same),
  :func:`kube_play_cronjob` and :func:`kube_play_locust`, each with its reason.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import kubernetes_validate
import pytest
import requests
import yaml

from loadtest.servers import free_port
from monitoring import prometheusrule
from service.settings import Settings
from tests.helpers import ROOT, in_container, jpeg, podman
from tools.kube_play import local_deployment

DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")
OVERLAY_IDS = [f"deploy/{o}" for o in OVERLAYS]  # not "gpu" alone: that keyword marks tests needing a GPU
RENDERED = (*OVERLAYS, "jobs", "monitoring")
#: The oldest Kubernetes we target (the kubectl on our machines speaks it) and the newest kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.32.0", "1.37.0")
OPERATOR_API = "monitoring.coreos.com/v1"  # Prometheus operator objects: no schema in kubernetes-validate
LOG_MOUNT = "/data/inference_log"


@functools.cache
def render(folder: str) -> tuple[dict, ...]:
    """The objects ``kubectl kustomize deploy/<folder>`` prints."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: it renders the kustomizations (`kubectl kustomize DIR`)"
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(obj for obj in yaml.safe_load_all(out.stdout) if obj)


def one(objects: tuple[dict, ...], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def settings_of(objects: tuple[dict, ...]) -> dict[str, str]:
    """The IMGCLS_* values the Deployment's container gets: its ConfigMap, then its own env."""
    spec = container(one(objects, "Deployment", "imgcls"))
    values: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        values.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    values.update({e["name"]: e["value"] for e in spec.get("env", []) if "value" in e})
    return values


# ---------------------------------------------------------------------------------------------- rendered, validated


@pytest.mark.parametrize("folder", RENDERED, ids=lambda f: f"deploy/{f}")
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_validates_strictly(folder, version):
    """Unknown or misspelled fields, wrong types, missing required fields: all refused (``--strict``)."""
    objects = render(folder)
    assert objects
    for obj in objects:
        if obj["apiVersion"] == OPERATOR_API:
            assert folder == "monitoring", "operator objects only in deploy/monitoring (clusters without it)"
            continue  # checked by their own tools below
        kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_refuses_a_misspelled_field():
    """The check above can fail: a probe under a misspelled key is refused."""
    deployment = json.loads(json.dumps(one(render("cpu"), "Deployment")))
    container(deployment)["readinesProbe"] = container(deployment).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_prometheusrule_is_the_rules_file_and_passes_promtool(tmp_path):
    rule = one(render("monitoring"), "PrometheusRule")
    assert (DEPLOY / "monitoring" / "prometheusrule.yaml").read_text() == prometheusrule.render(), (
        "deploy/monitoring/prometheusrule.yaml is stale: python -m monitoring.prometheusrule > "
        "deploy/monitoring/prometheusrule.yaml"
    )
    assert rule["spec"] == yaml.safe_load((ROOT / "monitoring" / "rules.yml").read_text())
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make system-deps` installs Debian's prometheus package"
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(rule["spec"]))
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_servicemonitor_scrapes_the_service_as_the_job_the_rules_expect():
    monitor = one(render("monitoring"), "ServiceMonitor")
    service = one(render("cpu"), "Service", "imgcls")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    # The operator's job label is the Service's name; the rules select job="imgcls".
    assert service["metadata"]["name"] == "imgcls" and 'up{job="imgcls"}' in (ROOT / "monitoring/rules.yml").read_text()
    assert {"action": "labeldrop", "regex": "endpoint"} in endpoint["relabelings"]


# ------------------------------------------------------------------------------------- what the objects promise


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_settings_are_valid_service_settings(overlay):
    """Every IMGCLS_* key the pods get is a setting of service/settings.py with a value it accepts."""
    values = settings_of(render(overlay))
    known = {f"IMGCLS_{name.upper()}" for name in Settings.__dataclass_fields__}
    assert {k for k in values if k.startswith("IMGCLS_")} <= known
    Settings.from_env(values)  # raises SettingsError on a value the service would refuse


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_pods_stop_without_losing_requests_and_run_locked_down(overlay):
    objects = render(overlay)
    deployment = one(objects, "Deployment", "imgcls")
    pod, box = deployment["spec"]["template"]["spec"], container(deployment)
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert {p["containerPort"] for p in box["ports"]} == {3000}
    assert box["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert box["livenessProbe"]["httpGet"]["path"] == box["startupProbe"]["httpGet"]["path"] == "/livez"
    # The grace period covers the preStop pause, the drain, and a request accepted at the last moment.
    settings = Settings.from_env(settings_of(objects))
    pause = int(box["lifecycle"]["preStop"]["exec"]["command"][-1])
    needed = pause + settings.drain_s + settings.body_timeout_s + settings.timeout_s
    assert pod["terminationGracePeriodSeconds"] > needed
    assert pod["securityContext"]["runAsNonRoot"] and box["securityContext"]["readOnlyRootFilesystem"]
    writable = {m["mountPath"] for m in box["volumeMounts"]}
    assert {"/tmp", LOG_MOUNT, settings_of(objects)["BENTOML_HOME"]} <= writable
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"][
        "matchLabels"
    ]  # fmt: skip
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "3000"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_every_pod_logs_to_its_own_folder_on_the_shared_volume(overlay):
    objects = render(overlay)
    deployment = one(objects, "Deployment", "imgcls")
    box = container(deployment)
    env = {e["name"]: e for e in box["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["IMGCLS_LOG_DIR"]["value"] == f"{LOG_MOUNT}/$(POD_NAME)"
    names = [e["name"] for e in box["env"]]
    assert names.index("POD_NAME") < names.index("IMGCLS_LOG_DIR"), "Kubernetes expands only earlier variables"
    mount = next(m for m in box["volumeMounts"] if m["mountPath"] == LOG_MOUNT)
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    claim = one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # The drift job reads the same claim at the same path.
    job_pod = one(render("jobs"), "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    drift = job_pod["containers"][0]
    job_mount = next(m for m in drift["volumeMounts"] if m["mountPath"] == LOG_MOUNT)
    job_volume = next(v for v in job_pod["volumes"] if v["name"] == job_mount["name"])
    assert job_volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"] and job_mount["readOnly"]
    assert f"--log-dir {LOG_MOUNT}" in drift["args"][0] and '--pushgateway "$PUSHGATEWAY_URL"' in drift["args"][0]


def test_cpu_overlay_runs_int8_on_the_cpu_image_and_scales_on_cpu():
    objects = render("cpu")
    box = container(one(objects, "Deployment"))
    values = Settings.from_env(settings_of(objects))
    assert box["image"].split(":")[0].endswith("image-classifier-service-cpu")
    assert (values.device, values.variant) == ("cpu", "int8")
    assert values.workers == int(box["resources"]["requests"]["cpu"]), "one API worker per CPU requested"
    assert box["resources"]["requests"] == box["resources"]["limits"], "Guaranteed QoS"
    (metric,) = one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"


def test_gpu_overlay_runs_fp16_on_one_gpu_and_scales_on_requests_in_flight():
    objects = render("gpu")
    box = container(one(objects, "Deployment"))
    values = Settings.from_env(settings_of(objects))
    assert box["image"].split(":")[0].endswith("image-classifier-service")
    assert (values.device, values.variant, values.placement) == ("cuda", "fp16", "shared")
    assert box["resources"]["limits"]["nvidia.com/gpu"] == 1
    (metric,) = one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]
    (rule,) = adapter_rules()
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"] == "imgcls_in_flight"


def test_locust_workers_find_their_master_and_the_service():
    objects = render("jobs")
    master_service = one(objects, "Service", "imgcls-locust")
    worker = container(one(objects, "Deployment", "imgcls-locust-worker"))
    assert worker["command"][-2:] == ["--master-host", master_service["metadata"]["name"]]
    assert {p["port"] for p in master_service["spec"]["ports"]} == {8089, 5557}
    host = one(objects, "ConfigMap")["data"]["LOCUST_HOST"]
    assert host == f"http://{one(render('cpu'), 'Service')['metadata']['name']}"


# ----------------------------------------------------------------------- prometheus-adapter's query, for real


def adapter_rules() -> list[dict]:
    return yaml.safe_load((DEPLOY / "gpu" / "prometheus-adapter-rules.yaml").read_text())["rules"]


def adapter_query(namespace: str, pods: list[str]) -> str:
    """The PromQL prometheus-adapter runs for the HPA's pods metric: the rule's template, filled in as it fills it."""
    (rule,) = adapter_rules()
    series = rule["seriesQuery"].split("{")[0]
    matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    return rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)


def prom_query(base: str, expr: str) -> list[dict]:
    with urllib.request.urlopen(f"{base}/api/v1/query?query={urllib.parse.quote(expr)}", timeout=5) as resp:
        return json.load(resp)["data"]["result"]


@pytest.mark.slow
@pytest.mark.integration
def test_adapter_query_gives_one_value_per_pod_that_rises_with_load(server, tmp_path):
    """A real Prometheus scrapes the running service every second, labelled like a pod; the adapter's query returns
    one series for it, 0 at rest and more with more clients in flight."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `make system-deps` installs Debian's prometheus package"
    namespace, pod = "imgcls-test", "imgcls-7d9f-abcde"
    target = server.url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "imgcls",
                        "static_configs": [{"targets": [target], "labels": {"namespace": namespace, "pod": pod}}],
                    }
                ],
            }
        )
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    expr = adapter_query(namespace, [pod])
    photo = jpeg(1600, 1200)  # decoding it takes long enough that the clients' requests overlap in the server
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            files = {"image": ("p.jpg", photo, "image/jpeg")}
            requests.post(server.url + "/classify", files=files, headers={"X-Traffic-Source": "loadtest"}, timeout=60)

    def sample(seconds: float) -> list[float]:
        values, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            result = prom_query(base, expr)
            assert len(result) == 1, f"{expr} gave {result}: one series per pod expected"
            assert result[0]["metric"] == {"namespace": namespace, "pod": pod}
            values.append(float(result[0]["value"][1]))
            time.sleep(0.5)
        return values

    threads: list[threading.Thread] = []
    try:
        deadline = time.monotonic() + 60
        while True:  # until the first scrape is in
            try:
                if prom_query(base, expr):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus scraped nothing within 60 s"
            time.sleep(0.5)
        levels = {0: sample(3)}
        for clients in (2, 8):
            while len(threads) < clients:
                threads.append(threading.Thread(target=client, daemon=True))
                threads[-1].start()
            time.sleep(1.5)  # the next scrapes see this load level only
            levels[clients] = sample(5)
        means = {n: sum(v) / len(v) for n, v in levels.items()}
        print(f"\n{expr}: mean over each load level {means}")
        assert means[0] == 0
        assert 0 < means[2] < means[8]
        assert max(levels[8]) <= 8
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        proc.terminate()
        proc.wait(timeout=20)


# ------------------------------------------------------------------------------------------ podman kube play


def kube_play_cronjob(service_image: str, jobs_image: str, claims: dict[str, Path], pushgateway: str) -> list[dict]:
    """The drift CronJob's pod as a bare Pod (podman runs no CronJobs), with its ConfigMap; ``claims`` maps each
    PersistentVolumeClaim it mounts to a host folder."""
    objects = render("jobs")
    config = json.loads(json.dumps(one(objects, "ConfigMap")))
    config["data"]["PUSHGATEWAY_URL"] = pushgateway
    template = json.loads(json.dumps(one(objects, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]))
    spec = template["spec"]
    spec["hostNetwork"] = True  # the Pushgateway listens on the host's 127.0.0.1
    spec["initContainers"][0]["image"] = service_image
    spec["containers"][0]["image"] = jobs_image
    for volume in spec["volumes"]:
        if "persistentVolumeClaim" in volume:
            claim = volume.pop("persistentVolumeClaim")["claimName"]
            volume["hostPath"] = {"path": str(claims[claim]), "type": "Directory"}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"imgcls-drift-{uuid.uuid4().hex[:6]}"}}
    return [config, {**pod, "spec": spec}]


@pytest.fixture(scope="session")
def jobs_image():
    """``container/build-jobs.sh``: the jobs image's tag; untagged after.

    Untagged rather than removed: its layers stay as the build cache, so the next run takes seconds, not a minute
    (the same image each time, so the disk holds one copy).
    """
    tag = f"localhost/imgcls-jobs:test-{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    build = subprocess.run(
        ["bash", "container/build-jobs.sh"], cwd=ROOT, env={**os.environ, "JOBS_IMAGE": tag},
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-6000:] + build.stderr[-6000:]
    assert build.stdout.strip().splitlines()[-1] == tag
    print(f"\nbuilt {tag} in {time.monotonic() - start:.0f}s: {build.stdout.strip().splitlines()[-2]}")
    yield tag
    podman("untag", tag, check=False)


@pytest.fixture(scope="module")
def played_pod(cpu_image, tmp_path_factory):
    """The CPU Deployment under ``podman kube play``: ready, sent production requests, stopped, taken down.

    Returns what was seen: the log root, the pod's name, the request ids answered, the checks made inside the pod.
    """
    root = tmp_path_factory.mktemp("kube")
    log_root = root / "inference_log"
    log_root.mkdir()
    os.chown(log_root, 1034, 1034)  # a fresh RWX volume's root, as fsGroup would make it
    port = free_port()
    objects, pod_name = local_deployment(f"localhost/{cpu_image}", port, log_root)  # what a user plays too
    manifest = root / "deployment.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    url = f"http://127.0.0.1:{port}"
    seen: dict = {"log_root": log_root, "pod": pod_name, "ids": []}
    started = time.monotonic()
    box = f"{pod_name}-{container(objects[-1])['name']}"  # podman's name for the pod's container
    podman("kube", "play", str(manifest))
    try:
        while True:
            try:
                if requests.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            state = podman("inspect", "--format", "{{.State.Status}}", box).stdout.strip()
            assert state == "running", podman("logs", box, check=False).stderr[-4000:]
            assert time.monotonic() - started < 180, "not ready within 3 minutes"
            time.sleep(0.2)
        seen["ready_s"] = time.monotonic() - started
        seen["pod_name_env"] = podman("exec", box, "printenv", "POD_NAME").stdout.strip()
        seen["uid"] = podman("exec", box, "id", "-u").stdout.strip()
        seen["root_write"] = podman("exec", box, "touch", "/probe", check=False)
        # 120 production requests (no X-Traffic-Source): enough rows for the drift job (at least 100), and the
        # last ones are answered right before the stop, so only the flush on SIGTERM can have logged them.
        photo = jpeg(320, 240)
        for _ in range(120):
            resp = requests.post(url + "/classify", files={"image": ("p.jpg", photo, "image/jpeg")}, timeout=60)
            assert resp.status_code == 200, resp.text
            seen["ids"].append(resp.json()["request_id"])
        seen["model"] = resp.json()["model"]
    finally:
        # Stop as the kubelet does: SIGTERM, then up to terminationGracePeriodSeconds before SIGKILL. `podman kube
        # down` alone (podman 4.3) kills the pod at once: the records of the last second were lost in our tries.
        grace = objects[-1]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        stop = time.monotonic()
        podman("pod", "stop", "-t", str(grace), pod_name, check=False, timeout=grace + 30)
        seen["stop_s"] = time.monotonic() - stop
        seen["exit"] = podman("inspect", "--format", "{{.State.ExitCode}}", box, check=False).stdout.strip()
        seen["down"] = podman("kube", "down", str(manifest), check=False, timeout=120)
    return seen


def logged_ids(folder: Path) -> list[str]:
    return [
        json.loads(line)["request_id"]
        for path in sorted(folder.glob("inference-*.jsonl"))
        for line in path.read_text().splitlines()
        if line
    ]


@in_container(kube_play=True)
def test_kube_play_cpu_deployment_serves_read_only_and_logs_to_its_pod_folder(played_pod):
    ready, stopped = played_pod["ready_s"], played_pod["stop_s"]
    print(f"\nready {ready:.1f}s after podman kube play; stopped {stopped:.1f}s after SIGTERM")
    assert played_pod["pod_name_env"] == played_pod["pod"], "POD_NAME from the downward API"
    assert played_pod["uid"] == "1034"
    assert played_pod["root_write"].returncode != 0 and "Read-only file system" in played_pod["root_write"].stderr
    assert played_pod["exit"] == "0" and played_pod["down"].returncode == 0, played_pod["down"].stderr
    folders = [p for p in played_pod["log_root"].iterdir() if p.is_dir()]
    assert [f.name for f in folders] == [played_pod["pod"]], "one folder, named after the pod"
    logged = logged_ids(folders[0])
    assert sorted(logged) == sorted(played_pod["ids"]), "every answer in the log, once, after the stop"


@in_container(kube_play=True)
def test_drift_cronjob_pod_judges_the_pod_log_and_pushes_to_a_pushgateway(played_pod, cpu_image, jobs_image, tmp_path):
    binary = shutil.which("prometheus-pushgateway")
    assert binary, "prometheus-pushgateway is missing: `make system-deps` installs Debian's package"
    port = free_port()
    gateway = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    manifest = tmp_path / "drift.yaml"
    reports = tmp_path / "reports"
    reports.mkdir()
    os.chown(reports, 1034, 1034)  # what fsGroup makes of a fresh volume
    claims = {"imgcls-inference-log": played_pod["log_root"], "imgcls-drift-reports": reports}
    objects = kube_play_cronjob(f"localhost/{cpu_image}", jobs_image, claims, f"http://127.0.0.1:{port}")
    manifest.write_text(yaml.safe_dump_all(objects))
    box = f"{objects[-1]['metadata']['name']}-drift"
    try:
        start = time.monotonic()
        podman("kube", "play", str(manifest))
        code = int(podman("wait", box, timeout=600).stdout.strip())
        logs = podman("logs", box).stdout
        print(f"\ndrift job pod ran in {time.monotonic() - start:.0f}s, exit {code}")
        assert code == 0, logs[-4000:]
        assert f"{len(played_pod['ids'])} lines in" in logs and "verdict:" in logs and "pushed to" in logs, logs
        pushed = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        model = played_pod["model"]
        assert f'imgcls_drift_judged{{instance="",job="imgcls_drift",model="{model}"}} 1' in pushed
        rows = f'imgcls_drift_rows_current{{instance="",job="imgcls_drift",model="{model}"}} {len(played_pod["ids"])}'
        assert rows in pushed
        # The report and the run history stay on their volume for the next runs and for people.
        assert len(list((reports / "workspace").glob("*/snapshots/*.json"))) == 1
        assert len(list(reports.glob("drift-*.html"))) == 1
    finally:
        podman("kube", "down", str(manifest), check=False)
        gateway.terminate()
        gateway.wait(timeout=20)


def kube_play_locust(host: str, web_port: int, master_port: int) -> list[dict]:
    """The jobs' ConfigMap and Locust Deployments, on the host's network (no Service here) and its 127.0.0.1 only."""
    objects = [json.loads(json.dumps(o)) for o in render("jobs") if o["kind"] in ("ConfigMap", "Deployment")]
    next(o for o in objects if o["kind"] == "ConfigMap")["data"]["LOCUST_HOST"] = host
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        deployment["spec"]["replicas"] = 1
        deployment["spec"]["template"]["spec"]["hostNetwork"] = True
        box = container(deployment)
        box.pop("ports", None)  # podman refuses port mappings on the host's network; the flags below bind instead
        if "--master" in box["command"]:
            box["command"] += ["--web-host", "127.0.0.1", "--web-port", str(web_port),
                               "--master-bind-host", "127.0.0.1", "--master-bind-port", str(master_port)]  # fmt: skip
        else:
            box["command"] = [*box["command"][:-1], "127.0.0.1", "--master-port", str(master_port)]
    return objects


@in_container(kube_play=True)
def test_locust_master_and_worker_pods_load_the_service(server, jobs_image, tmp_path):
    """The jobs image runs the manifests' Locust master and worker; a swarm started on the master's web API sends
    requests from the worker to the service."""
    web = free_port()
    master = next(port for port in iter(free_port, None) if port != web)
    objects = kube_play_locust(server.url, web, master)
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        container(deployment)["image"] = jobs_image
    manifest = tmp_path / "locust.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    ui = f"http://127.0.0.1:{web}"

    def pod_logs() -> str:
        names = podman("ps", "-a", "--format", "{{.Names}}", check=False).stdout.split()
        return "\n".join(f"--- {n}\n{podman('logs', n, check=False).stderr[-1500:]}" for n in names if "locust" in n)

    try:
        podman("kube", "play", str(manifest))
        deadline = time.monotonic() + 120
        while True:
            try:
                stats = requests.get(ui + "/stats/requests", timeout=5).json()
                if len(stats.get("workers", [])) == 1:
                    break
            except (requests.RequestException, ValueError):
                pass
            assert time.monotonic() < deadline, f"the worker did not join the master within 2 minutes\n{pod_logs()}"
            time.sleep(0.5)
        started = requests.post(ui + "/swarm", data={"user_count": 4, "spawn_rate": 4, "host": server.url}, timeout=10)
        assert started.ok and started.json()["success"], started.text
        swarm, deadline = time.monotonic(), time.monotonic() + 60  # a busy box may take a while to spawn the users
        while True:
            time.sleep(1)
            stats = requests.get(ui + "/stats/requests", timeout=5).json()
            total = next(s for s in stats["stats"] if s["name"] == "Aggregated")
            if total["num_requests"] > 10 or time.monotonic() > deadline:
                break
        requests.get(ui + "/stop", timeout=10)
        print(f"\nLocust in pods: {total['num_requests']} requests, {total['num_failures']} failures in "
              f"{time.monotonic() - swarm:.0f} s")  # fmt: skip
        assert total["num_requests"] > 10 and total["num_failures"] == 0, f"{stats['errors']}\n{pod_logs()}"
    finally:
        podman("kube", "down", str(manifest), check=False)
