"""Learning-rate schedules against transformers' schedule functions, their floors and wsd's shapes;
optimizer and schedule settings that do not belong together are config errors."""

import itertools
import math
import typing

import pytest
import torch
from test_config import BASE  # the config the config tests use
from transformers.optimization import (
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_inverse_sqrt_schedule,
    get_polynomial_decay_schedule_with_warmup,
    get_wsd_schedule,
)

from lmforge.config import TrainConfig, load_config
from lmforge.engine.optim import (
    DECAYS,
    OPTIMIZERS,
    build_optimizer,
    build_scheduler,
    lr_factor,
    schedule_change,
)
from lmforge.errors import ConfigError, UserError

LR = 3e-3


def lrs(scheduler, steps: int) -> list[float]:
    """The learning rate of each of `steps` optimizer steps, stepping the scheduler as training does."""
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)


def ours(total: int, *settings: str) -> list[float]:
    """Our LambdaLR, built from a TrainConfig as a run builds it."""
    cfg = TrainConfig.model_validate({"lr": LR, **dict(s.split("=") for s in settings)})
    return lrs(build_scheduler(optimizer(), cfg, total), total + 3)  # past the end too


def theirs(make, total: int, **kwargs) -> list[float]:
    return lrs(make(optimizer(), **kwargs), total + 3)


TOTAL = 50
CASES = {
    "cosine_with_restarts, 2 cycles (the default)": (
        ("scheduler=cosine_with_restarts", "warmup_steps=7"),
        get_cosine_with_hard_restarts_schedule_with_warmup,
        {"num_warmup_steps": 7, "num_training_steps": TOTAL, "num_cycles": 2},
    ),
    "cosine_with_restarts, 3 cycles, no warmup": (
        ("scheduler=cosine_with_restarts", "num_cycles=3"),
        get_cosine_with_hard_restarts_schedule_with_warmup,
        {"num_warmup_steps": 0, "num_training_steps": TOTAL, "num_cycles": 3},
    ),
    "polynomial, power 1 (the default)": (
        ("scheduler=polynomial", "warmup_steps=5"),
        get_polynomial_decay_schedule_with_warmup,
        {"num_warmup_steps": 5, "num_training_steps": TOTAL, "lr_end": 0.0, "power": 1.0},
    ),
    "polynomial, power 2, a floor": (
        ("scheduler=polynomial", "warmup_ratio=0.1", "power=2", "min_lr_ratio=0.1"),
        get_polynomial_decay_schedule_with_warmup,
        {"num_warmup_steps": 5, "num_training_steps": TOTAL, "lr_end": LR * 0.1, "power": 2.0},
    ),
    "polynomial, power 0.5": (
        ("scheduler=polynomial", "warmup_steps=3", "power=0.5"),
        get_polynomial_decay_schedule_with_warmup,
        {"num_warmup_steps": 3, "num_training_steps": TOTAL, "lr_end": 0.0, "power": 0.5},
    ),
    "inverse_sqrt, timescale = warmup": (
        ("scheduler=inverse_sqrt", "warmup_steps=8"),
        get_inverse_sqrt_schedule,
        {"num_warmup_steps": 8},
    ),
    "inverse_sqrt, no warmup: timescale 10,000": (
        ("scheduler=inverse_sqrt",),
        get_inverse_sqrt_schedule,
        {"num_warmup_steps": 0},
    ),
    "wsd, 1-sqrt (the default), decay 0.2": (
        ("scheduler=wsd", "warmup_steps=5"),
        get_wsd_schedule,
        {"num_warmup_steps": 5, "num_decay_steps": 10, "num_training_steps": TOTAL, "decay_type": "1-sqrt"},
    ),
    "wsd, linear, decay 0.3": (
        ("scheduler=wsd", "warmup_steps=4", "decay_shape=linear", "decay_ratio=0.3"),
        get_wsd_schedule,
        {"num_warmup_steps": 4, "num_decay_steps": 15, "num_training_steps": TOTAL, "decay_type": "linear"},
    ),
    "wsd, cosine, no stable phase": (
        ("scheduler=wsd", "warmup_steps=10", "decay_shape=cosine", "decay_ratio=0.8"),
        get_wsd_schedule,
        {"num_warmup_steps": 10, "num_decay_steps": 40, "num_training_steps": TOTAL, "decay_type": "cosine"},
    ),
    "wsd, 1-sqrt with a floor (after warmup, which transformers starts at the floor)": (
        ("scheduler=wsd", "warmup_steps=0", "min_lr_ratio=0.05"),
        get_wsd_schedule,
        {"num_warmup_steps": 0, "num_decay_steps": 10, "num_training_steps": TOTAL, "min_lr_ratio": 0.05},
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_each_new_schedule_is_transformers_schedule_at_every_step(case):
    settings, make, kwargs = CASES[case]
    if make is get_wsd_schedule:
        kwargs = {"decay_type": "1-sqrt", **kwargs}
    ours_, theirs_ = ours(TOTAL, *settings), theirs(make, TOTAL, **kwargs)
    assert len(ours_) == len(theirs_) == TOTAL + 3
    floored = any(setting.startswith("min_lr_ratio") for setting in settings)
    if make is get_polynomial_decay_schedule_with_warmup and floored:
        # transformers divides ((lr - lr_end) * x + lr_end) by lr: the same number but for the last bits
        assert ours_ == pytest.approx(theirs_, rel=1e-13, abs=0)
    else:
        assert ours_ == theirs_  # bit for bit
    assert len(set(ours_)) > 5  # a curve, not a constant


def test_restarts_go_back_to_the_peak_and_end_at_the_floor():
    total, warmup = 40, 0
    factors = [lr_factor(s, total, warmup, "cosine_with_restarts", 0.1, num_cycles=2) for s in range(total + 2)]
    assert factors[0] == 1.0 and factors[20] == 1.0  # each cycle starts at the peak
    assert factors[19] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))
    assert min(factors[:40]) > 0.1 and factors[40] == factors[41] == 0.1


