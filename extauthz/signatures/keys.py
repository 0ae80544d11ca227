"""Key folders: verification keys by ``keyid``, read from a mounted Secret and reloaded when it changes.

Folder layout (one level, dot-entries such as Kubernetes' ``..data`` skipped, symlinks followed):

``*.json`` / ``*.jwk`` / ``*.jwks``
    A JWK or a JWK Set. ``kid`` is the key id (the file name without extension when absent).
    Private members (``d``, ``p``, ...) are ignored: only the public half is kept. ``kty: oct`` is an
    HMAC secret. Optional members: ``alg`` (a registry name such as ``ed25519`` or a JOSE name such
    as ``EdDSA``), ``owner`` (who the key belongs to).
``*.pem``
    One public key (SubjectPublicKeyInfo or PKCS#1 ``RSA PUBLIC KEY``); the key id is the file name.
``*.secret``
    A shared HMAC secret, the file's raw bytes (one trailing newline dropped); id = file name.
``keys.yaml``
    Optional metadata by key id: ``{<keyid>: {algorithm: ..., owner: ...}}``. RSA keys need an
    algorithm here or in their JWK, because the same RSA key fits two algorithms.

A file that cannot be used is reported (and its keys left out); the others still load. The request
path never touches the disk: it reads the immutable :class:`KeySet` the watcher last swapped in.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from extauthz.safe_yaml import load_single
from extauthz.signatures.algorithms import KeyError_, VerificationKey, algorithm_for
from extauthz.watched import WatchedPath, visible_files

__all__ = ["KeyFolder", "KeySet", "load_key_set"]

log = logging.getLogger("extauthz.signatures.keys")

METADATA_FILE = "keys.yaml"
_JWK_SUFFIXES = (".json", ".jwk", ".jwks")
#: Larger files are not keys.
MAX_KEY_FILE_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class KeySet:
    """An immutable snapshot of a folder's usable keys."""

    keys: Mapping[str, VerificationKey] = field(default_factory=lambda: MappingProxyType({}))
    #: Problems found while loading (file: message); the keys they concern are absent.
    errors: tuple[str, ...] = ()

    def get(self, key_id: str) -> VerificationKey | None:
        return self.keys.get(key_id)

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[VerificationKey]:
        return iter(self.keys.values())


def _b64url(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise KeyError_(f"{what} must be a base64url string")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise KeyError_(f"{what} is not valid base64url") from None


def _int(value: Any, what: str) -> int:
    return int.from_bytes(_b64url(value, what), "big")


_CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}


def _public_from_jwk(jwk: Mapping[str, Any]) -> Any:
    """The public key (or secret bytes) of a JWK; private members are ignored."""
    kty = jwk.get("kty")
    if kty == "oct":
        return _b64url(jwk.get("k"), "k")
    if kty == "RSA":
        return rsa.RSAPublicNumbers(_int(jwk.get("e"), "e"), _int(jwk.get("n"), "n")).public_key()
    if kty == "EC":
        curve = _CURVES.get(str(jwk.get("crv")))
        if curve is None:
            raise KeyError_(f"EC curve {jwk.get('crv')!r} is not supported (P-256 and P-384 are)")
        try:
            return ec.EllipticCurvePublicNumbers(_int(jwk.get("x"), "x"), _int(jwk.get("y"), "y"), curve).public_key()
        except ValueError:
            raise KeyError_("EC point is not on the curve") from None
    if kty == "OKP":
        if jwk.get("crv") != "Ed25519":
            raise KeyError_(f"OKP curve {jwk.get('crv')!r} is not supported (Ed25519 is)")
        raw = _b64url(jwk.get("x"), "x")
        if len(raw) != 32:
            raise KeyError_("Ed25519 public key must be 32 bytes")
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    raise KeyError_(f"unsupported JWK kty {kty!r}")


def _public_from_pem(data: bytes) -> Any:
    if b"PRIVATE KEY" in data:
        raise KeyError_("contains a private key: mount only public keys where the sidecar can read them")
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyError_(f"not a PEM public key ({exc})") from None


@dataclass(slots=True)
class _Entry:
    key_id: str
    material: Any
    algorithm: str | None
    owner: str
    source: str


def _entries_of(path: Path) -> list[_Entry]:
    name = path.name
    data = path.read_bytes()
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyError_(f"larger than {MAX_KEY_FILE_BYTES} bytes")
    stem = name.rsplit(".", 1)[0]
    if name.endswith(_JWK_SUFFIXES):
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise KeyError_(f"not valid JSON ({exc})") from None
        if not isinstance(document, dict):
            raise KeyError_("must be a JWK object or a JWK Set")
        jwks = document.get("keys") if "keys" in document else [document]
        if not isinstance(jwks, list) or not all(isinstance(j, dict) for j in jwks):
            raise KeyError_("JWK Set 'keys' must be a list of objects")
        entries = []
        for jwk in jwks:
            kid = jwk.get("kid", stem if len(jwks) == 1 else None)
            if not isinstance(kid, str) or not kid:
                raise KeyError_("every key of a JWK Set needs a 'kid'")
            alg, owner = jwk.get("alg"), jwk.get("owner", "")
            if alg is not None and not isinstance(alg, str):
                raise KeyError_(f"{kid}: alg must be a string")
            if not isinstance(owner, str):
                raise KeyError_(f"{kid}: owner must be a string")
            try:
                material = _public_from_jwk(jwk)
            except KeyError_ as exc:
                raise KeyError_(f"{kid}: {exc}") from None
            entries.append(_Entry(kid, material, alg, owner, name))
        return entries
    if name.endswith(".pem"):
        return [_Entry(stem, _public_from_pem(data), None, "", name)]
    if name.endswith(".secret"):
        secret = data[:-1] if data.endswith(b"\n") else data
        secret = secret[:-1] if secret.endswith(b"\r") else secret
        return [_Entry(stem, secret, None, "", name)]
    return []


