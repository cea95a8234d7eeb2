"""Distilled modules (issue #17): the channels strategy's modules fine-tuned on the parent's logits."""

import math

import pytest
import torch

from cnnmod import CnnmodError, create_model, decompose, load_data, load_model, load_module, save_module
from cnnmod.cli import main
from cnnmod.compose.trunk import shared_layers
from cnnmod.data.inputspec import measure_spec
from cnnmod.files import read_file, write_file
from cnnmod.modules.distill import DistillOptions, channeled_targets, distill_
from cnnmod.modules.observe import _adapt
from cnnmod.modules.shared import identity
from cnnmod.trace.graph import trace_graph
from cnnmod.trace.network import GraphNetwork, weights_of
from cnnmod.training import TrainConfig, train


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    path = tmp_path_factory.mktemp("distill") / "m.safetensors"
    train("smallcnn", load_data("digits", "train"), path, TrainConfig(epochs=2, lr=0.05, batch_size=64), progress=False)
    return path


def _setup(path, **options):
    data = load_data("digits", "train")
    model = load_model(path)
    modules = decompose(model, data, calibration=0, positives=40, strategy="channels", **options)
    _, fetch = _adapt(data, data.classes, model.input_spec)
    teacher = GraphNetwork(trace_graph(model), weights_of(model))
    return modules, teacher, fetch, torch.arange(400)


def _distance(modules, teacher, x):
    """Mean squared distance of the modules' logits to the parent's channeled logits on ``x``."""
    with torch.no_grad():
        targets = channeled_targets(teacher(x), [m.class_index for m in modules])
        return float(sum(torch.nn.functional.mse_loss(m.network(x), t) for m, t in zip(modules, targets)))


def test_distillation_lowers_the_loss_within_its_budget_and_repeats_exactly(parent, tmp_path):
    modules, teacher, fetch, index = _setup(parent, keep=0.25)
    x = fetch(index)
    before = _distance(modules, teacher, x)
    options = DistillOptions(epochs=1.5, batch_size=64, lr=3e-3, seed=1)
    report = distill_(modules, teacher, fetch, index, options)
    assert report["steps"] == math.ceil(1.5 * math.ceil(400 / 64)) == 11
    assert report["images"] == 400 + 4 * 64  # an epoch of 7 steps, then 4 of the next
    after = _distance(modules, teacher, x)
    assert after < 0.9 * before and report["loss_last"] < report["loss_first"] and report["kept"]
    assert len(report["loss_curve"]) == 10 and report["loss_curve"][-1] < report["loss_curve"][0]
    assert report["macs"] == report["teacher_macs"] + report["student_macs"] > 0
    again, *_ = _setup(parent, keep=0.25)
    distill_(again, teacher, fetch, index, options)
    for m, n in zip(modules, again):  # the same seed: the same tensors, bit for bit
        assert all(torch.equal(m.network.weight(k), n.network.weight(k)) for k in m.network.weight_names)
    # a distilled module's file gives what the module in memory gives
    save_module(modules[4], tmp_path / "four.safetensors")
    loaded = load_module(tmp_path / "four.safetensors")
    assert torch.equal(loaded.margin(x), modules[4].margin(x))
    assert loaded.meta["distillation"]["steps"] == 11


def test_a_shared_trunk_is_trained_once_and_stays_shared(parent):
    modules, teacher, fetch, index = _setup(parent, keep=0.25, trunk=0.5)
    nets = [m.network for m in modules]
    trunk = shared_layers(nets)
    assert trunk  # the setting shares layers
    before = {k: nets[0].weight(k) for k in nets[0].weight_names}
    report = distill_(modules, teacher, fetch, index, DistillOptions(epochs=1, batch_size=100, lr=3e-3))
    assert report["trunk_layers"] == len(trunk)
    assert shared_layers(nets) == trunk  # still computed identically by every module
    keys = [k for k in nets[0].weight_names if k.rsplit(".", 1)[0] in trunk and k.endswith(".weight")]
    assert keys and any(not torch.equal(nets[0].weight(k), before[k]) for k in keys)  # it trained
    assert all(identity(net.weight(k)) == identity(nets[0].weight(k)) for net in nets for k in keys)  # one tensor


