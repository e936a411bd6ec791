"""The top of the drift report page, where people look first: a title, the verdict as a coloured banner with
what each drifted feature means in plain words, every score with the direction in which it drifts, and
thumbnails of the window's most unfamiliar images. Evidently's own report follows below it.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # drift.report builds the page with these functions, so it cannot be imported from here
    from drift.report import DriftResult
    from drift.thumbnails import Thumbnail

DRIFT, NO_DRIFT, CANNOT_JUDGE = "drift", "no drift", "cannot judge"
HEADINGS = {DRIFT: "Drift detected", NO_DRIFT: "No drift", CANNOT_JUDGE: "Cannot judge drift"}
#: Banner colours: red, green, grey.
COLOURS = {DRIFT: "#c62828", NO_DRIFT: "#2e7d32", CANNOT_JUDGE: "#616161"}

#: What a drift of each monitored feature means for the images, in a user's words.
MEANINGS = {
    "brightness": "the photos got brighter or darker (exposure, lighting, a new camera)",
    "contrast": "the photos got flatter or harsher (haze, lighting, processing)",
    "sharpness": "blur or focus changed (motion, a dirty lens, heavier compression or resizing)",
    "colorfulness": "the colours got more or less vivid",
    "saturation": "the colours got more washed out or more saturated (black and white, filters)",
    "entropy": "the images hold more or less detail and texture",
    "width": "the uploads' width changed (another camera, app or resizing step)",
    "height": "the uploads' height changed (another camera, app or resizing step)",
    "aspect_ratio": "the uploads' shape changed (portrait or landscape, crops, another camera)",
    "confidence": "the model is more or less sure of its answers",
    "ood_score": "more (or fewer) images unlike the training set",
    "label": "the mix of predicted classes changed",
    "embedding": "what the model sees changed (its internal description of the images)",
}

_FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif"


def verdict(result: DriftResult | None) -> str:
    """``drift``, ``no drift``, or ``cannot judge`` (no result)."""
    if result is None:
        return CANNOT_JUDGE
    return DRIFT if result.drift else NO_DRIFT


def page_title(result: DriftResult | None, subject: str = "", created: str = "") -> str:
    """The browser tab's title: the verdict first, then what was judged and when."""
    parts = [HEADINGS[verdict(result)], subject, created or (result.timestamp if result else "")]
    return " · ".join(p for p in parts if p)


def header_html(
    result: DriftResult | None,
    reason: str = "",
    notes: Sequence[str] = (),
    subject: str = "",
    thumbnails: Sequence[Thumbnail] | None = None,
    created: str = "",
) -> str:
    """The banner, the thumbnails (``None``: none were asked for), then the score table with its legend."""
    kind = verdict(result)
    created = created or (result.timestamp if result else "")
    head = html.escape(" · ".join(p for p in (HEADINGS[kind], subject) if p))
    parts = [
        f'<div class="drift-banner" data-verdict="{kind}" style="background:{COLOURS[kind]};color:#fff;'
        f'padding:14px 20px;font-size:22px;font-weight:600">{head}</div>',
        '<div style="padding:8px 20px 16px">',
    ]
    if result is None:
        parts.append(f"<p><b>Why:</b> {html.escape(reason)}</p>")
    else:
        parts.append(_verdict_lines(result))
    if thumbnails is not None:  # before the numbers: what the model is being sent says the most at a glance
        parts.append(thumbnails_html(thumbnails))
    if result is not None:
        parts.append(_score_table(result))
    items = [*(notes if result is None else result.notes), f"Created {created}." if created else ""]
    parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in items if n) + "</ul></div>")
    return f'<header id="drift-summary" style="{_FONT};border-bottom:2px solid #ccc">{"".join(parts)}</header>'


def _verdict_lines(result: DriftResult) -> str:
    drifted = [c for c in result.columns if c.drifted]
    if drifted:
        items = "".join(
            f"<li><b>{html.escape(c.feature)}</b>: {html.escape(MEANINGS.get(c.feature, 'its distribution moved'))}"
            f" ({_score_name(c)} = {c.score:.3g}; drifts when {html.escape(_condition(c))})</li>"
            for c in drifted
        )
        lines = f"<p>What moved, against the model's training reference:</p><ul>{items}</ul>"
    else:
        lines = "<p>Every feature is within its threshold: the traffic still looks like the training reference.</p>"
    sampled = (
        f" (sampled from {result.rows_current_total:,} and {result.rows_reference_total:,})" if result.sampled else ""
    )
    return (
        f"{lines}<p>{result.rows_current:,} current rows against {result.rows_reference:,} reference rows{sampled}. "
        f"Evidently's dataset drift (at least half of the columns drifted): "
        f"{'yes' if result.dataset_drift else 'no'} ({100 * result.drifted_share:.0f}% drifted).</p>"
    )


