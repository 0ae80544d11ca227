"""Reloads redo only what changed, and what they reuse is right: a changed file is compiled again, an
unchanged one is not, a change in a file a policy reads is seen, a removed file's policies go, and a
broken file refuses the whole set while the last good one keeps serving."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest

from extauthz.checks import kinds
from extauthz.policy import PolicySetError, Services
from extauthz.policy import loader as loader_module
from extauthz.policy.loader import FileState, PolicyLoader, PolicyWatcher

ALLOW = "rules:\n  - {name: all, decision: allow}"
DENY = "rules:\n  - {name: none, decision: deny}"
HMAC_POLICY = """
identity:
  - name: users
    jwt:
      issuer: https://idp.example.com
      audiences: [api]
      algorithms: [HS256]
      secretFile: hmac.key
rules:
  - {name: all, decision: allow}
"""


def _settled(path: Path) -> None:
    """Date a file a minute back: one just written is read again at every load (see RACY_NS)."""
    past = os.stat(path).st_mtime_ns - 60 * 10**9
    os.utime(path, ns=(past, past))


def _replace(path: Path, text: str) -> None:
    """Write beside it and rename over it (a new inode, as editors and ConfigMaps do), settled."""
    fresh = path.with_name(".tmp-" + path.name)
    fresh.write_text(text)
    _settled(fresh)
    os.replace(fresh, path)


def _by_name(policy_set) -> dict:
    return {p.name: p for p in policy_set.policies}


@pytest.fixture
def three(policy_dir, policy_yaml) -> Path:
    folder = policy_dir(**{
        "a.yaml": policy_yaml("a", f"match: {{hosts: [a.test]}}\n{ALLOW}"),
        "b.yaml": policy_yaml("b", f"match: {{hosts: [b.test]}}\n{ALLOW}"),
        "c.yaml": policy_yaml("c", f"match: {{hosts: [c.test]}}\n{ALLOW}"),
    })
    for path in folder.iterdir():
        _settled(path)
    return folder


def test_an_unchanged_file_is_reused_and_a_changed_one_compiled_again(three, policy_yaml) -> None:
    loader = PolicyLoader(three)
    first = _by_name(loader.load())
    assert (loader.last_stats.read, loader.last_stats.parsed, loader.last_stats.reused) == (3, 3, 0)
    _replace(three / "b.yaml", policy_yaml("b", f"match: {{hosts: [b.test]}}\n{DENY}"))
    second_set = loader.load()
    second = _by_name(second_set)
    assert (loader.last_stats.read, loader.last_stats.parsed, loader.last_stats.reused) == (1, 1, 2)
    assert second["a"] is first["a"] and second["c"] is first["c"]
    assert second["b"] is not first["b"]
    assert second_set.select("b.test", "/", "GET").checks[0].rules[0].decision == "deny"
    # Nothing changed: nothing read, nothing compiled.
    loader.load()
    assert (loader.last_stats.read, loader.last_stats.parsed, loader.last_stats.reused) == (0, 0, 3)


def test_a_file_rewritten_with_the_same_bytes_is_read_but_not_parsed(three) -> None:
    loader = PolicyLoader(three)
    first = _by_name(loader.load())
    text = (three / "a.yaml").read_text()
    _replace(three / "a.yaml", text)  # a new inode, the same bytes
    second = _by_name(loader.load())
    assert (loader.last_stats.read, loader.last_stats.parsed, loader.last_stats.reused) == (1, 0, 3)
    assert second["a"] is first["a"]


def test_a_removed_files_policies_disappear_and_come_back_compiled(three, policy_yaml) -> None:
    loader = PolicyLoader(three)
    first = _by_name(loader.load())
    text = (three / "c.yaml").read_text()
    (three / "c.yaml").unlink()
    policy_set = loader.load()
    assert sorted(_by_name(policy_set)) == ["a", "b"]
    assert policy_set.select("c.test", "/", "GET") is None
    assert policy_set.files == ("a.yaml", "b.yaml")
    (three / "c.yaml").write_text(text)
    again = _by_name(loader.load())
    assert again["c"] is not first["c"] and again["a"] is first["a"]


def test_a_renamed_file_is_compiled_under_its_new_name(three) -> None:
    loader = PolicyLoader(three)
    loader.load()
    os.rename(three / "a.yaml", three / "z.yaml")
    policy = _by_name(loader.load())["a"]
    assert policy.file == "z.yaml"


def test_an_error_in_one_file_refuses_the_set_and_the_fix_reuses_the_rest(three, policy_yaml) -> None:
    loader = PolicyLoader(three)
    first = _by_name(loader.load())
    _replace(three / "b.yaml", policy_yaml("b", "rules:\n  - {name: r, decision: maybe}"))
    with pytest.raises(PolicySetError) as info:
        loader.load()
    assert [e.file for e in info.value.errors] == ["b.yaml"]
    assert "spec.rules[0].decision" in str(info.value)
    _replace(three / "b.yaml", policy_yaml("b", f"match: {{hosts: [b.test]}}\n{DENY}"))
    fixed = _by_name(loader.load())
    assert fixed["a"] is first["a"] and fixed["c"] is first["c"]
    assert loader.last_stats.reused == 2


def test_set_wide_errors_are_checked_at_every_load(three, policy_yaml) -> None:
    """A new file may clash with unchanged ones (a name, a tie): reuse never skips those checks."""
    loader = PolicyLoader(three)
    loader.load()
    (three / "d.yaml").write_text(policy_yaml("a", "match: {hosts: [d.test]}"))
    with pytest.raises(PolicySetError, match="duplicate policy name"):
        loader.load()
    _replace(three / "d.yaml", policy_yaml("d", "match: {hosts: [a.test]}"))
    with pytest.raises(PolicySetError, match="ties with policy 'a'"):
        loader.load()
    (three / "d.yaml").unlink()
    assert sorted(_by_name(loader.load())) == ["a", "b", "c"]


def test_a_change_in_a_file_a_policy_reads_is_seen(policy_dir, policy_yaml) -> None:
    """The HMAC secret is long enough at first; shortened, it must fail the policy at the next load
    even though the policy's own file did not change (a reused policy would hide that)."""
    folder = policy_dir(**{"jwt.yaml": policy_yaml("jwt", HMAC_POLICY),
                           "other.yaml": policy_yaml("other", f"match: {{hosts: [o.test]}}\n{ALLOW}")})
    (folder / "hmac.key").write_bytes(b"s" * 40)
    loader = PolicyLoader(folder, Services())
    first = _by_name(loader.load())
    assert loader.last_stats.reused == 0
    # Unchanged secret: reused.
    loader.load()
    assert loader.last_stats.reused == 2
    _replace(folder / "hmac.key", "short")
    with pytest.raises(PolicySetError, match="at least 32 bytes") as info:
        loader.load()
    assert [e.file for e in info.value.errors] == ["jwt.yaml"]
    _replace(folder / "hmac.key", "t" * 40)
    again = _by_name(loader.load())
    assert again["jwt"] is not first["jwt"] and again["other"] is first["other"]


