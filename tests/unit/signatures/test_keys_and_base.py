"""Key folders (formats, metadata, refusals, reload) and signature-base derivations."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import rfc9421_vectors as rfc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.signatures.base import (
    ComponentError,
    CoveredComponents,
    Message,
    _lines_step_by_step,
    covered_components,
    signature_base,
)
from extauthz.signatures.keys import KeyFolder, load_key_set
from extauthz.signatures.sf import Item, StructuredFieldError, Token, parse_dictionary


def test_rfc_keys_load_with_algorithms_and_owner(rfc_key_folder: Path) -> None:
    keys = load_key_set(rfc_key_folder)
    assert keys.errors == ()
    assert {k.key_id: k.algorithm_name for k in keys} == {
        "test-key-rsa-pss": "rsa-pss-sha512", "test-key-rsa": "rsa-v1_5-sha256",
        "test-key-ecc-p256": "ecdsa-p256-sha256", "test-key-ed25519": "ed25519",
        "test-shared-secret": "hmac-sha256",
    }
    assert keys.get("test-key-rsa-pss").owner == "partner-pss"
    assert "material" not in repr(keys.get("test-shared-secret"))


def test_unusable_files_are_reported_and_left_out(tmp_path: Path) -> None:
    weak = rsa.generate_private_key(65537, 1024).public_key()
    p521 = ec.generate_private_key(ec.SECP521R1()).public_key()
    pem = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    (tmp_path / "no-alg.pem").write_text(rfc.TEST_KEY_RSA_PSS_PUBLIC_PEM)
    (tmp_path / "weak.pem").write_bytes(weak.public_bytes(*pem))
    (tmp_path / "p521.pem").write_bytes(p521.public_bytes(*pem))
    (tmp_path / "private.pem").write_text(rfc.TEST_KEY_ED25519_PRIVATE_PEM)
    (tmp_path / "short.secret").write_bytes(b"tooshort")
    (tmp_path / "broken.json").write_text("{nope")
    (tmp_path / "set.jwks").write_text(json.dumps({"keys": [rfc.TEST_KEY_ED25519_JWK, {"kty": "oct", "k": "AA"}]}))
    (tmp_path / "keys.yaml").write_text("weak: {algorithm: rsa-v1_5-sha256}\nghost: {owner: x}\n")
    keys = load_key_set(tmp_path)
    assert len(keys) == 0
    text = "\n".join(keys.errors)
    for expected in ("must declare its algorithm", "1024 bits", "secp521r1", "private key", "8 bytes",
                     "not valid JSON", "needs a 'kid'", "ghost"):
        assert expected in text, expected


def test_jwk_set_and_conflicting_metadata(tmp_path: Path) -> None:
    (tmp_path / "set.jwks").write_text(json.dumps({"keys": [
        {**rfc.TEST_KEY_ED25519_JWK, "owner": "alice"},
        {**rfc.TEST_KEY_RSA_PSS_JWK, "alg": "PS512"},
    ]}))
    (tmp_path / "keys.yaml").write_text("test-key-rsa-pss: {algorithm: rsa-v1_5-sha256}\n")
    keys = load_key_set(tmp_path)
    assert keys.get("test-key-ed25519").owner == "alice"
    assert keys.get("test-key-rsa-pss") is None and "PS512" in keys.errors[0]


def test_key_folder_reloads_added_rotated_and_removed_keys(tmp_path: Path) -> None:
    (tmp_path / "a.secret").write_bytes(b"A" * 32)
    folder = KeyFolder(tmp_path, interval=0.05)
    assert [k.key_id for k in folder.keys] == ["a"]

    async def scenario() -> None:
        assert await folder.reload_if_changed() is False
        (tmp_path / "b.secret").write_bytes(b"B" * 32)
        assert await folder.reload_if_changed() is True
        assert sorted(k.key_id for k in folder.keys) == ["a", "b"]
        (tmp_path / "a.secret").unlink()  # revocation
        await folder.start()
        for _ in range(100):
            if folder.keys.get("a") is None:
                break
            await asyncio.sleep(0.02)
        assert folder.keys.get("a") is None and folder.keys.get("b") is not None
        await folder.aclose()

    asyncio.run(scenario())


def test_unreadable_folder_keeps_the_last_keys(tmp_path: Path) -> None:
    folder_path = tmp_path / "k"
    folder_path.mkdir()
    (folder_path / "a.secret").write_bytes(b"A" * 32)
    folder = KeyFolder(folder_path)
    (folder_path / "a.secret").unlink()
    folder_path.rmdir()
    assert asyncio.run(folder.reload_if_changed()) is False
    assert folder.keys.get("a") is not None


# --- signature base derivations ----------------------------------------------------------------------------------

MSG = Message(method="GET", scheme="https", authority="WWW.Example.com:443",
              target="/parameters?var=this%20is%20a%20big%0Amultiline%20value&bar=with+plus+whitespace"
                     "&fa%C3%A7ade%22%3A%20=something&dup=1&dup=2&empty=",
              fields={"example-dict": " a=1,    b=2;x=1;y=2,   c=(a   b   c), d", "x-empty": "",
                      "x-ows": "  padded  "})


def _base(covered: str, message: Message = MSG) -> str:
    ((_, inner),) = parse_dictionary(f"s=({covered});created=1")
    return signature_base(message, inner).decode().rsplit("\n", 1)[0]  # type: ignore[arg-type]


def test_derived_components() -> None:
    assert _base('"@authority" "@scheme" "@method" "@path"') == (
        '"@authority": www.example.com\n"@scheme": https\n"@method": GET\n"@path": /parameters')
    assert _base('"@target-uri"').startswith('"@target-uri": https://www.example.com/parameters?var=')
    assert _base('"@request-target"') == f'"@request-target": {MSG.target}'
    assert _base('"@query"', Message(target="/x")) == '"@query": ?'
    assert _base('"@path"', Message(target="")) == '"@path": /'
    # RFC 9421 2.2.8 examples: decode, then re-encode with %20 for spaces.
    assert _base('"@query-param";name="var" "@query-param";name="bar" "@query-param";name="fa%C3%A7ade%22%3A%20"') == (
        '"@query-param";name="var": this%20is%20a%20big%0Amultiline%20value\n'
        '"@query-param";name="bar": with%20plus%20whitespace\n'
        '"@query-param";name="fa%C3%A7ade%22%3A%20": something')
    assert _base('"@query-param";name="empty"') == '"@query-param";name="empty": '
    assert _base('"@authority"', Message(scheme="http", authority="h:8080")) == '"@authority": h:8080'


def test_field_components_and_parameters() -> None:
    assert _base('"example-dict";sf') == '"example-dict";sf: a=1, b=2;x=1;y=2, c=(a b c), d'
    assert _base('"example-dict";key="c" "example-dict";key="d"') == (
        '"example-dict";key="c": (a b c)\n"example-dict";key="d": ?1')
    assert _base('"x-empty" "x-ows"') == '"x-empty": \n"x-ows": padded'
    assert _base('"x-ows";bs') == '"x-ows";bs: :cGFkZGVk:'
    lines = Message(fields={"x": "a,b"}, field_lines={"x": ("a", "b")})
    assert _base('"x"', lines) == '"x": a, b'


@pytest.mark.parametrize(("covered", "missing"), [
    ('"x-absent"', True),
    ('"@query-param";name="nope"', True),
    ('"example-dict";key="zz"', True),
    ('"@query-param";name="dup"', False),
    ('"@query-param"', False),
    ('"x-ows";sf', False),
    ('"x-ows";bs;sf', False),
    ('"x-ows";tr', False),
    ('"@method";req', False),
    ('"@status"', False),
    ('"@unknown"', False),
    ('"X-Upper"', False),
    ('"@signature-params"', False),
    ('"@method" "@method"', False),
    ('"x-ows";a;b "x-ows";b;a', False),
])
def test_component_errors(covered: str, missing: bool) -> None:
    with pytest.raises(ComponentError) as info:
        _base(covered)
    assert info.value.missing is missing


def test_non_ascii_and_line_breaks_are_refused() -> None:
    with pytest.raises(ComponentError):
        _base('"x"', Message(fields={"x": "caf\u00e9"}))
    assert _base('"x";bs', Message(fields={"x": "caf\u00e9"})) == '"x";bs: :Y2Fm6Q==:'


# --- compiled covered-components lists against the step-by-step reference ----------------------------------------

_NAMES = st.sampled_from([
    "@method", "@authority", "@scheme", "@target-uri", "@request-target", "@path", "@query", "@query-param",
    "@status", "@signature-params", "@nope", "example-dict", "x-empty", "x-ows", "x-absent", "x-lines", "x-break",
    "x-cafe", "X-Upper", "", "bad\x01",
])
_PARAMS = st.sampled_from([
    (), (("sf", True),), (("key", "a"),), (("key", "zz"),), (("key", 1),), (("bs", True),), (("req", True),),
    (("tr", True),), (("name", "var"),), (("name", "dup"),), (("name", "nope"),), (("name", 1),),
    (("bs", True), ("sf", True)), (("x", True), ("y", True)), (("y", True), ("x", True)),
])
_ITEMS = st.lists(st.builds(Item, st.one_of(_NAMES, _NAMES.map(Token), st.just(5)), _PARAMS), max_size=6).map(tuple)
_BASE_MESSAGE = MSG._replace(fields={**MSG.fields, "x-lines": "a,b", "x-break": "a\r\nb", "x-cafe": "caf\u00e9"},
                                    field_lines={"x-lines": (" a ", "b\t")})


def _lines_outcome(lines: Callable[[], list[str]]) -> tuple[object, ...]:
    try:
        return ("ok", lines())
    except ComponentError as exc:
        return ("component", str(exc), exc.missing)
    except StructuredFieldError as exc:
        return ("sf", str(exc))


@settings(max_examples=400, deadline=None)
@given(_ITEMS, st.sampled_from([_BASE_MESSAGE, Message(), Message(target="/x?dup=1&dup=2", status=200)]))
def test_compiled_components_give_what_the_reference_gives(items: tuple[Item, ...], message: Message) -> None:
    compiled = CoveredComponents.of(items)
    assert _lines_outcome(lambda: compiled.lines(message)) == _lines_outcome(
        lambda: _lines_step_by_step(message, items))
    assert compiled.keys == {(str(i.value), frozenset(i.params)) for i in items if type(i.value) is str}


def test_covered_components_are_compiled_once_per_items_tuple() -> None:
    ((_, inner),) = parse_dictionary('s=("@method" "@path");created=1')
    assert covered_components(inner.items) is covered_components(inner.items)  # type: ignore[union-attr]
    assert covered_components(inner.items).identifiers == ('"@method"', '"@path"')  # type: ignore[union-attr]


def test_a_yaml_bomb_in_the_key_metadata_is_reported_and_the_other_keys_load(tmp_path: Path, yaml_bomb) -> None:
    (tmp_path / "a.secret").write_bytes(b"A" * 32)
    (tmp_path / "keys.yaml").write_text("a: {owner: alice}\n" + yaml_bomb(levels=5))
    keys = load_key_set(tmp_path)
    assert [k.key_id for k in keys] == ["a"]
    assert keys.errors == ("keys.yaml:2: YAML anchors are not allowed (found &a); write the value out in full; "
                           "keys needing it are left out",)
