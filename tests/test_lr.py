import math

import pytest

from cocodc.config import load_config
from cocodc.trainer import lr_at

from conftest import TINY


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),
        (2, 0.5),  # linear warm-up over 4 steps
        (4, 1.0),  # the peak
        (9, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))),  # half way down the cosine: 0.55
        (14, 0.1),  # the end of the decay: lr x min_lr_ratio
        (20, 0.1),  # past it (a run continued past train.steps): the floor
    ],
)
def test_warm_up_then_cosine_down_to_the_floor(step, expected):
    config = load_config(TINY, ["train.lr=1.0", "train.warmup_steps=4", "train.steps=14", "train.min_lr_ratio=0.1"])
    assert lr_at(step, config) == pytest.approx(expected, abs=1e-12)


def test_the_decay_can_follow_another_length():
    config = load_config(TINY, ["train.lr=1.0", "train.warmup_steps=0", "train.min_lr_ratio=0.0"])
    assert lr_at(5, config, steps=10) == pytest.approx(0.5)  # cos(pi/2): half the peak at half of 10 steps
