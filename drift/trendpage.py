"""``history.html``: the drift history as a page a person reads, to see when a shift started.

Self-contained (inline SVG, no script, nothing fetched): it can be opened from disk, mailed, or served as a
static file. A chart per feature across runs, with its threshold and the drift side shaded, the drifted runs
marked, model changes and runs that could not judge; then a table of runs linking to their reports.
"""

from __future__ import annotations

import html
import logging
import math
import os
from collections.abc import Sequence
from datetime import UTC
from pathlib import Path
from typing import Any

from drift.reportpage import CANNOT_JUDGE, COLOURS, DRIFT, MEANINGS

log = logging.getLogger(__name__)

UNFAMILIAR = "unfamiliar share"

WIDTH, HEIGHT = 600, 150
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 12, 30
#: p-values below this are drawn at the bottom of their chart (a KS test of a strong shift reports 1e-30 or 0).
P_FLOOR = 1e-16


def render_history_page(
    entries: Sequence[dict[str, Any]], page: str | os.PathLike, base: str | os.PathLike | None = None
) -> Path:
    """Write the trend page of ``entries`` (as :func:`load_history` returns them) to ``page``.

    Report paths in the entries are relative to ``base`` (the history file's folder; default the page's)."""
    page = Path(page)
    base = Path(base) if base is not None else page.parent
    page.parent.mkdir(parents=True, exist_ok=True)
    features: list[str] = []
    for e in entries:
        features += [f["feature"] for f in e["features"] if f["feature"] not in features]
    charts = [_feature_chart(entries, name) for name in features]
    if any(e.get("unfamiliar_share") is not None for e in entries):
        charts.append(_unfamiliar_chart(entries))
    body = [
        "<h1>Drift history</h1>",
        _summary(entries),
        "<h2>Each feature across runs</h2>",
        '<p class="legend">Dots are runs: <span style="color:#c62828">&#9679; drifted</span>, '
        '<span style="color:#1565c0">&#9679; within its threshold</span>, <span style="color:#757575">&#215; could '
        "not judge</span>. The dashed line is the threshold and the shaded side of it is drift. p-values are "
        "drawn on a log scale and drift when they fall <b>below</b> the line; the embeddings' AUC drifts when it "
        "rises <b>above</b> it. A vertical dotted line marks a change of model or variant (a new reference). "
        "Hover a dot for its numbers.</p>",
        f'<div class="charts">{"".join(charts)}</div>',
        "<h2>Runs, newest first</h2>",
        _runs_table(entries, page.parent, base),
    ]
    doc = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Drift history</title><style>'
        "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:20px;color:#222}"
        f".charts{{display:flex;flex-wrap:wrap;gap:6px 24px}}figure{{margin:0 0 12px;width:{WIDTH}px}}"
        "figcaption{font-size:13px;margin-bottom:2px;min-height:2.6em}"
        "table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #eee;"
        "text-align:left;vertical-align:top}td:first-child{white-space:nowrap}"
        ".legend{font-size:13px;color:#444;max-width:760px}"
        f"</style></head><body>{''.join(body)}</body></html>"
    )
    page.write_text(doc, encoding="utf-8")
    log.info("drift history page saved: %s (%d runs)", page, len(entries))
    return page


def _summary(entries: Sequence[dict[str, Any]]) -> str:
    if not entries:
        return "<p>No run recorded yet.</p>"
    latest = entries[-1]
    text = (
        f"<p>{len(entries)} runs from {_when(entries[0])} to {_when(latest)}. Latest: "
        f"{_badge(latest['verdict'])} ({html.escape(latest.get('model') or 'no model')}).</p>"
    )
    judged = [e for e in entries if e["verdict"] != CANNOT_JUDGE]
    calm = [i for i, e in enumerate(judged) if e["verdict"] != DRIFT]
    streak = judged[calm[-1] + 1 :] if calm else judged
    if streak:
        first = streak[0]
        drifted = ", ".join(sorted(f["feature"] for f in first["features"] if f["drifted"]))
        before = (
            f"the last run without drift was at {_when(judged[calm[-1]])}, so the shift began between those two "
            "runs' windows"
            if calm
            else "no judged run before it was without drift"
        )
        text += (
            f"<p><b>Drifting since the run at {_when(first)}</b> ({len(streak)} judged run(s) in a row; the first "
            f"flagged {html.escape(drifted)}); {before}.</p>"
        )
    return text


def _when(entry: dict[str, Any]) -> str:
    return entry["_time"].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _badge(kind: str) -> str:
    return (
        f'<span style="background:{COLOURS[kind]};color:#fff;padding:1px 6px;border-radius:3px;white-space:nowrap">'
        f"{html.escape(kind)}</span>"
    )


