"""Reading a policy folder: every problem is reported with file, document, field and line."""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path

import pytest

from extauthz.policy import PolicySetError, Services, load_folder
from extauthz.policy.loader import PolicyWatcher, fingerprint, policy_files


def _errors(folder: Path) -> list[str]:
    with pytest.raises(PolicySetError) as info:
        load_folder(folder)
    return [str(e) for e in info.value.errors]


def test_loads_many_documents_per_file(policy_dir, policy_yaml) -> None:
    folder = policy_dir(**{"a.yaml": policy_yaml("one", "rules: []") + "---\n" + policy_yaml("two", "match: {paths: [/x]}")})
    policy_set = load_folder(folder)
    assert [p.name for p in policy_set.policies] == ["one", "two"]


def test_error_names_file_line_document_and_field(policy_dir, policy_yaml) -> None:
    text = policy_yaml("good", "rules: []") + "---\n" + policy_yaml(
        "bad",
        """
        rules:
          - name: r1
            decision: allow
          - name: r2
            decision: maybe
        """,
    )
    folder = policy_dir(**{"p.yaml": text})
    errors = _errors(folder)
    assert len(errors) == 1
    assert errors[0].startswith("p.yaml:17: document 2 (bad): spec.rules[1].decision: must be one of: allow, deny")


def test_every_error_is_reported_at_once(policy_dir, policy_yaml) -> None:
    folder = policy_dir(
        **{
            "a.yaml": policy_yaml("a", "mode: sometimes\nrules: [{name: x, decision: allow, when: 'request.methd == 1'}]"),
            "b.yaml": policy_yaml("b", "bogus: 1"),
            "c.yaml": "apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: c}\nspec: [\n",
        }
    )
    errors = "\n".join(_errors(folder))
    assert "a.yaml" in errors and "spec.mode: must be 'enforce' or 'dry-run'" in errors
    assert "unknown field 'methd' on request" in errors
    assert "b.yaml" in errors and "spec.bogus: unknown field" in errors
    assert "c.yaml" in errors and "invalid YAML" in errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("apiVersion: v1\nkind: AuthPolicy\nmetadata: {name: a}\nspec: {}\n", "apiVersion must be 'extauthz.dev/v1'"),
        ("apiVersion: extauthz.dev/v1\nkind: Nope\nmetadata: {name: a}\nspec: {}\n", "unknown kind 'Nope'"),
        ("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: A_B}\nspec: {}\n", "metadata.name: is required"),
        ("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: a}\n", "spec: is required"),
        ("- just\n- a list\n", "document must be a mapping"),
        ("apiVersion: extauthz.dev/v1\napiVersion: extauthz.dev/v1\n", "duplicate key"),
        ("a: [unclosed\n", "invalid YAML"),
        ("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: a}\nspec:\n  rules:\n    - {name: r, decision: allow, when: 'request.method ==' }\n", "invalid CEL"),
        ("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: a}\nspec:\n  rules:\n    - {name: r, decision: allow, when: '1 + 1'}\n", "expected bool"),
        ("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: a}\nspec:\n  rules:\n    - {name: r, decision: deny, status: 200}\n", "between 400 and 599"),
        ("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: a}\nspec:\n  rules:\n    - {name: r, decision: allow, status: 403}\n", "deny rules only"),
        ("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: a}\nspec:\n  rules:\n    - {name: r, decision: allow}\n    - {name: r, decision: allow}\n", "duplicate rule name"),
        ("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: a}\nspec:\n  match: {paths: ['admin']}\n", "exact path or a prefix"),
        ("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: a}\nspec:\n  match: {paths: ['/a/*/b']}\n", "exact path or a prefix"),
        ("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: a}\nspec:\n  match: {paths: ['/a//b']}\n", "not in normalized form"),
        ("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: a}\nspec:\n  match: {hosts: ['a.com:80']}\n", "no port"),
        ("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: a}\nspec:\n  match: {methods: [get]}\n", "upper-case HTTP method"),
        ("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: a}\nspec:\n  response: {headers: {':path': 'request.path'}}\n", "lower-case header name"),
        ("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: a}\nspec:\n  response: {headers: {x-a: 'nope('}}\n", "invalid CEL"),
    ],
)
def test_bad_documents(policy_dir, text: str, expected: str) -> None:
    errors = "\n".join(_errors(policy_dir(**{"p.yaml": text})))
    assert expected in errors


def test_duplicate_policy_names_across_files(policy_dir, policy_yaml) -> None:
    folder = policy_dir(**{"a.yaml": policy_yaml("same", "rules: []"), "b.yaml": policy_yaml("same", "match: {paths: [/b]}")})
    assert "duplicate policy name" in "\n".join(_errors(folder))


def test_invalid_utf8_and_huge_files_are_clear_errors(policy_dir) -> None:
    folder = policy_dir()
    (folder / "bin.yaml").write_bytes(b"kind: \xff\xfe\n")
    errors = "\n".join(_errors(folder))
    assert "bin.yaml" in errors and "not valid UTF-8" in errors


def test_missing_folder(tmp_path: Path) -> None:
    assert "does not exist" in "\n".join(_errors(tmp_path / "nope"))


def test_policy_tests_are_kept_apart(policy_dir, policy_yaml) -> None:
    test_doc = "apiVersion: extauthz.dev/v1\nkind: PolicyTest\nmetadata: {name: t}\nspec: {cases: []}\n"
    policy_set = load_folder(policy_dir(**{"a.yaml": policy_yaml("a", "rules: []"), "a_test.yaml": test_doc}))
    assert [p.name for p in policy_set.policies] == ["a"]
    assert [t.name for t in policy_set.tests] == ["t"]


