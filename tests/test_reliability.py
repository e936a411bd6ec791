"""The reliability suite (`make test-reliability`): the probes an SRE runs before production, against a real server.

Each probe runs beside a normal client and compares what that client gets with what it got alone, measured in
the same test a few seconds earlier (the machine is shared and noisy: ratios, never absolute times). Attackers
run in processes of their own, so they do not steal the normal client's interpreter. Everything is bounded in
time and sends traffic to 127.0.0.1 only. The figures are printed; docs/reliability.md records them.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import PIL.Image
import psutil
import pytest
import requests

from imgcls.inference_log import log_files, parse_line
from tests.helpers import (
    costly_webp,
    encode,
    jpeg,
    metric_values,
    scan_bomb,
    start_server,
    text_chunk_png,
    total,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.integration]

#: How much of its unloaded throughput a normal client must keep during an attack (docs/reliability.md has what
#: it keeps; this leaves room for a noisy 2-core box).
KEEPS = 0.7
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


@contextlib.contextmanager
def workers_rss(server):
    """The API workers' largest RSS now, and a list that gets their largest RSS every 50 ms until the block ends."""
    pids = worker_pids(server)
    base = max(psutil.Process(p).memory_info().rss for p in pids)
    peak, done = [base], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak.append(max(psutil.Process(p).memory_info().rss for p in pids))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield base, peak
    finally:
        done.set()
        watcher.join()


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
        latencies = [t for r in runs for t in r["latencies"]]
        merged[key] = {"rps": sum(r["rps"] for r in runs) / rounds, "statuses": dict(statuses), "latencies": latencies}
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
    with workers_rss(server) as (base_rss, peak):
        alone, attacked = alone_and_attacked(
            server.url, lambda: [in_process(costly_images, server.url, 60) for _ in range(4)]
        )
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
    """The kernel hands a new connection to whichever worker's loop is awake, often the busy one, and a keep-alive
    connection then stays where it landed: without the census (service/adaptations.py) 8 clients that connect at
    once and never reconnect stayed 2+6 or 3+5 as often as 4+4, for the whole run. With it, the crowded worker
    closes one connection at a time until the client's reconnect lands on the other."""
    env = {"IMGCLS_MODEL": tiny_model, "IMGCLS_DEVICE": "cpu", "IMGCLS_KEEPALIVE_REQUESTS": "0"}
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
    uneven = [split for split in splits if split[-1] - split[0] > 1]
    assert len(uneven) <= 2, f"connections stayed piled onto one worker: {splits}"


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
    counts = re.search(r"(\d+) generated, (\d+) passed", out)
    print(counts and counts.group(0))
    # exit 0 with every case passed; warnings (such as /feedback refusing most generated request ids, which only
    # this service can issue) are not failures
    assert proc.returncode == 0 and counts and counts.group(1) == counts.group(2), out[-4000:]
    assert int(counts.group(1)) >= 1000, out[-2000:]


def sender(url: str, data: bytes, seconds: float, path: str = "/classify", field: str = "image",
           content_type: str = "application/octet-stream") -> None:  # fmt: skip
    """Send ``data`` back to back as an upload for ``seconds``."""
    stop = time.monotonic() + seconds
    with requests.Session() as session:
        while time.monotonic() < stop:
            try:
                session.post(url + path, files={field: ("x", data, content_type)}, timeout=30)
            except requests.RequestException:
                time.sleep(0.1)


@functools.cache
def attack_images() -> dict[str, bytes]:
    """Made before the attackers fork, and once per run."""
    return {
        "scan_bomb": scan_bomb(),
        "progressive_7071": encode(
            PIL.Image.new("RGB", (7071, 7071), (40, 90, 160)), "JPEG", quality=50, progressive=True, subsampling=0
        ),  # fmt: skip
        "text_png": text_chunk_png(),
    }


