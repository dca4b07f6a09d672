"""One check of generation parameters, shared by the Python client, the CLI and the HTTP API."""

from __future__ import annotations

import math

import pytest

from hivegen.client.params import check_sampling
from hivegen.errors import InvalidParameterError


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 2}, "top_p"),
        ({"top_p": math.inf}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"seed": 1 << 63}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"stop": "x"}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"stop": [3]}, "stop"),
    ],
)
def test_out_of_range_parameters_are_named(kwargs: dict, param: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        check_sampling(**kwargs)
    assert info.value.param == param
    assert str(info.value).startswith(f"{param}: ")


def test_the_caller_spelling_is_used_in_the_error() -> None:
    with pytest.raises(InvalidParameterError, match=r"^--top-p: must be a number in \(0, 1\], not 2"):
        check_sampling(top_p=2, names={"top_p": "--top-p"})


def test_valid_parameters_pass() -> None:
    check_sampling(max_new_tokens=1, temperature=0, top_k=1, top_p=1, seed=0, stop=["\n", "END"])
    check_sampling(temperature=2.0, top_p=0.01, seed=(1 << 63) - 1)
    check_sampling()
