"""Load the drift reference that training stored with a model in the BentoML model store."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from service.artifacts import REFERENCE_FILE
from service.imagestats import STAT_FIELDS
from service.inference_log import EMBEDDING_PREFIX

log = logging.getLogger(__name__)


class ReferenceError(RuntimeError):
    """The reference of a model cannot be found or read; the message says what to do."""


def reference_path(tag: str) -> Path:
    """Where the reference table of model ``tag`` lies in the BentoML model store."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        model = bentoml.models.get(tag)
    except NotFound:
        raise ReferenceError(
            f"model {tag} (named in the inference log) is not in the BentoML model store; run the drift job where "
            "that model is stored (same BENTOML_HOME), or import it with `bentoml models import`."
        ) from None
    return Path(model.path) / REFERENCE_FILE


def embedding_columns(frame: pd.DataFrame) -> list[str]:
    """The ``emb_*`` columns of a table, in index order."""
    cols = [c for c in frame.columns if c.startswith(EMBEDDING_PREFIX) and c[len(EMBEDDING_PREFIX) :].isdigit()]
    return sorted(cols, key=lambda c: int(c[len(EMBEDDING_PREFIX) :]))


def load_reference(tag: str | None = None, path: str | Path | None = None) -> pd.DataFrame:
    """The reference table (statistics, label, confidence, ``emb_*``) of model ``tag``, or from ``path``."""
    path = Path(path) if path is not None else reference_path(tag)
    if not path.exists():
        raise ReferenceError(
            f"{path} is missing: the model was saved without a drift reference. Re-run training to store one."
        )
    frame = pd.read_parquet(path)
    missing = [c for c in (*STAT_FIELDS, "label", "confidence") if c not in frame.columns]
    if missing or not embedding_columns(frame):
        what = ", ".join(missing) if missing else f"{EMBEDDING_PREFIX}* columns"
        raise ReferenceError(f"{path} lacks {what}; it was written by another version: re-run training.")
    frame["label"] = frame["label"].astype(str)
    log.info("reference %s: %d rows", path, len(frame))
    return frame
