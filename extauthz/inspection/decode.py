"""The decode pipeline: what an attacker encodes, undone before any rule looks.

Every step works on a whole text at C speed (``str.replace``, ``binascii``, codecs, ``translate``),
because the inspector decodes all the values of a request joined into one text: a per-value or
per-escape Python callback would make a body full of escapes cost milliseconds. The few steps that
need a callback per match (numeric HTML entities, IIS ``%u`` escapes, nested Log4j lookups) stop
after a budget and say so (:attr:`Decoded.over_budget`), which the inspector scores as an evasion.

Patterns used here (decoding, not detection) are Python ``re`` patterns that cannot backtrack: each
alternative has a fixed length or a single bounded repetition.
"""

from __future__ import annotations

import binascii
import html
import re
import unicodedata
import warnings
from typing import AnyStr

import re2

__all__ = ["Decoded", "cmd_form", "cmd_form_bytes", "decode", "lookup_form", "lookup_form_bytes", "lookups_over_budget",
           "sql_form", "sql_form_bytes"]

#: URL-decoding rounds: ``%252e`` is two, no legitimate value needs more than three.
URL_ROUNDS = 3
#: Escapes decoded by a Python callback (numeric entities, ``%u``, JS ``\\u{...}``), per request.
CALLBACK_BUDGET = 1024
#: Texts with more '&' than this skip the standard library's full entity table (the common named
#: entities are still decoded).
HTML_FALLBACK_MAX = 64
#: Nested ``${...}`` lookups resolved per request.
LOOKUP_BUDGET = 512

_BAD_PERCENT_BYTES = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_IIS_ESCAPE_BYTES = re.compile(rb"%[uU]([0-9A-Fa-f]{4})")
_ESCAPE = re.compile(r"%(?:[0-9A-Fa-f]{2}|[uU][0-9A-Fa-f]{4})")
_ESCAPE_BYTES = re.compile(rb"%(?:[0-9A-Fa-f]{2}|[uU][0-9A-Fa-f]{4})")
_NUMERIC_ENTITY = re.compile(r"&#(?:[xX]([0-9A-Fa-f]{1,6})|([0-9]{1,7}));?")
_NAMED_ENTITIES = (
    ("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&apos;", "'"), ("&nbsp;", " "), ("&sol;", "/"),
    ("&lpar;", "("), ("&rpar;", ")"), ("&colon;", ":"), ("&semi;", ";"), ("&dollar;", "$"), ("&lbrace;", "{"),
    ("&rbrace;", "}"), ("&period;", "."), ("&bsol;", "\\"), ("&tab;", "\t"), ("&newline;", "\n"),
    ("&grave;", "`"), ("&equals;", "="), ("&excl;", "!"), ("&num;", "#"), ("&percnt;", "%"), ("&plus;", "+"),
    ("&comma;", ","), ("&ast;", "*"), ("&lsqb;", "["), ("&rsqb;", "]"), ("&vert;", "|"), ("&quest;", "?"),
    ("&amp;", "&"),
)  # fmt: skip
_NAMED_ENTITY = re.compile("|".join(re.escape(entity) for entity, _ in _NAMED_ENTITIES))
_JS_BRACED = re.compile(r"\\u\{([0-9A-Fa-f]{1,6})\}")
_OVERLONG = (
    (b"\xc0\xae", b"."), (b"\xe0\x80\xae", b"."), (b"\xc0\xaf", b"/"), (b"\xe0\x80\xaf", b"/"),
    (b"\xc1\x9c", b"\\"), (b"\xc0\xbc", b"<"), (b"\xc0\xbe", b">"), (b"\xc0\xa7", b"'"), (b"\xc0\xa2", b'"'),
    (b"\xc0\x80", b""),
)  # fmt: skip
#: Characters dropped before matching, as UTF-8: NUL and the invisible ones used to split keywords.
_INVISIBLE = tuple(c.encode("utf-8") for c in "\x00\u200b\u200c\u200d\u2060\ufeff\u00ad")
#: Dots and slashes that hosts and paths treat as '.' and '/' (IDNA, full-width), as UTF-8.
_LOOKALIKES = tuple((c.encode("utf-8"), plain) for c, plain in (
    ("\u3002", b"."), ("\uff61", b"."), ("\uff0e", b"."), ("\u2215", b"/"), ("\u2044", b"/")))
def _latin1_pattern(pattern: bytes) -> re2._Regexp:
    options = re2.Options()
    options.encoding = re2.Options.Encoding.LATIN1  # bytes as they are: these forms are invalid UTF-8
    return re2.compile(pattern, options)