def test_a_progressive_jpeg_scan_bomb_is_refused_from_its_structure(server):
    """A few hundred KB that declare 7000x7000 and hold 700 scans, each a pass over every coefficient: refused
    before decoding, so four senders of it cost a normal client no more than four senders of as many bytes of
    garbage (any flood of uploads takes its share of the CPU)."""
    bomb = attack_images()["scan_bomb"]
    garbage = bytes(range(256)) * (len(bomb) // 256)
    started = time.monotonic()
    resp = requests.post(server.url + "/classify", files={"image": ("b.jpg", bomb, "image/jpeg")}, timeout=30)
    took = time.monotonic() - started
    assert resp.status_code == 413 and resp.json()["error"] == "too_costly_to_decode", resp.text
    assert "scan" in resp.json()["detail"] and "IMGCLS_MAX_DECODE_PIXELS" in resp.json()["detail"]
    kept = {}
    for name, data in [("bomb", bomb), ("garbage", garbage)]:
        alone, attacked = alone_and_attacked(
            server.url, lambda data=data: [in_process(sender, server.url, data, 60) for _ in range(4)]
        )
        assert set(attacked["statuses"]) == {200}
        kept[name] = attacked["rps"] / alone["rps"]
    print(f"scan bomb ({len(bomb) >> 10} KB, 710 scans): refused in {took * 1000:.0f} ms; a normal client kept "
          f"{kept['bomb']:.0%} of its throughput beside 4 senders of it, {kept['garbage']:.0%} beside 4 senders of "
          "as many bytes of garbage")  # fmt: skip
    assert took < 1.0 and kept["bomb"] >= KEEPS * kept["garbage"]


def test_progressive_jpegs_that_would_hold_hundreds_of_mb_are_refused_and_memory_stays_flat(server):
    """A progressive 7071x7071 4:4:4 JPEG keeps 300 MB of coefficients while it decodes: counted as memory
    before decoding, it is refused; eight at once leave the workers' memory where it was."""
    data = attack_images()["progressive_7071"]
    with workers_rss(server) as (base, peak), ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: requests.post(server.url + "/classify", files={"image": ("p.jpg", data)},
                                                         timeout=60).status_code, range(16)))  # fmt: skip
    mb = 1 << 20
    print(f"16 progressive 7071x7071 JPEGs, 8 at a time: statuses {Counter(statuses)}; worker RSS {base / mb:.0f} "
          f"MB before, peak {max(peak) / mb:.0f} MB")  # fmt: skip
    assert set(statuses) == {413}
    assert max(peak) - base < 100 * mb


def test_announced_bodies_that_never_come_reserve_nothing(server):
    """24 connections that send headers declaring 64 MiB and no body: other uploads are still received."""
    port = int(server.url.rsplit(":", 1)[1])

    def announce(seconds: float) -> None:
        socks, stop = [], time.monotonic() + seconds
        while time.monotonic() < stop:
            while len(socks) < 24:
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=5)
                    s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                              b"Content-Length: 67108864\r\n\r\n")  # fmt: skip
                    socks.append(s)
                except OSError:
                    time.sleep(0.1)
            time.sleep(0.5)
            socks = [s for s in socks if s.fileno() >= 0 and not _closed(s)]

    alone, attacked = alone_and_attacked(server.url, lambda: [in_process(announce, 60)])
    print(f"24 connections announcing 64 MiB bodies: normal client {alone['rps']:.0f} req/s alone, "
          f"{attacked['rps']:.0f} beside them; statuses {attacked['statuses']}")  # fmt: skip
    assert set(attacked["statuses"]) == {200}
    assert attacked["rps"] >= KEEPS * alone["rps"]


def _closed(s: socket.socket) -> bool:
    try:
        s.setblocking(False)
        return s.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        s.setblocking(True)


