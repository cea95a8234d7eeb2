"""The demo, run fast on scikit-learn's 8x8 digits: the weak-class repair story and its output."""

import json

import torch

from cnnmod import load_data
from cnnmod.demo import _table, run_demo, weaken


def test_weaken_keeps_the_first_tenth_of_one_class_only():
    data = load_data("digits", "train")
    weak = weaken(data, 5, share=0.1)
    before, after = torch.bincount(data.labels, minlength=10), torch.bincount(weak.labels, minlength=10)
    assert after[5] == int(before[5]) // 10 == 14
    assert torch.equal(torch.cat([after[:5], after[6:]]), torch.cat([before[:5], before[6:]]))
    first = torch.nonzero(data.labels == 5).flatten()[:14]
    assert torch.equal(weak.images[weak.labels == 5], data.images[first])  # file order kept


def test_demo_repairs_the_weak_class_and_reports_it(capsys):
    assert run_demo(epochs=3, as_json=True, data="digits") == 0
    r = json.loads(capsys.readouterr().out)

    assert r["data"] == "digits" and r["weak_class"] == "5" and r["weak_class_train_images"] == 14
    for key in ("weak_model", "weak_modules", "weak_calibrated", "repaired", "fitted"):
        assert 0.0 <= r[f"{key}_top1"] <= 1.0 and 0.0 <= r[f"{key}_class_accuracy"] <= 1.0
    for key in ("repaired", "fitted"):
        assert r[f"{key}_others_change_worst"] <= r[f"{key}_others_change_mean"]
    # the use case: the swapped-in module of a healthy model repairs the class the weak model misses
    assert r["weak_modules_class_accuracy"] < r["model_class_accuracy"]
    assert r["repaired_class_accuracy"] > r["weak_modules_class_accuracy"] + 0.3
    assert r["fitted_class_accuracy"] > r["weak_modules_class_accuracy"] + 0.3
    assert r["fit_images"] > 0 and r["repaired_rule"] == r["fitted_rule"] == "calibrated"
    # rounded: accuracies to 4 decimals, points and seconds to 2
    assert all(round(v, 4) == v for v in r.values() if isinstance(v, float))
    assert all(round(r[k], 2) == r[k] for k in ("repaired_others_change_mean", "decompose_inference_ratio"))

    lines = _table(r).splitlines()
    assert len(lines) == 10
    assert lines[-2].lstrip().startswith("with module 5 of the first smallcnn")
    assert len({line.index("top-1") for line in lines if "top-1" in line}) == 1  # one column for the values
