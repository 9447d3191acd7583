"""The shared argument checks: one message shape (argument, bad value, valid range, fix), the same forms everywhere."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_mofo._validation import (
    as_bool,
    as_choice,
    as_device,
    as_dtype,
    as_float,
    as_int,
    as_patterns,
)

WHERE = "Thing()"


@pytest.mark.parametrize("value", ["1e-3", None, True, math.inf, -math.inf, math.nan, [1.0], torch.tensor(1.0)])
def test_as_float_refuses_non_numbers_bools_and_non_finite_values(value: object) -> None:
    with pytest.raises(ValueError, match=r"Thing\(\): lr=.* is invalid; the valid range is a number >= 0"):
        as_float(value, where=WHERE, argument="lr", minimum=0.0)


def test_as_float_checks_both_ends_of_the_interval_and_names_the_fix() -> None:
    assert as_float(1, where=WHERE, argument="f", minimum=0.0, maximum=1.0, min_inclusive=False) == 1.0
    with pytest.raises(MisconfigurationException, match=r"f=0 is invalid; the valid range is \(0, 1\]\. Use 0.15"):
        as_float(
            0,
            where=WHERE,
            argument="f",
            minimum=0.0,
            maximum=1.0,
            min_inclusive=False,
            fix="Use 0.15.",
            error=MisconfigurationException,
        )
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        as_float(1.0, where=WHERE, argument="b", minimum=0.0, maximum=1.0, max_inclusive=False)
    assert as_float(math.inf, where=WHERE, argument="x", minimum=0.0, allow_inf=True) == math.inf


@pytest.mark.parametrize("value", [2.5, 2.0, "3", True, None])
def test_as_int_refuses_floats_strings_and_bools(value: object) -> None:
    with pytest.raises(ValueError, match=r"steps=.* is invalid; the valid range is an integer >= 1"):
        as_int(value, where=WHERE, argument="steps", minimum=1)


def test_as_int_checks_its_range() -> None:
    assert as_int(3, where=WHERE, argument="n", minimum=1, maximum=3) == 3
    with pytest.raises(ValueError, match=r"an integer in \[1, 3\]"):
        as_int(4, where=WHERE, argument="n", minimum=1, maximum=3)


def test_as_patterns_takes_a_single_string_as_one_pattern() -> None:
    vocabulary = ("bias", "norm")
    assert as_patterns("lm_head", where=WHERE, argument="dense", vocabulary=vocabulary) == ("lm_head",)
    assert as_patterns(["bias", r"q_proj"], where=WHERE, argument="dense", vocabulary=vocabulary) == ("bias", "q_proj")
    assert as_patterns(None, where=WHERE, argument="include", vocabulary=vocabulary) is None


@pytest.mark.parametrize(("value", "reason"), [(["("], "not a valid regular expression"), ([3], "is not a string")])
def test_as_patterns_names_the_bad_entry(value: object, reason: str) -> None:
    with pytest.raises(MisconfigurationException, match=rf"Thing\(\): include=.* is invalid.*{reason}"):
        as_patterns(value, where=WHERE, argument="include", vocabulary=("bias",), error=MisconfigurationException)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("float16", torch.float16),
        ("torch.bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("fp32", torch.float32),
        ("double", torch.float64),
        (torch.float32, torch.float32),
        (None, None),
    ],
)
def test_as_dtype_accepts_the_same_forms_everywhere(value: object, expected: torch.dtype | None) -> None:
    assert as_dtype(value, where=WHERE, argument="snapshot_dtype") is expected


@pytest.mark.parametrize("value", ["int8", torch.int64, 16, "float8"])
def test_as_dtype_refuses_what_is_not_a_floating_point_dtype(value: object) -> None:
    with pytest.raises(ValueError, match=r"snapshot_dtype=.* is invalid; the valid range is one of \['float64'"):
        as_dtype(value, where=WHERE, argument="snapshot_dtype")


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_as_bool_takes_only_real_booleans(value: object) -> None:
    with pytest.raises(ValueError, match=r"Thing\(\): reset=.* is invalid; the valid range is True or False"):
        as_bool(value, where=WHERE, argument="reset")
    assert as_bool(False, where=WHERE, argument="reset") is False


def test_as_bool_tells_yaml_users_to_drop_the_quotes() -> None:
    with pytest.raises(ValueError, match=r"without quotes in YAML"):
        as_bool("false", where=WHERE, argument="reset")


def test_as_choice_names_the_choices_and_refuses_a_bool_for_a_word() -> None:
    assert as_choice("l1", where=WHERE, argument="norm", choices=("l2", "l1")) == "l1"
    for value in ("L2", True, None):
        with pytest.raises(ValueError, match=r"norm=.* is invalid; the valid range is one of \('l2', 'l1'\)"):
            as_choice(value, where=WHERE, argument="norm", choices=("l2", "l1"))


def test_as_device_takes_cpu_and_none_and_refuses_what_this_machine_lacks() -> None:
    assert as_device("cpu", where=WHERE, argument="device") == torch.device("cpu")
    assert as_device(torch.device("cpu"), where=WHERE, argument="device") == torch.device("cpu")
    assert as_device(None, where=WHERE, argument="device") is None
    for value, reason in (("gpu0", "torch cannot parse it"), ("meta", "holds no values"), (3, "")):
        with pytest.raises(ValueError, match=rf"device=.* is invalid.*{reason}"):
            as_device(value, where=WHERE, argument="device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a build without CUDA")
def test_as_device_refuses_cuda_on_a_build_without_it_naming_the_fix() -> None:
    with pytest.raises(MisconfigurationException, match=r"device='cuda' is invalid.*no usable 'cuda' device.*'cpu'"):
        as_device("cuda", where=WHERE, argument="device", error=MisconfigurationException)