def test_polynomial_power_and_floor():
    assert lr_factor(55, 100, 10, "polynomial", power=2.0) == pytest.approx((1 - 45 / 90) ** 2)
    assert lr_factor(55, 100, 10, "polynomial", 0.2, power=2.0) == pytest.approx(0.2 + 0.8 * 0.25)
    assert lr_factor(100, 100, 10, "polynomial", 0.2, power=3.0) == pytest.approx(0.2)
    assert lr_factor(500, 100, 10, "polynomial", 0.2) == pytest.approx(0.2)  # past the end: the floor


def test_inverse_sqrt_ignores_the_length_and_stops_at_the_floor():
    assert lr_factor(40, 100, 10, "inverse_sqrt") == pytest.approx(0.5)  # sqrt(10 / 40)
    assert lr_factor(40, 100, 10, "inverse_sqrt") == lr_factor(40, 10**6, 10, "inverse_sqrt")
    assert lr_factor(40, 100, 10, "inverse_sqrt", 0.1) == pytest.approx(0.5)  # above the floor: unchanged
    assert lr_factor(10_000, 100, 10, "inverse_sqrt", 0.1) == 0.1  # sqrt(10 / 10,000) = 0.03 is below it
    assert lr_factor(3, 100, 10, "inverse_sqrt", 0.5) == pytest.approx(0.3)  # warmup still starts from 0


