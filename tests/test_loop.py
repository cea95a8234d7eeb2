"""The one training loop (loop.py): order, schedule, resumption, progress lines."""

import math

import torch

from cnnmod.loop import Order, Progress, run_steps, warmup_cosine


def _run(steps, order=None, w=None, seen=None, min_batch=1):
    w = torch.zeros(3, requires_grad=True) if w is None else w
    x, y = torch.arange(21.0).view(7, 3) / 10, torch.arange(7.0)
    opt = torch.optim.SGD([w], lr=0.1)
    gen = torch.Generator().manual_seed(5)
    if order is not None and order.step:  # the generator's state as the interrupted run left it
        gen.manual_seed(5)
        torch.randperm(7, generator=gen)

    def loss_of(batch):
        (seen if seen is not None else []).append(batch.tolist())
        return ((x[batch] @ w - y[batch]) ** 2).mean()

    order = run_steps(opt, loss_of, index=torch.arange(7), batch_size=3, steps=steps, gen=gen, order=order,
                      rate=warmup_cosine(0.1, 4, 2), min_batch=min_batch)
    return w, order


def test_the_order_is_a_seeded_permutation_each_pass_and_a_short_rest_is_dropped():
    seen = []
    _run(3, seen=seen)
    assert sorted(sum(seen[:3], [])) == list(range(7))  # a pass: 3 + 3 + 1 images, each once
    seen = []
    _run(3, seen=seen, min_batch=2)
    assert [len(b) for b in seen] == [3, 3, 3] and sorted(sum(seen[:2], [])) != list(range(7))


def test_a_run_continued_from_its_order_ends_where_the_whole_run_ends():
    whole, _ = _run(4)
    half, order = _run(2)
    assert order.step == 2 and len(order.rest) == 1
    rest, order = _run(4, order=Order(order.step, order.rest), w=half.detach().clone().requires_grad_(True))
    # SGD without momentum holds no state: continuing from the weights and the order is the whole run
    assert torch.allclose(whole, rest) and order.step == 4


def test_warm_up_then_cosine():
    rate = warmup_cosine(1.0, 10, 4)
    assert [round(rate(s), 4) for s in (0, 1, 3)] == [0.25, round(0.5 * 0.5 * (1 + math.cos(math.pi / 10)), 4),
                                                      round(0.5 * (1 + math.cos(3 * math.pi / 10)), 4)]
    assert rate(9) < 0.03 and warmup_cosine(1.0, 10, 0)(0) == 1.0


def test_plain_progress_lines_when_not_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(Progress, "EVERY", 0.0)
    shown = Progress(4, "distillation", enabled=True)
    shown.update()
    shown.update()
    err = capsys.readouterr().err
    assert "distillation: 25% (1/4)" in err and "distillation: 50% (2/4), about" in err and "left" in err
    Progress(4, "quiet", enabled=False).update()
    assert capsys.readouterr().err == ""
