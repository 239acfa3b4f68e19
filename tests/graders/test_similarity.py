"""text_similarity: each metric from its library, on known values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tunehouse.graders import Sample, parse_grader
from tunehouse.graders.similarity import METRICS, similarity

A = "the cat sat on the mat"
B = "a cat was sitting on the rug"
C = "quantum chromodynamics describes quarks"


def grader(metric: str, **extra):
    return parse_grader(
        {
            "type": "text_similarity",
            "name": "sim",
            "input": "{{sample.output_text}}",
            "reference": "{{item.reference}}",
            "evaluation_metric": metric,
            **extra,
        }
    )


@pytest.mark.parametrize("metric", METRICS)
def test_identical_is_one_and_disjoint_is_low(metric):
    same = grader(metric).grade(Sample.from_text(A), {"reference": A})
    assert same.reward == pytest.approx(1.0, abs=0.01)
    assert not same.errored
    other = grader(metric).grade(Sample.from_text(A), {"reference": C})
    assert other.reward < 0.3
    assert not other.errored


def test_known_values():
    from rapidfuzz import fuzz

    assert similarity("fuzzy_match", "hello", "hellO") == pytest.approx(0.8)
    assert similarity("fuzzy_match", A, B) == pytest.approx(fuzz.ratio(A, B) / 100)
    assert similarity("bleu", A, B) == pytest.approx(0.15207, abs=1e-4)
    assert similarity("gleu", A, B) == pytest.approx(2 / 11)
    # rouge-1 F: 3 shared unigrams (cat, on, the) of 6 and 7 words
    assert similarity("rouge_1", A, B) == pytest.approx(2 * (3 / 6) * (3 / 7) / (3 / 6 + 3 / 7))
    assert similarity("rouge_5", A, B) == 0.0
    assert similarity("rouge_2", A, A + " today") > similarity("rouge_2", A, B)


def test_meteor_uses_wordnet_synonyms():
    # "fast" and "quick" share a WordNet synset: METEOR's synonym stage matches them.
    synonym = similarity("meteor", "a fast dog", "a quick dog")
    unrelated = similarity("meteor", "a blue dog", "a quick dog")
    assert synonym > unrelated + 0.2


def test_cosine_orders_by_meaning():
    near = similarity("cosine", A, B)
    far = similarity("cosine", A, C)
    assert near > 0.6 > 0.2 > far


def test_empty_texts():
    assert similarity("bleu", "", "") == 1.0
    assert similarity("meteor", "", "x") == 0.0


def test_pass_threshold():
    g = grader("fuzzy_match", pass_threshold=0.8)
    assert g.passed(g.grade(Sample.from_text("hello"), {"reference": "hellO"}))
    assert not g.passed(g.grade(Sample.from_text("help"), {"reference": "hellO"}))


def test_cosine_loads_the_packaged_model_offline(tmp_path):
    """The embedding model comes from the package's files: no hub, no cache, no network."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = (
        "from tunehouse.graders.similarity import similarity;"
        f"print(round(similarity('cosine', {A!r}, {A!r}), 4))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1.0"
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))
