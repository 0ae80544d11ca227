"""The decode pipeline undoes each encoding an attacker layers, and stops within its budget."""

from __future__ import annotations

import pytest

from extauthz.inspection.decode import CALLBACK_BUDGET, JNDI_MARK, cmd_form, decode, lookup_form, sql_form


@pytest.mark.parametrize(
    ("encoded", "plain"),
    [
        ("%3Cscript%3E", "<script>"),
        ("%253Cscript%253E", "<script>"),  # double
        ("%25253c", "<"),  # triple
        ("%u003cscript", "<script"),  # IIS
        ("%c0%ae%c0%ae/", "../"),  # overlong UTF-8
        ("&lt;b&gt; &amp;amp; &#60;&#x3C;&#0000060", "<b> & <<<"),  # two layers of entities
        ("&amp;lpar;1&amp;rpar;", "(1)"),
        ("&dollar;&lbrace;x&rbrace;", "${x}"),
        ("\\u0024\\u007b\\x41\\u{42}", "${ab"),
        ("\uff33\uff25\uff2c\uff25\uff23\uff34", "select"),  # full-width, NFKC
        ("sel\u200bect\x00", "select"),  # invisible characters
        ("100% sure, 50%off, %zz", "100% sure, 50%off, %zz"),  # a '%' that starts no escape stays
        ("a=b&c=d", "a=b&c=d"),
    ],
)
def test_decode(encoded: str, plain: str) -> None:
    assert decode(encoded).text.lower() == plain


def test_decoding_stops_at_its_budget_and_says_so() -> None:
    flood = "&#60;" * (CALLBACK_BUDGET + 10)
    decoded = decode(flood)
    assert decoded.over_budget
    assert not decode("&#60;" * 10).over_budget


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        ("union/**/select", "union select"),
        ("union/*!50000select*/", "union select"),
        ("union/*comment*/all/**/select", "union all select"),
        ("/* unterminated", " unterminated"),
    ],
)
def test_sql_form(text: str, plain: str) -> None:
    assert " ".join(sql_form(text).split()) == " ".join(plain.split())


@pytest.mark.parametrize(
    ("text", "plain"),
    [("c'a't /e\"t\"c/pa\\ss\\wd", "cat /etc/passwd"), ("cat${ifs}/etc/passwd", "cat /etc/passwd"), ("w^h^o^a^m^i", "whoami")],
)
def test_cmd_form(text: str, plain: str) -> None:
    assert cmd_form(text).lower() == plain


@pytest.mark.parametrize(
    "text",
    [
        "${${lower:j}ndi:ldap://x}",
        "${${::-j}${::-n}${::-d}${::-i}:ldap://x}",
        "${${env:none:-j}ndi:ldap://x}",
        "${j${k8s:k5:-nd}i:ldap://x}",
        "${${date:'j'}ndi:ldap://x}",
        "${${upper:j}ndi:ldap://x}",
    ],
)
def test_lookups_resolve_to_jndi(text: str) -> None:
    assert JNDI_MARK in lookup_form(text).text


@pytest.mark.parametrize("text", ["${user.name}", "${a ? b : c}", "price: ${price}"])
def test_other_templates_stay_as_they_are(text: str) -> None:
    assert lookup_form(text).text == text