def test_image_headers_are_read_off_the_event_loop(server):
    """A 63 KB PNG whose text chunks inflate to 60 MB: refused after the first MiB, in a worker thread, so the
    probes that share the event loop keep answering at once."""
    png = attack_images()["text_png"]
    resp = requests.post(server.url + "/classify", files={"image": ("t.png", png, "image/png")}, timeout=30)
    assert resp.status_code == 413 and "text metadata" in resp.json()["detail"]

    def livez(seconds: float) -> list[float]:
        times, stop = [], time.monotonic() + seconds
        with requests.Session() as session:
            while time.monotonic() < stop:
                started = time.monotonic()
                session.get(server.url + "/livez", timeout=10)
                times.append(time.monotonic() - started)
                time.sleep(0.02)
        return sorted(times)

    alone = livez(3)
    senders = [in_process(sender, server.url, png, 30) for _ in range(4)]
    time.sleep(1)
    attacked = livez(5)
    for s in senders:
        s.terminate()
        s.join(timeout=10)
    p50 = lambda t: t[len(t) // 2] * 1000  # noqa: E731
    print(f"/livez beside 4 senders of text-chunk PNGs: p50 {p50(alone):.1f} ms alone, {p50(attacked):.1f} ms "
          f"attacked, max {attacked[-1] * 1000:.0f} ms")  # fmt: skip
    assert p50(attacked) < 50 and attacked[-1] < 0.5


def test_a_request_past_its_deadline_stops_using_cpu(tiny_model, tmp_path):
    """A costly image still decoding at the deadline: 504, and its decode (in the slow lane's process) is killed,
    so the server is idle again within a second."""
    env = {"IMGCLS_MODEL": tiny_model, "IMGCLS_DEVICE": "cpu", "IMGCLS_TIMEOUT_S": "1",
           "IMGCLS_MAX_PIXELS": "150000000", "IMGCLS_MAX_DECODE_PIXELS": "150000000"}  # fmt: skip
    srv = start_server(".", env, tmp_path)
    try:
        huge = costly_webp(11000)  # seconds of CPU in full
        tree = [psutil.Process(srv.proc.pid)]

        def cpu() -> float:
            total = 0.0
            for p in [*tree, *tree[0].children(recursive=True)]:
                try:
                    total += sum(p.cpu_times()[:2])
                except psutil.Error:
                    pass
            return total

        resp = requests.post(srv.url + "/classify", files={"image": ("h.webp", huge)}, timeout=60)
        answered = time.monotonic()
        assert resp.status_code == 504 and resp.json()["error"] == "timeout", resp.text
        busy, last = [], cpu()
        while time.monotonic() - answered < 3:
            time.sleep(0.25)
            now = cpu()
            busy.append((round(time.monotonic() - answered, 2), round((now - last) / 0.25, 2)))
            last = now
        idle_at = next((t for t, cores in busy if cores < 0.2), None)
    finally:
        srv.stop()
    print(f"costly decode past its 1 s deadline: server CPU (cores) after the 504: {busy}; idle after {idle_at} s")
    assert idle_at is not None and idle_at <= 1.0


def test_batches_do_not_starve_single_photos(server):
    """Four clients sending 64-image batches beside one sending single photos: the photos are taken in turn with the
    batches' images, and the batches are shed by their estimated wait instead of queueing for seconds."""
    small = jpeg(160, 120)

    def batches(seconds: float) -> None:
        stop = time.monotonic() + seconds
        files = [("images", ("b.jpg", small, "image/jpeg"))] * 64
        with requests.Session() as session:
            while time.monotonic() < stop:
                try:
                    session.post(server.url + "/classify_batch", files=files, timeout=30)
                except requests.RequestException:
                    time.sleep(0.1)

    alone, attacked = alone_and_attacked(server.url, lambda: [in_process(batches, 60) for _ in range(4)])
    slowest = max(attacked["latencies"])
    print(f"single photos: {alone['rps']:.0f} req/s alone, {attacked['rps']:.0f} beside 4 clients of 64-image "
          f"batches ({attacked['rps'] / alone['rps']:.0%}), slowest {slowest * 1000:.0f} ms; "
          f"statuses {attacked['statuses']}")  # fmt: skip
    assert set(attacked["statuses"]) <= {200, 503}
    # Its two connections among six get a third of the turns: no wait near a second, and a floor well under that
    # share for a noisy box (docs/reliability.md has what it keeps).
    assert attacked["rps"] >= 0.15 * alone["rps"] and slowest < 0.5


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs for the inference log: a disk that fills up (needs root)."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_loses_whole_records_counted_one_by_one(tiny_model, small_disk, tmp_path):
    """The log's disk fills up mid-write, then space comes back: every line left is a whole record, the records
    lost are counted one by one in imgcls_inference_log_dropped_total, and no empty thumbnail is left."""
    env = {"IMGCLS_MODEL": tiny_model, "IMGCLS_DEVICE": "cpu", "IMGCLS_LOG_DIR": str(small_disk),
           "IMGCLS_THUMBNAILS_PER_S": "1000", "IMGCLS_LOG_MAX_TOTAL_BYTES": "0"}  # fmt: skip
    srv = start_server(".", env, tmp_path / "server")
    answered, unfamiliar = [], []
    try:
        free = shutil.disk_usage(small_disk).free
        (small_disk / "filler").write_bytes(b"\0" * (free - 24 * 1024))  # about 20 records' room left

        images = [
            jpeg(),
            encode(PIL.Image.effect_noise((200, 150), 64).convert("RGB"), "JPEG"),
            encode(PIL.Image.new("RGB", (300, 200), (250, 20, 180)), "PNG"),
        ]  # some unfamiliar: thumbnails

        def send(n: int) -> None:
            with requests.Session() as session:
                for i in range(n):
                    files = {"image": ("a", images[i % len(images)])}
                    resp = session.post(srv.url + "/classify", files=files, timeout=30)
                    assert resp.status_code == 200, resp.text
                    answered.append(resp.json()["request_id"])
                    unfamiliar.append(resp.json()["unfamiliar"])

        send(150)
        time.sleep(2.5)  # flushed (and failed) meanwhile
        (small_disk / "filler").unlink()  # space is back
        send(50)
        time.sleep(2.5)
        values = metric_values(srv.url)
    finally:
        srv.stop()
    logged, torn = set(), 0
    for path in log_files(small_disk):
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path.name} ends with a fragment"
        for line in data.splitlines():
            record = parse_line(line)
            torn += record is None
            if record is not None:
                logged.add(record["request_id"])
    dropped = total(values, "imgcls_inference_log_dropped_total")
    errors = total(values, "imgcls_inference_log_write_errors_total")
    thumbnails = list((small_disk / "unfamiliar").glob("*")) if (small_disk / "unfamiliar").exists() else []
    empty = [p.name for p in thumbnails if p.stat().st_size == 0 or not p.name.endswith(".jpg")]
    lost = set(answered) - logged
    print(f"log disk full, then freed: {len(answered)} answered, {len(logged)} logged, {len(lost)} lost, counted "
          f"{dropped:.0f} dropped in {errors:.0f} failed writes; {torn} torn lines; {sum(unfamiliar)} unfamiliar, "
          f"{len(thumbnails)} thumbnails, {len(empty)} empty or partial")  # fmt: skip
    assert torn == 0 and not empty and (thumbnails or not any(unfamiliar))
    assert lost and dropped == len(lost)
    assert set(answered[-50:]) <= logged  # once there is space again, every record is written