def _x_positions(entries: Sequence[dict[str, Any]]) -> list[float]:
    """Runs placed by time, so a gap in the schedule shows; evenly when they all fall within a second."""
    times = [e["_time"].timestamp() for e in entries]
    lo, hi = (min(times), max(times)) if times else (0.0, 0.0)
    span = WIDTH - LEFT - RIGHT
    if len(entries) < 2:
        return [LEFT + span / 2] * len(entries)
    if hi - lo < 1:
        return [LEFT + span * i / (len(entries) - 1) for i in range(len(entries))]
    return [LEFT + span * (t - lo) / (hi - lo) for t in times]


def _svg(title: str, caption: str, elements: list[str]) -> str:
    return (
        f"<figure><figcaption><b>{html.escape(title)}</b> {html.escape(caption)}</figcaption>"
        f'<svg width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{html.escape(title)}" style="font:11px sans-serif;background:#fafafa">'
        f"{''.join(elements)}</svg></figure>"
    )


def _frame(entries: Sequence[dict[str, Any]], xs: list[float], ticks: list[tuple[float, str]]) -> list[str]:
    """Axes, y ticks, the first and last run's dates, model changes and runs that could not judge."""
    bottom = HEIGHT - BOTTOM
    out = [f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" stroke="#999"/>']
    out.append(f'<line x1="{LEFT}" y1="{bottom}" x2="{WIDTH - RIGHT}" y2="{bottom}" stroke="#999"/>')
    for y, label in ticks:
        out.append(f'<line x1="{LEFT - 4}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{html.escape(label)}</text>')
    if entries:
        out.append(f'<text x="{LEFT}" y="{HEIGHT - 8}">{_when(entries[0])}</text>')
        if len(entries) > 1:
            out.append(f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 8}" text-anchor="end">{_when(entries[-1])}</text>')
    previous = None
    for e, x in zip(entries, xs, strict=True):
        if e["verdict"] == CANNOT_JUDGE:
            tip = html.escape(f"{_when(e)}: could not judge: {e.get('reason') or ''}")
            out.append(
                f'<text x="{x:.1f}" y="{bottom - 3}" text-anchor="middle" fill="#757575" font-size="13">'
                f"&#215;<title>{tip}</title></text>"
            )
            continue
        current = (e.get("model"), e.get("variant"))
        if previous is not None and current != previous:
            tip = html.escape(f"from here on: {current[0]} ({current[1]})")
            out.append(
                f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{bottom}" stroke="#555" stroke-dasharray="1 3">'
                f"<title>{tip}</title></line>"
            )
        previous = current
    return out


def _series(
    xs: list[float],
    points: list[tuple[int, float, float | None, bool, str]],
    to_y,
    drift_above: bool,
) -> list[str]:
    """The threshold line with its drift side shaded, the score line and one dot per judged run."""
    out = []
    with_thr = [(xs[i], to_y(thr)) for i, _, thr, _, _ in points if thr is not None]
    if with_thr:
        edge = TOP if drift_above else HEIGHT - BOTTOM
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in with_thr)
        if len(with_thr) == 1:  # a single run: a level line across the chart
            y = with_thr[0][1]
            with_thr = [(LEFT, y), (WIDTH - RIGHT, y)]
            line = f"{LEFT},{y:.1f} {WIDTH - RIGHT},{y:.1f}"
        area = f"{with_thr[0][0]:.1f},{edge} {line} {with_thr[-1][0]:.1f},{edge}"
        out.append(f'<polygon points="{area}" fill="#c62828" fill-opacity="0.07"/>')
        out.append(f'<polyline points="{line}" fill="none" stroke="#c62828" stroke-dasharray="5 3"/>')
    if len(points) > 1:
        line = " ".join(f"{xs[i]:.1f},{to_y(v):.1f}" for i, v, _, _, _ in points)
        out.append(f'<polyline points="{line}" fill="none" stroke="#90a4ae"/>')
    for i, v, _, drifted, tip in points:
        colour = "#c62828" if drifted else "#1565c0"
        out.append(
            f'<circle cx="{xs[i]:.1f}" cy="{to_y(v):.1f}" r="{5 if drifted else 3.5}" fill="{colour}">'
            f"<title>{html.escape(tip)}</title></circle>"
        )
    return out