def test_a_policy_reading_a_folder_is_compiled_again_when_the_folder_changes(policy_dir, policy_yaml) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    folder = policy_dir()
    keys = folder.parent / "keys"
    keys.mkdir()

    def add_key(key_id: str) -> None:
        public = ed25519.Ed25519PrivateKey.generate().public_key()
        (keys / f"{key_id}.pem").write_bytes(public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))

    add_key("k1")
    spec = f"signature:\n  keys: {{folder: {keys}, ids: [k1]}}\n{ALLOW}"
    (folder / "signed.yaml").write_text(policy_yaml("signed", spec))
    (folder / "other.yaml").write_text(policy_yaml("other", f"match: {{hosts: [o.test]}}\n{ALLOW}"))
    for path in folder.iterdir():
        _settled(path)
    loader = PolicyLoader(folder, Services())
    first = _by_name(loader.load())
    loader.load()
    assert loader.last_stats.reused == 2
    add_key("k2")
    second = _by_name(loader.load())
    assert loader.last_stats.reused == 1
    assert second["signed"] is not first["signed"] and second["other"] is first["other"]


def test_a_policy_that_is_not_reusable_is_compiled_at_every_load(three, monkeypatch) -> None:
    """A check whose compile depends on more than its document and files says so."""
    rules_kind = kinds()["rules"]

    def from_spec(spec, build):
        if build.policy_name == "b":
            build.not_reusable()
        return rules_kind.from_spec(spec, build)

    monkeypatch.setitem(kinds(), "rules", dataclasses.replace(rules_kind, from_spec=from_spec))
    loader = PolicyLoader(three)
    first = _by_name(loader.load())
    second = _by_name(loader.load())
    assert loader.last_stats.reused == 2
    assert second["b"] is not first["b"] and second["a"] is first["a"]


