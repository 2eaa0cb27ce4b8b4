"""guard_kernels.validation.real_number: the one check of scalar settings (kernel API and GuardConfig)."""

import math

import numpy as np
import pytest
import torch

from guard_kernels.validation import real_number


@pytest.mark.parametrize(
    "value,expected",
    [
        (0.3, 0.3),
        (2, 2.0),
        (-2.5, -2.5),
        (np.float32(0.3), float(np.float32(0.3))),
        (np.float64(0.3), 0.3),
        (np.float16(0.5), 0.5),
        (np.int64(3), 3.0),
        (np.uint8(7), 7.0),
        (np.array(0.25), 0.25),  # a 0-d array
        (torch.tensor(0.3), float(torch.tensor(0.3))),
        (torch.tensor(0.3, dtype=torch.float64), 0.3),
        (torch.tensor(4), 4.0),
        (torch.tensor(0.5, dtype=torch.bfloat16), 0.5),
    ],
    ids=repr,
)
def test_accepts_real_numbers_as_python_floats(value, expected):
    number = real_number("x", value)
    assert type(number) is float and number == expected


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        np.bool_(True),
        np.array(True),
        torch.tensor(True),
        "0.3",
        b"1",
        None,
        1j,
        np.complex64(1),
        torch.tensor(1 + 1j),
        [0.3],
        np.array([0.3]),
        torch.tensor([0.3]),
        torch.zeros(2, 2),
    ],
    ids=repr,
)
def test_refuses_what_is_not_a_real_number_with_a_type_error(value):
    with pytest.raises(TypeError, match=r"^spike_scale must be a real number, got .+$") as raised:
        real_number("spike_scale", value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, np.float32("nan"), np.float64("-inf"), torch.tensor(math.inf), 10**400],
    ids=repr,
)
def test_refuses_non_finite_numbers_with_a_value_error(value):
    with pytest.raises(ValueError, match=r"^scale must be finite, got (nan|-?inf)$"):
        real_number("scale", value)


def test_bounds_are_inclusive_and_named_in_the_message():
    assert real_number("x", 0.0, minimum=0.0) == 0.0
    assert real_number("x", 1, maximum=1.0) == 1.0
    with pytest.raises(ValueError, match=r"^x must be >= 0, got -0.1$"):
        real_number("x", -0.1, minimum=0.0)
    with pytest.raises(ValueError, match=r"^x must be <= 1, got 1.5$"):
        real_number("x", np.float64(1.5), maximum=1.0)
    with pytest.raises(ValueError, match=r"^x must be >= -1, got -2$"):
        real_number("x", torch.tensor(-2), minimum=-1.0, maximum=1.0)