def _feature_chart(entries: Sequence[dict[str, Any]], name: str) -> str:
    xs = _x_positions(entries)
    points = []
    for i, e in enumerate(entries):
        f = next((f for f in e["features"] if f["feature"] == name), None)
        if f is None or f.get("score") is None:
            continue
        tip = (
            f"{_when(e)}: score {f['score']:.3g}, threshold {_number(f.get('threshold'))}"
            f"{' — DRIFTED' if f['drifted'] else ''} ({e.get('model')}, {e.get('rows')} rows)"
        )
        points.append((i, float(f["score"]), f.get("threshold"), bool(f["drifted"]), tip))
    is_auc = any(
        f.get("drifts_when", "").startswith("AUC") for e in entries for f in e["features"] if f["feature"] == name
    )
    meaning = MEANINGS.get(name, "")
    if is_auc:
        values = [v for _, v, _, _, _ in points] + [t for _, _, t, _, _ in points if t is not None]
        lo = math.floor(min([0.5, *values]) * 10) / 10
        to_y = _linear(lo, 1.0)
        ticks = [(to_y(v), f"{v:.1f}") for v in _steps(lo, 1.0, 0.1)]
        caption = f"— AUC, drifts above the threshold: {meaning}"
    else:
        values = [v for _, v, _, _, _ in points] + [t for _, _, t, _, _ in points if t is not None]
        low = max(P_FLOOR, min([1e-4, *(v / 10 for v in values if v > 0)]))
        decades = max(1, math.ceil(-math.log10(low)))
        to_y = _log_p(decades)
        step = max(1, math.ceil(decades / 5))
        ticks = [(to_y(10.0**-d), "1" if d == 0 else f"1e-{d}") for d in range(0, decades + 1, step)]
        caption = f"— p-value (log scale), drifts below the threshold: {meaning}"
    elements = _frame(entries, xs, ticks) + _series(xs, points, to_y, drift_above=is_auc)
    return _svg(name, caption, elements)


def _unfamiliar_chart(entries: Sequence[dict[str, Any]]) -> str:
    xs = _x_positions(entries)
    points = [
        (i, float(e["unfamiliar_share"]), None, False, f"{_when(e)}: {100 * e['unfamiliar_share']:.1f}% unfamiliar")
        for i, e in enumerate(entries)
        if e.get("unfamiliar_share") is not None and e["verdict"] != CANNOT_JUDGE
    ]
    top = max([0.04, *(v * 1.1 for _, v, _, _, _ in points)])
    step = next(s for s in (0.01, 0.02, 0.05, 0.1, 0.2, 0.25) if top / s <= 5)
    hi = min(1.0, math.ceil(top / step) * step)
    to_y = _linear(0.0, hi)
    ticks = [(to_y(v), f"{100 * v:.0f}%") for v in _steps(0.0, hi, step)]
    caption = (
        "— share of the window's images flagged as unlike the training set (about 1% of images like it are, by the "
        "detector's threshold); a figure, not a test"
    )
    return _svg(UNFAMILIAR, caption, _frame(entries, xs, ticks) + _series(xs, points, to_y, False))


def _number(x: float | None) -> str:
    return "none" if x is None else f"{x:.3g}"


def _linear(lo: float, hi: float):
    def to_y(v: float) -> float:
        v = min(max(v, lo), hi)
        return TOP + (HEIGHT - TOP - BOTTOM) * (hi - v) / ((hi - lo) or 1.0)

    return to_y


def _log_p(decades: int):
    def to_y(p: float) -> float:
        exponent = min(max(-math.log10(max(p, 10.0**-decades)), 0.0), float(decades))
        return TOP + (HEIGHT - TOP - BOTTOM) * exponent / decades

    return to_y


def _steps(lo: float, hi: float, step: float) -> list[float]:
    n = int(round((hi - lo) / step))
    return [lo + k * step for k in range(n + 1)]


def _runs_table(entries: Sequence[dict[str, Any]], page_dir: Path, base: Path) -> str:
    head = "".join(
        f"<th>{h}</th>"
        for h in ("time (UTC)", "verdict", "model", "variant", "window", "rows", "drifted / why not judged",
                  "unfamiliar", "report")
    )  # fmt: skip
    rows = []
    for e in reversed(entries):
        window = e.get("window") or {}
        span = " to ".join(x[:19].replace("T", " ") for x in (window.get("start"), window.get("end")) if x)
        asked = ", ".join(f"{k} {window[k]}" for k in ("since", "last") if window.get(k) is not None)
        if e["verdict"] == CANNOT_JUDGE:
            what = html.escape(e.get("reason") or "")
        else:
            what = ", ".join(
                f'<span title="{html.escape(MEANINGS.get(f["feature"], ""))}">{html.escape(f["feature"])}</span>'
                for f in e["features"]
                if f["drifted"]
            )
        share = e.get("unfamiliar_share")
        report = e.get("report")
        link = ""
        if report:
            href = os.path.relpath(base / report, page_dir)
            link = f'<a href="{html.escape(Path(href).as_posix())}">{html.escape(Path(report).name)}</a>'
        cells = (
            _when(e).removesuffix(" UTC"),
            _badge(e["verdict"]),
            html.escape(e.get("model") or ""),
            html.escape(e.get("variant") or ""),
            html.escape(span + (f" ({asked})" if asked else "")),
            f"{e.get('rows', 0):,}",
            what,
            "" if share is None else f"{100 * share:.1f}%",
            link,
        )
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"
