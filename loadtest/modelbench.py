"""`python -m loadtest.modelbench [--model TAG]`: img/s of each stored ONNX variant per batch size, CPU and (if
present) GPU.

Prints a table and writes JSON (default ``results/bench_model.json``). Throughput is measured with uint8 inputs
already at the model size, so decoding and resizing are not included (the load test covers those). With
``--min-int8-speedup X`` it exits 1 unless int8 reaches X times fp32 at ``--gate-batch`` on the CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

from imgcls.model_files import DEFAULT_MODEL, VARIANT_FILES, verify
from imgcls.onnx_run import cuda_usable, images_per_second, session_for
from imgcls.preprocess import SPEC_FILE, PreprocessSpec
from loadtest.report import cpu_text, machine_info

log = logging.getLogger(__name__)


def benchmark(
    folder: Path, batches: list[int], seconds: float, variants: list[str], threads: int = 0, gpu: bool = True
) -> list[dict]:
    """One row per (device, variant, batch): images per second."""
    size = PreprocessSpec.load(folder / SPEC_FILE).size
    devices = [("cpu", "CPUExecutionProvider")]
    if gpu and cuda_usable():
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
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.modelbench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="BentoML model tag")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--variants", default="fp32,fp16,int8", help="comma-separated variants")
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement time per cell")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for onnxruntime (0: all cores)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU even if there is one")
    parser.add_argument("--min-int8-speedup", type=float, default=0.0, help="gate: int8/fp32 on the CPU (0: none)")
    parser.add_argument("--gate-batch", type=int, default=8, help="the batch size the gate looks at")
    parser.add_argument("--out", default="results/bench_model.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bentoml").setLevel(logging.WARNING)

    import bentoml

    try:
        model = bentoml.models.get(args.model)
    except bentoml.exceptions.NotFound:
        print(f"error: no model {args.model} in the BentoML store; run `make train` first.", file=sys.stderr)
        return 2
    folder = Path(model.path)
    verify(folder)
    batches = [int(b) for b in args.batches.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    rows = benchmark(folder, batches, args.seconds, variants, args.threads, gpu=not args.no_gpu)
    ratios = speedups(rows)
    key = f"cpu/int8/b{args.gate_batch}"
    gate = None
    if args.min_int8_speedup:
        gate = {"ratio": key, "value": ratios.get(key), "min": args.min_int8_speedup}
        gate["passed"] = gate["value"] is not None and gate["value"] >= args.min_int8_speedup
    result = {
        "model": str(model.tag),
        "labels": model.info.labels,
        "input_size": PreprocessSpec.load(folder / SPEC_FILE).size,
        "note": "uint8 pixels at the model size, onnxruntime only (no decode/resize); one session per variant",
        "machine": machine_info(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows,
        "speedup_vs_fp32": ratios,
        "gate": gate,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    where = f"{m['cores']} cores ({cpu_text(m)}), {m['gpu'] or 'no GPU'}"
    print(f"\nmodel {model.tag} (input {result['input_size']} px); {where}\n")
    print(table(rows))
    print("\nspeed-up vs fp32: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"wrote {out}")
    if gate is not None:
        print(
            f"gate int8 >= {gate['min']:g}x fp32 ({key}): {gate['value']}, {'passed' if gate['passed'] else 'FAILED'}"
        )
        return 0 if gate["passed"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