def test_distillation_is_refused_for_paper_modules_before_the_pass():
    data = load_data("digits", "train")
    model = create_model("smallcnn", num_classes=10, image_size=8).eval()
    with pytest.raises(CnnmodError, match="expected the channels strategy to distil"):
        decompose(model, data, input_spec=measure_spec(data.images), distill={"epochs": 1})
    with pytest.raises(CnnmodError, match="expected --distill to be a number > 0 and <= 1000"):
        DistillOptions(epochs=0)


def test_decompose_distils_when_asked():
    torch.manual_seed(0)
    data = load_data("digits", "train")
    model = create_model("smallcnn", num_classes=10, image_size=8).eval()
    modules = decompose(model, data, input_spec=measure_spec(data.images), calibration=0, positives=20,
                        strategy="channels", keep=0.5, distill={"epochs": 1, "batch_size": 50})
    assert modules[0].meta["distillation"]["steps"] == math.ceil(200 / 50)
    # a reuse of two classes distils on their images and the negatives (2 of each class), not on every class's
    pair = decompose(model, data, input_spec=measure_spec(data.images), calibration=0, positives=20, only=["3", "8"],
                     strategy="channels", keep=0.5, distill={"epochs": 1, "batch_size": 50})
    assert pair[0].meta["distillation"]["images"] == 2 * 10 + 2 * 18


