"""SentencePiece vocabulary: training it, and the default one shipped in the repo.

The shipped t5lite/data/vocab/default.model was made with (t5lite/data/train_vocab.py):

    python -m t5lite.data.train_vocab --output=t5lite/data/vocab/default --vocab_size=8000

(trains on the train splits of the embedded corpus; deterministic, ~10 s on 2 CPU cores).

Ids follow T5: pad=0, eos=1, unk=2, no bos. seqio adds DEFAULT_EXTRA_IDS sentinels
<extra_id_0> .. <extra_id_99> at the top (ids 8099 .. 8000), and the model pads its
embedding table to DEFAULT_MODEL_VOCAB_SIZE.
"""

import functools
import os
from collections.abc import Iterable, Sequence

import sentencepiece as spm
import seqio

from t5lite.errors import UserError

DEFAULT_VOCAB_PATH = os.path.join(os.path.dirname(__file__), "vocab", "default.model")
DEFAULT_EXTRA_IDS = 100
DEFAULT_MODEL_VOCAB_SIZE = 8192  # 8100 ids rounded up to a multiple of 128 for TPU-friendly shapes
# WikiText-2 writes rare words as the literal text "<unk>"; SentencePiece's own unknown piece
# gets another name so that literal stays an ordinary piece and decodes back to "<unk>".
UNK_PIECE = "<unk_sp>"
# Always single pieces: newlines (speech and paragraph breaks survive a round trip) and "<unk>".
USER_DEFINED_PIECES = ("\n", "<unk>")
# The trained model depends on the thread count, so it is fixed for reproducibility.
TRAINER_THREADS = 4
# Longest training text in bytes; SentencePiece silently skips longer ones (its default is 4192).
MAX_TEXT_BYTES = 1 << 20


def train_sentencepiece(
    texts: Iterable[str],
    output_prefix: str,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    byte_fallback: bool = True,
    max_sentences: int = 1_000_000,
) -> str:
    """Trains a SentencePiece model with T5 ids (pad 0, eos 1, unk 2, no bos).

    Args:
      texts: training texts (documents or lines); newlines inside a text are kept.
      output_prefix: writes `{output_prefix}.model` and `{output_prefix}.vocab`.
      vocab_size: pieces in the model, including pad/eos/unk, byte and user pieces.
      model_type: "unigram" or "bpe" (also "char", "word").
      character_coverage: fraction of characters covered by single-character pieces.
      byte_fallback: encode characters outside the vocabulary as UTF-8 byte pieces.
      max_sentences: if there are more texts, an evenly spaced subset of this many is used.

    Returns:
      Path of the .model file. The same texts and arguments give the same bytes.
    """
    texts = _evenly_spaced([text for text in texts if text.strip()], max_sentences)
    if not texts:
        raise UserError("train_sentencepiece got no non-blank texts to train on.")
    output_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(output_dir, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=output_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        unk_piece=UNK_PIECE,
        user_defined_symbols=list(USER_DEFINED_PIECES),
        # NFKC without the "nmt" rules, which would turn newlines into spaces.
        normalization_rule_name="nfkc",
        max_sentence_length=MAX_TEXT_BYTES,
        num_threads=TRAINER_THREADS,
        minloglevel=2,
    )
    return output_prefix + ".model"


def _evenly_spaced(items: Sequence[str], max_items: int) -> list[str]:
    """At most max_items items spread evenly over the sequence (deterministic subsample)."""
    if max_items < 1:
        raise UserError(f"max_sentences must be at least 1, got {max_items}.")
    if len(items) <= max_items:
        return list(items)
    return [items[i * len(items) // max_items] for i in range(max_items)]


@functools.cache
def get_default_vocabulary() -> seqio.SentencePieceVocabulary:
    """The shipped vocabulary with 100 T5 sentinels: vocab_size == 8100."""
    return seqio.SentencePieceVocabulary(DEFAULT_VOCAB_PATH, extra_ids=DEFAULT_EXTRA_IDS)


def pieces(vocabulary: seqio.Vocabulary) -> list[str]:
    """The piece of each id 0 .. vocab_size - 1 ("▁the", "ing", ...); "" for the special pieces (padding,
    EOS, unknown, byte fallbacks), which stand for no word (t5lite.model.word_vectors)."""
    if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
        raise UserError(f"Word vectors are mapped through a SentencePiece vocabulary's pieces; the training data "
                        f"uses a {type(vocabulary).__name__}. Unset TransformerConfig.embedding_init_file.")
    sp = vocabulary.tokenizer
    special = (sp.is_control, sp.is_unknown, sp.is_byte, sp.is_unused)
    return ["" if any(is_(i) for is_ in special) else sp.id_to_piece(i) for i in range(vocabulary.vocab_size)]


def tokens_per_character(vocabulary: seqio.Vocabulary, texts: Sequence[str]) -> float:
    """Tokens the vocabulary spends per character of `texts` (lower is a tighter vocabulary)."""
    characters = sum(len(t) for t in texts)
    if not characters:
        raise UserError("tokens_per_character needs non-empty texts.")
    return sum(len(vocabulary.encode(t)) for t in texts) / characters


if __name__ == "__main__":
    import sys

    sys.exit("t5lite.data.vocab is a library now: train a vocabulary with python -m t5lite.data.train_vocab")
