"""A corpus shipped for a model: its own answers to questions of ours, for LogitSpec to retrieve from.

A session's suffix index holds only what that conversation said, so at the start of an answer,
and in text that does not repeat, retrieval has little to offer. How a model goes on, though,
repeats across conversations: the same list openings, markdown, stock phrases and sentence
shapes. The corpus is that: the model's greedy answers to bench/corpus_prompts.jsonl (questions
written for this in Spec-Bench's categories, none of Spec-Bench's own, and none of
bench/prior_prompts.jsonl's, from which the shipped acceptance statistics learn how often its
drafts are accepted), written by bench/make_prior.py. The engine indexes it once at start and
LogitSpecDrafter proposes what followed the context there as one more branch, under node kinds of
its own that the cost model prices like every other (decoding/drafters.py).

It holds no request's text: it is shipped, never learned while serving, so one client's text can
neither be proposed to another nor show in another's timing. It is keyed like the shipped prior
(statistics_cache.prior_key): its token ids mean something only for that model's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from decoding import statistics_cache
from decoding.drafters import CORPUS_SEPARATOR
from decoding.loader import LoadedModel
from retrieval.suffix_index import SuffixIndex


def corpus_path(loaded: LoadedModel) -> Path:
    return statistics_cache.PRIORS / f"{loaded.name}.corpus.json"


def load_corpus(loaded: LoadedModel) -> tuple[SuffixIndex, int] | None:
    """The shipped corpus indexed (answers behind CORPUS_SEPARATOR) and its count of answers, or
    None: no file for the model's name, one keyed to another model or format, or one holding a
    token id outside the model's vocabulary (which a forward could not embed)."""
    try:
        entry = json.loads(corpus_path(loaded).read_text())
        if entry["key"] != statistics_cache.prior_key(loaded):
            return None
        vocab = int(loaded.hf_config["vocab_size"])
        answers = entry["answers"]
        if not all(type(t) is int and 0 <= t < vocab for answer in answers for t in answer):
            return None
        return index_answers(answers), len(answers)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def index_answers(answers: list[list[int]]) -> SuffixIndex:
    """One suffix index of every answer, each behind a CORPUS_SEPARATOR."""
    tokens: list[int] = []
    for answer in answers:
        tokens += answer
        tokens.append(CORPUS_SEPARATOR)
    return SuffixIndex(tokens)


def write_corpus(loaded: LoadedModel, answers: list[list[int]], source: str, path: Path | None = None) -> Path:
    """Write a corpus for this model (bench/make_prior.py): to `path`, by default where
    load_corpus reads it. An answer a line."""
    path = path or corpus_path(loaded)
    lines = ",\n".join("  " + json.dumps(a) for a in answers)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'{{"key": {json.dumps(statistics_cache.prior_key(loaded))},\n "source": {json.dumps(source)},\n'
                    f' "answers": [\n{lines}\n ]}}\n')
    return path
