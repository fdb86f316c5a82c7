"""Caption metrics: equal to pycocoevalcap's own classes, parallel == single, sanitising, errors.

The METEOR JVM takes ~6 s to start: one scorer serves the whole module.
"""

from __future__ import annotations

import math

import pytest

from dvsa.errors import DvsaError
from dvsa.evaluation.captions import METRICS, CaptionScorer, _chunks, clean_text, prepare, ptb_tokenize, score_parallel
from dvsa.evaluation.meteor import JAVA_MISSING, MeteorProcess, check_java

REFS = {
    1: ["A man is riding a horse.", "A person rides a brown horse on the beach."],
    2: ["Two dogs play with a red ball!", "Dogs chasing a ball in the park"],
    "x": ["A plate of food, with broccoli and rice.", "Some food on a white plate."],
    4: ["A red car parked next to a tree.", "The car is red; a tree stands behind it."],
    5: ["Café tables under an umbrella.", "People sit at outdoor tables (cafe)."],
}
HYPS = {1: "a man riding a horse", 2: "a dog with a ball", "x": "a plate with food on it.",
        4: "a red car near a tree", 5: "tables at a café"}


DECIMAL_COMMA = "-Duser.language=de -Duser.country=DE"


@pytest.fixture(scope="module")
def scorer():
    """The module's scorer, its JVM started under a decimal-comma JAVA_TOOL_OPTIONS: the
    jar's EVAL dies under that locale (see the death test) unless our forced flags win."""
    env = pytest.MonkeyPatch()
    env.setenv("JAVA_TOOL_OPTIONS", DECIMAL_COMMA)
    try:
        s = CaptionScorer()
        s.score({0: ["a red ball"]}, {0: "a ball"})  # starts the JVM under that environment
    finally:
        env.undo()
    with s:
        yield s


