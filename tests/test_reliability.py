"""The reliability suite (`make test-reliability`): the probes an SRE runs before production, against a real server.

Each probe runs beside a normal client and compares what that client gets with what it got alone, measured in
the same test a few seconds earlier (the machine is shared and noisy: ratios, never absolute times). Attackers
run in processes of their own, so they do not steal the normal client's interpreter. Everything is bounded in
time and sends traffic to 127.0.0.1 only. The figures are printed; docs/reliability.md records them.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import requests

from imgcls.inference_log import log_files, parse_line
from tests.helpers import encode, jpeg, start_server

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.integration]

#: How much of its unloaded throughput a normal client must keep during an attack.
KEEPS = 0.8
FORK = multiprocessing.get_context("fork")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    env = {"IMGCLS_MODEL": tiny_model, "IMGCLS_DEVICE": "cpu", "IMGCLS_HEADER_TIMEOUT_S": "3",
           "IMGCLS_BODY_TIMEOUT_S": "5", "IMGCLS_DRAIN_S": "1"}  # fmt: skip
    srv = start_server(".", env, tmp_path_factory.mktemp("reliability"))
    yield srv
    srv.stop()


def normal_client(url: str, seconds: float, connections: int = 2) -> dict:
    """A well-behaved client: ``connections`` keep-alive loops posting a 500x375 JPEG; req/s and statuses."""
    body, stop, statuses, latencies = jpeg(), time.monotonic() + seconds, Counter(), []

    def loop() -> None:
        with requests.Session() as session:
            while time.monotonic() < stop:
                started = time.monotonic()
                try:
                    status = session.post(url + "/classify", files={"image": ("a.jpg", body)}, timeout=30).status_code
                except requests.RequestException as exc:
                    status = type(exc).__name__
                statuses[status] += 1
                latencies.append(time.monotonic() - started)

    threads = [threading.Thread(target=loop) for _ in range(connections)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return {"rps": statuses[200] / seconds, "statuses": dict(statuses), "latencies": latencies}


def alone_and_attacked(url: str, attack, rounds: int = 3, seconds: float = 4.0) -> tuple[dict, dict]:
    """The normal client's throughput alone and beside ``attack()`` (which starts attacker processes and returns
    them), in alternating rounds so that a change in the machine's other load falls on both alike."""
    results = {"alone": [], "attacked": []}
    for _ in range(rounds):
        results["alone"].append(normal_client(url, seconds))
        attackers = attack()
        time.sleep(1.5)  # the attack is under way
        results["attacked"].append(normal_client(url, seconds))
        for a in attackers:
            a.terminate()
            a.join(timeout=10)
    merged = {}
    for key, runs in results.items():
        statuses = Counter()
        for r in runs:
            statuses.update(r["statuses"])
        merged[key] = {"rps": sum(r["rps"] for r in runs) / rounds, "statuses": dict(statuses)}
    return merged["alone"], merged["attacked"]


def in_process(target, *args) -> multiprocessing.Process:
    proc = FORK.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def slow_bodies(port: int, connections: int, seconds: float) -> None:
    """Open connections that send a request head and the start of a multipart body, then a byte a second."""
    socks = []
    for _ in range(connections):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; "
                      b"filename=\"a.jpg\"\r\n\r\n")  # fmt: skip
            socks.append(s)
        except OSError:
            pass
    stop = time.monotonic() + seconds
    while time.monotonic() < stop and socks:
        for s in list(socks):
            try:
                s.sendall(b"x")
            except OSError:  # the server gave up on it (408): open another, as an attacker would
                socks.remove(s)
                try:
                    socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                except OSError:
                    pass
        time.sleep(1.0)


def huge_headers(port: int, seconds: float) -> None:
    """Send endless header bytes, reconnecting whenever the server closes the connection."""
    stop, chunk = time.monotonic() + seconds, b"a" * 65536
    while time.monotonic() < stop:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Huge: ")
                while time.monotonic() < stop:
                    s.sendall(chunk)
        except OSError:
            time.sleep(0.01)


