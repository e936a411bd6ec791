"""`python -m drift`: judge the inference log against the model's training reference.

Exit code 0: no drift; 1: drift; 2: cannot judge (no log, too few rows, several models, no reference).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from drift.logread import LogError, parse_since, read_log
from drift.promfile import render, write_textfile
from drift.reference import ReferenceError, load_reference
from drift.report import DriftConfig, NotEnoughData, drift_report, summary_table

EXIT_OK, EXIT_DRIFT, EXIT_CANNOT_JUDGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, read the log and the reference, run the report; returns the exit code."""
    defaults = DriftConfig()
    p = argparse.ArgumentParser(prog="python -m drift", description=__doc__.splitlines()[0])
    p.add_argument(
        "--log-dir",
        default=os.environ.get("IMGCLS_LOG_DIR", "inference_log"),
        help="inference-log folder or file (default: $IMGCLS_LOG_DIR, else ./inference_log as the service)",
    )
    p.add_argument("--since", help="only rows from this time on: ISO 8601 (2025-01-31T12:00) or a duration (24h, 7d)")
    p.add_argument("--last", type=int, help="only the newest N rows (after --since)")
    p.add_argument("--model", help="judge this model tag only (needed when the window holds several)")
    p.add_argument("--reference", type=Path, help="reference parquet to use instead of the one stored with the model")
    p.add_argument("--out", type=Path, default=Path("reports"), help="reports folder (default: ./reports)")
    p.add_argument("--prom-file", type=Path, help="Prometheus text file (default: OUT/drift.prom)")
    p.add_argument("--min-rows", type=int, default=defaults.min_rows, help=f"default {defaults.min_rows}")
    p.add_argument(
        "--max-rows",
        type=int,
        default=defaults.max_rows,
        help=f"rows per side above which tables are sampled (default {defaults.max_rows})",
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="sampling seed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = DriftConfig(min_rows=args.min_rows, max_rows=args.max_rows, seed=args.seed)
    prom_file = args.prom_file or args.out / "drift.prom"

    data = None
    try:
        if not args.log_dir:
            raise LogError("no inference log given: pass --log-dir or set IMGCLS_LOG_DIR")
        since = parse_since(args.since) if args.since else None
        data = read_log(args.log_dir, since=since, last=args.last, model=args.model)
        print(
            f"log: {data.lines:,} lines in {len(data.files)} files, {data.skipped:,} skipped (corrupt or "
            f"truncated), {data.outside_window:,} outside the window, {data.other_models:,} of other models"
        )
        if data.model is None:
            raise NotEnoughData(f"no valid rows in the window; at least {config.min_rows} are needed")
        reference = load_reference(path=args.reference) if args.reference else load_reference(data.model)
        notes = [f"Model {data.model}; log {args.log_dir}."]
        if data.skipped:
            notes.append(f"{data.skipped:,} of {data.lines:,} log lines were skipped as corrupt or truncated.")
        result = drift_report(reference, data.frame, args.out, config, notes=notes)
    except (LogError, ReferenceError, NotEnoughData, ValueError) as e:
        print(f"cannot judge drift: {e}", file=sys.stderr)
        model = data.model if data else None
        rows = len(data.frame) if data else 0
        write_textfile(prom_file, render(None, model, data.skipped if data else 0, rows))
        return EXIT_CANNOT_JUDGE

    write_textfile(prom_file, render(result, data.model, data.skipped))
    print(summary_table(result))
    for note in result.notes[1:]:
        print(note)
    print(
        f"dataset drift (share of drifted columns {result.drifted_share:.2f} >= {config.drift_share}): "
        f"{'yes' if result.dataset_drift else 'no'}"
    )
    print(
        f"verdict: {'DRIFT' if result.drift else 'no drift'} ({result.rows_current:,} current rows vs "
        f"{result.rows_reference:,} reference rows)"
    )
    print(f"report: {result.html_path}\njson:   {result.json_path}\nprometheus: {prom_file}")
    return EXIT_DRIFT if result.drift else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