def pycocoevalcap_reference(refs, hyps):
    """coco-caption's pipeline, called directly: PTBTokenizer then the four scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": hyps[k]}] for k in refs})
    out = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{i + 1}": b for i, b in enumerate(bleu)})
    meteor = Meteor()
    out["METEOR"], _ = meteor.compute_score(gts, res)
    del meteor
    out["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    out["CIDEr"], _ = Cider().compute_score(gts, res)
    return out


def synthetic_pairs(n):
    colours = ["red", "green", "blue", "yellow", "purple"]
    shapes = ["circle", "square", "triangle", "star"]
    refs, hyps = {}, {}
    for i in range(n):
        c, s = colours[i % 5], shapes[(i // 5) % 4]
        refs[i] = [f"a {c} {s} on the left.", f"There is a small {c} {s}!"]
        hyps[i] = f"a {colours[(i * 3) % 5]} {s}" if i % 7 else f"a {c} {shapes[i % 4]} here"
    return refs, hyps


def test_equals_pycocoevalcap_called_directly(scorer):
    ours = scorer.score(REFS, HYPS)
    theirs = pycocoevalcap_reference(REFS, HYPS)
    assert list(ours) == list(METRICS)
    for m in METRICS:
        assert isinstance(ours[m], float)
        assert math.isclose(ours[m], float(theirs[m]), rel_tol=0, abs_tol=1e-9), m
    assert 0.0 < ours["METEOR"] < 1.0


def test_hand_computed_bleu_and_perfect_match(scorer):
    # tokenizer="none": hyp "a b c d" vs ref "a b x y": unigram precision 2/4, BP = 1.
    plain = CaptionScorer(tokenizer="none")
    plain.meteor = scorer.meteor  # share the module's JVM (closed by the fixture)
    s = plain.score({0: ["a b x y"]}, {0: "a b c d"})
    assert s["Bleu_1"] == pytest.approx(0.5, abs=1e-6)
    assert s["ROUGE_L"] == pytest.approx(0.5)  # LCS 2 of 4 both ways
    same = scorer.score({0: ["a big red ball on the grass"]}, {0: "A big red ball, on the grass."})
    for n in range(1, 5):
        assert same[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert same["ROUGE_L"] == pytest.approx(1.0)
    assert same["METEOR"] > 0.9


def test_ptb_tokenize_matches_coco_rules():
    assert ptb_tokenize(["A man, riding a horse.", "", "Café über \"quoted\" text!"]) == [
        "a man riding a horse", "", "café über quoted text"]
    with pytest.raises(DvsaError, match="line break"):
        ptb_tokenize(["two\nlines"])


def test_sanitising_newlines_and_separators(scorer):
    dirty_refs = {1: ["A man is\nriding a horse.", "A person ||| rides a brown horse."],
                  2: ["Two dogs\r\n play\twith a ball"]}
    dirty_hyps = {1: "a man\nriding ||| a horse", 2: ["two dogs\u2028playing"]}
    clean_refs = {1: ["A man is riding a horse.", "A person rides a brown horse."],
                  2: ["Two dogs play with a ball"]}
    clean_hyps = {1: "a man riding a horse", 2: "two dogs playing"}
    assert scorer.score(dirty_refs, dirty_hyps) == scorer.score(clean_refs, clean_hyps)
    assert scorer.last_report.texts_reformatted == 0
    scorer.score(dirty_refs, dirty_hyps)
    assert scorer.last_report.texts_reformatted == 5
    assert clean_text(" a\n\nb ||| c\t") == "a b c"


def test_empty_hypotheses_and_references_are_counted(scorer):
    refs = {1: ["a red ball", "..."], 2: ["a blue cube"], 3: [", ;", ""]}
    hyps = {1: "a red ball", 2: "", 3: "anything"}
    s = scorer.score(refs, hyps)
    r = scorer.last_report
    assert (r.segments, r.empty_hypotheses, r.empty_references_dropped,
            r.ids_without_reference) == (2, 1, 3, 1)
    # Same as scoring the two surviving ids with the empty references removed.
    assert s == scorer.score({1: ["a red ball"], 2: ["a blue cube"]}, {1: "a red ball", 2: ""})
    assert 0 < s["METEOR"] < 1


def test_input_errors_name_the_id():
    with pytest.raises(DvsaError, match="exactly one hypothesis per id.*'b'.*2"):
        prepare({"a": ["x"], "b": ["y"]}, {"a": "x", "b": ["y", "z"]})
    with pytest.raises(DvsaError, match="same ids.*without hypothesis.*7"):
        prepare({7: ["x"]}, {8: "x"})
    with pytest.raises(DvsaError, match="id 3 must be a list"):
        prepare({3: "just a string"}, {3: "x"})
    with pytest.raises(DvsaError, match="nothing to score"):
        prepare({}, {})
    with pytest.raises(DvsaError, match="no id has a non-empty reference"):
        prepare({1: ["..."]}, {1: "x"})
    with pytest.raises(DvsaError, match="tokenizer"):
        CaptionScorer(tokenizer="spacy")


def test_missing_java_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java on PATH
    with pytest.raises(DvsaError) as err:
        check_java()
    assert str(err.value) == JAVA_MISSING
    with pytest.raises(DvsaError, match="Java not found: METEOR needs a Java runtime"):
        CaptionScorer().score({1: ["a b"]}, {1: "a b"})
    with pytest.raises(DvsaError, match="apt-get install default-jre-headless"):
        MeteorProcess().segment_stats([(["a"], "a")])


def test_jvm_that_cannot_start_reports_its_stderr():
    meteor = MeteorProcess(java_options=["-Xmx1k"])  # overrides -Xmx2G: VM init fails
    with pytest.raises(DvsaError, match=r"died \(exit code 1\).*Too small"):
        meteor.segment_stats([(["a red ball"], "a ball")])
    assert not meteor.running


def test_jvm_death_mid_session_reports_exit_code_and_stderr(tmp_path):
    # A stand-in "java" that takes the first request, then dies like an out-of-memory JVM.
    fake = tmp_path / "java"
    fake.write_text("#!/bin/sh\nread line\n"
                    "echo 'Exception in thread \"main\" java.lang.OutOfMemoryError: "
                    "Java heap space' >&2\nexit 3\n")
    fake.chmod(0o755)
    meteor = MeteorProcess(java=str(fake))
    segments = [(["a red ball"], "a ball")] * 500
    with pytest.raises(DvsaError, match=r"died \(exit code 3\) while computing segment "
                                        r"statistics: .*OutOfMemoryError: Java heap space"):
        meteor.segment_stats(segments)
    assert not meteor.running


@pytest.mark.slow
def test_jvm_death_mid_session_is_reported_not_hidden():
    # A decimal-comma locale makes the jar's Scanner choke on its own "5.0" statistics:
    # pycocoevalcap shows "could not convert string to float: b''"; we show the Java error.
    with CaptionScorer(java_options=["-Duser.language=de", "-Duser.country=DE"]) as broken:
        with pytest.raises(DvsaError, match="died.*evaluating.*InputMismatchException"):
            broken.score({1: ["a red ball"]}, {1: "a ball"})


def test_module_jvm_survived_a_decimal_comma_locale(scorer):
    assert scorer.meteor.running
    assert scorer.score({0: ["a red ball"]}, {0: "a ball"})["METEOR"] > 0


def test_chunks_cover_everything_once():
    for n in (1, 5, 10, 11):
        for parts in (1, 2, 3, 16):
            ranges = _chunks(n, parts)
            assert [i for s, e in ranges for i in range(s, e)] == list(range(n))
            assert len(ranges) == min(n, parts)


@pytest.mark.ray
def test_parallel_equals_single_process(scorer, ray_local):
    refs, hyps = synthetic_pairs(60)
    refs.update(REFS)
    hyps.update(HYPS)
    single = scorer.score(refs, hyps)
    parallel = score_parallel(refs, hyps, num_actors=2)
    assert parallel == single  # identical statistics text -> identical EVAL -> same floats
    with pytest.raises(DvsaError, match="exactly one hypothesis"):
        score_parallel({1: ["a"]}, {1: ["a", "b"]}, num_actors=2)
