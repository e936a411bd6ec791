"""The window's most unfamiliar images, as the service stored them: so a person reading a report sees what the
model is being sent, not only numbers about it.

The service saves a small JPEG of each image it flags as unfamiliar (``<log dir>/unfamiliar/<request id>.jpg``,
or under each pod's folder), within a disk budget that drops the oldest first; so an image of the window may have
no thumbnail any more, and the highest-scoring images that still have one are shown.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import pandas as pd

from imgcls.inference_log import thumbnail_files, thumbnail_name

log = logging.getLogger(__name__)

#: Thumbnails shown on a report.
DEFAULT_COUNT = 8


@dataclass(frozen=True)
class Thumbnail:
    """One stored image of the window, with what the log says about it."""

    request_id: str
    time: str  # ISO 8601, UTC
    label: str  # the predicted class
    ood_score: float  # unfamiliarity: above 1.0 the service flagged it
    jpeg: bytes


def most_unfamiliar(frame: pd.DataFrame, log_dir: str | os.PathLike, n: int = DEFAULT_COUNT) -> list[Thumbnail]:
    """The ``n`` rows of ``frame`` (a :class:`drift.logread.LogData` table) with the highest unfamiliarity score
    whose thumbnail is stored under ``log_dir``, highest first."""
    if n <= 0 or frame.empty:
        return []
    stored = thumbnail_files(log_dir)
    if not stored:
        return []
    rows = frame[frame["ood_score"].notna()]
    names = rows["request_id"].map(thumbnail_name)
    rows = (
        rows[names.isin(list(stored))].assign(thumbnail=names).sort_values("ood_score", ascending=False, kind="stable")
    )
    found = []
    for row in rows.itertuples(index=False):
        try:
            jpeg = stored[row.thumbnail].read_bytes()
        except OSError:  # pruned by the service's disk budget since it was listed
            continue
        found.append(Thumbnail(row.request_id, row.time.isoformat(timespec="seconds"), row.label, row.ood_score, jpeg))
        if len(found) == n:
            break
    log.info("%d thumbnails of %d stored under %s shown", len(found), len(stored), log_dir)
    return found
