"""Issue 11, bug 9: no file of the project names a package index. pip's default index needs
no URL, so a default in the Dockerfile or the docs only pins users (and mirrors) to one host.
The check looks for the shape of an index URL rather than naming any host itself."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a URL of a package index: pip's ".../simple" layout or PyTorch-style ".../whl/<variant>",
# or an --index-url / --extra-index-url / PIP_INDEX_URL given a URL
INDEX_URL = re.compile(
    r"https?://[^\s\"'<>)]*/(simple|whl)(/|\b)"
    r"|(index-url|INDEX_URL)[\s=\"']+https?://",
)


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    # this file holds example URLs (of example.org hosts) to test the pattern itself
    files = [ROOT / name for name in listed if ROOT / name != Path(__file__).resolve()]
    return [path for path in files if path.is_file() and b"\0" not in path.read_bytes()[:4096]]


def test_no_file_names_a_package_index() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in tracked_text_files()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if INDEX_URL.search(line)
    ]
    assert not found, "package index URLs:\n" + "\n".join(found)


def test_the_pattern_finds_what_it_is_for() -> None:
    assert INDEX_URL.search("pip install --index-url https://mirror.example/simple torch")
    assert INDEX_URL.search("ARG TORCH_INDEX_URL=https://example.org/whl/cpu")
    assert not INDEX_URL.search("see https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
