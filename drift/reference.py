"""Load the drift reference that training stored with a model, for the variant that served the traffic."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from imgcls.imagestats import STAT_FIELDS
from imgcls.inference_log import EMBEDDING_PREFIX
from imgcls.model_files import reference_file

log = logging.getLogger(__name__)


class ReferenceError(RuntimeError):
    """The reference of a model cannot be found or read; the message says what to do."""


def model_folder(tag: str) -> Path:
    """Where model ``tag`` lies in the BentoML model store."""
    import bentoml

    try:
        return Path(bentoml.models.get(tag).path)
    except bentoml.exceptions.NotFound:
        raise ReferenceError(
            f"model {tag} is not in the BentoML model store; run the drift job where that model is stored (same "
            "BENTOML_HOME), or import it with `bentoml models import`."
        ) from None


def embedding_columns(frame: pd.DataFrame) -> list[str]:
    """The ``emb_*`` columns of a table, in index order."""
    cols = [c for c in frame.columns if c.startswith(EMBEDDING_PREFIX) and c[len(EMBEDDING_PREFIX) :].isdigit()]
    return sorted(cols, key=lambda c: int(c[len(EMBEDDING_PREFIX) :]))


def load_reference(tag: str | None = None, variant: str | None = None, path: str | Path | None = None) -> pd.DataFrame:
    """The reference table (statistics, label, confidence, ood_score, ``emb_*``) of model ``tag`` as ``variant``
    computes it, or the table in ``path``."""
    if path is None:
        if not variant:
            raise ReferenceError(
                "the log lines do not say which model variant served them (written by an older service): "
                "pass --variant fp32, fp16 or int8."
            )
        path = model_folder(tag) / reference_file(variant)
    path = Path(path)
    if not path.exists():
        raise ReferenceError(f"{path} is missing: the model was saved without this reference. Re-run training.")
    frame = pd.read_parquet(path)
    missing = [c for c in (*STAT_FIELDS, "label", "confidence") if c not in frame.columns]
    if missing or not embedding_columns(frame):
        what = ", ".join(missing) if missing else f"{EMBEDDING_PREFIX}* columns"
        raise ReferenceError(f"{path} lacks {what}; it was written by another version: re-run training.")
    frame["label"] = frame["label"].astype(str)
    log.info("reference %s: %d rows", path, len(frame))
    return frame
