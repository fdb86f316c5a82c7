"""Caption metrics as coco-caption reports them: BLEU-1..4, METEOR, ROUGE-L, CIDEr.

:class:`CaptionScorer` is a hardened wrapper over pycocoevalcap 1.2:

* **Tokenisation** is coco-caption's: the Stanford PTB tokenizer jar that pycocoevalcap
  ships, run with the same flags (``-preserveLines -lowerCase``) and the same punctuation
  filter. We feed it on stdin from one JVM for references and hypotheses together instead
  of a temporary file inside site-packages (pycocoevalcap's way, which fails on a read-only
  venv); the tokenizer is line-by-line, so the tokens are the same. The number of lines that
  come back is checked (pycocoevalcap would silently mis-assign captions after a stray
  newline). ``tokenizer="none"`` skips it for captions that are already tokenised.
* **BLEU, ROUGE-L, CIDEr** are pycocoevalcap's own classes on the tokenised captions.
* **METEOR** is pycocoevalcap's jar and protocol, in one reused JVM we start ourselves
  (:class:`~dvsa.evaluation.meteor.MeteorProcess`: forced locale, readable JVM errors).
* **Sanitising** (:func:`prepare`): whitespace runs (newlines, tabs, Unicode line separators)
  become one space and ``|||`` (METEOR's field separator) is removed. Exactly one hypothesis
  per id, else :class:`DvsaError` naming the id. Empty hypotheses are kept (they score 0,
  as in coco-caption) and counted; empty references are dropped and counted; an id left
  with no reference is skipped and counted. The counts are on :attr:`CaptionScorer.last_report`.

:func:`score_parallel` splits METEOR's per-segment work over Ray actors (each its own JVM)
and combines the statistics in one ``EVAL`` exactly as the single process does, so it
returns the same numbers as :meth:`CaptionScorer.score`.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import asdict, dataclass
from typing import Any, Hashable, Mapping, Sequence

from dvsa.errors import DataError, DvsaError
from dvsa.evaluation.meteor import JVM_LOCALE_FLAGS, MeteorProcess, check_java, java_env, pycocoevalcap_dir

log = logging.getLogger(__name__)

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
TOKENIZERS = ("ptb", "none")

Refs = Mapping[Hashable, Sequence[str]]
Hyps = Mapping[Hashable, Any]


@dataclass
class SanitizeReport:
    """What :func:`prepare` changed or skipped (logged as a warning when not zero)."""

    segments: int = 0                    # ids scored
    empty_hypotheses: int = 0            # kept: they score 0
    empty_references_dropped: int = 0    # references empty after cleaning/tokenising
    ids_without_reference: int = 0      # skipped: every reference was empty
    texts_reformatted: int = 0           # had newlines/tabs/runs of spaces or '|||'

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# --------------------------------------------------------------------------- preparation


def clean_text(text: str) -> str:
    """One line, single spaces, no METEOR separator: ``'a\\n b ||| c'`` -> ``'a b c'``."""
    return " ".join(text.replace("|||", " ").split())


def _one_hypothesis(key: Hashable, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise DvsaError(f"caption evaluation: exactly one hypothesis per id is allowed; "
                            f"id {key!r} has {len(value)}")
        value = value[0]
        if isinstance(value, str):
            return value
    raise DvsaError(f"caption evaluation: hypothesis for id {key!r} must be a string, "
                    f"got {type(value).__name__}")


def _check_inputs(refs: Refs, hyps: Hyps) -> tuple[dict, dict]:
    if not isinstance(refs, Mapping) or not isinstance(hyps, Mapping):
        raise DvsaError("caption evaluation: refs and hyps must be dicts keyed by id")
    missing_hyp = [k for k in refs if k not in hyps]
    missing_ref = [k for k in hyps if k not in refs]
    if missing_hyp or missing_ref:
        parts = []
        if missing_hyp:
            parts.append(f"{len(missing_hyp)} id(s) without hypothesis, e.g. {missing_hyp[:5]}")
        if missing_ref:
            parts.append(f"{len(missing_ref)} id(s) without references, e.g. {missing_ref[:5]}")
        raise DvsaError("caption evaluation: refs and hyps must have the same ids: "
                        + "; ".join(parts))
    if not refs:
        raise DvsaError("caption evaluation: nothing to score (no ids)")
    out_refs, out_hyps = {}, {}
    for key, rs in refs.items():
        if isinstance(rs, str) or not isinstance(rs, Sequence):
            raise DvsaError(f"caption evaluation: references for id {key!r} must be a list "
                            f"of strings, got {type(rs).__name__}")
        for j, r in enumerate(rs):
            if not isinstance(r, str):
                raise DvsaError(f"caption evaluation: reference {j} of id {key!r} is "
                                f"{type(r).__name__}, not a string")
        out_refs[key] = list(rs)
        out_hyps[key] = _one_hypothesis(key, hyps[key])
    return out_refs, out_hyps


def ptb_tokenize(texts: Sequence[str], java: str = "java") -> list[str]:
    """coco-caption's tokenisation of single-line texts: PTB tokens, lower case, no punctuation."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

    if not texts:
        return []
    for i, t in enumerate(texts):
        if "\n" in t or "\r" in t:
            raise DvsaError(f"PTB tokenizer: text {i} contains a line break (use clean_text)")
    jar = pycocoevalcap_dir() / "tokenizer" / STANFORD_CORENLP_3_4_1_JAR
    cmd = [check_java(java), *JVM_LOCALE_FLAGS, "-cp", str(jar),
           "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    try:
        done = subprocess.run(cmd, input=("\n".join(texts) + "\n").encode("utf-8"),
                              capture_output=True, env=java_env(), check=False)
    except FileNotFoundError as exc:
        raise DvsaError(f"Java not found: {exc}") from exc
    err = done.stderr.decode("utf-8", "replace").strip()
    if done.returncode != 0:
        raise DvsaError(f"PTB tokenizer (Java) failed with exit code {done.returncode}: "
                        f"{err[-600:] or 'no output on stderr'}")
    lines = done.stdout.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(texts):
        raise DvsaError(f"PTB tokenizer returned {len(lines)} lines for {len(texts)} captions")
    # The same filter as pycocoevalcap's PTBTokenizer.tokenize.
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)
            for line in lines]