@pytest.mark.parametrize(("shape", "at_half"), [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_wsd_holds_the_peak_then_decays_in_its_shape_to_the_floor(shape, at_half):
    total, warmup = 100, 10  # decay_ratio 0.2: the last 20 steps decay, from step 80
    factor = [lr_factor(s, total, warmup, "wsd", 0.1, decay_ratio=0.2, decay_shape=shape) for s in range(total + 1)]
    assert factor[5] == 0.5  # warmup from 0
    assert factor[10:81] == [1.0] * 71  # stable
    assert factor[90] == pytest.approx(0.1 + 0.9 * at_half)
    assert all(a > b for a, b in itertools.pairwise(factor[80:])), "strictly decaying"
    assert factor[100] == pytest.approx(0.1)
    assert 0.1 < factor[99] < 1.0


def test_1_sqrt_drops_first_and_flattens_at_the_end():
    """1-sqrt lies below linear all through the decay, falling fastest at its start and slowest at
    its end (Hägele et al. 2024); cosine is above linear in the first half, below in the second."""

    def at(step, shape):
        return lr_factor(step, 100, 0, "wsd", decay_ratio=0.5, decay_shape=shape)

    assert at(55, "1-sqrt") < at(55, "linear") < at(55, "cosine")
    assert at(95, "cosine") < at(95, "1-sqrt") < at(95, "linear")
    assert at(50, "1-sqrt") - at(51, "1-sqrt") > 10 * (at(98, "1-sqrt") - at(99, "1-sqrt"))


def test_a_wsd_decay_that_does_not_fit_the_run_is_refused_when_the_length_is_known():
    cfg = TrainConfig.model_validate({"scheduler": "wsd", "warmup_steps": 90, "decay_ratio": 0.2})
    with pytest.raises(UserError, match=r"decay_ratio=0.2: the last 20 of 100 steps\) would start inside the 90"):
        build_scheduler(optimizer(), cfg, 100)
    build_scheduler(optimizer(), cfg, 200)  # fits: 90 warmup, 70 stable, 40 decay
    build_scheduler(optimizer(), cfg.model_copy(update={"warmup_steps": 80}), 100)  # no stable phase: fine
    short = TrainConfig.model_validate({"scheduler": "wsd", "decay_ratio": 0.1})
    with pytest.raises(UserError, match=r"train.decay_ratio=0.1 of 4 steps rounds to no decay step"):
        build_scheduler(optimizer(), short, 4)


def test_a_resume_with_another_length_says_what_happens_to_each_schedule():
    def change(total_now, step, **settings):
        cfg = TrainConfig.model_validate({"lr": 2e-3, **settings})
        return schedule_change(cfg, cfg, 100, total_now, step)

    assert change(200, 50, scheduler="wsd", warmup_steps=3) == (
        "the wsd learning-rate schedule is planned again over 200 steps instead of 100: at step 51 the learning "
        "rate becomes 0.002 (it was 0.002), decaying from step 160 (it was 80), reaching 0 at step 200"
    )
    # 2e-3 * (0.1 + 0.9 * (1 - 50/200) ** 2), and (1 - 50/100) ** 2 before
    assert change(200, 50, scheduler="polynomial", power=2, min_lr_ratio=0.1).endswith(
        "at step 51 the learning rate becomes 0.00121 (it was 0.00065), reaching 0.0002 at step 200"
    )
    # inverse_sqrt and constant do not depend on the length, unless their warmup is a share of it
    assert change(200, 50, scheduler="inverse_sqrt", warmup_steps=3) == ""
    assert change(200, 50, scheduler="constant", warmup_steps=3) == ""
    assert change(200, 15, scheduler="inverse_sqrt", warmup_ratio=0.1).endswith(
        "at step 16 the learning rate becomes 0.0015 (it was 0.00163), its warmup now 20 steps (it was 10)"
    )
    assert change(100, 50, scheduler="wsd") == ""  # the same length


def test_every_optimizer_and_schedule_of_the_schema_has_a_builder():
    fields = TrainConfig.model_fields
    assert set(typing.get_args(fields["optimizer"].annotation)) == set(OPTIMIZERS)
    assert set(typing.get_args(fields["scheduler"].annotation)) == set(DECAYS)


def test_each_optimizer_is_the_one_named_and_updates_differently():
    """The registry builds what the config names (so a test cannot pass by always building AdamW),
    over param_groups, and one step from the same gradient moves the weights differently."""
    from lion_pytorch import Lion

    expected = {"adamw": torch.optim.AdamW, "adafactor": torch.optim.Adafactor, "sgd": torch.optim.SGD, "lion": Lion}
    moved = {}
    for name, kind in expected.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        cfg = TrainConfig.model_validate({"optimizer": name, "lr": 1e-2, "weight_decay": 0.1})
        opt = build_optimizer(model, cfg)
        assert type(opt) is kind
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        before = model[1].weight.detach().clone()
        model(torch.tensor([1, 2, 3])).square().sum().backward()
        opt.step()
        moved[name] = model[1].weight.detach() - before
    assert all(delta.abs().sum() > 0 for delta in moved.values())
    names = list(moved)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(moved[a], moved[b]), (a, b)
    # lion's update is the sign: every entry moved by lr (plus the decay lr * wd * w)
    assert torch.allclose(moved["lion"].abs(), torch.full_like(moved["lion"], 1e-2), rtol=0.05)


def test_sgd_takes_its_momentum_and_nesterov():
    model = torch.nn.Linear(4, 4)
    default = build_optimizer(model, TrainConfig.model_validate({"optimizer": "sgd"}))
    assert default.defaults["momentum"] == 0.9 and default.defaults["nesterov"] is False
    cfg = TrainConfig.model_validate({"optimizer": "sgd", "momentum": 0.5, "nesterov": True})
    sgd = build_optimizer(model, cfg)
    assert sgd.defaults["momentum"] == 0.5 and sgd.defaults["nesterov"] is True


def test_lion_takes_the_adam_betas():
    cfg = TrainConfig.model_validate({"optimizer": "lion", "adam_beta1": 0.95, "adam_beta2": 0.98, "lr": 1e-4})
    lion = build_optimizer(torch.nn.Linear(4, 4), cfg)
    assert lion.defaults["betas"] == (0.95, 0.98) and lion.defaults["lr"] == 1e-4


# --------------------------------------------------------------------------- config errors


def problems(tmp_path, *overrides: str) -> list[str]:
    path = tmp_path / "config.yaml"
    path.write_text(BASE)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, env={})
    return info.value.problems


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("train.momentum=0.8",),
            "train.momentum applies to train.optimizer=sgd only, not adamw: remove train.momentum or set "
            "train.optimizer=sgd; adamw's momentum is train.adam_beta1",
        ),
        (
            ("train.optimizer=adafactor", "train.nesterov=true"),
            "train.nesterov applies to train.optimizer=sgd only, not adafactor: remove train.nesterov or set "
            "train.optimizer=sgd",
        ),
        (
            ("train.optimizer=sgd", "train.nesterov=true", "train.momentum=0"),
            "train.nesterov needs momentum, but train.momentum is 0: raise train.momentum (e.g. 0.9) or set "
            "train.nesterov=false",
        ),
        (
            ("train.num_cycles=3",),
            "train.num_cycles applies to train.scheduler=cosine_with_restarts only, not cosine: remove "
            "train.num_cycles or set train.scheduler=cosine_with_restarts",
        ),
        (
            ("train.scheduler=linear", "train.power=2"),
            "train.power applies to train.scheduler=polynomial only, not linear",
        ),
        (
            ("train.decay_ratio=0.1",),
            "train.decay_ratio applies to train.scheduler=wsd only, not cosine",
        ),
        (
            ("train.scheduler=polynomial", "train.decay_shape=linear"),
            "train.decay_shape applies to train.scheduler=wsd only, not polynomial",
        ),
        (
            ("train.scheduler=constant", "train.min_lr_ratio=0.1"),
            "train.min_lr_ratio is the floor of a decay, and train.scheduler=constant never decays",
        ),
    ],
)
def test_settings_of_another_optimizer_or_schedule_are_config_errors(tmp_path, overrides, message):
    (problem,) = problems(tmp_path, *overrides)
    assert message in problem
    field = message.split()[0]
    assert problem.startswith(f"override '{field}="), "located at the setting it names"


