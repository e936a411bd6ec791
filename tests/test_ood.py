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


def test_distances_agree_with_their_definitions():
    """ood.py computes the distances with folded matrices; here they are as the formulas read."""
    train_e, train_s, train_y = draw(800, 1)
    detector = ood.fit(train_e, train_s, train_y, *draw(300, 2)[:2])
    probe_e, probe_s, _ = draw(40, 3, shift=1.5)
    z = (np.concatenate([probe_e, probe_s], axis=1) - detector.center) / detector.scale
    diff = z[:, None, :] - detector.class_means[None]
    mahalanobis = np.sqrt(np.einsum("ncd,de,nce->nc", diff, detector.precision, diff).min(axis=1))
    unit = probe_e / np.linalg.norm(probe_e, axis=1, keepdims=True)
    kth_similarity = -np.sort(-(unit @ detector.bank.T), axis=1)[:, detector.k - 1]
    assert np.allclose(detector.parts(probe_e, probe_s), np.stack([mahalanobis, 1 - kth_similarity], 1), rtol=1e-9)


def test_rates_tool_scores_every_group_and_variant_of_a_stored_model(tiny_model, tmp_path, capsys):
    """`python -m training.ood_rates` on the stored tiny model: the demo groups, a folder of one's own, JSON."""
    from PIL import Image

    from training.ood_rates import main

    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(folder / f"{i}.png")
    out = tmp_path / "rates.json"
    assert main(["--model", tiny_model, "--n", "12", "--images", str(folder), "--json", str(out)]) == 0
    table = json.loads(out.read_text())
    groups = [row["group"] for row in table["rows"]]
    assert groups[:4] == ["new demo images (familiar)", "demo classes never trained on",
                          "pages of text (document shift)", "crops of real photographs"]  # fmt: skip
    assert groups[4] == f"images in {folder}" and table["rows"][4]["images"] == 12
    for row in table["rows"]:
        for variant in ("fp32", "int8"):
            assert 0.0 <= row[variant]["share"] <= 1.0
    assert table["rows"][2]["int8"]["share"] >= 0.9  # pages of text, even for the barely trained tiny model
    assert "crops of real photographs" in capsys.readouterr().out
    assert main(["--model", "no-such-model:latest"]) == 2