#: RE2, not ``re``: it scans 64 KiB of bytes in 0.1 ms where ``re`` takes 0.5 ms.
_OVERLONG_FORM = _latin1_pattern(b"|".join(re.escape(overlong) for overlong, _ in _OVERLONG))
_OVERLONG_PLAIN = dict(_OVERLONG)


def _plain_of_overlong(match: re.Match[bytes]) -> bytes:
    return _OVERLONG_PLAIN[match.group()]


#: The characters of _LOOKALIKES and _INVISIBLE beyond Latin-1.
_SPECIAL_WIDE = "\u3002\uff61\uff0e\u2215\u2044\u200b\u200c\u200d\u2060\ufeff"
#: Every character of _SPECIAL_WIDE and full-width ASCII: whether a text needs any of that work.
_WIDE_WORK = re.compile("[" + _SPECIAL_WIDE + "\uff01-\uff5e]")
#: Texts longer than this get only full-width ASCII mapped instead of the whole NFKC.
NFKC_MAX_CHARS = 16384
#: Full-width ASCII (U+FF01 to U+FF5E) as UTF-8.
_FULL_WIDTH = re.compile(rb"\xef\xbc[\x81-\xbf]|\xef\xbd[\x80-\x9e]")


def _half_width(match: re.Match[bytes]) -> bytes:
    return bytes((ord(match.group().decode("utf-8")) - 0xFEE0,))


class Decoded:
    """A text after the pipeline, and whether a budgeted step gave up (an evasion signal).

    The pipeline ends on the UTF-8 bytes the matchers read (``data``: lone surrogates, which have no
    UTF-8, read as '?'); ``text`` is the same as a str, made when asked for."""

    __slots__ = ("_data", "_text", "over_budget")

    def __init__(self, text: str | None = None, over_budget: bool = False, *, data: bytes | None = None) -> None:
        self._text = text  # one of text and data is given
        self._data = data
        self.over_budget = over_budget

    @property
    def text(self) -> str:
        if self._text is None:
            assert self._data is not None
            self._text = self._data.decode("utf-8")
        return self._text

    @property
    def data(self) -> bytes:
        if self._data is None:
            assert self._text is not None
            self._data = utf8(self._text)
        return self._data

    def __repr__(self) -> str:
        return f"Decoded({self.text!r}, over_budget={self.over_budget})"