def _metadata(folder: Path, errors: list[str]) -> dict[str, dict[str, str]]:
    path = folder / METADATA_FILE
    if not path.exists():
        return {}
    try:
        document = load_single(path.read_bytes(), METADATA_FILE) or {}
    except OSError as exc:
        errors.append(f"{METADATA_FILE}: cannot be read ({exc.strerror}); keys needing it are left out")
        return {}
    except ValueError as exc:  # YamlInputError: "keys.yaml:<line>: <problem>"
        errors.append(f"{exc}; keys needing it are left out")
        return {}
    if not isinstance(document, dict):
        errors.append(f"{METADATA_FILE}: must be a mapping of key id to {{algorithm, owner}}")
        return {}
    result: dict[str, dict[str, str]] = {}
    for key_id, meta in document.items():
        if not isinstance(meta, dict) or set(meta) - {"algorithm", "owner"} or not all(
            isinstance(v, str) for v in meta.values()
        ):
            errors.append(f"{METADATA_FILE}: {key_id}: must be a mapping with 'algorithm' and/or 'owner' strings")
            continue
        result[str(key_id)] = meta
    return result


def key_files(folder: Path) -> list[Path]:
    """Visible regular files of the folder (symlinks followed, dot-entries skipped), sorted."""
    try:
        return visible_files(folder)
    except OSError:
        return []


def load_key_set(folder: Path) -> KeySet:
    """Read every key of ``folder`` (blocking: call at load time or from a thread)."""
    errors: list[str] = []
    if not folder.is_dir():
        return KeySet(errors=(f"{folder}: key folder does not exist or is not a folder",))
    metadata = _metadata(folder, errors)
    keys: dict[str, VerificationKey] = {}
    seen: set[str] = set()
    for path in key_files(folder):
        if path.name == METADATA_FILE:
            continue
        try:
            entries = _entries_of(path)
        except (OSError, KeyError_) as exc:
            errors.append(f"{path.name}: {exc}")
            continue
        for entry in entries:
            seen.add(entry.key_id)
            meta = metadata.get(entry.key_id, {})
            declared = meta.get("algorithm") or entry.algorithm
            if meta.get("algorithm") and entry.algorithm and meta["algorithm"] != entry.algorithm:
                errors.append(f"{path.name}: {entry.key_id}: {METADATA_FILE} says {meta['algorithm']}, "
                              f"the JWK says {entry.algorithm}")
                continue
            try:
                algorithm = algorithm_for(entry.material, declared)
            except KeyError_ as exc:
                errors.append(f"{path.name}: {entry.key_id}: {exc}")
                continue
            if entry.key_id in keys:
                first = keys[entry.key_id].source
                errors.append(f"{path.name}: key id {entry.key_id!r} is also in {first}; both left out")
                keys[entry.key_id] = VerificationKey(entry.key_id, algorithm, None, source="<duplicate>")
                continue
            owner = meta.get("owner") or entry.owner
            keys[entry.key_id] = VerificationKey(entry.key_id, algorithm, entry.material, owner, entry.source)
    usable = {k: v for k, v in keys.items() if v.material is not None}
    for key_id in metadata:
        if key_id not in seen:
            errors.append(f"{METADATA_FILE}: describes key {key_id!r}, which no file provides")
    return KeySet(MappingProxyType(usable), tuple(errors))


class KeyFolder:
    """A key folder shared by every policy that names it, reloaded in the background on change.

    Loaded once, synchronously, when first referenced (policy load time); after the server calls
    :meth:`start`, rotated, added and removed keys take effect without a restart. A removed file
    removes its keys (revocation); a folder that cannot be read at all keeps the last keys (a
    transient mount problem must not lock everyone out) and logs an error.
    """

    def __init__(self, folder: Path, interval: float = 2.0) -> None:
        self.folder = folder
        self._watched = WatchedPath(folder, self._load, what="key folder", interval=interval, on_change=self._report)
        self._watched.refresh()

    def _load(self, folder: Path) -> KeySet:
        if self._watched.value is not None and not folder.is_dir():
            raise OSError(errno.ENOENT, "the folder cannot be read; keeping the keys loaded before")
        return load_key_set(folder)

    def _report(self, key_set: KeySet) -> None:
        for error in key_set.errors:
            log.error("key folder %s: %s", self.folder, error)
        log.info("key folder %s: %d usable keys", self.folder, len(key_set))

    @property
    def keys(self) -> KeySet:
        return self._watched.value if self._watched.value is not None else KeySet()

    @property
    def started(self) -> bool:
        return self._watched.started

    async def reload_if_changed(self) -> bool:
        """Reload when the folder changed; True when a new key set was swapped in."""
        return await asyncio.to_thread(self._watched.refresh)

    async def start(self) -> None:
        if not self._watched.started:
            await self._watched.start()

    async def aclose(self) -> None:
        await self._watched.aclose()
