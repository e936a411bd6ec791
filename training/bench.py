"""`python -m training.bench [--model TAG]`: img/s of each stored ONNX variant per batch size, CPU and (if present) GPU.

Prints a table and writes JSON (default ``results/bench_model.json``). The model-stage target it checks:
int8 at least 3x fp32 at batch 8 on the CPU. Throughput is measured with uint8 inputs already at the
model size, so decoding and resizing are not included (the load test covers those).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

from service.artifacts import DEFAULT_MODEL_NAME, VARIANT_FILES, verify
from service.preprocess import SPEC_FILE, PreprocessSpec
from training.speed import images_per_second, session_for

log = logging.getLogger(__name__)

INT8_TARGET = 3.0
TARGET_BATCH = 8


def cuda_available() -> bool:
    """True when the service would pick CUDA here (onnxruntime lists the provider and a driver is loaded)."""
    from service.runtime import choose_device

    return choose_device("auto") == "cuda"


def benchmark(
    folder: Path, batches: list[int], seconds: float, variants: list[str], threads: int = 0, gpu: bool = True
) -> list[dict]:
    """One row per (device, variant, batch): images per second."""
    size = PreprocessSpec.load(folder / SPEC_FILE).size
    devices = [("cpu", "CPUExecutionProvider")]
    if gpu and cuda_available():
        devices.append(("cuda", "CUDAExecutionProvider"))
    elif gpu:
        log.info("No CUDA GPU usable by onnxruntime: CPU only")
    rows = []
    for device, provider in devices:
        for variant in variants:
            sess = session_for(folder / VARIANT_FILES[variant], provider, threads if device == "cpu" else 0)
            for batch in batches:
                ips = images_per_second(sess, size, batch, seconds)
                rows.append({"device": device, "variant": variant, "batch": batch, "images_per_second": round(ips, 1)})
                log.info("%s %s batch %d: %.1f img/s", device, variant, batch, ips)
    return rows


def speedups(rows: list[dict]) -> dict:
    """Each variant's throughput relative to fp32 on the same device and batch."""
    base = {(r["device"], r["batch"]): r["images_per_second"] for r in rows if r["variant"] == "fp32"}
    out = {}
    for r in rows:
        ref = base.get((r["device"], r["batch"]))
        if ref and r["variant"] != "fp32":
            out[f"{r['device']}/{r['variant']}/b{r['batch']}"] = round(r["images_per_second"] / ref, 2)
    return out


def table(rows: list[dict]) -> str:
    """A plain-text table: one line per device and variant, one column per batch size."""
    batches = sorted({r["batch"] for r in rows})
    head = f"{'device':<7}{'variant':<9}" + "".join(f"{'b' + str(b):>10}" for b in batches) + "   (img/s)"
    lines = [head, "-" * len(head)]
    for device in dict.fromkeys(r["device"] for r in rows):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["device"] == device):
            vals = {
                r["batch"]: r["images_per_second"] for r in rows if (r["device"], r["variant"]) == (device, variant)
            }
            lines.append(f"{device:<7}{variant:<9}" + "".join(f"{vals.get(b, float('nan')):>10.1f}" for b in batches))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=f"{DEFAULT_MODEL_NAME}:latest", help="BentoML model tag")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--variants", default="fp32,fp16,int8", help="comma-separated variants")
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement time per cell")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for onnxruntime (0: all cores)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU even if there is one")
    parser.add_argument("--out", default="results/bench_model.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bentoml").setLevel(logging.WARNING)

    import bentoml

    try:
        model = bentoml.models.get(args.model)
    except bentoml.exceptions.NotFound:
        print(
            f"error: no model {args.model} in the BentoML store; run `python -m training --demo` first.",
            file=sys.stderr,
        )
        return 2
    folder = Path(model.path)
    verify(folder)
    batches = [int(b) for b in args.batches.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    rows = benchmark(folder, batches, args.seconds, variants, args.threads, gpu=not args.no_gpu)
    ratios = speedups(rows)
    key = f"cpu/int8/b{TARGET_BATCH}"
    target = {
        "int8_vs_fp32_cpu_batch8": ratios.get(key),
        "required": INT8_TARGET,
        "met": None if key not in ratios else ratios[key] >= INT8_TARGET,
    }
    result = {
        "model": str(model.tag),
        "labels": model.info.labels,
        "input_size": PreprocessSpec.load(folder / SPEC_FILE).size,
        "note": "uint8 pixels at the model size, onnxruntime only (no decode/resize); one session per variant",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor()},
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows,
        "speedup_vs_fp32": ratios,
        "target": target,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nmodel {model.tag} (input {result['input_size']} px), {os.cpu_count()} CPUs\n")
    print(table(rows))
    print("\nspeed-up vs fp32: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if target["met"] is not None:
        verdict = "met" if target["met"] else "NOT met"
        print(f"target int8 >= {INT8_TARGET:g}x fp32 at batch {TARGET_BATCH} on CPU: {ratios[key]:.2f}x, {verdict}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