def utf8(text: str) -> bytes:
    """What the matchers read: UTF-8, lone surrogates (an invalid escape in a query, \\ud800 in JSON)
    as '?', as an invalid character would be."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def decode(text: str | None, raw: bytes | None = None) -> Decoded:
    """Percent-escapes (repeatedly, IIS ``%u`` and overlong UTF-8 included), HTML entities, JS/JSON
    escapes, Unicode NFKC, invisible characters: the form every built-in rule matches. Case is left
    as it is: every rule matches case-insensitively (which costs the matchers nothing per
    character; lower-casing a non-ASCII text does). The text may hold lone surrogates.

    Percent-escapes are decoded in every target, not only in URL parts: a JSON value that a backend
    URL-decodes (or builds a URL from) carries them through. ``raw``: the bytes ``text`` was read
    from (a text body, invalid UTF-8 included), which the first round decodes instead of encoding
    the text again, as a backend that undoes escapes before reading UTF-8 would. ``text`` may be
    None when ``raw`` is given: then it is ``raw`` read with replacement characters, and only made
    when the first round has nothing to decode (the bytes are read as UTF-8 once, not twice: for
    random bytes each reading costs half a millisecond per 64 KiB).
    """
    budget = [CALLBACK_BUDGET]
    rounds = URL_ROUNDS
    if text is None:
        assert raw is not None
        # The first round's test on the bytes: the escapes are ASCII, which reading with
        # replacement characters leaves where they are.
        if b"%" in raw and _ESCAPE_BYTES.search(raw) is not None:
            text = _percent_decode("", budget, raw)
            rounds -= 1
        else:
            text = raw.decode("utf-8", "replace")
            rounds = 0
        raw = None
    for _ in range(rounds):
        if "%" not in text or _ESCAPE.search(text) is None:
            break
        decoded = _percent_decode(text, budget, raw)
        raw = None
        if decoded == text:
            break
        text = decoded
    for _ in range(2):  # &amp;lt; is two layers
        if "&" not in text:
            break
        decoded = _html_decode(text, budget)
        if decoded == text:
            break
        text = decoded
    if "\\" in text:
        percents = text.count("%")
        text = _js_decode(text, budget)
        if text.count("%") > percents:  # \x25 spelled a percent: the escape it starts is decoded
            text = _percent_decode(text, budget)
    if text.isascii():
        data = text.encode("ascii")
        return Decoded(text if b"\x00" not in data else None, budget[0] < 0, data=data.replace(b"\x00", b""))
    # Characters that need work beyond Latin-1: full-width ASCII (long texts), look-alike dots and
    # slashes, invisible characters. Whether there are any is asked of the str in one search for
    # all of them (a search of the UTF-8 bytes for their lead byte stops at every replacement
    # character of invalid input, which shares it); the replacing is done on the UTF-8 bytes (one
    # byte a character, where the str may have four).
    try:
        text.encode("latin-1")
        wide = False
    except UnicodeEncodeError:
        wide = _WIDE_WORK.search(text) is not None
    # NFKC costs about a microsecond a character: past the limit, full-width ASCII only.
    nfkc = len(text) <= NFKC_MAX_CHARS
    if nfkc and not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
        wide = True  # the normalized text is looked at again below
    data = utf8(text)
    if not nfkc and wide and (b"\xef\xbc" in data or b"\xef\xbd" in data):
        data = _budgeted_sub(_FULL_WIDTH, _half_width, data, budget, flag=False)
    if wide and any(c in text for c in _SPECIAL_WIDE):
        for lookalike, plain in _LOOKALIKES:
            if lookalike in data:
                data = data.replace(lookalike, plain)
        for invisible in _INVISIBLE:
            if invisible in data:
                data = data.replace(invisible, b"")
    else:
        if "\xad" in text:
            data = data.replace(b"\xc2\xad", b"")
        if "\x00" in text:
            data = data.replace(b"\x00", b"")
    # The text as a str only when asked for (then from the bytes, which may differ from it).
    return Decoded(None, budget[0] < 0, data=data)


def _iis_bytes(match: re.Match[bytes]) -> bytes:
    return chr(int(match.group(1), 16)).encode("utf-8", "surrogatepass")


def _percent_decode(text: str, budget: list[int], raw: bytes | None = None) -> str:
    # binascii's quoted-printable decoder undoes =XX at C speed: spell every '%XX' as '=XX' (a
    # literal '=' as '=3D'), after making the '%' that start no escape literal.
    # The escapes are ASCII: the same on the text's UTF-8 as on the text.
    if raw is None:
        raw = text.encode("utf-8", "surrogatepass")
    if b"%u" in raw or b"%U" in raw:
        raw = _budgeted_sub(_IIS_ESCAPE_BYTES, _iis_bytes, raw, budget)
    if _BAD_PERCENT_BYTES.search(raw) is not None:
        raw = _BAD_PERCENT_BYTES.sub(b"%25", raw)
    decoded = binascii.a2b_qp(raw.replace(b"=", b"=3D").replace(b"%", b"="))
    if b"\xc0" in decoded or b"\xc1" in decoded or b"\xe0\x80" in decoded:
        # One search for all of them (a replace per form would scan the whole text ten times, and
        # random bytes hold these lead bytes everywhere), budgeted like every per-escape step.
        decoded = _budgeted_sub(_OVERLONG_FORM, _plain_of_overlong, decoded, budget)  # type: ignore[arg-type]
    return decoded.decode("utf-8", "replace")


def _html_decode(text: str, budget: list[int]) -> str:
    # Which of the common named entities occur: one search for '&' (a literal prefix the engine
    # skips to) instead of a scan of the whole text per entity; then one replace per entity found,
    # in the table's order (&amp; last: "&amp;lt;" is one layer per round).
    present = set(_NAMED_ENTITY.findall(text))
    if present:
        for entity, char in _NAMED_ENTITIES:
            if entity in present:
                text = text.replace(entity, char)
    if "&#" in text:
        text = _budgeted_sub(_NUMERIC_ENTITY, _entity_char, text, budget)
    elif "&" in text and ";" in text and text.count("&") <= HTML_FALLBACK_MAX:
        # Rarer named entities (&Tab; &NewLine; ...): the standard library's table, for a text with
        # few '&' (its decoder calls back into Python for every one).
        text = html.unescape(text)
    return text


def _entity_char(match: re.Match[str]) -> str:
    entity = match.group()
    char = _ENTITY_CHARS.get(entity)
    if char is None:
        code = int(match.group(1), 16) if match.group(1) else int(match.group(2))
        char = chr(code) if 0 < code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else "\ufffd"
        if len(_ENTITY_CHARS) < 4096:
            _ENTITY_CHARS[entity] = char
    return char


#: Numeric entities already decoded (the same few come back: &#39; &#x3C; &#8217;). Bounded.
_ENTITY_CHARS: dict[str, str] = {}


def _js_decode(text: str, budget: list[int]) -> str:
    if "\\u{" in text:
        text = _budgeted_sub(_JS_BRACED, lambda m: chr(min(int(m.group(1), 16), 0x10FFFF)), text, budget)
    if len(text) > NFKC_MAX_CHARS and not text.isascii():
        # The codec below reads Latin-1 bytes: every other character is spelt as an escape first, a
        # cost per character that a long non-Latin text (or random bytes) makes milliseconds. Past
        # the limit, the escapes that spell characters (\xHH, \uHHHH) only, as for a malformed text.
        try:
            text.encode("latin-1")
        except UnicodeEncodeError:
            return _budgeted_sub(_JS_ESCAPE, _js_char, text, budget)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown escapes such as \q stay as they are
            return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:  # a truncated escape somewhere: decode the well-formed ones only
        return _budgeted_sub(_JS_ESCAPE, _js_char, text, budget)


_JS_ESCAPE = re.compile(r"\\(?:x([0-9A-Fa-f]{2})|u([0-9A-Fa-f]{4}))")


def _js_char(match: re.Match[str]) -> str:
    code = int(match.group(1) or match.group(2), 16)
    return chr(code) if not 0xD800 <= code <= 0xDFFF else "\ufffd"


def _budgeted_sub(pattern: re.Pattern[AnyStr], replace: object, text: AnyStr, budget: list[int], *,
                  flag: bool = True) -> AnyStr:  # fmt: skip
    """``pattern.sub`` for at most what is left of the budget; running out marks the budget spent
    (an evasion, unless ``flag`` is false: then the rest is only left as it is)."""
    if budget[0] <= 0:
        if flag:
            budget[0] = -1
        return text
    count = budget[0]
    result, made = pattern.subn(replace, text, count=count)  # type: ignore[call-overload]
    budget[0] -= made
    if made >= count and flag:
        budget[0] = -1
    return result  # type: ignore[no-any-return]


# --- the extra forms some detectors match besides the decoded text ------------------------------
#
# They work on the UTF-8 bytes the matcher reads (the decoded text is encoded once): byte operations
# are C loops over one byte a character, where the same on a str that holds one non-Latin character
# is a loop over two or four. The str functions are the same operations for callers that hold text.

_COMMENT_BUDGET = 256
_VERSIONED = re.compile(rb"/\*!\d{0,6}")


def sql_form_bytes(data: bytes) -> tuple[bytes, bool]:
    """SQL comments out of the way: ``union/**/select`` and ``union/*!50000select*/`` read as
    ``union select``. The first 256 comments are removed with their content, and the form ends
    there: past that many comments the text is not data, which the second value says (an evasion),
    and what follows was matched as it is. Returns ``data`` itself when there is no comment."""
    # One split finds every comment (up to the budget): no search, count or search for a
    # versioned comment of its own (each a pass over a text that may be 192 KiB of UTF-8).
    pieces = data.split(b"/*", _COMMENT_BUDGET + 1)
    if len(pieces) == 1:
        return data, False
    # More than the budget: versioned comments count too (see lookups_over_budget).
    over = len(pieces) > _COMMENT_BUDGET + 1
    # Versioned comments (known from the pieces, unless there are too many to have them all).
    if (over or any(piece[:1] == b"!" for piece in pieces[1:])) and b"/*!" in data:
        data = _VERSIONED.sub(b" ", data)
        pieces = data.split(b"/*", _COMMENT_BUDGET + 1)
    if len(pieces) > _COMMENT_BUDGET + 1:
        pieces.pop()
    out = [pieces[0]]
    for piece in pieces[1:]:
        end = piece.find(b"*/")
        out.append(b" " + (piece[end + 2 :] if end >= 0 else piece))
    return b"".join(out).replace(b"*/", b" "), over


_IFS = re.compile(rb"\$\{ifs\}|\$ifs", re.IGNORECASE)
_POSITIONAL = re.compile(rb"\$[0-9@*]")
_SHELL_QUOTING = b"\\'\"^"


def cmd_form_bytes(data: bytes) -> bytes:
    """Shell quoting and field-separator tricks undone: ``c'a't /e\\tc/pa""sswd`` and
    ``cat${IFS}/etc/passwd`` read as ``cat /etc/passwd``."""
    if b"$" in data:
        # $IFS is a space; $@, $* and positional parameters are empty in an injected command.
        data = _POSITIONAL.sub(b"", _IFS.sub(b" ", data))
    return data.translate(None, _SHELL_QUOTING)


_INNER_LOOKUP = re.compile(rb"\$\{([^${}]{0,256})\}")
#: Log4j lookups that read something: without a default they resolve to an unknown value.
_LOOKUP_NAMES = frozenset({
    b"env", b"sys", b"java", b"ctx", b"main", b"date", b"map", b"sd", b"bundle", b"docker", b"k8s", b"kubernetes",
    b"spring", b"web", b"log4j", b"marker", b"jvmrunargs", b"event", b"base64", b"lower", b"upper", b"jndi",
    b"hostname",
})  # fmt: skip
#: What a resolved ``${jndi:...}`` leaves behind, so later rounds cannot resolve it away.
JNDI_MARK = "\ue000jndi:"
_JNDI_MARK = JNDI_MARK.encode("utf-8")
_FROZEN_OPEN, _FROZEN_CLOSE = "\ue001".encode("utf-8"), "\ue002".encode("utf-8")


def lookup_form_bytes(data: bytes, count: int | None = None) -> tuple[bytes, bool]:
    """Log4j lookups resolved from the inside out, as Log4j would: ``${lower:J}`` is ``j``,
    ``${::-j}`` and ``${env:X:-j}`` are ``j`` (their default), other known lookups an unknown value,
    unknown names stay literal. ``${${lower:j}ndi:`` becomes a ``${jndi:`` and is marked. Returns
    the result and whether the budget ran out (an evasion). ``count``: ``data.count(b"${")`` when
    the caller knows it (a pass over the text less)."""
    if count is None:
        count = data.count(b"${")
    if not count:
        return data, False
    if count > LOOKUP_BUDGET:  # not a value a logger would see as data: say so, resolve nothing
        return data, True
    budget = [LOOKUP_BUDGET]
    for _ in range(8):
        if b"${" not in data or budget[0] <= 0:
            break
        resolved = _budgeted_sub(_INNER_LOOKUP, _resolve, data, budget)
        if resolved == data:
            break
        data = resolved
    if b"\xee\x80" in data:  # the lead bytes of both marks: one search for them
        data = data.replace(_FROZEN_OPEN, b"${").replace(_FROZEN_CLOSE, b"}")
    return data, budget[0] < 0


def _resolve(match: re.Match[bytes]) -> bytes:
    body = match.group(1)
    name, colon, argument = body.partition(b":")
    name = name.strip().lower()
    if name == b"jndi" and colon:
        return _JNDI_MARK + argument
    if b":-" in body:
        return body.split(b":-", 1)[1]
    if name == b"lower" or name == b"upper":
        return argument.lower()  # upper too: rules match case-insensitively anyway
    if name == b"date" and len(argument) >= 2 and argument[:1] == argument[-1:] == b"'":
        return argument[1:-1]  # a quoted literal in a date pattern prints as itself
    if name in _LOOKUP_NAMES and colon:
        return b""
    return _FROZEN_OPEN + body + _FROZEN_CLOSE


def lookups_over_budget(data: bytes) -> tuple[bool, int | None]:
    """Whether making the extra forms of ``data`` would run out of a budget (more SQL comments or
    lookups than they resolve): known from two counts, before any form is made. With it, the number
    of lookups when it was counted (for :func:`lookup_form_bytes`)."""
    if data.count(b"/*") > _COMMENT_BUDGET:
        return True, None
    lookups = data.count(b"${")
    return lookups > LOOKUP_BUDGET, lookups


def _as_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _as_text(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


def sql_form(text: str) -> str:
    """:func:`sql_form_bytes` of a text."""
    return text if "/*" not in text else _as_text(sql_form_bytes(_as_bytes(text))[0])


def cmd_form(text: str) -> str:
    """:func:`cmd_form_bytes` of a text."""
    return _as_text(cmd_form_bytes(_as_bytes(text)))


def lookup_form(text: str) -> Decoded:
    """:func:`lookup_form_bytes` of a text."""
    if "${" not in text:
        return Decoded(text)
    data, over = lookup_form_bytes(_as_bytes(text))
    return Decoded(_as_text(data), over)
