"""Text corruptions: determinism, rates growing with the level, EDA on a WordNet fixture, offline errors."""

import os
import random

import numpy as np
import pytest

from queryshift.shifts import item_rng
from queryshift.shifts import text as text_mod
from queryshift.shifts.registry import build_shift
from queryshift.shifts.text import (
    CHAR_CORRUPTIONS,
    MissingResource,
    TextCorruption,
    WordNet,
    eda,
    find_wordnet,
    insert_punctuation,
    normalise,
)

CAPTION = ("several young people walking along the crowded street carrying colorful umbrellas while "
           "heavy rain falls over tall buildings behind them today")
HAS_SYSTEM_WORDNET = os.path.exists("/usr/share/wordnet/index.noun")


def _changed_fraction(shift, text, seeds=range(12)):
    words = text.split()
    fractions = []
    for s in seeds:
        out = shift(text, s, 0, 1, item_rng(0, s)).split()
        if len(out) == len(words):
            fractions.append(np.mean([a != b for a, b in zip(words, out)]))
        else:  # insertions/deletions: count what is no longer there
            fractions.append(1 - len(set(out) & set(words)) / len(set(words)))
    return float(np.mean(fractions))


@pytest.mark.parametrize("name", CHAR_CORRUPTIONS)
def test_char_level_is_deterministic_and_level_dependent(name):
    shift = build_shift(f"{name}:3", "text")
    a = shift(CAPTION, 1, 0, 1, item_rng(5, 1))
    assert a == shift(CAPTION, 1, 0, 1, item_rng(5, 1))
    outs = {shift(CAPTION, i, 0, 1, item_rng(5, i)) for i in range(6)}
    assert len(outs) > 1  # different queries get different typos
    low, high = (_changed_fraction(build_shift(f"{name}:{lv}", "text"), CAPTION) for lv in (1, 7))
    assert 0 < low < high, (low, high)


def test_nlpaug_calls_leave_global_random_state_alone():
    py_state, np_state = random.getstate(), np.random.get_state()[1].copy()
    build_shift("KeyboardAug:5", "text")(CAPTION, 0, 0, 1, item_rng(0, 0))
    assert random.getstate() == py_state and np.array_equal(np.random.get_state()[1], np_state)


def test_aliases_resolve():
    assert build_shift("char_swap:7", "text").name == "RandomCharAug_swap:7"
    assert build_shift("ocr:2", "text").name == "OcrAug:2"


def test_random_deletion_and_swap_rates_grow():
    for op in ("rd", "rs"):
        rates = [_changed_fraction(build_shift(f"{op}:{lv}", "text"), CAPTION) for lv in (1, 4, 7)]
        assert rates[0] < rates[1] < rates[2], (op, rates)


def test_eda_output_is_normalised():
    out = eda("A dog's frisbee-catching trick, at 5 PM!", "rs", 0.3, item_rng(0, 0))
    assert out == normalise(out) and out.islower() and "-" not in out and "'" not in out
    assert sorted(out.split()) == sorted("a dogs frisbee catching trick at pm".split())


def test_random_deletion_never_empties():
    for i in range(20):
        assert eda("hello world", "rd", 0.99, item_rng(0, i)).split()


def test_insert_punctuation_counts():
    words = CAPTION.split()
    for level in (1, 7):
        rate = 0.05 * level
        for i in range(10):
            out = insert_punctuation(CAPTION, rate, item_rng(0, i)).split()
            marks = [w for w in out if w in text_mod.PUNCTUATION]
            assert [w for w in out if w not in text_mod.PUNCTUATION] == words
            assert 1 <= len(marks) <= int(rate * len(words) + 1)


# -- WordNet ---------------------------------------------------------------------------------------------


def _write_wordnet(root):
    """A two-synset WordNet 3.0-format database: data lines are found by their byte offset."""
    root.mkdir()
    lines = [
        "  1 This is a licence header line (starts with spaces)\n",
        "{off:08d} 06 n 03 car 0 auto 0 motorcar 0 000 | a motor vehicle\n",
        "{off:08d} 06 n 02 railcar 0 car 0 000 | a wheeled vehicle on rails\n",
    ]
    data, offsets = "", []
    for line in lines:
        if line.startswith("{off"):
            offsets.append(len(data.encode()))
            line = line.format(off=offsets[-1])
        data += line
    (root / "data.noun").write_text(data)
    (root / "index.noun").write_text(
        "  1 licence header\n"
        f"auto n 1 1 @ 1 0 {offsets[0]:08d}\n"
        f"car n 2 1 @ 2 0 {offsets[0]:08d} {offsets[1]:08d}\n"
        f"motorcar n 1 1 @ 1 0 {offsets[0]:08d}\n"
        f"railcar n 1 1 @ 1 0 {offsets[1]:08d}\n")
    (root / "noun.exc").write_text("cars_of_old car\n")
    for pos in ("verb", "adj", "adv"):
        (root / f"data.{pos}").write_text("")
        (root / f"index.{pos}").write_text("")
    return str(root)


