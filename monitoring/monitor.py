"""`make monitor`: Debian's Prometheus with the project's scrape config and rules, watching a local service.

It also starts a Pushgateway for the drift job when none answers at ``--pushgateway`` (its pushes are kept in
the data folder) and Evidently's UI on the drift and accuracy jobs' workspace (``--workspace``), prints the URLs,
and stops what it started on Ctrl+C (or SIGTERM). Everything binds to 127.0.0.1; the data (Prometheus's TSDB, the
Pushgateway's file, the logs) stays in ``--data-dir``, so the history survives a restart.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "prometheus.yml"
SERVICE_JOB, PUSHGATEWAY_JOB = "imgcls", "pushgateway"
LOCAL_HOSTS = ("127.0.0.1", "localhost")


def render_config(service: str, pushgateway: str, scrape_interval: str | None = None) -> str:
    """monitoring/prometheus.yml with the two targets replaced and the rule files made absolute.

    The result can be written anywhere (Prometheus resolves relative rule paths against the config's folder).
    """
    config = yaml.safe_load(CONFIG.read_text())
    config["rule_files"] = [str((HERE / path).resolve()) for path in config["rule_files"]]
    targets = {SERVICE_JOB: service, PUSHGATEWAY_JOB: pushgateway}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    if scrape_interval:
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = scrape_interval
    return yaml.safe_dump(config, sort_keys=False)


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


#: Prometheus's pages the monitor points to; Debian's package ships only the classic UI, under /classic/.
PAGES = {
    "targets": "targets",
    "alerts": "alerts",
    "rules": "rules",
    "graph": "graph?g0.expr=job_endpoint:bentoml_service_request:rate5m&g0.tab=0",
}


def page_links(base: str) -> dict[str, str]:
    """The URL of each of :data:`PAGES` on the Prometheus at ``base``: its React UI, else its classic one."""
    prefix = "" if answers(f"{base}/alerts") else "classic/"  # (/graph redirects to the classic page there)
    return {name: f"{base}/{prefix}{path}" for name, path in PAGES.items()}


def binary(name: str) -> str:
    """The path of a Debian binary, or exit with what to install."""
    path = shutil.which(name)
    if path is None:
        sys.exit(f"error: `{name}` is not installed; `make system-deps` installs it (Debian packages).")
    return path


def start(cmd: list[str], log_file: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server with its output in ``log_file``."""
    with open(log_file, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_until(url: str, proc: subprocess.Popen, log_file: Path, timeout: float = 60.0) -> None:
    """Poll ``url`` until it answers; exit with the log's end if the server stops or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode}:\n{tail(log_file)}")
        if answers(url):
            return
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s:\n{tail(log_file)}")


def tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM (Prometheus and the Pushgateway shut down cleanly on it), then SIGKILL after 30 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    port = os.environ.get("BENTOML_PORT", "3000")
    p = argparse.ArgumentParser(
        prog="python -m monitoring.monitor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="From make: make monitor ARGS='--port 9190 --pushgateway 127.0.0.1:9191'. Exit status: 0 stopped "
        "with Ctrl+C, 1 a server could not start or stopped.",
    )
    p.add_argument("--service", default=f"127.0.0.1:{port}", help="host:port of the service to scrape (%(default)s)")
    p.add_argument(
        "--pushgateway",
        default="127.0.0.1:9091",
        help="host:port of the drift job's Pushgateway, started when none answers (%(default)s)",
    )
    p.add_argument("--no-pushgateway", action="store_true", help="never start a Pushgateway, only scrape one")
    p.add_argument("--port", type=int, default=9090, help="Prometheus's port on 127.0.0.1 (%(default)s)")
    p.add_argument("--data-dir", type=Path, default=HERE.parent / ".monitor",
                   help="TSDB, Pushgateway file, logs (%(default)s)")  # fmt: skip
    p.add_argument("--scrape-interval", default=None, help="instead of prometheus.yml's 5s, e.g. 1s")
    p.add_argument("--workspace", type=Path, default=Path("reports/workspace"),
                   help="the drift and accuracy jobs' Evidently workspace (%(default)s)")  # fmt: skip
    p.add_argument("--evidently-port", type=int, default=8000, help="Evidently UI's port on 127.0.0.1, 0: none "
                   "(%(default)s)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prometheus = binary("prometheus")
    args.data_dir.mkdir(parents=True, exist_ok=True)
    config = args.data_dir / "prometheus.yml"
    config.write_text(render_config(args.service, args.pushgateway, args.scrape_interval))
    # SIGTERM stops as Ctrl+C does; Ctrl+C in a terminal also reaches the children, which stop on it themselves.
    # SIGINT is set too: a shell starting this in the background (`make monitor &`) leaves it ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    procs: list[subprocess.Popen] = []
    try:
        pushgateway_url, pushgateway_note = f"http://{args.pushgateway}", "already running"
        if answers(pushgateway_url + "/-/ready"):
            pass
        elif args.no_pushgateway or args.pushgateway.rsplit(":", 1)[0] not in LOCAL_HOSTS:
            pushgateway_note = "not answering; the drift panels stay empty until one runs"
        else:
            log_file = args.data_dir / "pushgateway.log"
            cmd = [binary("prometheus-pushgateway"), f"--web.listen-address={args.pushgateway}",
                   f"--persistence.file={args.data_dir / 'pushgateway.db'}"]  # fmt: skip
            procs.append(start(cmd, log_file))
            wait_until(pushgateway_url + "/-/ready", procs[-1], log_file)
            pushgateway_note = f"started here, log {log_file}"

        prometheus_log = log_file = args.data_dir / "prometheus.log"
        cmd = [prometheus, f"--config.file={config}", f"--storage.tsdb.path={args.data_dir / 'prometheus'}",
               f"--web.listen-address=127.0.0.1:{args.port}"]  # fmt: skip
        procs.append(start(cmd, log_file))
        base = f"http://127.0.0.1:{args.port}"
        wait_until(base + "/-/ready", procs[-1], log_file)

        evidently_note = "not started (--evidently-port 0)"
        if args.evidently_port:
            log_file = args.data_dir / "evidently.log"
            args.workspace.mkdir(parents=True, exist_ok=True)  # (it shows an empty one until the first run)
            cmd = [str(Path(sys.executable).parent / "evidently"), "ui", "--workspace", str(args.workspace),
                   "--host", "127.0.0.1", "--port", str(args.evidently_port)]  # fmt: skip
            procs.append(start(cmd, log_file, env={**os.environ, "DO_NOT_TRACK": "1"}))  # no usage telemetry
            evidently_url = f"http://127.0.0.1:{args.evidently_port}"
            wait_until(evidently_url + "/api/version", procs[-1], log_file)
            evidently_note = f"{evidently_url}  (workspace {args.workspace.resolve()}, log {log_file})"

        service_note = "answering" if answers(f"http://{args.service}/metrics") else "not answering yet (make serve)"
        pages = "".join(f"  {name:<10} {url}\n" for name, url in page_links(base).items())
        print(
            f"Prometheus   {base}  (log {prometheus_log})\n{pages}"
            f"Service      http://{args.service}/metrics  ({service_note})\n"
            f"Pushgateway  {pushgateway_url}  ({pushgateway_note})\n"
            f"  drift job  python -m drift --pushgateway {pushgateway_url}\n"
            f"Evidently    {evidently_note}\n"
            f"Dashboard    {HERE / 'grafana' / 'dashboard.json'} (for Grafana; see docs/monitoring.md)\n"
            "Ctrl+C stops.",
            flush=True,
        )
        while all(proc.poll() is None for proc in procs):
            time.sleep(1)
        dead = next(proc for proc in procs if proc.poll() is not None)
        print(f"error: {dead.args[0]} stopped with code {dead.returncode}; see its log in {args.data_dir}", flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl+C must not leave a server behind
            signal.signal(sig, signal.SIG_IGN)
        stop(procs)
        if procs:
            print("stopped " + ", ".join(Path(proc.args[0]).name for proc in procs), flush=True)


if __name__ == "__main__":
    sys.exit(main())
