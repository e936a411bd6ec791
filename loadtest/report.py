"""Results of a load-test run: the gate, markdown tables, the results JSON and a latency-vs-throughput chart."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from loadtest.stepstats import headline, meets_slo

#: The CPU features that decide how fast int8 and fp32 kernels run (onnxruntime picks its kernels by them).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")


def machine_info() -> dict:
    """Where the numbers came from: cores, CPU model, memory, GPU (if any) and library versions."""
    cpu, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split() if f in SIMD_FLAGS]
    except OSError:
        cpu = platform.processor()
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        gpu = None
    versions = {}
    for pkg in ("bentoml", "onnxruntime-gpu", "locust", "fastapi", "uvicorn"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "cpu_flags": flags,
        "memory_gib": mem_gib,
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def cpu_text(machine: dict) -> str:
    """The CPU model and the SIMD flags its int8 and fp32 speeds depend on, as the reports print them."""
    return f"{machine['cpu']}; {' '.join(machine.get('cpu_flags') or ['no AVX2'])}"


def gate(result: dict, latency_objective_ms: float, max_error_rate: float, min_rps: float, min_ratio: float) -> dict:
    """Pass or fail with the reasons: a step within the SLO, at least ``min_rps`` there, and the compare ratio."""
    reasons = []
    best = result["targets"]["service"]["headline"]
    if best is None:
        reasons.append(f"no step met p99 <= {latency_objective_ms:g} ms with errors <= {100 * max_error_rate:g}%")
    elif min_rps and best["rps"] < min_rps:
        reasons.append(f"best throughput within the SLO is {best['rps']:.1f} req/s, below --min-rps {min_rps:g}")
    cmp = result.get("comparison")
    if min_ratio and cmp is not None and (cmp["throughput_ratio"] is None or cmp["throughput_ratio"] < min_ratio):
        reasons.append(f"throughput ratio {cmp['throughput_ratio']} is below --min-ratio {min_ratio:g}")
    return {"passed": not reasons, "reasons": reasons}


def comparison(service_steps: list[dict], baseline: dict | None, max_error_rate: float) -> dict:
    """Service vs baseline at an equal or lower p99.

    The baseline's best step within the SLO sets the bar; the service is taken at its best step whose
    p99 is not higher than that step's (and errors within budget), so the ratio never buys throughput
    with latency.
    """
    matched = headline(service_steps, baseline["p99_ms"], max_error_rate) if baseline else None
    ratio = round(matched["rps"] / baseline["rps"], 2) if matched and baseline["rps"] > 0 else None
    return {
        "throughput_ratio": ratio,
        "service_users": matched["users"] if matched else None,
        "service_p99_ms": matched["p99_ms"] if matched else None,
        "baseline_p99_ms": baseline["p99_ms"] if baseline else None,
    }


def _fmt(x, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def steps_table(steps: list[dict], latency_objective_ms: float, max_error_rate: float) -> str:
    """Markdown table: one row per step."""
    rows = [
        "| users | req/s | errors | p50 ms | p95 ms | p99 ms | server CPU ms/req | within SLO |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for s in steps:
        ok = "yes" if meets_slo(s, latency_objective_ms, max_error_rate) else "no"
        rows.append(
            f"| {s['users']} | {_fmt(s['rps'], 1)} | {100 * s['error_rate']:.2f}% | {_fmt(s['p50_ms'])} "
            f"| {_fmt(s['p95_ms'])} | {_fmt(s['p99_ms'])} | {_fmt(s.get('server_cpu_ms_per_request'), 2)} | {ok} |"
        )
    return "\n".join(rows)


def headline_table(result: dict) -> str:
    """Markdown table: each target's best step within the SLO, plus the ratio when comparing."""
    rows = [
        "| target | best req/s within SLO | users | p50 ms | p99 ms | errors | mean batch size |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in result["targets"].values():
        h = t["headline"]
        batch = t.get("metrics", {}).get("mean_batch_size")
        if h is None:
            rows.append(f"| {t['label']} | none within SLO | - | - | - | - | {_fmt(batch, 2)} |")
            continue
        rows.append(
            f"| {t['label']} | {h['rps']:.1f} | {h['users']} | {_fmt(h['p50_ms'])} | {_fmt(h['p99_ms'])} "
            f"| {100 * h['error_rate']:.2f}% | {_fmt(batch, 2)} |"
        )
    cmp = result.get("comparison")
    if cmp is not None:
        rows.append(
            f"| **service / baseline at p99 <= {_fmt(cmp['baseline_p99_ms'])} ms** "
            f"| **{_fmt(cmp['throughput_ratio'], 2)}x** | {_fmt(cmp['service_users'])} | | "
            f"{_fmt(cmp['service_p99_ms'])} vs {_fmt(cmp['baseline_p99_ms'])} | | |"
        )
    return "\n".join(rows)


def side_by_side_table(result: dict) -> str:
    """Markdown table of a comparison: each step's two measurements in one row, with the throughput ratio."""
    service, baseline = result["targets"]["service"], result["targets"]["baseline"]
    name = baseline["label"].split(" (")[0]
    rows = [
        f"| users | service req/s | p50 / p99 ms | CPU ms/req | {name} req/s | p50 / p99 ms | CPU ms/req | ratio |",
        "|---:|---:|---|---:|---:|---|---:|---:|",
    ]
    theirs = {s["users"]: s for s in baseline["steps"]}
    for ours in service["steps"]:
        other = theirs.get(ours["users"])
        cells = [str(ours["users"])]
        for s in (ours, other):
            if s is None:
                cells += ["-", "-", "-"]
                continue
            latency = f"{_fmt(s['p50_ms'])} / {_fmt(s['p99_ms'])}"
            cells += [_fmt(s["rps"], 1), latency, _fmt(s.get("server_cpu_ms_per_request"), 2)]
        ratio = ours["rps"] / other["rps"] if other and other["rps"] > 0 else None
        cells.append(f"{ratio:.2f}x" if ratio is not None else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def markdown(result: dict) -> str:
    """The ready-to-paste section for docs/benchmarks.md: machine, command, headline and per-step tables."""
    m, s = result["machine"], result["settings"]
    gpu = m["gpu"] or "no GPU"
    lines = [
        f"Machine: {m['cores']} cores ({cpu_text(m)}), {m['memory_gib']} GiB, {gpu}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "",
        f"Command: `{result['command']}`",
        "",
        f"Scenario: {s['scenario']} (image mix `{s['image_mix']}`, {100 * s['batch_share']:g}% batches, "
        f"{100 * s['bad_input_share']:g}% bad inputs); "
        f"objective p99 <= {s['latency_objective_ms']:g} ms, errors <= {100 * s['max_error_rate']:g}%; "
        f"steps of {s['step_duration']:g} s ({s['step_settle']:g} s settle), model `{s['model']}`.",
        "",
        headline_table(result),
    ]
    if result.get("comparison") is not None:
        lines += ["", "Step by step (the two targets in turn at each step):", "", side_by_side_table(result)]
    for t in result["targets"].values():
        metrics = t.get("metrics", {})
        extra = ""
        if metrics.get("available"):
            extra = f" Rejected inputs counted by the service: {metrics.get('rejected_total', 0)}."
        lines += [
            "",
            f"**{t['label']}** per step:{extra}",
            "",
            steps_table(t["steps"], s["latency_objective_ms"], s["max_error_rate"]),
        ]
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> Path:
    """PNG: p50/p95/p99 against achieved req/s for every target, with the SLO line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(9, 5.5))
    styles = {"p50_ms": ":", "p95_ms": "--", "p99_ms": "-"}
    for i, t in enumerate(result["targets"].values()):
        steps = [s for s in t["steps"] if s["requests"] > 0]
        if not steps:
            continue
        x = [s["rps"] for s in steps]
        for key, style in styles.items():
            ax.plot(x, [s[key] for s in steps], style, marker="o", color=f"C{i}", label=f"{t['label']} {key[:3]}")
        for s in steps:  # the user count of each step, at its p99
            ax.annotate(f"{s['users']}u", (s["rps"], s["p99_ms"]), textcoords="offset points", xytext=(-4, 6),
                        fontsize=7, color=f"C{i}")  # fmt: skip
        h = t["headline"]
        if h is not None:
            ax.annotate(f"{h['rps']:.0f} req/s", (h["rps"], h["p99_ms"]), textcoords="offset points", xytext=(6, -14))
    objective = result["settings"]["latency_objective_ms"]
    ax.axhline(objective, color="red", linewidth=1, label=f"objective p99 {objective:g} ms")
    ax.set_xlabel("achieved throughput (req/s); labels: users")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())  # 20, 50, 100, 200 rather than 2x10^1
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title(f"Latency vs throughput ({result['settings']['scenario']}, {result['machine']['cores']} cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(result: dict, out_dir: Path) -> dict[str, Path]:
    """Write results.json, results.md and latency_vs_throughput.png into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "markdown": out_dir / "results.md",
        "chart": out_dir / "latency_vs_throughput.png",
    }
    result.setdefault("files", {}).update({k: str(v) for k, v in paths.items()})
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["markdown"].write_text(markdown(result))
    chart(result, paths["chart"])
    return paths