def test_wordnet_parser_on_fixture(tmp_path):
    wn = WordNet(_write_wordnet(tmp_path / "wn"))
    assert wn.synonyms("car") == ("auto", "motorcar", "railcar")
    assert wn.synonyms("cars") == ("auto", "car", "motorcar", "railcar")  # morphy: plural suffix rule
    assert wn.synonyms("cars_of_old") == ("auto", "car", "motorcar", "railcar")  # exception list
    assert wn.synonyms("bicycle") == ()


def test_eda_synonym_replacement_and_insertion_with_fixture(tmp_path):
    wn = WordNet(_write_wordnet(tmp_path / "wn"))
    sentence = "the red car is parked near the old house"
    out = eda(sentence, "sr", 0.1, item_rng(0, 0), synonyms=wn.synonyms).split()
    assert out[2] in ("auto", "motorcar", "railcar") and out[:2] + out[3:] == sentence.split()[:2] + \
        sentence.split()[3:]
    out = eda(sentence, "ri", 0.1, item_rng(0, 0), synonyms=wn.synonyms).split()
    assert len(out) == len(sentence.split()) + 1
    assert any(w in out for w in ("auto", "motorcar", "railcar"))


def test_missing_wordnet_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv("WNSEARCHDIR", raising=False)
    monkeypatch.setattr(text_mod, "WORDNET_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(MissingResource, match="apt-get install wordnet-base"):
        find_wordnet()


def test_wnsearchdir_is_honoured(monkeypatch, tmp_path):
    root = _write_wordnet(tmp_path / "wn")
    monkeypatch.setenv("WNSEARCHDIR", root)
    assert find_wordnet() == root


@pytest.mark.skipif(not HAS_SYSTEM_WORDNET, reason="wordnet-base not installed")
def test_system_wordnet_synonyms_and_levels():
    wn = text_mod.wordnet()
    assert "automobile" in wn.synonyms("car")
    assert "domestic dog" in wn.synonyms("dogs")
    shift = build_shift("sr:6", "text")
    out = shift(CAPTION, 0, 0, 1, item_rng(0, 0))
    assert out == shift(CAPTION, 0, 0, 1, item_rng(0, 0)) and out != normalise(CAPTION)
    low, high = (_changed_fraction(build_shift(f"sr:{lv}", "text"), CAPTION, range(6)) for lv in (1, 7))
    assert low < high


# -- semantic filter and sentence-level models (offline here: the error path only) ---------------------------


class _FakeFilter:
    def __init__(self, accept_after):
        self.calls, self.accept_after, self.max_draws = 0, accept_after, 100

    def similar(self, a, b):
        self.calls += 1
        return self.calls >= self.accept_after

    draw = text_mod.SemanticFilter.draw


def test_semantic_filter_redraws_until_similar():
    shift = TextCorruption("rs", 7)
    shift.filter = _FakeFilter(accept_after=3)
    shift(CAPTION, 0, 0, 1, item_rng(0, 0))
    assert shift.filter.calls == 3
    shift.filter = _FakeFilter(accept_after=10**9)
    assert shift(CAPTION, 0, 0, 1, item_rng(0, 0))  # keeps the last draw after 100 failures
    assert shift.filter.calls == 100


def test_semantic_filter_offline_error():
    with pytest.raises(MissingResource, match="sentence-transformers|paraphrase-mpnet-base-v2"):
        build_shift("rs:6+filter", "text")


@pytest.mark.parametrize("name,model", [("formal", "prithivida/informal_to_formal_styletransfer"),
                                        ("passive", "prithivida/active_to_passive_styletransfer"),
                                        ("back_trans", "facebook/wmt19-en-de")])
def test_sentence_level_offline_errors_name_the_model(name, model):
    with pytest.raises(MissingResource, match=model):
        build_shift(name, "text")


def test_levels_and_modality_are_checked():
    with pytest.raises(ValueError, match="1-7"):
        build_shift("OcrAug:8", "text")
    with pytest.raises(ValueError, match="level must be 1"):
        build_shift("formal:2", "text")
    with pytest.raises(ValueError, match=r"'sr'.*image"):
        build_shift("sr:6", "image")