def test_every_misplaced_setting_is_reported_at_once(tmp_path):
    found = problems(tmp_path, "train.optimizer=lion", "train.momentum=0.9", "train.power=2", "train.num_cycles=2")
    assert len(found) == 3
    assert any("lion's momentum is train.adam_beta1" in p for p in found)


def test_settings_in_their_place_are_accepted(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(BASE)
    for overrides in (
        ("train.optimizer=sgd", "train.momentum=0.8", "train.nesterov=true"),
        ("train.optimizer=lion", "train.adam_beta2=0.99"),
        ("train.scheduler=cosine_with_restarts", "train.num_cycles=4", "train.min_lr_ratio=0.1"),
        ("train.scheduler=polynomial", "train.power=2"),
        ("train.scheduler=wsd", "train.decay_ratio=0.3", "train.decay_shape=cosine"),
        ("train.scheduler=inverse_sqrt", "train.min_lr_ratio=0.1"),
    ):
        load_config(path, overrides, env={})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_on_cpu_are_a_config_error_naming_cuda(tmp_path, name):
    (problem,) = problems(tmp_path, f"train.optimizer={name}")
    assert f"train.optimizer={name} needs a CUDA GPU (bitsandbytes' 8-bit optimizers)" in problem
    assert "on CPU use adamw, adafactor, sgd or lion" in problem
