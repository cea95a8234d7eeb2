"""Reuse across models: calibration, the calibrated rule, "unknown", continuous learning."""


import pytest
import torch

from cnnmod import CnnmodError, compose, decompose, load_composed, save_composed
from cnnmod.evaluate import evaluate_scores
from cnnmod.modules.adapt import adapt_
from cnnmod.modules.calibration import fit_platt

from nets import PixelNet, pixel_data


def _platt_loss(a, b, m, y):
    n_pos, n_neg = y.sum(), (~y).sum()
    w = torch.where(y, 0.5 / n_pos, 0.5 / n_neg).double()
    t = torch.where(y, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2)).double()
    z = a * m.double() + b
    return float((w * (torch.nn.functional.softplus(z) - t * z)).sum())


def test_platt_fit_is_the_minimum_of_its_loss():
    torch.manual_seed(0)
    m = torch.randn(300) * 4 + 1
    y = (m + 3 * torch.randn(300)) > 1
    a, b = fit_platt(m, y)
    best = _platt_loss(a, b, m, y)
    for da in (-1e-3, 1e-3):  # no nearby point is lower (oracle: the loss itself)
        for db in (-1e-3, 1e-3):
            assert _platt_loss(a + da, b + db, m, y) >= best - 1e-12
    assert a > 0  # a larger margin means "mine" more often


def test_platt_stays_finite_on_separable_data():
    m = torch.tensor([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])
    a, b = fit_platt(m, m > 0)
    assert 0 < a < 100 and abs(b) < 1e-6


def test_calibrated_rule_scores_are_affine_in_the_margins_and_unknown_rejects():
    modules = decompose(PixelNet(), pixel_data(), positives=2, negatives_per_class=1, calibration=2)
    assert all("calibration" in m.meta for m in modules)
    x = pixel_data().tensors[0]
    vote, calibrated = compose(modules, rule="vote"), compose(modules, rule="calibrated")
    assert compose(modules).rule == "vote"  # one parent: its margins are comparable, the vote is exact
    margins = vote(x)
    a = torch.tensor([m.meta["calibration"]["a"] for m in modules])
    b = torch.tensor([m.meta["calibration"]["b"] for m in modules])
    assert torch.allclose(calibrated(x), margins * a + b)
    picky = compose(modules, unknown_below=0.999999)
    assert picky.rule == "calibrated"
    assert picky.reject_below() == pytest.approx(float(torch.logit(torch.tensor(0.999999, dtype=torch.float64))))
    with pytest.raises(CnnmodError, match="unknown threshold in \\(0, 1\\) with the calibrated rule"):
        compose(modules, rule="vote", unknown_below=0.5)


def test_unknown_answers_are_counted_as_misses():
    from cnnmod import Dataset

    data = Dataset(torch.zeros(4, 1, 1, 1, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), ["a", "b"])
    scores = torch.tensor([[2.0, 0.0], [-1.0, -0.5], [3.0, 1.0], [0.0, 5.0]])
    result = evaluate_scores(lambda imgs: scores[: len(imgs)], data, ["a", "b"], reject_below=1.0)
    # image 1 (best -0.5) is unknown; the others are right
    assert result["unknown"] == 0.25 and result["top1"] == 0.75


def test_continuous_learning_keeps_what_foreign_images_activate():
    modules = decompose(PixelNet(), pixel_data(), positives=2, negatives_per_class=0, delta=1e9, calibration=0)
    m = modules[0]
    before = m.network.masks()["relu"].clone()
    foreign = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    foreign[:, 0, 1, 1] = 200  # lights pixel 3, which no class of the parent used
    m.input_spec = type(m.input_spec)(1, (2, 2), (0.0,), (1.0 / 255,))  # raw values as the net saw them
    added = adapt_(m, foreign)
    after = m.network.masks()["relu"]
    expected = before.clone()
    expected[0, 1, 1] = True  # channel 0 (weight +1) at pixel 3; channel 1 (weight -1) stays off
    assert added == 1 and torch.equal(after, expected)


def test_composed_file_keeps_its_rule_and_threshold(tmp_path):
    modules = decompose(PixelNet(), pixel_data(), positives=2, negatives_per_class=1, calibration=2)
    save_composed(compose(modules, unknown_below=0.7), tmp_path / "c.safetensors")
    loaded = load_composed(tmp_path / "c.safetensors")
    assert loaded.rule == "calibrated" and loaded.unknown_below == 0.7
    x = pixel_data().tensors[0]
    assert torch.equal(loaded(x), compose(modules, unknown_below=0.7)(x))