def test_retention_prunes_the_files_of_workers_that_are_gone(tiny_model, tmp_path):
    """Files of processes that no longer run count as closed: with 2 MiB and 7 days allowed, twenty 1 MiB files
    of dead workers, 40 days old, are deleted once the server writes."""
    folder = tmp_path / "log"
    folder.mkdir()
    old = time.time() - 40 * 86400
    dead = [pid for pid in range(4_000_000, 4_100_000, 5000) if not psutil.pid_exists(pid)][:20]
    for i, pid in enumerate(dead):
        path = folder / f"inference-20250101T0000{i:02d}-{pid}.jsonl"
        path.write_bytes(b"\n" * (1 << 20))
        os.utime(path, (old, old))
    env = {"IMGCLS_MODEL": tiny_model, "IMGCLS_DEVICE": "cpu", "IMGCLS_LOG_DIR": str(folder),
           "IMGCLS_LOG_MAX_TOTAL_BYTES": str(2 << 20), "IMGCLS_LOG_MAX_AGE_DAYS": "7"}  # fmt: skip
    srv = start_server(".", env, tmp_path / "server")
    try:
        requests.post(srv.url + "/classify", files={"image": ("a.jpg", jpeg())}, timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(str(p) in f.name for f in folder.iterdir() for p in dead):
            time.sleep(0.5)
        left = [f.name for f in folder.iterdir() if any(f"-{p}." in f.name for p in dead)]
    finally:
        srv.stop()
    print(f"retention: {len(dead)} files of dead workers, 40 days old; {len(left)} left after the server wrote")
    assert not left
