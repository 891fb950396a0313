"""LR schedule (warmup + cosine, per iteration) and early stopping."""
import io
import math

import pytest
import torch

from engine.schedule import EarlyStopping, WarmupCosineLR, lr_at, warmup_steps_for

# lr 0.01, start factor 0.001, 10 steps/epoch, 2 warmup epochs (20 steps), 101 steps in all, min 1e-6
CURVE = dict(base_lr=0.01, total_steps=101, warmup_steps=20, warmup_start_factor=0.001, min_lr=1e-6)
EXPECTED = {
    0: 1e-5,                       # lr * start factor
    10: 0.005005,                  # halfway up: 0.01 * (0.001 + 0.999 * 0.5)
    19: 0.0095005,                 # last warmup step
    20: 0.01,                      # first cosine step: the full lr
    40: 1e-6 + 0.009999 * (1 + math.cos(math.pi / 4)) / 2,   # a quarter into the cosine
    60: 0.0050005,                 # half way down: (lr + min) / 2
    99: 1e-6 + 0.009999 * math.sin(math.pi / 160) ** 2,
    100: 1e-6,                     # the final step ends at min_lr
}


@pytest.mark.parametrize("step,expected", sorted(EXPECTED.items()))
def test_lr_at_chosen_iterations(step, expected):
    assert lr_at(step, **CURVE) == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_curve_is_monotonic_up_then_down():
    lrs = [lr_at(s, **CURVE) for s in range(101)]
    assert all(a < b for a, b in zip(lrs[:20], lrs[1:21]))
    assert all(a > b for a, b in zip(lrs[20:100], lrs[21:101]))


def test_no_warmup_and_degenerate_lengths():
    assert lr_at(0, 0.1, total_steps=11, warmup_steps=0, min_lr=0.0) == pytest.approx(0.1)
    assert lr_at(10, 0.1, total_steps=11, warmup_steps=0, min_lr=0.0) == pytest.approx(0.0)
    assert lr_at(0, 0.1, total_steps=1, warmup_steps=0, min_lr=0.001) == pytest.approx(0.001)  # one step: it is the last
    assert lr_at(500, 0.1, total_steps=11, warmup_steps=2, min_lr=0.001) == pytest.approx(0.001)  # past the end


def test_warmup_steps_for_recipe():
    assert warmup_steps_for(3, 360) == 1080  # the template recipe: 3 epochs of warmup
    assert warmup_steps_for(0.5, 75) == 38


def _optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=123.0, momentum=0.9)


def test_scheduler_drives_the_optimizer_and_resumes_exactly():
    opt = _optimizer()
    sched = WarmupCosineLR(opt, **CURVE)
    seen = []
    for _ in range(45):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [lr_at(s, **CURVE) for s in range(45)]

    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    opt2 = _optimizer()
    resumed = WarmupCosineLR(opt2, **CURVE)
    resumed.load_state_dict(state)
    assert resumed.last_step == 45
    after = []
    for _ in range(56):
        after.append(opt2.param_groups[0]["lr"])
        opt2.step()
        resumed.step()
    assert after == [lr_at(s, **CURVE) for s in range(45, 101)]


def test_early_stopping_on_a_metric_sequence():
    es = EarlyStopping(patience=3)
    improved = [es.update(v) for v in (0.10, 0.20, 0.20, 0.15, 0.19)]
    assert improved == [True, True, False, False, False]  # equal is not better
    assert es.best == 0.20 and es.bad_epochs == 3 and es.should_stop

    es = EarlyStopping(patience=3)
    for v in (0.1, 0.05, 0.05, 0.3, 0.2, 0.2):
        es.update(v)
    assert not es.should_stop and es.bad_epochs == 2 and es.best == 0.3  # the new best reset the count


def test_early_stopping_disabled_and_state_roundtrip():
    es = EarlyStopping(patience=0)
    for v in (0.5, 0.1, 0.1, 0.1, 0.1, 0.1):
        es.update(v)
    assert es.bad_epochs == 5 and not es.should_stop

    es = EarlyStopping(patience=2)
    es.update(0.4)
    es.update(0.3)
    restored = EarlyStopping(patience=2)
    restored.load_state_dict(es.state_dict())
    assert restored.state_dict() == {"best": 0.4, "bad_epochs": 1}
    assert restored.update(0.35) is False and restored.should_stop


def test_epochs_within_a_time_limit():
    from engine.schedule import epochs_within

    assert epochs_within(0, 500.0, 3, 50) == 50  # no limit
    assert epochs_within(600, 0.0, 0, 50) == 50  # nothing measured yet
    assert epochs_within(210, 60.0, 1, 6) == 3  # 150 s left, 60 s per epoch: two more fit
    assert epochs_within(210, 180.0, 3, 6) == 3  # 30 s left: none
    assert epochs_within(10_000, 60.0, 1, 6) == 6  # capped by train.epochs
    assert epochs_within(100, 400.0, 2, 6) == 2  # over the limit: never fewer than done


def test_refit_ends_the_cosine_at_the_new_length():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = WarmupCosineLR(opt, 0.1, total_steps=100, warmup_steps=0, min_lr=0.0)
    for _ in range(10):
        sched.step()
    before = sched.get_lr()
    sched.refit(20)
    assert sched.get_lr() < before and opt.param_groups[0]["lr"] == sched.get_lr()
    for _ in range(9):
        sched.step()
    assert sched.last_step == 19 and sched.get_lr() == pytest.approx(0.0)
    assert WarmupCosineLR(opt, 0.1, 100).state_dict()["total_steps"] == 100 and sched.state_dict()["total_steps"] == 20
