"""Train a SentencePiece vocabulary (T5 ids) on the embedded corpus or on registered seqio tasks.

    python -m t5lite.data.train_vocab --output=t5lite/data/vocab/default --vocab_size=8000
    python -m t5lite.data.train_vocab --task=my_qa --vocab_size=8000 --output=my_vocab/spm

(the first made the shipped t5lite/data/vocab/default.model: deterministic, ~10 s on 2 CPU cores).
Trains on the "train" split; prints the tokens per character on the "validation" split.
"""

import argparse
import itertools
import sys
from collections.abc import Iterable, Sequence

import seqio

from t5lite.data import embedded_corpus, pipeline
from t5lite.data.vocab import DEFAULT_EXTRA_IDS, tokens_per_character, train_sentencepiece
from t5lite.errors import reports_user_errors


def _embedded_corpus_train_texts() -> Iterable[str]:
    """Train-split documents of tiny Shakespeare and WikiText-2 (never validation/test)."""
    return itertools.chain(
        embedded_corpus.tiny_shakespeare_documents("train"),
        embedded_corpus.wikitext2_documents("train"),
    )


def _task_texts(names: Sequence[str], split: str) -> list[str]:
        return [t for name in names for task in pipeline.list_tasks_of(name) for t in pipeline.raw_texts(task, split)]


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="output prefix, e.g. t5lite/data/vocab/default")
    parser.add_argument("--task", action="append", default=[],
                        help="train on the 'train' split of this task or mixture (repeatable); "
                             "default: the embedded corpus")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--model_type", default="unigram", choices=["unigram", "bpe"])
    parser.add_argument("--character_coverage", type=float, default=1.0)
    parser.add_argument("--no_byte_fallback", action="store_true")
    parser.add_argument("--max_sentences", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    texts = _task_texts(args.task, "train") if args.task else list(_embedded_corpus_train_texts())
    path = train_sentencepiece(texts, args.output, args.vocab_size, model_type=args.model_type,
                               character_coverage=args.character_coverage,
                               byte_fallback=not args.no_byte_fallback, max_sentences=args.max_sentences)
    held_out = _task_texts(args.task, "validation") if args.task else list(
        itertools.chain(embedded_corpus.tiny_shakespeare_documents("validation"),
                        embedded_corpus.wikitext2_documents("validation")))
    vocabulary = seqio.SentencePieceVocabulary(path, extra_ids=DEFAULT_EXTRA_IDS)
    print(f"wrote {path}: {vocabulary.vocab_size} ids with {DEFAULT_EXTRA_IDS} sentinels; "
          f"{tokens_per_character(vocabulary, held_out):.4f} tokens per character on the validation text")
    return 0


if __name__ == "__main__":
    sys.exit(main())
