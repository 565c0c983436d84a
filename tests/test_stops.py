"""StopMatcher: stop strings never leak, text before them is emitted, matches span deltas."""

import random

import pytest

from streaming.errors import InvalidInputError
from streaming.stops import StopMatcher


def run(stops, deltas):
    m = StopMatcher(stops)
    out, stopped = [], False
    for d in deltas:
        text, stopped = m.push(d)
        out.append(text)
        if stopped:
            break
    return "".join(out) + m.flush(), stopped, m


def test_no_stops_passes_through():
    m = StopMatcher(None)
    assert m.push("abc") == ("abc", False)
    assert m.flush() == ""
    assert StopMatcher([]).push("x") == ("x", False)


def test_stop_inside_one_delta():
    text, stopped, m = run(["STOP"], ["hello STOP world"])
    assert (text, stopped, m.matched) == ("hello ", True, "STOP")


def test_stop_across_deltas_never_leaks():
    m = StopMatcher(["</end>"])
    assert m.push("answer <") == ("answer ", False)  # "<" might start the stop: held back
    assert m.held == "<"
    assert m.push("/en") == ("", False)
    assert m.push("d> more") == ("", True)
    assert m.stopped and m.flush() == ""
    assert m.push("later") == ("", True)


def test_false_alarm_is_released():
    m = StopMatcher(["</end>"])
    assert m.push("a </e") == ("a ", False)
    assert m.push("x") == ("</ex", False)
    assert m.push("<") == ("", False)
    assert m.flush() == "<"  # end of stream: held text is emitted


def test_earliest_of_several_stops_wins():
    text, stopped, m = run(["world", "lo w"], ["hel", "lo world"])
    assert (text, m.matched) == ("hel", "lo w")


def test_overlapping_prefixes():
    # "ababc": the stop starts at the second "ab"
    assert run(["abc"], ["a", "b", "a", "b", "c", "d"])[:2] == ("ab", True)


def test_single_string_accepted():
    assert run("\n\n", ["one\n", "\ntwo"])[:2] == ("one", True)


@pytest.mark.parametrize("bad, match", [([""], "empty"), (["ok", ""], r"stop\[1\] is an empty"), ([3], "must be a string"), (5, "string or a list")])
def test_invalid_stops(bad, match):
    with pytest.raises(InvalidInputError, match=match):
        StopMatcher(bad)


def test_random_splits_agree_with_reference():
    rng = random.Random(0)
    alphabet = "ab<>/ \n"
    for _ in range(500):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        full = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(full) + 1), k=min(len(full) + 1, rng.randint(0, 6))))
        deltas = [full[i:j] for i, j in zip([0] + cuts, cuts + [len(full)])]
        hits = [full.find(s) for s in stops if s in full]
        expected = full[: min(hits)] if hits else full
        text, stopped, m = run(stops, deltas)
        assert (text, stopped) == (expected, bool(hits)), (stops, deltas)
        assert len(m.held) < max(map(len, stops))