def prepare(refs: Refs, hyps: Hyps, tokenizer: str = "ptb", java: str = "java"
            ) -> tuple[dict[Hashable, list[str]], dict[Hashable, list[str]], SanitizeReport]:
    """Validate, sanitise and tokenise: ``(gts, res, report)`` in pycocoevalcap's format
    (``{id: [ref, ...]}``, ``{id: [hyp]}``)."""
    if tokenizer not in TOKENIZERS:
        raise DvsaError(f"caption evaluation: tokenizer {tokenizer!r} is not one of {TOKENIZERS}")
    refs, hyps = _check_inputs(refs, hyps)
    report = SanitizeReport()
    keys = list(refs)
    flat: list[str] = []
    for k in keys:
        flat.extend(refs[k])
        flat.append(hyps[k])
    cleaned = [clean_text(t) for t in flat]
    report.texts_reformatted = sum(a != b for a, b in zip(flat, cleaned))
    tokens = ptb_tokenize(cleaned, java) if tokenizer == "ptb" else cleaned
    gts: dict[Hashable, list[str]] = {}
    res: dict[Hashable, list[str]] = {}
    pos = 0
    for k in keys:
        n = len(refs[k])
        kept = [r for r in tokens[pos:pos + n] if r.strip()]
        hyp = tokens[pos + n]
        pos += n + 1
        report.empty_references_dropped += n - len(kept)
        if not kept:
            report.ids_without_reference += 1
            continue
        if not hyp.strip():
            report.empty_hypotheses += 1
        gts[k] = kept
        res[k] = [hyp]
    report.segments = len(gts)
    if not gts:
        raise DataError("caption evaluation: no id has a non-empty reference caption")
    if (report.empty_hypotheses or report.empty_references_dropped
            or report.ids_without_reference):
        log.warning("caption evaluation: %s", report.as_dict())
    return gts, res, report


# --------------------------------------------------------------------------- scoring


def corpus_scores_without_meteor(gts: dict, res: dict) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr with pycocoevalcap's classes (pure Python)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["ROUGE_L"] = float(rouge)
    out["CIDEr"] = float(cider)
    return out


def _ordered(scores: dict[str, float]) -> dict[str, float]:
    return {m: scores[m] for m in METRICS}


