"""`python -m drift`: judge the inference log against the training reference of the model variant that served it."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from drift import EXIT_USAGE, UsageParser
from drift.logread import LogError, parse_since, read_log
from drift.promfile import push, registry, write_textfile
from drift.reference import ReferenceError, load_reference
from drift.report import COLUMNS, DriftConfig, NotEnoughData, drift_report, save_cannot_judge, summary_table
from drift.reportpage import verdict
from drift.thumbnails import DEFAULT_COUNT, most_unfamiliar
from drift.workspace import DEFAULT_PROJECT, WORKSPACE_DIR, cannot_judge_snapshot, record, run_tags, tagged
from imgcls.inference_log import PRODUCTION, default_log_dir
from imgcls.model_files import VARIANTS

EXIT_OK, EXIT_DRIFT, EXIT_CANNOT_JUDGE = 0, 1, 2
EXIT_CODES = f"""exit codes:
  {EXIT_OK}  no drift
  {EXIT_DRIFT}  drift: a feature, the predicted labels or the embeddings moved (see the report)
  {EXIT_CANNOT_JUDGE}  cannot judge: no log, too few rows, several models or variants in the window, no reference
  {EXIT_USAGE} the command line is wrong (nothing is judged, written or pushed)
"""


def _since(text: str) -> str:
    try:
        parse_since(text)
    except LogError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--since {text!r} ")) from None
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = DriftConfig()
    p = UsageParser(
        prog="python -m drift",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
        epilog=EXIT_CODES,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32),
    )
    p.add_argument(
        "--log-dir",
        type=Path,
        default=default_log_dir(),
        help="inference-log folder (or one file); per-pod subfolders are read too (default: %(default)s, from "
        "IMGCLS_LOG_DIR or BENTOML_HOME, as the service resolves it)",
    )
    p.add_argument(
        "--since", type=_since, help="only rows from this time on: ISO 8601 (2025-01-31T12:00) or a duration (24h, 7d)"
    )
    p.add_argument("--last", type=int, help="only the newest N rows (after --since)")
    p.add_argument("--model", help="judge this model tag only (needed when the window holds several)")
    p.add_argument("--variant", choices=VARIANTS, help="judge this model variant only (needed when it holds several)")
    p.add_argument(
        "--source",
        action="append",
        dest="sources",
        metavar="NAME",
        help=f"judge traffic of this source (repeatable; default: {PRODUCTION} only, so load tests and simulations, "
        "marked with X-Traffic-Source, stay out)",
    )
    p.add_argument("--all-sources", action="store_true", help="judge every traffic source together")
    p.add_argument("--reference", type=Path, help="reference parquet to use instead of the one stored with the model")
    p.add_argument("--out", type=Path, default=Path("reports"), help="reports folder (default: %(default)s)")
    p.add_argument(
        "--workspace",
        type=Path,
        help=f"Evidently workspace each run is added to (default: OUT/{WORKSPACE_DIR}); `evidently ui` shows it",
    )
    p.add_argument("--project", default=DEFAULT_PROJECT, help="its project (default: %(default)s)")
    p.add_argument(
        "--thumbnails",
        type=int,
        default=DEFAULT_COUNT,
        metavar="N",
        help="thumbnails of the window's most unfamiliar images on the report (%(default)s; 0: none)",
    )
    p.add_argument("--prom-file", type=Path, help="Prometheus text file (default: OUT/drift.prom)")
    p.add_argument("--pushgateway", metavar="URL", help="also push the figures to this Prometheus Pushgateway")
    p.add_argument("--min-rows", type=int, default=defaults.min_rows, help="fewer rows cannot be judged (%(default)s)")
    p.add_argument(
        "--max-rows",
        type=int,
        default=defaults.max_rows,
        help="rows per side above which tables are sampled (%(default)s)",
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="sampling seed (%(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, read the log and the reference, run the report; returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = DriftConfig(min_rows=args.min_rows, max_rows=args.max_rows, seed=args.seed)
    sources = None if args.all_sources else frozenset(args.sources or [PRODUCTION])
    prom_file = args.prom_file or args.out / "drift.prom"

    data = result = None
    reason, notes, thumbnails, subject = "", [], None, ""
    try:
        since = parse_since(args.since) if args.since else None
        data = read_log(args.log_dir, since, args.last, args.model, args.variant, sources, args.max_rows, args.seed)
        print(
            f"log {args.log_dir}: {data.lines:,} lines in {len(data.files) - data.files_before_window} files "
            f"({data.files_before_window} last written before the window, not read), {data.skipped:,} skipped "
            f"(corrupt or truncated), {data.outside_window:,} outside the window, {data.other_sources:,} of other "
            f"traffic sources, {data.other_models:,} of other models or variants"
        )
        thumbnails = (
            most_unfamiliar(data.most_unfamiliar, args.log_dir, args.thumbnails) if args.thumbnails > 0 else None
        )
        if data.model is not None:
            subject = f"{data.model} ({data.variant or 'variant not logged'})"
            notes.append(f"Model {subject}; log {args.log_dir}.")
        if data.skipped:
            notes.append(f"{data.skipped:,} of {data.lines:,} log lines were skipped as corrupt or truncated.")
        if data.other_sources:
            left_out = ", ".join(f"{k} {v:,}" for k, v in data.sources.items() if sources and k not in sources)
            notes.append(f"{data.other_sources:,} rows of other traffic sources were left out: {left_out}.")
        if data.model is None:
            shown = ", ".join(f"{k} ({v})" for k, v in data.sources.items()) or "none"
            raise NotEnoughData(
                f"no valid rows of {', '.join(sorted(sources)) if sources else 'any source'} in the window "
                f"(sources found: {shown}); at least {config.min_rows} are needed"
            )
        if args.reference:
            reference = load_reference(path=args.reference)
        else:
            reference = load_reference(data.model, args.variant or data.variant)
        figures = {"rows": data.rows}
        if math.isfinite(data.unfamiliar_share):  # (not when the log predates the unfamiliar-image score)
            figures["unfamiliar_share"] = data.unfamiliar_share
        result = drift_report(reference, data.frame, args.out, config, notes=notes, subject=subject,
                              thumbnails=thumbnails, rows=data.rows, figures=figures)  # fmt: skip
    except (LogError, ReferenceError, NotEnoughData, ValueError) as e:
        reason = str(e)
        print(f"cannot judge drift: {reason}", file=sys.stderr)

    unfamiliar = data.unfamiliar_share if data else float("nan")
    figures = registry(result, data.model if data else None, data.skipped if data else 0,
                       data.rows if data else 0, unfamiliar)  # fmt: skip
    write_textfile(prom_file, figures)
    report = result.html_path if result else save_cannot_judge(args.out, reason, notes, subject, thumbnails)
    workspace = args.workspace or args.out / WORKSPACE_DIR
    model, variant = (data.model, data.variant) if data else (None, None)
    snapshot = result.snapshot if result else cannot_judge_snapshot("drift", reason, data.rows if data else 0)
    tags = run_tags(verdict(result), model, variant, "drift")
    try:
        run = record(workspace, tagged(snapshot, tags, {"report": str(report)}), COLUMNS, args.project)
        print(f"workspace: {run}")
    except OSError as exc:  # the verdict still stands: say so and go on
        print(f"could not record the run in the workspace {workspace}: {exc}", file=sys.stderr)
    if args.pushgateway:
        try:
            push(args.pushgateway, figures, data.model if data else None)
            print(f"pushed to {args.pushgateway}")
        except OSError as exc:
            print(f"could not push to the Pushgateway {args.pushgateway}: {exc}", file=sys.stderr)
            return EXIT_CANNOT_JUDGE
    if result is None:
        print(f"page: {report}")
        return EXIT_CANNOT_JUDGE
    print(summary_table(result))
    for note in result.notes[1:]:
        print(note)
    print(f"unfamiliar images in the window: {100 * unfamiliar:.1f}%")
    if thumbnails is not None:
        print(f"thumbnails of the most unfamiliar images on the report: {len(thumbnails)}")
    print(
        f"verdict: {'DRIFT' if result.drift else 'no drift'} ({result.rows_current:,} current rows vs "
        f"{result.rows_reference:,} reference rows): drift when any column or the embeddings moved"
    )
    print(
        f"  beside it, Evidently's rule (drift when at least {config.drift_share:.0%} of the columns moved): "
        f"{result.drifted_share:.0%} moved, {'met' if result.dataset_drift else 'not met'}"
    )
    print(f"report: {result.html_path}\njson:   {result.json_path}\nprometheus: {prom_file}")
    return EXIT_DRIFT if result.drift else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
