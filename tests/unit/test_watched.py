"""Watched files: a value read from several files (an OpenAPI spec and what it references) is
re-read when any of them changes."""

from __future__ import annotations

import time
from pathlib import Path

from extauthz.watched import WatchedPath


def test_related_files_are_watched_too(tmp_path: Path):
    main, other = tmp_path / "main.txt", tmp_path / "other.txt"
    main.write_text("other.txt")
    other.write_text("1")
    reads: list[str] = []
    read_files: list[Path] = []

    def parse(path: Path) -> str:
        read_files[:] = [path, path.parent / path.read_text()]
        value = (path.parent / path.read_text()).read_text()
        reads.append(value)
        return value

    watched = WatchedPath(main, parse, what="test", related=lambda: read_files)
    assert watched.refresh() and watched.value == "1"
    assert not watched.refresh()  # the files it read are covered now: no second read
    time.sleep(0.01)
    other.write_text("22")
    assert watched.refresh() and watched.value == "22"
    other.write_text("not used")
    (tmp_path / "third.txt").write_text("3")
    main.write_text("third.txt")
    assert watched.refresh() and watched.value == "3"
    assert reads == ["1", "22", "3"]


def test_a_failed_read_of_a_related_file_keeps_the_value_and_is_retried(tmp_path: Path):
    main, other = tmp_path / "main.txt", tmp_path / "other.txt"
    main.write_text("x")
    other.write_text("good")
    read_files: list[Path] = [main, other]

    def parse(path: Path) -> str:
        text = other.read_text()
        if text == "bad":
            raise ValueError("broken")
        return text

    watched = WatchedPath(main, parse, what="test", related=lambda: read_files)
    assert watched.refresh()
    time.sleep(0.01)
    other.write_text("bad")
    assert not watched.refresh() and watched.value == "good" and "broken" in watched.error
    other.write_text("fixed")
    assert watched.refresh() and watched.value == "fixed" and watched.error is None