@functools.cache
def costly_uploads() -> tuple[bytes, bytes]:
    """Images small on the wire and costly to decode: a 4000x4000 lossless WebP (within the decode budget:
    decoded in full) and a 7000x7000 one (over it: refused from its header). Made before the attackers fork."""
    from PIL import Image

    return tuple(
        encode(Image.new("RGB", (side, side), (90, 140, 200)), "WEBP", lossless=True, quality=0)
        for side in (4000, 7000)
    )


def costly_images(url: str, seconds: float) -> None:
    """Send the costly images back to back."""
    allowed, refused = costly_uploads()
    stop = time.monotonic() + seconds
    with requests.Session() as session:
        while time.monotonic() < stop:
            for data in (allowed, refused):
                try:
                    session.post(url + "/classify", files={"image": ("x.webp", data, "image/webp")}, timeout=30)
                except requests.RequestException:
                    time.sleep(0.1)


def worker_pids(srv) -> list[int]:
    """The API worker processes of a server (not the shared model process, nor helpers such as the costly-image
    decoder and multiprocessing's resource tracker)."""
    workers = []
    for child in psutil.Process(srv.proc.pid).children(recursive=True):
        try:
            if "--service-name image_classifier" in " ".join(child.cmdline()):
                workers.append(child.pid)
        except psutil.Error:  # gone, or a killed worker its supervisor has not reaped yet
            continue
    return workers


def logged_ids(folder: Path) -> set[str]:
    ids = set()
    for path in log_files(folder):
        for line in path.read_bytes().splitlines():
            record = parse_line(line)
            if record is not None:
                ids.add(record["request_id"])
    return ids


def test_slow_bodies_and_huge_headers_leave_a_normal_client_its_throughput(server):
    port = int(server.url.rsplit(":", 1)[1])

    def attack() -> list:
        return [in_process(slow_bodies, port, 128, 60), *(in_process(huge_headers, port, 60) for _ in range(2))]

    alone, attacked = alone_and_attacked(server.url, attack)
    print(f"normal client: {alone['rps']:.0f} req/s alone, {attacked['rps']:.0f} beside 128 slow bodies and 2 "
          f"endless headers ({attacked['rps'] / alone['rps']:.0%}); statuses {attacked['statuses']}")  # fmt: skip
    assert set(attacked["statuses"]) == {200}
    assert attacked["rps"] >= KEEPS * alone["rps"]


def test_costly_images_leave_a_normal_client_its_throughput_and_memory_stays_bounded(server):
    costly_uploads()
    pids = worker_pids(server)
    base_rss = max(psutil.Process(p).memory_info().rss for p in pids)
    peak, done = [base_rss], threading.Event()

    def watch_memory() -> None:
        while not done.is_set():
            peak.append(max(psutil.Process(p).memory_info().rss for p in pids))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_memory)
    watcher.start()
    alone, attacked = alone_and_attacked(
        server.url, lambda: [in_process(costly_images, server.url, 60) for _ in range(4)]
    )
    done.set()
    watcher.join()
    mb = 1 << 20
    ratio = attacked["rps"] / alone["rps"]
    print(f"normal client: {alone['rps']:.0f} req/s alone, {attacked['rps']:.0f} beside 4 clients of costly images "
          f"({ratio:.0%}); worker RSS {base_rss / mb:.0f} MB idle, peak {max(peak) / mb:.0f} MB")  # fmt: skip
    assert set(attacked["statuses"]) == {200}
    assert attacked["rps"] >= KEEPS * alone["rps"]
    assert max(peak) < 800 * mb  # docs/reliability.md: the figure measured, and the bound kept


