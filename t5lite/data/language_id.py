"""Language identification with py3langid: langid.py's model, shipped in the wheel (no download).

    identify_language("Das ist ein deutscher Satz.")  -> ("de", 0.9998)

140 labels, ISO 639 codes ("en", "de", "zh", ...) plus "zxx" (no linguistic content); UNDETERMINED
("und") is t5lite's label for text whose best language has less than the caller's minimum confidence.
The model is a naive Bayes classifier over byte n-grams (Lui & Baldwin 2012); it loads once per
process (about 1 s) on first use, and then classifies about 100 KB of text in 10 ms. Confidence is
py3langid's normalised probability of the best language, in [0, 1]: short or mixed-language text and
text with few letters (numbers, code, tables) get low confidence.
"""

from __future__ import annotations

import functools

from t5lite.errors import UserError

UNDETERMINED = "und"


@functools.cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier  # noqa: PLC0415  (1 s; only when used)

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def supported_languages() -> tuple[str, ...]:
    """ISO 639-1 codes (mostly) that the model can answer."""
    return tuple(_identifier().labels)


def check_languages(languages: tuple[str, ...]) -> None:
    """A UserError naming any code the model cannot answer (a typo would silently drop everything)."""
    unknown = sorted(set(languages) - set(supported_languages()) - {UNDETERMINED})
    if unknown:
        raise UserError(f"Language codes {unknown} are not among the {len(supported_languages())} that py3langid "
                        f"identifies: {', '.join(sorted(supported_languages()))}.")


def identify_language(text: str, min_confidence: float = 0.0) -> tuple[str, float]:
    """(language code, confidence in [0, 1]) of the text's most likely language; the code is
    UNDETERMINED when the confidence is below min_confidence."""
    language, confidence = _identifier().classify(text)
    return (language if confidence >= min_confidence else UNDETERMINED), confidence
