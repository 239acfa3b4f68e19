"""What a training file will cost and what training will see, counted with the base model's own tokenizer.

`analyze` adds to a `ValidationReport` (from `validation.validate_file`):

- stats: tokens, trained (assistant) tokens and messages per example (min / mean / median / p10 / p90 /
  max / total), truncated examples, examples without a system or user message;
- truncation warnings: examples longer than the context length lose tokens from the end, as OpenAI does;
- `all_labels_masked` errors: examples where no trained token survives truncation (weight 0 on every
  assistant message is already caught by the format check);
- `special_token` errors: text containing the tokenizer's special tokens (e.g. ``<|im_end|>``), which
  would corrupt the chat template;
- exact and near duplicates within a file (MinHash over word 3-grams, banded LSH), and overlap between
  the training and validation files, as warnings naming both lines;
- estimate: billable tokens = sum(min(tokens, context)) × epochs, with the OpenAI `auto` epochs rule;
  cost at `price_per_million` and, given a measured `tokens_per_second`, a duration.

Context length: the base model's own (``max_position_embeddings``, or its text config's), as the
trainer uses it: an example is truncated only where the model itself could not read it. A folder
whose config names none gets ``DEFAULT_CONTEXT_LENGTH`` (2048).
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from array import array
from collections.abc import Callable
from pathlib import Path

from tunehouse.data.chat import TemplateError, content_text, prompt_ids, tokenize_chat
from tunehouse.data.epochs import auto_n_epochs  # OpenAI's `auto` epochs rule (REFERENCE §6.5)
from tunehouse.data.validation import METHODS, Problem, ValidationReport, iter_examples, validate_file

DEFAULT_CONTEXT_LENGTH = 2048
DEFAULT_PRICE_PER_MILLION = 25.0  # USD per million billable tokens (gpt-4o fine-tuning list price)
# A reinforcement prompt must leave at least this many tokens of the context for its answers.
MIN_ANSWER_ROOM = 16
NEAR_DUPLICATE_THRESHOLD = 0.8  # estimated Jaccard similarity of word 3-gram sets
NEAR_DUPLICATE_MAX_EXAMPLES = 50_000  # beyond this, only exact duplicates are looked for (~1.4 kB each)


def context_length_for(model_dir: Path, *, cap: int | None = None) -> int:
    """The training context for a Hugging Face model folder: the model's own (its config's
    max_position_embeddings, or its text config's), at most `cap` where one is given;
    DEFAULT_CONTEXT_LENGTH where the config names none."""
    fallback = cap or DEFAULT_CONTEXT_LENGTH
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return fallback
    max_pos = config.get("max_position_embeddings") or (config.get("text_config") or {}).get(
        "max_position_embeddings"
    )
    if not max_pos:
        return fallback
    return min(int(max_pos), cap) if cap else int(max_pos)


# ---------------------------------------------------------------------------------------------------
# Duplicates


class MinHasher:
    """MinHash signatures of word 3-gram sets (the datasketch scheme, vectorised with numpy)."""

    def __init__(self, num_perm: int = 64, seed: int = 1):
        import numpy as np

        self.np = np
        rng = np.random.RandomState(seed)
        prime = (1 << 61) - 1
        self.a = rng.randint(1, prime, size=num_perm, dtype=np.uint64)
        self.b = rng.randint(0, prime, size=num_perm, dtype=np.uint64)
        self.prime = np.uint64(prime)
        self.mask = np.uint64(0xFFFFFFFF)

    @staticmethod
    def shingles(text: str) -> set[str]:
        words = text.lower().split()
        if len(words) < 3:
            return {" ".join(words)}
        return {" ".join(words[i : i + 3]) for i in range(len(words) - 2)}

    def signature(self, text: str):
        np = self.np
        sh = self.shingles(text)
        hv = np.fromiter((zlib.crc32(s.encode()) for s in sh), dtype=np.uint64, count=len(sh))
        with np.errstate(over="ignore"):
            phv = ((hv[:, None] * self.a + self.b) % self.prime) & self.mask
        return phv.min(axis=0).astype(np.uint32)


class DuplicateIndex:
    """Exact duplicates by a hash of the canonical JSON; near duplicates by MinHash + banded LSH.

    Memory stays small per example: signatures live in one growing uint32 matrix and the LSH
    buckets map a band's hash to a row (the first example seen with that band).
    """

    def __init__(self, hasher: MinHasher, *, bands: int = 8, threshold: float = NEAR_DUPLICATE_THRESHOLD):
        np = hasher.np
        self.np = np
        self.hasher = hasher
        self.bands = bands
        self.rows = len(hasher.a) // bands
        self.threshold = threshold
        self.exact: dict[int, int] = {}  # hash of the example → line
        self.buckets: list[dict[int, int]] = [{} for _ in range(bands)]  # band hash → row
        self.sigs = np.empty((1024, len(hasher.a)), dtype=np.uint32)
        self.lines = array("q")  # row → line

    @staticmethod
    def exact_key(example: dict) -> int:
        canon = json.dumps(example, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return int.from_bytes(hashlib.blake2b(canon.encode(), digest_size=8).digest(), "little")

    def _bands(self, sig) -> list[int]:
        r = self.rows
        return [hash(sig[i * r : (i + 1) * r].tobytes()) for i in range(self.bands)]

    def find(self, key: int, sig) -> tuple[str, int] | None:
        """("duplicate" | "near_duplicate", line of the earlier example) or None."""
        if key in self.exact:
            return "duplicate", self.exact[key]
        if sig is None:
            return None
        for band, bucket in zip(self._bands(sig), self.buckets, strict=True):
            row = bucket.get(band)
            if row is not None and float((self.sigs[row] == sig).mean()) >= self.threshold:
                return "near_duplicate", self.lines[row]
        return None

    def add(self, line: int, key: int, sig) -> None:
        self.exact.setdefault(key, line)
        if sig is None:
            return
        row = len(self.lines)
        if row == len(self.sigs):
            self.sigs = self.np.concatenate([self.sigs, self.np.empty_like(self.sigs)])
        self.sigs[row] = sig
        self.lines.append(line)
        for band, bucket in zip(self._bands(sig), self.buckets, strict=True):
            bucket.setdefault(band, row)


# ---------------------------------------------------------------------------------------------------
# Analysis


def _chat_sequences(example: dict) -> tuple[list[dict], list[dict]]:
    return [example], example["messages"]


def _preference_sequences(example: dict) -> tuple[list[dict], list[dict]]:
    inp = example["input"]
    base = {k: v for k, v in inp.items() if k != "messages"}
    return [
        {**base, "messages": inp["messages"] + example[k]}
        for k in ("preferred_output", "non_preferred_output")
    ], inp["messages"] + example["preferred_output"] + example["non_preferred_output"]


# Per data format (validation.METHODS maps a method to its format): the chat examples that training
# tokenizes for one line (two for a preference pair), and every message of the line.
SEQUENCES = {"chat": _chat_sequences, "preference": _preference_sequences, "prompt": _chat_sequences}


def _sequences(example: dict, method: str) -> tuple[list[dict], list[dict]]:
    """The chat examples that training tokenizes for one line (two for a preference pair)."""
    return SEQUENCES[METHODS[method]](example)


def _special_token_pattern(tokenizer) -> re.Pattern | None:
    # Only the control tokens (bos/eos/pad/unk and the template's markers): other added tokens such
    # as "<filename>" in SmolLM2 can appear in ordinary text without breaking the template.
    tokens = {t for t in getattr(tokenizer, "all_special_tokens", []) or [] if t and len(t) > 1}
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _distribution(values: array) -> dict:
    import numpy as np

    if not len(values):
        return {"min": 0, "mean": 0.0, "median": 0.0, "p10": 0.0, "p90": 0.0, "max": 0, "total": 0}
    v = np.frombuffer(values, dtype=np.int64) if values.typecode == "q" else np.asarray(values)
    return {
        "min": int(v.min()),
        "mean": round(float(v.mean()), 2),
        "median": float(np.median(v)),
        "p10": float(np.percentile(v, 10)),
        "p90": float(np.percentile(v, 90)),
        "max": int(v.max()),
        "total": int(v.sum()),
    }


def _analyze_file(
    report: ValidationReport,
    path: Path,
    *,
    method: str,
    tokenizer,
    context_length: int,
    own_index: DuplicateIndex,
    hasher: MinHasher,
    other_index: DuplicateIndex | None = None,
    overlap_severity: str = "warning",
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Tokenizes every valid line of one file, adds its problems to `report`, returns its stats."""
    tokens, billed, trained, n_messages = array("q"), array("q"), array("q"), array("q")
    n_truncated = no_system = no_user = n_pairs = 0
    special = _special_token_pattern(tokenizer) if tokenizer is not None else None
    what = "validation" if report.file_kind == "validation" else "training"
    done = 0
    for line, example in iter_examples(path, method=method):
        done += 1
        if progress is not None and done % 64 == 0:
            progress(done)
        sequences, all_messages = _sequences(example, method)
        roles = {m.get("role") for m in all_messages}
        no_system += not (roles & {"system", "developer"})
        no_user += "user" not in roles
        n_messages.append(len(all_messages))
        text = "\n".join(f"{m.get('role')}: {content_text(m.get('content'))}" for m in all_messages)

        bad = False
        if special is not None:
            hit = special.search(text)
            if hit:
                report.add(
                    Problem(
                        "special_token",
                        f"example contains the special token {hit.group()!r} of the base model's tokenizer; "
                        "remove it (the chat template adds these itself)",
                        line,
                        "error",
                    )
                )
                bad = True

        # Tokens, with the base model's chat template.
        if tokenizer is not None and not bad:
            n_tok = n_bill = n_train = 0
            trunc = False
            try:
                if METHODS[method] == "prompt":
                    # A prompt trains on the answers sampled for it: it must leave them room.
                    n_prompt = len(prompt_ids(tokenizer, example))
                    if n_prompt >= context_length - MIN_ANSWER_ROOM:
                        report.add(
                            Problem(
                                "prompt_too_long",
                                f"prompt has {n_prompt:,} tokens; with the context length "
                                f"{context_length:,} that leaves fewer than {MIN_ANSWER_ROOM} tokens "
                                "for the sampled answers. Shorten it.",
                                line,
                                "error",
                            )
                        )
                    sequences = []  # nothing else to tokenize: the answers are sampled in training
                    n_tok = n_bill = n_prompt
                for seq in sequences:
                    t = tokenize_chat(tokenizer, seq, max_length=context_length)
                    n_tok += t.n_tokens
                    n_bill += len(t.input_ids)
                    n_train += t.n_trained
                    trunc = trunc or t.truncated
                    if t.n_trained == 0:
                        bad = True
            except TemplateError as e:
                report.add(
                    Problem(
                        "template_error",
                        f"the base model's chat template cannot render this example: {e}",
                        line,
                        "error",
                    )
                )
                bad = True
            else:
                tokens.append(n_tok)
                billed.append(n_bill)
                trained.append(n_train)
                if trunc:
                    n_truncated += 1
                    report.add(
                        Problem(
                            "truncated",
                            f"example has {n_tok:,} tokens, more than the context length {context_length:,}; "
                            f"{n_tok - n_bill:,} tokens will be cut from the end. Shorten or split it.",
                            line,
                            "warning",
                        )
                    )
                if bad:
                    report.add(
                        Problem(
                            "all_labels_masked",
                            "no trained (assistant) token is left after truncating the example to "
                            f"{context_length:,} tokens, so it teaches nothing; shorten the conversation "
                            "before the assistant reply",
                            line,
                            "error",
                        )
                    )

        # Duplicates within the file, then overlap with the training file.
        key = DuplicateIndex.exact_key(example)
        sig = hasher.signature(text) if done <= NEAR_DUPLICATE_MAX_EXAMPLES else None
        if other_index is not None:
            hit = other_index.find(key, sig)
            if hit is not None:
                kind, other = hit
                same = "is identical to" if kind == "duplicate" else "is nearly identical to"
                report.add(
                    Problem(
                        "train_validation_overlap",
                        f"validation example {same} training example on line {other}; remove it from one "
                        "file so the validation loss measures generalisation",
                        line,
                        overlap_severity,  # type: ignore[arg-type]
                    )
                )
                n_pairs += 1
        hit = own_index.find(key, sig)
        if hit is not None:
            kind, other = hit
            same = "exact duplicate" if kind == "duplicate" else "near duplicate"
            report.add(
                Problem(
                    kind,
                    f"example is an {same} of line {other} in this {what} file; remove repeats unless "
                    "you mean to weight them",
                    line,
                    "warning",
                )
            )
        own_index.add(line, key, sig)
    if progress is not None:
        progress(done)

    stats = {
        "n_examples_analyzed": done,
        "tokens_per_example": _distribution(tokens),
        "billed_tokens_per_example": _distribution(billed),
        "trained_tokens_per_example": _distribution(trained),
        "messages_per_example": _distribution(n_messages),
        "n_truncated": n_truncated,
        "n_missing_system": no_system,
        "n_missing_user": no_user,
        "n_duplicates": report.warning_counts.get("duplicate", 0),
        "n_near_duplicates": report.warning_counts.get("near_duplicate", 0),
        "near_duplicates_checked": min(done, NEAR_DUPLICATE_MAX_EXAMPLES),
        "context_length": context_length,
    }
    if other_index is not None:
        stats["n_overlapping_training"] = n_pairs
    if tokenizer is None:
        for k in ("tokens_per_example", "billed_tokens_per_example", "trained_tokens_per_example"):
            stats[k] = None
    return stats