class CaptionScorer:
    """Corpus-level coco-caption metrics; one METEOR JVM, started lazily and reused.

    Use as a context manager or call :meth:`close`; an unclosed JVM is ended at exit.
    """

    def __init__(self, tokenizer: str = "ptb", java: str = "java", meteor_heap: str = "2G",
                 java_options: Sequence[str] = ()):
        if tokenizer not in TOKENIZERS:
            raise DvsaError(f"CaptionScorer: tokenizer {tokenizer!r} is not one of {TOKENIZERS}")
        self.tokenizer = tokenizer
        self.java = java
        self.meteor = MeteorProcess(java=java, max_heap=meteor_heap, java_options=java_options)
        self.last_report: SanitizeReport | None = None

    def prepare(self, refs: Refs, hyps: Hyps):
        gts, res, report = prepare(refs, hyps, self.tokenizer, self.java)
        self.last_report = report
        return gts, res

    def score(self, refs: Refs, hyps: Hyps) -> dict[str, float]:
        """``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}`` over all ids."""
        check_java(self.java)
        gts, res = self.prepare(refs, hyps)
        keys = list(gts)
        stats = self.meteor.segment_stats([(gts[k], res[k][0]) for k in keys])
        meteor, _ = self.meteor.evaluate(stats)
        scores = corpus_scores_without_meteor(gts, res)
        scores["METEOR"] = meteor
        return _ordered(scores)

    def close(self) -> None:
        self.meteor.close()

    def __enter__(self) -> "CaptionScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- parallel METEOR


class MeteorWorker:
    """Body of a Ray actor: its own METEOR JVM computing segment statistics."""

    def __init__(self, java: str = "java", meteor_heap: str = "2G",
                 java_options: Sequence[str] = ()):
        self.meteor = MeteorProcess(java=java, max_heap=meteor_heap, java_options=java_options)

    def segment_stats(self, segments: list[tuple[list[str], str]]) -> list[str]:
        return self.meteor.segment_stats(segments)

    def evaluate(self, stats: list[str]) -> tuple[float, list[float]]:
        return self.meteor.evaluate(stats)

    def close(self) -> None:
        self.meteor.close()


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, near-equal ``[start, end)`` ranges covering ``range(n)``."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def _unwrap_ray_error(exc: BaseException) -> BaseException:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, DvsaError):
        return DvsaError(str(cause))
    return exc


def score_parallel(refs: Refs, hyps: Hyps, num_actors: int = 2, *, tokenizer: str = "ptb",
                   java: str = "java", meteor_heap: str = "2G",
                   java_options: Sequence[str] = (), actor_num_cpus: float = 1.0
                   ) -> dict[str, float]:
    """:meth:`CaptionScorer.score` with METEOR's per-segment work on ``num_actors`` Ray actors.

    Each actor runs its own JVM over a contiguous slice of the ids and returns the segments'
    statistics; one actor then evaluates all statistics in one ``EVAL`` line, which is exactly
    what the single process does (the statistics are deterministic text). BLEU, ROUGE-L and
    CIDEr (which needs document frequencies over the whole set) run on the driver meanwhile.
    Uses the connected Ray (``ray.init`` is called if none is).
    """
    import ray

    if num_actors < 1:
        raise DvsaError(f"score_parallel: num_actors must be >= 1, got {num_actors}")
    check_java(java)
    gts, res, _ = prepare(refs, hyps, tokenizer, java)
    keys = list(gts)
    segments = [(gts[k], res[k][0]) for k in keys]
    if not ray.is_initialized():
        ray.init()
    actor_cls = ray.remote(MeteorWorker).options(num_cpus=actor_num_cpus)
    ranges = _chunks(len(segments), num_actors)
    actors = [actor_cls.remote(java, meteor_heap, tuple(java_options)) for _ in ranges]
    try:
        futures = [a.segment_stats.remote(segments[s:e]) for a, (s, e) in zip(actors, ranges)]
        scores = corpus_scores_without_meteor(gts, res)
        try:
            stats = [line for part in ray.get(futures) for line in part]
            meteor, _ = ray.get(actors[0].evaluate.remote(stats))
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap_ray_error(exc) from exc
        scores["METEOR"] = meteor
        return _ordered(scores)
    finally:
        try:
            ray.get([a.close.remote() for a in actors], timeout=30)
        except Exception:  # an actor that already died has nothing to close
            pass
        for a in actors:
            ray.kill(a)
