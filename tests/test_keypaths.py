"""Key paths: spelling, joining and folding of repeated layer indices."""

from __future__ import annotations

import itertools
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from nnx_ckpt_widgets import _keypaths


def expand(pattern: str) -> set[tuple[str, ...]]:
    """Every key path a folded pattern stands for: ``{0..2}`` and ``{0,5}`` expand."""
    choices = []
    for part in pattern.split("/"):
        span = re.fullmatch(r"\{(\d+)\.\.(\d+)\}", part)
        listed = re.fullmatch(r"\{(\d+(?:,\d+)+)\}", part)
        if span:
            choices.append([str(i) for i in range(int(span[1]), int(span[2]) + 1)])
        elif listed:
            choices.append(listed[1].split(","))
        else:
            choices.append([part])
    return set(itertools.product(*choices))


def test_to_keypath_makes_integer_keys_strings():
    assert _keypaths.to_keypath(("layers", 0, "kernel")) == ("layers", "0", "kernel")
    assert _keypaths.to_keypath(("layers", "0")) == _keypaths.to_keypath(("layers", 0))


def test_join_uses_slashes():
    assert _keypaths.join(("linear1", "kernel")) == "linear1/kernel"


def test_fold_contiguous_indices_into_a_range():
    paths = [("layers", str(i), "kernel") for i in range(48)]
    [(pattern, members)] = _keypaths.fold(paths)
    assert pattern == "layers/{0..47}/kernel"
    assert members == paths


def test_fold_gapped_indices_into_a_list():
    paths = [("layers", i, "w") for i in ("0", "2", "5")]
    assert [p for p, _ in _keypaths.fold(paths)] == ["layers/{0,2,5}/w"]


def test_fold_keeps_distinct_names_apart_in_first_seen_order():
    paths = [("b",), ("layers", "0", "w"), ("a",), ("layers", "1", "w"), ("layers", "0", "b")]
    assert [p for p, _ in _keypaths.fold(paths)] == ["b", "layers/{0..1}/w", "a", "layers/0/b"]


def test_fold_sorts_indices_numerically():
    paths = [("h", str(i)) for i in (10, 2, 1, 0, 11, 3, 4, 5, 6, 7, 8, 9)]
    assert [p for p, _ in _keypaths.fold(paths)] == ["h/{0..11}"]


def test_fold_nested_indices_when_every_combination_is_present():
    paths = [("blocks", str(b), "heads", str(h)) for b in range(3) for h in range(2)]
    assert [p for p, _ in _keypaths.fold(paths)] == ["blocks/{0..2}/heads/{0..1}"]


def test_fold_never_claims_paths_that_are_not_there():
    # blocks/0/heads/0 and blocks/1/heads/1 only: "blocks/{0..1}/heads/{0..1}" would claim four.
    paths = [("blocks", "0", "heads", "0"), ("blocks", "1", "heads", "1")]
    for pattern, members in _keypaths.fold(paths):
        assert expand(pattern) == set(members)


def test_fold_does_not_merge_digit_keys_with_leading_zeros():
    # '01' and '1' are different keys; folding them as the index 1 would hide one of them.
    paths = [("x", "01"), ("x", "1"), ("x", "007")]
    folded = _keypaths.fold(paths)
    for pattern, members in folded:
        assert expand(pattern) == set(members)
    assert sorted(m for _, members in folded for m in members) == sorted(paths)


_name = st.one_of(
    st.sampled_from(["a", "b", "layers", "w"]),
    st.integers(0, 12).map(str),
    st.sampled_from(["00", "01", "007"]),
)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(_name, min_size=1, max_size=4).map(tuple), max_size=20, unique=True))
def test_fold_partitions_paths_and_patterns_expand_to_their_members(paths):
    folded = _keypaths.fold(paths)
    members = [m for _, group in folded for m in group]
    assert sorted(members) == sorted(paths)
    assert len(members) == len(set(members))
    for pattern, group in folded:
        assert expand(pattern) == set(group)
    # Groups come in order of first appearance.
    firsts = [paths.index(group[0]) for _, group in folded]
    assert firsts == sorted(firsts)