def test_the_command_line_distils_and_reports_the_share_of_the_parents_training(parent, tmp_path, capsys):
    out = tmp_path / "mods"
    assert main(["decompose", str(parent), "--data", "digits", "--out", str(out), "--strategy", "channels",
                 "--keep", "0.5", "--positives", "30", "--distill", "0.5", "--distill-lr", "0.002",
                 "--distill-composed", "2", "--distill-features", "0.5", "--distill-temperature", "3",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "distilled: 2 steps over 256 images" in printed and "of what training the parent cost" in printed
    assert "statistics pass: " in printed and "calibration pass: " in printed
    assert printed.count("of what training the parent cost") == 3
    # two epochs of ~1,400 digits trained the parent; half a pass over 300 images is a small share of that
    assert load_module(out / "3.safetensors").meta["distillation"]["options"]["lr"] == 0.002
    assert load_module(out / "3.safetensors").meta["distillation"]["options"]["composed"] == 2.0
    assert load_module(out / "3.safetensors").meta["distillation"]["options"]["features"] == 0.5
    assert load_module(out / "3.safetensors").meta["distillation"]["options"]["temperature"] == 3.0
    assert main(["decompose", str(parent), "--data", "digits", "--out", str(tmp_path / "p"), "--distill", "1"]) == 2
    assert "expected the channels strategy to distil" in capsys.readouterr().err
    assert main(["decompose", str(parent), "--data", "digits", "--out", str(tmp_path / "p"), "--strategy", "channels",
                 "--distill-lr", "0.01"]) == 2
    assert main(["decompose", str(parent), "--data", "digits", "--out", str(tmp_path / "p"), "--strategy", "channels",
                 "--distill-composed", "1"]) == 2
    assert "expected --distill-composed only with --distill EPOCHS" in capsys.readouterr().err
    assert main(["decompose", str(parent), "--data", "digits", "--out", str(tmp_path / "p"), "--strategy", "channels",
                 "--distill-crop"]) == 2
    assert "expected --distill-crop only with --distill EPOCHS" in capsys.readouterr().err


def test_an_interrupted_distillation_resumes_to_the_same_tensors(parent, tmp_path):
    options = DistillOptions(epochs=1.5, batch_size=64, lr=1e-3, seed=3)
    whole, teacher, fetch, index = _setup(parent, keep=0.25, trunk=0.5)
    distill_(whole, teacher, fetch, index, options)
    cut, *_ = _setup(parent, keep=0.25, trunk=0.5)
    calls = []

    def interrupted(idx):  # the 6th batch never comes: Ctrl-C
        calls.append(len(idx))
        if len(calls) == 6:
            raise KeyboardInterrupt
        return fetch(idx)

    state = tmp_path / "distill-progress.safetensors"
    with pytest.raises(KeyboardInterrupt):
        distill_(cut, teacher, interrupted, index, options, progress_file=state, save_every=0)
    assert state.exists()
    other, *_ = _setup(parent, keep=0.5)
    with pytest.raises(CnnmodError, match="a saved distillation of another run"):
        distill_(other, teacher, fetch, index, options, progress_file=state, resume=True)
    saved, meta = read_file(state)  # a state whose tensors do not fit this run is refused, nothing changed
    bad = dict(saved, **{k: t[:1] for k, t in saved.items() if k.startswith("w/")})
    write_file(tmp_path / "bad.safetensors", bad, meta)
    with pytest.raises(CnnmodError, match="tensors or fields that do not fit it"):
        distill_(cut, teacher, fetch, index, options, progress_file=tmp_path / "bad.safetensors", resume=True)
    fetched = []
    report = distill_(cut, teacher, lambda idx: fetched.append(len(idx)) or fetch(idx), index, options,
                      progress_file=state, resume=True, save_every=0)
    # the 6 steps left, not all 11; then the check before and after (7 batches each) and one image for shapes
    assert len(fetched) == (11 - 5) + 2 * 7 + 1
    assert report["steps"] == 11 and report["images"] == 400 + 4 * 64 and not state.exists()
    for m, n in zip(whole, cut):  # bit for bit the uninterrupted run
        assert all(torch.equal(m.network.weight(k), n.network.weight(k)) for k in m.network.weight_names)


def _first_batch_seen(parent, images: int, **options):
    """The first batch a distillation fetched, and what its teacher was shown of it."""
    modules, teacher, fetch, index = _setup(parent, keep=0.5)
    fetched, shown = [], []

    class Recording(GraphNetwork):
        def forward(self, x, after=None):
            shown.append(x.clone())
            return super().forward(x, after)

    recording = Recording(teacher.graph, teacher.weights())
    distill_(modules, recording, lambda idx: fetched.append(fetch(idx)) or fetched[-1], index[:images],
             DistillOptions(epochs=1, batch_size=images, **options))
    return fetched[0], shown[0]


def test_flip_mirrors_a_seeded_half_of_each_batch_for_teacher_and_students(parent):
    given, seen = _first_batch_seen(parent, 128, flip=True)
    same = (seen == given).flatten(1).all(1)
    mirrored = (seen == given.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 30 < int((mirrored & ~same).sum()) < 98


def test_weights_that_do_not_lower_the_loss_are_not_kept(parent):
    modules, teacher, fetch, index = _setup(parent, keep=0.5)
    before = [dict(m.network.weights()) for m in modules]
    report = distill_(modules, teacher, fetch, index[:128], DistillOptions(epochs=1, batch_size=128, lr=0.5))
    assert not report["kept"] and report["loss_after"] >= report["loss_before"]
    assert all(m.network.weights()[k] is t for m, own in zip(modules, before) for k, t in own.items())


def test_the_composed_term_is_the_divergence_of_the_margins_softmax():
    from cnnmod.modules.distill import _summed_loss

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    targets = channeled_targets(logits, [0, 1, 2])  # (3 modules, 2 images, 2)
    exact = [t.clone() for t in targets]
    assert float(_summed_loss(exact, targets, 1.0)) == 0.0
    moved = [t.clone() for t in targets]
    moved[1][:, 1] += 1.0  # module 1's margin one higher on both images
    mse = float(_summed_loss(moved, targets, 0.0))
    assert mse == pytest.approx(2 * 1.0 / 2)  # two images, a squared error of 1 each, halved
    theirs = torch.stack([t[:, 1] - t[:, 0] for t in targets], 1)
    mine = torch.stack([t[:, 1] - t[:, 0] for t in moved], 1)
    p, q = theirs.softmax(1), mine.softmax(1)
    kl = float((p * (p.log() - q.log())).sum())  # oracle: the definition
    assert float(_summed_loss(moved, targets, 0.5)) == pytest.approx(mse + 0.5 * kl, rel=1e-5)
    p, q = (theirs / 4).softmax(1), (mine / 4).softmax(1)  # at a temperature of 4, scaled by its square
    soft = float((p * (p.log() - q.log())).sum())
    assert float(_summed_loss(moved, targets, 0.5, 4.0)) == pytest.approx(mse + 0.5 * 16 * soft, rel=1e-5)
    with pytest.raises(CnnmodError, match="expected --distill-composed to be a number >= 0"):
        DistillOptions(composed=-1.0)


def test_the_feature_term_compares_the_channels_each_module_kept(parent):
    from cnnmod.modules.distill import _Features

    modules, teacher, fetch, index = _setup(parent, keep=0.5)
    x = fetch(index[:64])
    features = _Features(modules, teacher, x)
    assert features.points  # the smallcnn's stage ends and its last feature map
    seen, mine = {}, {}
    teacher(x, after=features.grab(seen))
    group = type("G", (), {"members": list(range(len(modules)))})()
    for k, m in enumerate(modules):
        m.network(x, after=lambda name, out, k=k: features.grab_own(mine)(k, name, out))
    right = float(features.loss(mine, seen, group))
    # the same modules compared with the parent's first channels instead of those they kept: much further
    wrong = _Features(modules, teacher, x)
    wrong.index = [{p: None if k is None else torch.arange(len(k)) for p, k in idx.items()} for idx in wrong.index]
    assert any(k is not None for idx in features.index for k in idx.values())
    assert 0 < right < 0.5 * float(wrong.loss(mine, seen, group))
    # a module keeping every channel computes the parent's features: the term is zero (up to rounding)
    whole, *_ = _setup(parent, keep=1.0)
    full, mine = _Features(whole, teacher, x), {}
    for k, m in enumerate(whole):
        m.network(x, after=lambda name, out, k=k: full.grab_own(mine)(k, name, out))
    assert float(full.loss(mine, seen, group)) < 1e-8


def test_feature_distillation_trains_binds_on_the_device_and_refuses_modules_from_files(parent, tmp_path):
    modules, teacher, fetch, index = _setup(parent, keep=0.25)
    untouched = {k: modules[0].network.weight(k) for k in modules[0].network.weight_names if "running" in k
                 or k.endswith(".addmap")}
    x = fetch(index)
    before = _distance(modules, teacher, x)
    options = DistillOptions(epochs=2, batch_size=64, lr=3e-3, seed=1, features=1.0)
    report = distill_(modules, teacher, fetch, index, options, device="cpu")
    assert report["kept"] and _distance(modules, teacher, x) < before
    # the tensors it did not train are the modules' own still (shared with the parent), not copies
    assert all(modules[0].network.weight(k) is t for k, t in untouched.items())
    again, *_ = _setup(parent, keep=0.25)
    distill_(again, teacher, fetch, index, options)
    assert all(torch.equal(m.network.weight(k), n.network.weight(k)) for m, n in zip(modules, again)
               for k in m.network.weight_names)
    save_module(modules[0], tmp_path / "zero.safetensors")
    with pytest.raises(CnnmodError, match="modules read from files"):
        distill_([load_module(tmp_path / "zero.safetensors")], teacher, fetch, index, options)


def test_crop_shifts_each_image_by_at_most_an_eighth_of_its_size(parent):
    given, seen = _first_batch_seen(parent, 64, crop=True)
    padded = torch.nn.functional.pad(given, (1, 1, 1, 1))  # 8x8 digits: up to one pixel
    h, w = given.shape[-2:]
    shifts = [[bool(torch.equal(padded[i, :, dy:dy + h, dx:dx + w], seen[i])) for dy in range(3) for dx in range(3)]
              for i in range(len(given))]
    assert all(any(s) for s in shifts) and sum(s[4] for s in shifts) < len(given)  # some moved, all within one
