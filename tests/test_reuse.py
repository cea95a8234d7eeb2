"""Reuse across models: calibration, the calibrated rule, "unknown", continuous learning."""


import pytest
import torch

from cnnmod import CnnmodError, compose, decompose, load_composed, save_composed
from cnnmod.evaluate import evaluate_scores
from cnnmod.modules.adapt import adapt_
from cnnmod.modules.calibration import fit_platt
from cnnmod.trace import overlay_maps

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
    before = overlay_maps(m.network, "mask")["relu"].clone()
    foreign = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    foreign[:, 0, 1, 1] = 200  # lights pixel 3, which no class of the parent used
    m.input_spec = type(m.input_spec)(1, (2, 2), (0.0,), (1.0 / 255,))  # raw values as the net saw them
    added = adapt_(m, foreign)
    after = overlay_maps(m.network, "mask")["relu"]
    expected = before.clone()
    expected[0, 1, 1] = True  # channel 0 (weight +1) at pixel 3; channel 1 (weight -1) stays off
    assert added == 1 and torch.equal(after, expected)
    assert torch.equal(overlay_maps(modules[1].network, "mask")["relu"], overlay_maps(
        decompose(PixelNet(), pixel_data(), positives=2, negatives_per_class=0, delta=1e9, calibration=0)[1].network,
        "mask")["relu"])  # a sibling module sharing the parent's tensors is untouched


def test_composed_file_keeps_its_rule_and_threshold(tmp_path):
    modules = decompose(PixelNet(), pixel_data(), positives=2, negatives_per_class=1, calibration=2)
    save_composed(compose(modules, unknown_below=0.7), tmp_path / "c.safetensors")
    loaded = load_composed(tmp_path / "c.safetensors")
    assert loaded.rule == "calibrated" and loaded.unknown_below == 0.7
    x = pixel_data().tensors[0]
    assert torch.equal(loaded(x), compose(modules, unknown_below=0.7)(x))


def test_joint_fit_recovers_known_scalars():
    # Oracle: labels drawn from softmax(a * m + b) with known (a, b). Class-balanced weighting
    # shifts each b_k by -log(prior_k) (the prior-shift identity of logistic models), and softmax
    # ignores a common shift of all b, so b is compared as differences.
    from cnnmod.compose.fit import fit_composition

    gen = torch.Generator().manual_seed(0)
    a_true, b_true = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.0, 1.0, -1.0])
    m = torch.randn(40000, 3, generator=gen) * 2
    y = torch.multinomial(torch.softmax(m * a_true + b_true, 1), 1, generator=gen)[:, 0]
    a, b = fit_composition(m, y, torch.ones(3), torch.zeros(3), hold=0.0)
    prior = torch.bincount(y, minlength=3).double() / len(y)
    expected = b_true.double() - prior.log()
    assert torch.allclose(a, a_true.double(), atol=0.05)
    assert torch.allclose(b - b[0], expected - expected[0], atol=0.05)


def test_joint_fit_mends_a_module_that_claims_everything(decomposed, tmp_path, capsys):
    from cnnmod import load_data
    from cnnmod.cli import main
    from cnnmod.compose import fit_composed_, load_modules

    _, _, mods = decomposed
    test = load_data("digits", "test")
    modules = load_modules(mods)
    good = evaluate_scores(compose(modules, rule="calibrated").score_images, test, test.classes)["top1"]
    modules[3].meta["calibration"]["b"] += 20.0  # module 3 now wins nearly every image
    broken = evaluate_scores(compose(modules, rule="calibrated").score_images, test, test.classes)
    assert broken["per_class"]["3"] == 1.0 and broken["top1"] < 0.3
    used = fit_composed_(modules, load_data("digits", "train"), per_class=50)
    assert used == 500 and all(m.meta["calibration"]["images"] == 500 for m in modules)
    mended = evaluate_scores(compose(modules, rule="calibrated").score_images, test, test.classes)["top1"]
    assert mended >= good - 0.02
    from cnnmod import Dataset

    with pytest.raises(CnnmodError, match="expected images of every composed class in the fitting data, found none of 0, 1, 2"):
        fit_composed_(modules, Dataset(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 0]), ["cat"]))
    # The command line: --fit-data fits, the composed file keeps the fitted scalars.
    out = tmp_path / "c.safetensors"
    assert main(["compose", str(mods), "--out", str(out), "--fit-data", "digits", "--fit-per-class", "50"]) == 0
    assert "jointly on 500 images" in capsys.readouterr().out
    loaded = load_composed(out)
    assert loaded.rule == "calibrated" and loaded.modules_[0].meta["calibration"]["images"] == 500
    assert main(["compose", str(mods), "--out", str(tmp_path / "x.safetensors"), "--fit-data", "mnist5k",
                 "--fit-split", "test", "--rule", "vote"]) == 2
    assert "expected the calibrated rule with --fit-data" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
