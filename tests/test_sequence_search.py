"""Operator Sequence Search on synthetic streams: unit cases, and properties against a brute force.

The brute force states the rule of ``rrto_lab.sequence_search`` in a dozen lines: for every period
p, the template is the last p tokens, its occurrences are taken right-greedily from the end, and the
explanation with the fewest unexplained ops (then the smallest p) wins.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rrto_lab.sequence_search import (
    SequenceSearch,
    SyntheticStream,
    find_sequence,
    synthetic_stream,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def brute_force(coarse, fine=None, min_repeats=2, min_period=1):
    """(period, period starts) of the best explanation, or None."""
    toks = list(zip(coarse, fine, strict=True)) if fine is not None else list(coarse)
    n, best = len(toks), None
    for p in range(min_period, n // min_repeats + 1):
        starts, j = [n - p], n - 2 * p
        while j >= 0:
            if toks[j:j + p] == toks[n - p:]:
                starts.append(j)
                j -= p
            else:
                j -= 1
        if len(starts) >= min_repeats and (best is None or (len(starts) - 1) * p > best[0]):
            best = ((len(starts) - 1) * p, p, sorted(starts))
    return None if best is None else best[1:]


def assert_truth(result, truth: SyntheticStream, min_repeats: int = 2) -> None:
    assert result.found == (truth.repeats >= min_repeats), result.explain()
    if result.found:
        got = (result.start, result.period, result.repeats, result.noise, result.template)
        assert got == (truth.start, truth.period, truth.repeats, truth.noise, truth.template)


def assert_brute(result, coarse, fine=None, min_repeats=2, min_period=1) -> None:
    expected = brute_force(coarse, fine, min_repeats, min_period)
    assert result.found == (expected is not None)
    if expected is not None:
        assert (result.period, list(result.period_starts)) == (expected[0], expected[1])
        steady = {i for s in expected[1] for i in range(s, s + expected[0])}
        assert result.noise == tuple(i for i in range(len(coarse)) if i not in steady)


# --- the cases of the issue, one by one --------------------------------------------------------

def test_clean_stream_with_an_init_prefix():
    r = find_sequence(list("xyz" + "abcd" * 4))
    assert (r.found, r.start, r.period, r.repeats) == (True, 3, 4, 4)
    assert r.noise == (0, 1, 2) and r.template == tuple("abcd")
    assert r.period_starts == (3, 7, 11, 15) and r.unexplained == 7


def test_without_fine_tokens_coarse_ones_serve_both_levels():
    coarse = ["aten.mm", "aten.add", "aten._to_copy"] * 3
    r = find_sequence(coarse)
    assert r.template == ("aten.mm", "aten.add", "aten._to_copy")
    assert r.level1_candidates >= 1 and r.level2_checks >= 1


def test_init_prefix_of_any_content_with_warmups_that_almost_match():
    s = synthetic_stream(12, 3, init_noise=40, warmups=2, seed=7)
    r = find_sequence(s.coarse, s.fine)
    assert_truth(r, s)
    assert r.start == s.start > 2 * 12  # the warm-ups are in the noise
    text = r.explain()
    assert "op names repeat 5 times, fine tokens 3" in text and "2 of 4 earlier periods" in text


def test_noise_between_periods_is_filtered_and_listed():
    s = synthetic_stream(10, 5, init_noise=3, gaps=[2, 0, 1, 3], seed=1)
    r = find_sequence(s.coarse, s.fine)
    assert_truth(r, s)
    assert len(r.noise) == 3 + 6
    assert "3 ops before the first period, 6 ops in 3 gaps" in r.explain()


def test_a_metric_computed_now_and_then_longer_than_a_period_is_noise():
    s = synthetic_stream(8, 4, gaps=[0, 20, 0], seed=6)
    r = find_sequence(s.coarse, s.fine)
    assert_truth(r, s)
    assert r.noise == tuple(range(s.start + 16, s.start + 36))
    online = SequenceSearch()
    feed(online, s.coarse, s.fine, 0, s.start + 16)
    assert online.search().repeats == 2
    feed(online, s.coarse, s.fine, s.start + 16, len(s.coarse))
    r = online.search()  # a noise run that long is searched afresh, with the same answer
    assert r.level1_candidates > 0 and (r.start, r.repeats, r.noise) == (s.start, 4, s.noise)


def test_an_op_inserted_inside_a_period_makes_it_not_a_period():
    period = [f"op{k}" for k in range(10)]
    broken = period[:8] + ["aten.log"] + period[8:]
    r = find_sequence(period + period + broken + period + period)
    assert (r.found, r.period, r.repeats) == (True, 10, 4)
    assert r.noise == tuple(range(20, 31))
    assert "1 op(s) inserted (first: op 28 'aten.log')" in r.explain()
    assert "makes it not a period" in r.explain()


def test_nested_blocks_do_not_fool_it():
    s = synthetic_stream(60, 4, init_noise=5, gaps=0.5, nested=6, seed=3)
    layer = 58 // 6
    assert s.coarse[s.start + 1:s.start + 1 + layer] == s.coarse[s.start + 1 + layer:
                                                                 s.start + 1 + 2 * layer]
    assert_truth(find_sequence(s.coarse, s.fine), s)
    r = find_sequence(s.coarse)  # op names alone suffice here
    assert (r.start, r.period, r.noise) == (s.start, s.period, s.noise)


def test_fewest_unexplained_ops_then_the_smallest_period():
    period = [f"op{k}" for k in range(50)]
    r = find_sequence(period * 3)  # also readable as 47 ops with 3 "noise" ops per gap
    assert (r.period, r.start, r.noise) == (50, 0, ())
    tie = find_sequence(list("caacaa"))  # "a" x4 and "caa" x2 both leave 3 ops unexplained
    assert (tie.period, tie.repeats, tie.unexplained) == (1, 4, 3)


def test_a_partial_period_before_the_first_whole_one_is_noise_not_a_rotation():
    r = find_sequence(list("cd" + "abcd" * 4))
    assert (r.start, r.period, r.template, r.noise) == (2, 4, tuple("abcd"), (0, 1))


def test_trade_off_a_leading_period_tail_counts_when_it_explains_as_much():
    r = find_sequence(list("bcd" + "abcd" * 2))  # r*k = 2*1 <= p = 4: "bcd" x3 wins
    assert (r.period, r.repeats, r.noise) == (3, 3, (3, 7))


def test_dynamic_shapes_fail_at_level_2_and_say_why():
    s = synthetic_stream(20, 6, dynamic_shapes=True, seed=2)
    r = find_sequence(s.coarse, s.fine)
    assert not r.found and r.start == -1 and r.noise == ()
    assert r.rejected[0].period == 20 and r.rejected[0].coarse_repeats == 6
    assert "same ops, fine tokens change every period (dynamic shapes?)" in r.explain()
    assert r.period == 0 and r.repeats == 0 and r.template == ()


def test_a_shape_change_starts_a_new_steady_sequence():
    s = synthetic_stream(15, 3, shape_change=4, seed=5)
    r = find_sequence(s.coarse, s.fine)
    assert_truth(r, s)
    assert r.start >= 4 * 15 and "4 of 6 earlier periods differ" in r.explain()


def test_not_found_without_min_repeats_periods():
    s = synthetic_stream(8, 2, init_noise=4, seed=4)
    assert find_sequence(s.coarse, s.fine).found
    r = find_sequence(s.coarse, s.fine, min_repeats=3)
    assert not r.found and "occurs 2 time(s)" in r.explain()
    assert not find_sequence([]).found and "empty" in find_sequence([]).explain()


def test_min_period_skips_short_templates():
    r = find_sequence(list("xaaaxaaa"), min_period=2)
    assert (r.period, r.start) == (4, 0)
    assert find_sequence(list("xaaaxaaa")).period == 1


def test_fine_tokens_that_do_not_name_the_op_still_refine_it():
    coarse = list("abab" * 3)
    fine = ["same"] * len(coarse)  # says nothing about the op: both levels are compared
    r = find_sequence(coarse, fine)
    assert (r.period, r.start, r.template) == (2, 0, ("same", "same"))


def test_result_is_frozen_with_a_compact_repr():
    r = find_sequence(list("xyzabcabc"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.period = 4  # type: ignore[misc]
    assert repr(r) == ("SequenceResult(found=True, start=3, period=3, repeats=2, noise=3 ops, "
                       "n_ops=9, l1=1, l2=1)")
    assert repr(find_sequence(list("abc"))).startswith("SequenceResult(found=False, n_ops=3")


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="one fine token per op"):
        find_sequence(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="min_repeats >= 2"):
        find_sequence(["a"], min_repeats=1)
    with pytest.raises(ValueError, match="max_history"):
        SequenceSearch(max_history=0)
    with pytest.raises(ValueError, match="gaps has 1 lengths for 2 gaps"):
        synthetic_stream(5, 3, gaps=[1])
    with pytest.raises(ValueError, match="nested"):
        synthetic_stream(4, 3, nested=3)


def test_synthetic_stream_ground_truth_is_consistent():
    s = synthetic_stream(30, 5, init_noise=9, warmups=1, gaps=0.7, shape_change=1, nested=4,
                         seed=11)
    steady = set(range(len(s.coarse))) - set(s.noise)
    assert len(steady) == s.period * s.repeats and min(steady) == s.start
    assert s.fine[-s.period:] == s.template and len(s.coarse) == len(s.fine)
    assert synthetic_stream(30, 5, seed=11) == synthetic_stream(30, 5, seed=11)
    ends = {i for i in steady if s.fine[i].endswith("->cpu")}
    assert len(ends) == s.repeats
    assert ends <= set(s.syncs) and set(s.syncs) <= ends | set(s.noise)


# --- the online form ---------------------------------------------------------------------------

def feed(search: SequenceSearch, coarse, fine, lo: int, hi: int) -> None:
    for c, f in zip(coarse[lo:hi], fine[lo:hi], strict=True):
        search.push(c, f)


def test_online_confirmation_extends_the_known_sequence():
    s = synthetic_stream(25, 8, init_noise=30, gaps=0.5, seed=9)
    ends = [i + 1 for i, f in enumerate(s.fine) if f.endswith("->cpu")]
    online = SequenceSearch()
    feed(online, s.coarse, s.fine, 0, ends[1])
    first = online.search()
    alone = find_sequence(s.coarse[:ends[1]], s.fine[:ends[1]])
    assert first.found and first.level1_candidates > 0 and online.known is first
    for a, b in zip(ends[1:], ends[2:], strict=False):
        feed(online, s.coarse, s.fine, a, b)
        r = online.search()
        assert r.level1_candidates == 0 and "confirmed online" in r.explain()
    assert_truth(r, s)
    assert online.search() is r  # nothing new: the same answer
    again = online.search(fresh=True)
    assert again.level1_candidates > 0 and (again.start, again.noise) == (r.start, r.noise)
    assert (first.repeats, first.noise) == (2, alone.noise)  # a result stays what it was


def test_online_noise_sync_then_a_new_sequence():
    a = synthetic_stream(10, 3, seed=1)
    b = synthetic_stream(14, 3, seed=2)
    online = SequenceSearch()
    feed(online, a.coarse, a.fine, 0, len(a.coarse))
    assert online.search().period == 10
    online.push("aten._local_scalar_dense", "item(loss)")  # a logging sync between inferences
    assert not online.search().found and online.known is not None
    for k in range(3):
        feed(online, b.coarse, b.fine, 14 * k, 14 * (k + 1))
        r = online.search()
    assert (r.found, r.period, r.repeats, r.start) == (True, 14, 3, 31)


def test_online_history_is_bounded_and_never_starts_inside_a_period():
    s = synthetic_stream(20, 40, init_noise=10, gaps=0.3, seed=3)
    online = SequenceSearch(max_history=150)
    ends = [i + 1 for i, f in enumerate(s.fine) if f.endswith("->cpu")]
    prev = 0
    for end in ends:
        feed(online, s.coarse, s.fine, prev, end)
        prev, r = end, online.search()
    assert r.found and r.n_ops <= 150 and r.offset + r.n_ops == len(s.coarse)
    assert r.offset == r.start or r.offset in s.noise  # the window starts at a period or in noise
    assert r.noise == tuple(i for i in s.noise if i >= r.offset)
    assert len(online._coarse) <= 3 * 150 + 1024


# --- properties ---------------------------------------------------------------------------------

streams = st.fixed_dictionaries({
    "period": st.integers(1, 12),
    "repeats": st.integers(1, 6),
    "init_noise": st.integers(0, 15),
    "warmups": st.integers(0, 2),
    "gaps": st.floats(0, 1),
    "shape_change": st.integers(0, 2),
    "nested": st.sampled_from([0, 0, 2, 3]),
    "dynamic_shapes": st.just(False),
    "seed": st.integers(0, 10**6),
}).filter(lambda kw: not kw["nested"] or kw["period"] >= kw["nested"] + 2)


@FAST
@given(kw=streams, min_repeats=st.sampled_from([2, 3]))
def test_generated_streams_recover_their_ground_truth(kw, min_repeats):
    s = synthetic_stream(**kw)
    r = find_sequence(s.coarse, s.fine, min_repeats=min_repeats)
    assert_truth(r, s, min_repeats)
    assert_brute(r, s.coarse, s.fine, min_repeats)


@FAST
@given(kw=streams, min_repeats=st.sampled_from([2, 3]))
def test_dynamic_shapes_are_never_a_sequence(kw, min_repeats):
    s = synthetic_stream(**{**kw, "dynamic_shapes": True})
    assert s.repeats == 1
    assert not find_sequence(s.coarse, s.fine, min_repeats=min_repeats).found


@st.composite
def small_streams(draw):
    """Random short streams over a small alphabet: either noise, or a motif repeated with noise."""
    letters = st.sampled_from("abcd")
    if draw(st.booleans()):
        coarse = draw(st.lists(letters, max_size=40))
    else:
        motif = draw(st.lists(st.sampled_from("abc"), min_size=1, max_size=6))
        coarse = []
        for _ in range(draw(st.integers(1, 6))):
            coarse += draw(st.lists(letters, max_size=2)) + motif
    fine = None
    if draw(st.booleans()):
        fine = [c + draw(st.sampled_from("0000001")) for c in coarse]
    return coarse, fine


@settings(max_examples=1000, deadline=None)
@given(stream=small_streams(), min_repeats=st.sampled_from([2, 2, 3]),
       min_period=st.sampled_from([1, 1, 2, 3]))
def test_any_small_stream_matches_the_brute_force(stream, min_repeats, min_period):
    coarse, fine = stream
    r = find_sequence(coarse, fine, min_repeats=min_repeats, min_period=min_period)
    assert_brute(r, coarse, fine, min_repeats, min_period)


@FAST
@given(kw=streams, min_repeats=st.sampled_from([2, 3]),
       max_history=st.sampled_from([None, None, 20, 60, 200]), data=st.data())
def test_online_equals_a_fresh_search_at_every_sync_point(kw, min_repeats, max_history, data):
    """Syncs at the end of each period (steady, old shape or warm-up) and on some noise ops; not
    inside a period (there the known sequence may be a part of the inference; SequenceSearch)."""
    s = synthetic_stream(**kw)
    online = SequenceSearch(min_repeats, max_history=max_history)
    ends = {i for i in s.syncs if s.fine[i].endswith("->cpu")}
    syncs = ends | data.draw(st.sets(st.sampled_from(s.syncs)))
    for i, (c, f) in enumerate(zip(s.coarse, s.fine, strict=True)):
        online.push(c, f)
        if i not in syncs and i != len(s.coarse) - 1:
            continue
        r = online.search()
        w = slice(r.offset, r.offset + r.n_ops)
        assert w.stop == i + 1
        fresh = find_sequence(s.coarse[w], s.fine[w], min_repeats=min_repeats)
        assert r.found == fresh.found
        if r.found:
            assert (r.start - r.offset, r.period, r.repeats) == (fresh.start, fresh.period,
                                                                 fresh.repeats)
            assert r.noise == tuple(j + r.offset for j in fresh.noise)
    if max_history is None:
        assert_truth(r, s, min_repeats)