def test_a_racy_file_is_read_again_although_its_scan_looks_the_same(three, policy_yaml, monkeypatch) -> None:
    """A second write within one tick of the file system's clock can leave size and times as they
    were: a file modified shortly before it was read is read again at the next load."""
    path = three / "a.yaml"
    for guard in (True, False):
        if not guard:
            monkeypatch.setattr(loader_module, "RACY_NS", 0)
        path.write_text(policy_yaml("a", f"match: {{hosts: [a.test]}}\n{ALLOW}"))  # just written: racy
        loader = PolicyLoader(three)
        stale = loader.scan()
        loader.load(stale)
        path.write_text(policy_yaml("a", f"match: {{hosts: [a.test]}}\n{DENY}"))
        # Hand the loader the old scan, as if the file system had not recorded the second write.
        decision = loader.load(stale).select("a.test", "/", "GET").checks[0].rules[0].decision
        assert decision == ("deny" if guard else "allow")


def test_scan_lists_what_policy_files_lists(tmp_path: Path, policy_yaml) -> None:
    folder = tmp_path / "p"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    for name in ("b.yaml", "a.yml", "sub/c.yaml", "sub/deeper/d.yaml", ".hidden/e.yaml", "notes.txt", ".f.yaml"):
        (folder / name).write_text(policy_yaml("x", "rules: []"))
    (folder / "mounted.yaml").mkdir()
    os.symlink(folder / "a.yml", folder / "link.yaml")
    os.symlink(folder, folder / "sub" / "loop")  # a cycle is walked once
    scan = loader_module.scan_folder(folder)
    assert [s.label for s in scan] == ["a.yml", "b.yaml", "link.yaml", "mounted.yaml", "sub/c.yaml",
                                       "sub/deeper/d.yaml"]
    os.unlink(folder / "sub" / "loop")  # policy_files would walk the cycle for ever
    assert [s.label for s in scan] == [p.relative_to(folder).as_posix() for p in loader_module.policy_files(folder)]
    assert next(s for s in scan if s.label == "mounted.yaml").stat == ("folder",)
    assert next(s for s in scan if s.label == "link.yaml").stat[0] == str(folder / "a.yml")
    assert all(isinstance(s, FileState) for s in scan)


def test_the_watcher_reloads_only_the_changed_file(three, policy_yaml) -> None:
    loader = PolicyLoader(three)
    loader.load()
    sets: list = []
    rejections: list = []
    watcher = PolicyWatcher(three, loader.services, sets.append, rejections.append, interval=0.05, loader=loader)
    watcher.mark_loaded()
    assert asyncio.run(watcher.poll_once()) is None
    _replace(three / "a.yaml", policy_yaml("a", f"match: {{hosts: [a.test]}}\n{DENY}"))
    assert asyncio.run(watcher.poll_once()) is True
    assert (loader.last_stats.read, loader.last_stats.parsed, loader.last_stats.reused) == (1, 1, 2)
    _replace(three / "a.yaml", "apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: a}\nspec: [\n")
    assert asyncio.run(watcher.poll_once()) is False
    assert len(sets) == 1 and "a.yaml" in str(rejections[0])


def test_a_change_made_between_the_first_load_and_the_watch_is_seen(three, policy_yaml) -> None:
    loader = PolicyLoader(three)
    loader.load()
    _replace(three / "a.yaml", policy_yaml("a", f"match: {{hosts: [a.test]}}\n{DENY}"))
    sets: list = []
    watcher = PolicyWatcher(three, loader.services, sets.append, print, interval=0.05, loader=loader)
    watcher.mark_loaded()
    assert asyncio.run(watcher.poll_once()) is True