def _score_name(column) -> str:
    return "AUC" if column.drifts_when.startswith("AUC") else "p"


def _condition(column) -> str:
    """``p ≤ 0.00167``: the column's drift condition with its threshold."""
    return column.drifts_when.replace("<=", "≤").replace("thr", f"{column.threshold:.3g}")


def _score_table(result: DriftResult) -> str:
    cell = "padding:2px 10px;border-bottom:1px solid #eee;text-align:left"
    head = "".join(
        f'<th style="{cell}">{h}</th>'
        for h in ("feature", "what a drift means", "score", "drifts when", "threshold", "drifted")
    )
    rows = []
    for c in result.columns:
        mark = '<b style="color:#c62828">YES</b>' if c.drifted else "no"
        values = (
            f"<b>{html.escape(c.feature)}</b>",
            html.escape(MEANINGS.get(c.feature, "")),
            f"{c.score:.3g}",
            html.escape(c.drifts_when.replace("<=", "≤")),
            f"{c.threshold:.3g}",
            mark,
        )
        rows.append("<tr>" + "".join(f'<td style="{cell}">{v}</td>' for v in values) + "</tr>")
    n_tests = sum(1 for c in result.columns if not c.drifts_when.startswith("AUC"))
    legend = (
        f"<p><b>Reading the scores.</b> The {n_tests} column scores are <b>p-values</b>: how likely a difference "
        "this large between the window and the reference would be by chance. Small is suspicious: a column drifts "
        "when its p-value is <b>below</b> its threshold (the false-alarm budget split over the columns). The "
        "embedding score is an <b>AUC</b>: how well a classifier tells the window's embeddings from the "
        "reference's, 0.5 when it cannot; it drifts when it is <b>above</b> its threshold.</p>"
    )
    table = f'<table style="border-collapse:collapse;font-size:14px"><tr>{head}</tr>{"".join(rows)}</table>'
    return legend + table


def thumbnails_html(thumbnails: Sequence[Thumbnail]) -> str:
    """A strip of the thumbnails as data URIs with their score and label, or a note saying why there is none."""
    title = "<h3>The window's most unfamiliar images</h3>"
    if not thumbnails:
        return (
            f"{title}<p>No thumbnail of this window is stored. The service keeps one only for images it flags as "
            "unfamiliar (score above 1.0), within its disk budget (IMGCLS_THUMBNAIL_BYTES); so none was flagged, "
            "their thumbnails were pruned, or --log-dir is not the folder the service writes to.</p>"
        )
    figures = []
    for t in thumbnails:
        data = base64.b64encode(t.jpeg).decode()
        alt = html.escape(f"request {t.request_id}, predicted {t.label}, unfamiliarity {t.ood_score:.2f}")
        when = t.time[:19].replace("T", " ")
        figures.append(
            '<figure style="margin:0;width:112px;font-size:12px">'
            f'<img src="data:image/jpeg;base64,{data}" alt="{alt}" title="{html.escape(t.request_id)}" '
            'style="width:112px;height:112px;object-fit:contain;image-rendering:pixelated;background:#eee">'
            f"<figcaption><b>{t.ood_score:.2f}</b> · {html.escape(t.label)}<br>{html.escape(when)}</figcaption>"
            "</figure>"
        )
    return (
        f'{title}<div style="display:flex;flex-wrap:wrap;gap:10px">{"".join(figures)}</div>'
        '<p style="font-size:13px;color:#555">Highest unfamiliarity score first (above 1.0 the service flags an '
        "image as unfamiliar), as the model saw them: resized to its input. Caption: score · predicted class · "
        "time (UTC).</p>"
    )


def report_page(evidently_html: str, result: DriftResult, subject: str = "", thumbnails=None) -> str:
    """Evidently's standalone report with a title and :func:`header_html` on top."""
    title = f"<title>{html.escape(page_title(result, subject))}</title>"
    page = evidently_html.replace("<head>", "<head>" + title, 1)
    return page.replace("<body>", "<body>" + header_html(result, subject=subject, thumbnails=thumbnails), 1)


def cannot_judge_page(
    reason: str, notes: Sequence[str] = (), subject: str = "", thumbnails=None, created: str = ""
) -> str:
    """A page for a run that could not judge: why, and the thumbnails of whatever the window held."""
    title = html.escape(page_title(None, subject, created))
    header = header_html(None, reason, notes, subject, thumbnails, created)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>'
        f'<body style="margin:0">{header}</body></html>'
    )
