"""The unfamiliar-image detector on synthetic features: calibrated flag rate, far and near outliers, storage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imgcls import ood

E, S, C = 8, len(ood.CONTENT_STATS), 4


def draw(n: int, seed: int, shift: float = 0.0, classes: range = range(C)):
    """Embeddings around one centre per class (on a sphere, as a network's tend to be) and content statistics."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(C + 2, E)) * 3
    labels = rng.choice(list(classes), size=n)
    embedding = centres[labels] + rng.normal(size=(n, E))
    stats = rng.normal(size=(n, S)) + shift
    return embedding, stats, labels


def test_about_one_percent_of_held_out_images_are_flagged_and_far_ones_are():
    train_e, train_s, train_y = draw(4000, 1)
    val_e, val_s, _ = draw(1000, 2)
    detector = ood.fit(train_e, train_s, train_y, val_e, val_s)
    test_e, test_s, _ = draw(5000, 3)
    assert 0.003 <= (detector.score(test_e, test_s) > 1).mean() <= 0.025
    shifted_e, shifted_s, _ = draw(500, 4, shift=6.0)  # same kinds of content, very different statistics
    assert (detector.score(shifted_e, shifted_s) > 1).mean() >= 0.95
    new_e, new_s, _ = draw(500, 5, classes=range(C, C + 2))  # classes never seen, ordinary statistics
    assert (detector.score(new_e, new_s) > 1).mean() >= 0.5


def test_scores_survive_the_trip_through_json_and_bad_entries_are_refused():
    train_e, train_s, train_y = draw(500, 1)
    detector = ood.fit(train_e, train_s, train_y, *draw(200, 2)[:2])
    stored = ood.OodDetector.from_dict(json.loads(json.dumps(detector.to_dict())))
    probe_e, probe_s, _ = draw(50, 3)
    rows = [dict(zip(ood.CONTENT_STATS, row, strict=True)) for row in probe_s]
    assert np.allclose(stored.score(probe_e, rows), detector.score(probe_e, probe_s), atol=1e-3)
    broken = {**detector.to_dict(), "precision": [[1.0]]}
    with pytest.raises(ValueError, match="inconsistent"):
        ood.OodDetector.from_dict(broken)
    with pytest.raises(ValueError, match="method"):
        ood.OodDetector.from_dict({**detector.to_dict(), "method": "magic"})


@pytest.mark.parametrize("candidate", [ood.DEFAULT, ood.CANDIDATES[1]], ids=["statistics apart", "one distance"])
def test_distances_agree_with_their_definitions(candidate):
    """ood.py computes the distances with folded matrices; here they are as the formulas read."""
    train_e, train_s, train_y = draw(800, 1)
    detector = ood.fit(train_e, train_s, train_y, *draw(300, 2)[:2], candidate=candidate)
    probe_e, probe_s, _ = draw(40, 3, shift=1.5)
    joined = np.concatenate([probe_e, probe_s[:, : len(candidate.joint)]], axis=1)
    z = (joined - detector.center) / detector.scale
    diff = z[:, None, :] - detector.class_means[None]
    mahalanobis = np.sqrt(np.einsum("ncd,de,nce->nc", diff, detector.precision, diff).min(axis=1))
    unit = probe_e / np.linalg.norm(probe_e, axis=1, keepdims=True)
    kth_similarity = -np.sort(-(unit @ detector.bank.T), axis=1)[:, detector.k - 1]
    apart = np.zeros(len(probe_e))
    if candidate.apart:  # Mahalanobis of the standardised statistics to their training mean
        mean, std = train_s.mean(axis=0), train_s.std(axis=0)
        train_z, probe_z = (train_s - mean) / std, (probe_s - mean) / std
        precision = np.linalg.inv(np.cov(train_z, rowvar=False) + ood.SHRINKAGE * np.eye(train_s.shape[1]))
        apart = np.sqrt(np.einsum("nd,de,ne->n", probe_z, precision, probe_z))
    expected = np.stack([mahalanobis, 1 - kth_similarity, apart], 1)
    assert np.allclose(detector.parts(probe_e, probe_s), expected, rtol=1e-8)
    scaled = expected / [detector.mahalanobis_scale, detector.knn_scale, getattr(detector.apart, "part_scale", 1)]
    combined = np.linalg.norm(scaled, axis=1) if candidate.combine == ood.NORM else scaled.max(axis=1)
    assert np.allclose(detector.score(probe_e, probe_s), combined / detector.threshold, rtol=1e-8)


def test_a_detector_stored_before_the_statistics_had_their_own_distance_scores_as_it_did():
    """An ood.json of the earlier format (statistics joined to the embedding, no `apart`, the larger distance)."""
    train_e, train_s, train_y = draw(500, 1)
    old = ood.fit(train_e, train_s, train_y, *draw(200, 2)[:2], candidate=ood.CANDIDATES[1])
    stored = {k: v for k, v in old.to_dict().items() if k not in ("apart", "combine")}
    probe_e, probe_s, _ = draw(50, 3)
    read = ood.OodDetector.from_dict(stored)
    assert np.allclose(read.score(probe_e, probe_s), old.score(probe_e, probe_s), atol=1e-3)


def test_rates_tool_scores_every_group_and_variant_of_a_stored_model(tiny_model, tmp_path, capsys):
    """`python -m training.ood_rates` on the stored tiny model: every source, a folder of one's own, JSON."""
    from PIL import Image

    from training.ood_rates import main

    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(folder / f"{i}.png")
    out = tmp_path / "rates.json"
    assert main(["--model", tiny_model, "--n", "12", "--images", str(folder), "--json", str(out)]) == 0
    rows = {row["source"]: row for row in json.loads(out.read_text())["rows"]}
    kinds = [row["kind"] for row in rows.values()]
    assert kinds[:2] == ["familiar", "familiar"] and kinds[-1] == "yours"
    assert {"photo", "text", "texture", "unseen", "transformed"} <= set(kinds)
    assert rows[f"images in {folder}"]["images"] == 12
    names = {c.name for c in ood.CANDIDATES}
    for row in rows.values():
        assert row["features"] in names and all(0.0 <= row[v] <= 1.0 for v in ("fp32", "fp16", "int8"))
    assert rows["pages of text"]["int8"] >= 0.9  # even for the barely trained tiny model
    assert "| photographs: scikit-image's samples | photo |" in capsys.readouterr().out
    assert main(["--model", "no-such-model:latest"]) == 2