def test_configmap_layout_is_read_through_symlinks(tmp_path: Path, policy_yaml) -> None:
    """Kubelet layout: ..2026_x/ holds files, ..data -> it, visible names -> ..data/name."""
    folder = tmp_path / "cm"
    folder.mkdir()
    stamp = folder / "..2026_11_22_00_00_00.000000001"
    stamp.mkdir()
    (stamp / "orders.yaml").write_text(policy_yaml("orders", "rules: []"))
    os.symlink(stamp.name, folder / "..data")
    os.symlink("..data/orders.yaml", folder / "orders.yaml")
    assert [p.name for p in policy_files(folder)] == ["orders.yaml"]
    assert [p.name for p in load_folder(folder).policies] == ["orders"]
    before = fingerprint(folder)
    stamp2 = folder / "..2026_11_22_00_00_01.000000002"
    stamp2.mkdir()
    (stamp2 / "orders.yaml").write_text(policy_yaml("orders2", "rules: []"))
    os.symlink(stamp2.name, folder / "..data_tmp")
    os.replace(folder / "..data_tmp", folder / "..data")
    assert fingerprint(folder) != before
    assert [p.name for p in load_folder(folder).policies] == ["orders2"]


def test_a_yaml_bomb_in_a_policy_or_policy_test_is_refused_naming_file_and_line(policy_dir, policy_yaml,
                                                                                yaml_bomb) -> None:
    bomb = textwrap.indent(yaml_bomb(levels=5), "  ")
    folder = policy_dir(**{
        "good.yaml": policy_yaml("good", "rules: []"),
        "bomb.yaml": policy_yaml("bomb", "x-laughs:\n" + bomb),
        "bomb_test.yaml": "apiVersion: extauthz.dev/v1\nkind: PolicyTest\nmetadata: {name: t}\nspec:\n" + bomb,
    })
    errors = _errors(folder)
    assert "bomb.yaml:7: document 1: YAML anchors are not allowed (found &a); write the value out in full" in errors
    assert "bomb_test.yaml:5: document 1: YAML anchors are not allowed (found &a); write the value out in full" in errors


@pytest.mark.parametrize("text", ["", "\n\n", "# orders policy: coming soon\n", "---\n", "---\n# nothing\n---\n", "~\n"])
def test_a_file_without_documents_is_an_error_not_zero_policies(policy_dir, policy_yaml, text: str) -> None:
    """A half-written ConfigMap update must not quietly remove the file's policies."""
    folder = policy_dir(**{"a.yaml": policy_yaml("a", "rules: []"), "orders.yaml": text})
    assert _errors(folder) == ["orders.yaml: document 0: holds no documents (empty, or only comments and '---'); "
                               "delete the file to remove its policies"]


def test_empty_documents_between_policies_are_fine(policy_dir, policy_yaml) -> None:
    text = "---\n" + policy_yaml("one", "rules: []") + "---\n---\n# gap\n" + policy_yaml("two", "match: {paths: [/x]}")
    assert [p.name for p in load_folder(policy_dir(**{"a.yaml": text})).policies] == ["one", "two"]


def test_a_folder_named_like_a_policy_file_is_an_error(policy_dir, policy_yaml) -> None:
    """What a container runtime leaves when it mounts a file that is missing; never walked."""
    folder = policy_dir(**{"a.yaml": policy_yaml("a", "rules: []")})
    (folder / "orders.yaml").mkdir()
    (folder / "orders.yaml" / "inner.yaml").write_text(policy_yaml("inner", "match: {paths: [/i]}"))
    (folder / "sub").mkdir()
    (folder / "sub" / "b.yml").write_text(policy_yaml("b", "match: {paths: [/b]}"))
    assert [p.relative_to(folder).as_posix() for p in policy_files(folder)] == ["a.yaml", "orders.yaml", "sub/b.yml"]
    errors = _errors(folder)
    assert len(errors) == 1 and errors[0].startswith("orders.yaml: document 0: is a folder, not a policy file")


def _watch(folder: Path, policy_sets: list, rejections: list) -> PolicyWatcher:
    watcher = PolicyWatcher(folder, Services(), policy_sets.append, rejections.append, interval=0.05)
    watcher.mark_loaded()
    return watcher


def _replace(path: Path, text: str) -> None:
    """Rewrite a file so that the watcher's fingerprint sees it (size, mtime or inode change)."""
    fresh = path.with_name(".tmp-" + path.name)
    fresh.write_text(text)
    os.replace(fresh, path)


@pytest.mark.parametrize("breakage", ["empty", "comments", "folder", "bomb"])
def test_the_watcher_keeps_the_last_good_set_when_a_file_breaks(policy_dir, policy_yaml, yaml_bomb,
                                                               breakage: str) -> None:
    folder = policy_dir(**{"orders.yaml": policy_yaml("orders", "rules: []"),
                           "users.yaml": policy_yaml("users", "match: {paths: [/users]}")})
    policy_sets: list = []
    rejections: list[PolicySetError] = []
    watcher = _watch(folder, policy_sets, rejections)
    if breakage == "folder":
        (folder / "users.yaml").unlink()
        (folder / "users.yaml").mkdir()
    else:
        text = {"empty": "", "comments": "# users: being rewritten\n", "bomb": yaml_bomb(levels=5)}[breakage]
        _replace(folder / "users.yaml", text)
    assert asyncio.run(watcher.poll_once()) is False
    assert policy_sets == [] and len(rejections) == 1
    assert str(rejections[0].errors[0]).startswith("users.yaml")
    # Deleting the file is how its policies go away.
    if breakage == "folder":
        (folder / "users.yaml").rmdir()
    else:
        (folder / "users.yaml").unlink()
    assert asyncio.run(watcher.poll_once()) is True
    assert [p.name for p in policy_sets[0].policies] == ["orders"]
