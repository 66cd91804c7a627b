"""Inputs in the key (:mod:`runcache.run.inputs`): a warm snapshot of plain paths is kept
whole and checked by one ``lstat`` a path; anything that changes what they name must
still give another snapshot (or a refusal), never the one kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runcache.errors import BadRequest
from runcache.run.inputs import Inputs

PATHS = ["src/a.txt", "src/b.txt"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_bytes(b"a" * 100)
    (tmp_path / "src" / "b.txt").write_bytes(b"b" * 100)
    return tmp_path


def _warm(tree: Path) -> tuple[Inputs, bytes]:
    inputs = Inputs(100, 1 << 20)
    first = inputs.snapshot(str(tree), PATHS)
    again = inputs.snapshot(str(tree), PATHS, known_only=True)  # from the kept snapshot
    assert again == first
    return inputs, first.digest


def test_same_size_new_content_is_a_new_digest(tree: Path) -> None:
    inputs, before = _warm(tree)
    (tree / "src" / "b.txt").write_bytes(b"c" * 100)
    os.utime(tree / "src" / "b.txt", ns=(1, 1))  # a changed mtime, whatever the clock did
    assert inputs.snapshot(str(tree), PATHS).digest != before


def test_a_file_replaced_by_another_is_a_new_digest(tree: Path) -> None:
    inputs, before = _warm(tree)
    (tree / "new").write_bytes(b"z" * 100)
    os.replace(tree / "new", tree / "src" / "a.txt")  # another inode at the same path
    assert inputs.snapshot(str(tree), PATHS).digest != before


def test_a_removed_file_is_a_new_digest(tree: Path) -> None:
    inputs, before = _warm(tree)
    (tree / "src" / "a.txt").unlink()
    after = inputs.snapshot(str(tree), PATHS)
    assert after.digest != before
    assert [path for path, _ in after.stats] == [str((tree / "src" / "b.txt").resolve())]


def test_a_file_replaced_by_a_link_out_of_the_directory_is_refused(
    tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    inputs, _ = _warm(tree)
    outside = tmp_path_factory.mktemp("outside") / "secret"
    outside.write_bytes(b"a" * 100)
    (tree / "src" / "a.txt").unlink()
    (tree / "src" / "a.txt").symlink_to(outside)
    with pytest.raises(BadRequest, match="leads outside"):
        inputs.snapshot(str(tree), PATHS)


def test_a_link_is_looked_through_every_time(tree: Path) -> None:
    """A path that is a link is never kept whole: its target may change under an
    unchanged link."""
    (tree / "src" / "target").write_bytes(b"t" * 100)
    (tree / "src" / "link").symlink_to("target")
    inputs = Inputs(100, 1 << 20)
    before = inputs.snapshot(str(tree), ["src/link"]).digest
    (tree / "src" / "target").write_bytes(b"u" * 100)
    os.utime(tree / "src" / "target", ns=(1, 1))
    assert inputs.snapshot(str(tree), ["src/link"]).digest != before