def _method_of(report: ValidationReport, method: str | None) -> str:
    if method is not None:
        return method
    # The method whose format the file is in (the first, where several share one); a file in no
    # known format is reported as chat data.
    return next((m for m, fmt in METHODS.items() if fmt == report.format), "supervised")


def analyze(
    report: ValidationReport,
    path: Path,
    *,
    tokenizer,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    n_epochs: int | str = "auto",
    validation_path: Path | None = None,
    price_per_million: float = DEFAULT_PRICE_PER_MILLION,
    tokens_per_second: float | None = None,
    method: str | None = None,
    overlap_is_error: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ValidationReport:
    """Adds token stats, token-level problems, duplicates, overlap and the estimate to `report`
    (in place; also returned). `tokenizer=None` skips the token counts but still finds duplicates.

    With `validation_path`, the validation file is analysed into `report.validation` (validated
    first if that is still None) and its overlap with the training file is reported there.
    """
    method = _method_of(report, method)
    if "wrong_format" in report.error_counts or "empty_file" in report.error_counts:
        return report
    hasher = MinHasher()
    train_index = DuplicateIndex(hasher)
    report.stats = _analyze_file(
        report,
        path,
        method=method,
        tokenizer=tokenizer,
        context_length=context_length,
        own_index=train_index,
        hasher=hasher,
        progress=progress,
    )
    validation_tokens = None
    if validation_path is not None:
        if report.validation is None:
            report.validation = validate_file(
                validation_path, method=method, min_examples=1, file_kind="validation"
            )
        v = report.validation
        if "wrong_format" not in v.error_counts and "empty_file" not in v.error_counts:
            v.stats = _analyze_file(
                v,
                validation_path,
                method=method,
                tokenizer=tokenizer,
                context_length=context_length,
                own_index=DuplicateIndex(hasher),
                hasher=hasher,
                other_index=train_index,
                overlap_severity="error" if overlap_is_error else "warning",
            )
            if v.stats["billed_tokens_per_example"] is not None:
                validation_tokens = v.stats["billed_tokens_per_example"]["total"]

    if tokenizer is not None:
        epochs = auto_n_epochs(max(1, report.n_examples)) if n_epochs in ("auto", None) else int(n_epochs)
        per_epoch = report.stats["billed_tokens_per_example"]["total"]
        billable = per_epoch * epochs
        report.estimate = {
            "n_epochs": epochs,
            "n_epochs_auto": n_epochs in ("auto", None),
            "context_length": context_length,
            "tokens_per_epoch": per_epoch,
            "trained_tokens_per_epoch": report.stats["trained_tokens_per_example"]["total"],
            "billable_tokens": billable,
            "price_per_million_tokens": price_per_million,
            "cost_usd": round(billable * price_per_million / 1e6, 6),
            "validation_tokens": validation_tokens,  # not billed
            "tokens_per_second": tokens_per_second,
            "estimated_seconds": round(billable / tokens_per_second, 1) if tokens_per_second else None,
        }
    return report


def check_files(
    train: Path,
    *,
    validation: Path | None = None,
    tokenizer,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    method: str = "supervised",
    n_epochs: int | str = "auto",
    overlap_is_error: bool = False,
    min_examples: int = 10,
    price_per_million: float = DEFAULT_PRICE_PER_MILLION,
    tokens_per_second: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> ValidationReport:
    """Format check + analysis of a training file and (optionally) a validation file.

    The returned report is the training file's; the validation file's is `report.validation`.
    `report.ok` / `report.job_error()` / `report.error_param` cover both.
    """
    report = validate_file(train, method=method, min_examples=min_examples)
    if validation is not None:
        report.validation = validate_file(validation, method=method, min_examples=1, file_kind="validation")
    return analyze(
        report,
        train,
        tokenizer=tokenizer,
        context_length=context_length,
        n_epochs=n_epochs,
        validation_path=validation,
        price_per_million=price_per_million,
        tokens_per_second=tokens_per_second,
        method=method,
        overlap_is_error=overlap_is_error,
        progress=progress,
    )