def test_latency_after_a_burst_is_back_to_idle_within_five_seconds(server):
    def lone_latency(n: int = 20) -> float:
        with requests.Session() as session:
            times = []
            for _ in range(n):
                started = time.monotonic()
                session.post(server.url + "/classify", files={"image": ("a.jpg", jpeg())}, timeout=30)
                times.append(time.monotonic() - started)
        return sorted(times)[n // 2]

    idle = lone_latency()
    burst = [in_process(normal_client, server.url, 10.0, 64)]
    for b in burst:
        b.join(timeout=60)
    started = time.monotonic()
    after = lone_latency(10)
    while after > 2 * idle and time.monotonic() - started < 5:
        after = lone_latency(10)
    print(f"lone request: {idle * 1000:.1f} ms idle, {after * 1000:.1f} ms right after a 64-client burst "
          f"({time.monotonic() - started:.1f} s after it)")  # fmt: skip
    assert after <= 2 * idle


def test_keep_alive_clients_stay_spread_over_the_workers(tiny_model, tmp_path):
    """The kernel hands a new connection to whichever worker's loop is awake, most often the busy one: without
    service/balance.py 8 clients that reconnect now and then drifted from 4+4 to 0+8 within 20 s, one worker
    queueing while the other idled. Here they reconnect every 50 requests, about twice a second; measured without
    the census, 3 of 14 samples were 2+6, with it none was further apart than 3+5."""
    env = {"IMGCLS_MODEL": tiny_model, "IMGCLS_DEVICE": "cpu", "IMGCLS_KEEPALIVE_REQUESTS": "50"}
    srv = start_server(".", env, tmp_path)
    try:
        port = int(srv.url.rsplit(":", 1)[1])
        workers = [psutil.Process(pid) for pid in worker_pids(srv)]
        result: dict = {}
        client = threading.Thread(target=lambda: result.update(normal_client(srv.url, 20, connections=8)))
        client.start()
        splits = []
        time.sleep(4)
        while client.is_alive() and len(splits) < 14:
            splits.append(sorted(
                sum(1 for c in w.net_connections() if c.status == "ESTABLISHED" and c.laddr.port == port)
                for w in workers
            ))  # fmt: skip
            time.sleep(1)
        client.join()
    finally:
        srv.stop()
    print(f"8 keep-alive clients, connections per worker once a second: {splits}; {result['rps']:.0f} req/s")
    assert set(result["statuses"]) == {200}
    uneven = [split for split in splits if split[-1] - split[0] > 2]
    assert len(uneven) <= 1, f"connections piled onto one worker: {splits}"


def test_a_killed_worker_is_replaced_and_loses_at_most_its_last_second(server):
    """kill -9 of an API worker under 8 clients: the requests in flight on it fail, its last second of log is lost
    (the writer flushes once a second), and the supervisor starts a new one."""
    answered, failures, stop = [], Counter(), threading.Event()

    def client() -> None:
        body = jpeg()
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    resp = session.post(server.url + "/classify", files={"image": ("a.jpg", body)}, timeout=30)
                    answered.append((time.monotonic(), resp.json()["request_id"]))
                except (requests.RequestException, ValueError, KeyError) as exc:
                    failures[type(exc).__name__] += 1

    threads = [threading.Thread(target=client) for _ in range(8)]
    [t.start() for t in threads]
    time.sleep(4)
    victim = worker_pids(server)[0]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    time.sleep(6)
    stop.set()
    [t.join() for t in threads]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (len(worker_pids(server)) < 2 or victim in worker_pids(server)):
        time.sleep(0.5)
    replaced = time.monotonic() - killed_at
    time.sleep(2)  # the surviving worker's last flush
    lost = {rid for _, rid in answered} - logged_ids(server.log_dir)
    rate = sum(1 for t, _ in answered if killed_at - 3 <= t < killed_at) / 3
    print(f"kill -9 of a worker under 8 clients ({rate:.0f} req/s): {sum(failures.values())} requests failed "
          f"{dict(failures)}, {len(lost)} answered records not in the log, replaced in {replaced:.0f} s")  # fmt: skip
    assert victim not in worker_pids(server) and len(worker_pids(server)) == 2, "the worker was not replaced"
    assert requests.get(server.url + "/readyz", timeout=10).status_code == 200
    assert sum(failures.values()) <= 8, "more requests failed than were in flight"
    assert len(lost) <= 1.5 * rate, "more than the last flush interval of the log was lost"


def test_a_killed_supervisor_takes_its_workers_with_it_and_the_port_is_free(tiny_model, tmp_path):
    env = {"IMGCLS_MODEL": tiny_model, "IMGCLS_DEVICE": "cpu", "IMGCLS_DRAIN_S": "0"}
    srv = start_server(".", env, tmp_path / "a")
    children = psutil.Process(srv.proc.pid).children(recursive=True)
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()
    started = time.monotonic()
    while time.monotonic() - started < 20 and any(c.is_running() and c.status() != "zombie" for c in children):
        time.sleep(0.2)
    gone = time.monotonic() - started
    print(f"supervisor killed: its {len(children)} workers gone after {gone:.1f} s")
    assert not any(c.is_running() and c.status() != "zombie" for c in children)
    port = int(srv.url.rsplit(":", 1)[1])
    # The port can be listened on again, as the next `bentoml serve` would: with SO_REUSEADDR, as circus sets it,
    # so connections the server closed (TIME_WAIT) do not count, while a listener left behind would. Retried for a
    # few seconds, as a restart would be (the bind failed once in a full suite run and never alone); a failure
    # names what holds the port.
    deadline, error = time.monotonic() + 10, None
    while time.monotonic() < deadline:
        try:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen()
            break
        except OSError as exc:
            error = exc
            time.sleep(0.5)
    else:
        held = subprocess.run(["ss", "-tanp"], capture_output=True, text=True).stdout.splitlines()
        raise AssertionError(f"port {port} still taken ({error}): {[ln for ln in held if f':{port} ' in ln]}")


def test_sigterm_under_load_answers_every_accepted_request_and_logs_it(tiny_model, tmp_path):
    env = {"IMGCLS_MODEL": tiny_model, "IMGCLS_DEVICE": "cpu", "IMGCLS_DRAIN_S": "1", "IMGCLS_ACCESS_LOG": "0"}
    srv = start_server(".", env, tmp_path)
    answered, failures, stop = [], Counter(), threading.Event()

    def client() -> None:
        body = jpeg()
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    resp = session.post(srv.url + "/classify", files={"image": ("a.jpg", body)}, timeout=30)
                except requests.ConnectionError:
                    failures["connection"] += 1  # refused, or reset before the server read the request
                    time.sleep(0.05)
                    continue
                if resp.status_code == 200:
                    answered.append(resp.json()["request_id"])
                else:
                    failures[resp.status_code] += 1

    threads = [threading.Thread(target=client) for _ in range(8)]
    [t.start() for t in threads]
    time.sleep(3)
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(timeout=60)
    stop.set()
    [t.join() for t in threads]
    logged = logged_ids(srv.log_dir)
    unlogged, unanswered = len(set(answered) - logged), len(logged - set(answered))
    print(f"SIGTERM under 8 clients: exit {code}, {len(answered)} answered, failures {dict(failures)}, "
          f"{unlogged} answered but not logged, {unanswered} logged unanswered")  # fmt: skip
    assert code == 0 and answered
    assert set(failures) <= {"connection"}, "an accepted request got an error status"
    assert set(answered) <= logged, "an answered request is missing from the inference log"
    assert logged <= set(answered), "a request was processed (logged) but its client got no answer"


def test_a_head_that_never_ends_is_closed_after_the_header_timeout(server):
    port = int(server.url.rsplit(":", 1)[1])
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\n")
        reply = b""
        try:
            while time.monotonic() - started < 8:
                conn.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.5)
        except OSError:
            pass
        try:
            reply = conn.recv(4096)
        except OSError:
            pass
    assert time.monotonic() - started < 6
    assert reply.startswith(b"HTTP/1.1 408") and b"head_timeout" in reply


def test_schemathesis_finds_no_server_error_in_the_documented_api(server, tmp_path):
    """Property-based requests generated from /docs.json for the two upload endpoints: over 1,000, and no 5xx."""
    spec = requests.get(server.url + "/docs.json", timeout=10).json()
    assert all(spec["paths"][p]["post"]["requestBody"]["required"] for p in ("/classify", "/classify_batch"))
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/docs.json", "--checks", "not_a_server_error",
           "--max-examples", "1000", "--phases", "coverage,fuzzing", "--workers", "2", "--request-timeout", "30",
           "--include-method", "POST", "--suppress-health-check", "all", "--generation-deterministic"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    generated = [line for line in out.splitlines() if " generated" in line]
    print(generated)
    assert proc.returncode == 0 and "No issues found" in out, out[-4000:]
    assert generated and int(generated[0].split()[0]) >= 1000, out[-2000:]
