"""PII scrubbing: emails, phone numbers, IP addresses and payment card numbers become placeholders.

    scrub_pii("Mail jo@example.com or call +44 20 7946 0958.")
    -> ("Mail <EMAIL> or call <PHONE>.", Counter({"email": 1, "phone": 1}))

Precision comes first: a pretraining corpus loses little when a rare phone number slips through, but
replacing dates, prices or version numbers damages text a model should learn from. So:
- email    local@domain.tld, the top-level domain two or more letters.
- ip       IPv4 dotted quads with every octet 0-255 and no leading zeros, not inside a longer dotted or
           digit run and not after a version / section word ("version 1.2.3.4", "v1.2.3.4", "section
           1.2.3.4" stay); IPv6 in any form that Python's ipaddress accepts, with at least one digit (so
           "Cafe::Add" in code stays).
- card     13-19 digits, bare or in card groupings (4-4-4-4, 4-6-5, ...) split by one kind of separator
           (space or dash), a major issuer's prefix (_CARD_PREFIX) and a valid Luhn checksum.
- phone    "+" and 8-15 digits in groups ("+44 20 7946 0958", "+14155552671"); North American numbers
           with separators ("(415) 555-2671", "1-888-595-5485", "415.555.2671", area code and exchange
           starting 2-9); trunk-0 national numbers of 9-11 digits in groups ("020 7946 0958", "01 23 45 67
           89"). Bare digit runs, 7-digit local numbers and dotted dates are left alone.
Not caught: numbers written out or split by other tokens (WikiText's "555 @-@ 1234"), obfuscated emails
("jo at example dot com"), names, street addresses, account or ID numbers.
"""

from __future__ import annotations

import collections
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping

from t5lite.errors import UserError

PII_KINDS = ("email", "ip", "card", "phone")  # also the order they are replaced in
DEFAULT_PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP>", "card": "<CARD>", "phone": "<PHONE>"}

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w@-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w-]|\.\d)")
# A candidate: hex groups and colons (and an optional embedded IPv4 tail); ipaddress decides.
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|\d{1,3}(?:\.\d{1,3}){3})?(?![\w:.]|\.\d)")
# Words after which a dotted quad is a version or a section number, not an address.
_NOT_AN_ADDRESS_BEFORE = re.compile(
    r"(?i)(?:\b(?:v|ver|version|versions|release|build|rev|revision|firmware|update|section|sections|chapter|"
    r"clause|article|figure|fig|table|step|rule|item|§)\.?\s*|§\s*)$")
_CARD = re.compile(r"(?<![\w+.,-])[2-6]\d{3}(?:[ -]?\d{2,7}){2,5}(?![\w-]|[.,]\d)")
# Issuer prefixes: Visa 4, Mastercard 51-55 and 2221-2720, Amex 34 / 37, Diners 30 / 36 / 38 / 39, JCB 35,
# Discover, UnionPay and Maestro 50-58 / 6.
_CARD_PREFIX = re.compile(r"4|5[0-8]|2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)|3[04-9]|6")
_PHONE = re.compile(
    r"(?<![\w+.,-])(?:"
    r"\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,5})){1,6}"  # international
    r"|(?:\+?1[ .-]?)?(?:\([2-9]\d\d\)[ ]?|[2-9]\d\d[ .-])[2-9]\d\d[ .-]\d{4}"  # North American
    r"|\(?0\d{1,4}\)?(?:[ -]\d{2,4}){2,4}"  # trunk-0 national
    r")(?![\w-]|[ .-]?\d)")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of digits (payment cards, some IDs)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_ipv4(match: re.Match) -> bool:
    return not _NOT_AN_ADDRESS_BEFORE.search(match.string[max(0, match.start() - 12):match.start()])


def _is_ipv6(match: re.Match) -> bool:
    text = match.group(0)
    if not any(ch.isdigit() for ch in text):
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _is_card(match: re.Match) -> bool:
    text = match.group(0)
    groups = [len(g) for g in re.split(r"[ -]", text)]
    one_separator = len(set(re.findall(r"\D", text))) <= 1
    card_grouping = len(groups) == 1 or groups in ([4, 6, 4], [4, 6, 5]) or (
        all(g == 4 for g in groups[:-1]) and groups[-1] <= 4)
    digits = re.sub(r"\D", "", text)
    return (one_separator and card_grouping and 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits))
            and luhn_valid(digits))


def _is_phone(match: re.Match) -> bool:
    text = match.group(0)
    digits = sum(ch.isdigit() for ch in text)
    if text.startswith("+"):
        return 8 <= digits <= 15  # E.164 allows at most 15
    if text.lstrip("(").startswith("0"):
        return 9 <= digits <= 11
    return True  # North American: the pattern fixes its shape


_PATTERNS: dict[str, tuple[tuple[re.Pattern, Callable[[re.Match], bool] | None], ...]] = {
    "email": ((_EMAIL, None),),
    "ip": ((_IPV6, _is_ipv6), (_IPV4, _is_ipv4)),
    "card": ((_CARD, _is_card),),
    "phone": ((_PHONE, _is_phone),),
}


def check_pii_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """The kinds in replacement order; a UserError for an unknown one."""
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - set(PII_KINDS))
    if unknown:
        raise UserError(f"Unknown PII kinds {unknown}; choose from {list(PII_KINDS)}.")
    return tuple(k for k in PII_KINDS if k in kinds)


def scrub_pii(
    text: str, *, kinds: Iterable[str] = PII_KINDS, placeholders: Mapping[str, str] | None = None
) -> tuple[str, collections.Counter]:
    """(text with each PII match replaced by its kind's placeholder, {kind: replacements}).

    kinds: which of PII_KINDS to replace (always in the order email, ip, card, phone, so an email's
      digits or an address's groups are gone before the number patterns run).
    placeholders: {kind: text}, default DEFAULT_PLACEHOLDERS for kinds not given.
    """
    placeholders = {**DEFAULT_PLACEHOLDERS, **(placeholders or {})}
    counts: collections.Counter = collections.Counter()
    for kind in check_pii_kinds(kinds):
        for pattern, accept in _PATTERNS[kind]:
            def replace(match: re.Match, kind: str = kind, accept=accept) -> str:
                if accept is not None and not accept(match):
                    return match.group(0)
                counts[kind] += 1
                return placeholders[kind]

            text = pattern.sub(replace, text)
    return text, counts
