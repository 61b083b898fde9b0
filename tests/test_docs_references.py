"""Every reference in the repository resolves inside it: no file cites material that does not ship
with it (the training and architecture notes it was written from, a machine's absolute paths), and
every relative markdown link in README.md and docs/*.md points to a file that exists.

docs/bench/ (raw measurements) is not checked."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = {".md", ".py", ".yaml", ".yml", ".sh"}
SKIPPED_DIRS = ("docs/bench/",)
# Folders that are never part of the repository (build outputs, caches, local tooling), for a copy
# of the working tree without git.
UNTRACKED_DIRS = {".git", ".gpu", ".whl", "output", "build", "dist", "__pycache__", ".pytest_cache"}

# Written in pieces so that this file does not cite what it looks for.
OUTSIDE = [
    ("a note outside the repository", re.compile(r"shared" r"/(spec|bench)\b")),
    ("a path above the repository", re.compile(r"\.\./" r"shared\b")),
    ("an absolute machine path", re.compile(r"(?<![\w.~-])/" r"work/")),
    ("a spec file that does not ship", re.compile(r"\b(flux2-architecture|edit-training)\.md\b")),
    ("a section of a spec that does not ship", re.compile(r"\bspec\s*§", re.IGNORECASE)),
    ("a spec that does not ship", re.compile(r"\bspec:?\s+`?(edit-training|training\.md)", re.IGNORECASE)),
]

# (file, the exact text it may hold) pairs allowed to cite outside material: none
ALLOWED: set = set()


def repository_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        files = [
            p.relative_to(ROOT).as_posix()
            for p in ROOT.rglob("*")
            if p.is_file() and not UNTRACKED_DIRS & set(p.relative_to(ROOT).parts[:-1])
        ]
    return sorted(f for f in files if Path(f).suffix in SUFFIXES and not f.startswith(SKIPPED_DIRS)
                  and (ROOT / f).is_file())


def test_no_reference_to_material_outside_the_repository():
    found = []
    for rel in repository_files():
        text = (ROOT / rel).read_text(encoding="utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            for what, pattern in OUTSIDE:
                m = pattern.search(line)
                if m and not any(rel == f and allowed in line for f, allowed in ALLOWED):
                    found.append(f"{rel}:{n}: {what} ({m.group(0)!r}): {line.strip()[:120]}")
    assert not found, "references that do not resolve inside the repository:\n" + "\n".join(found)


FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(\s*(?:<([^>\n]+)>|([^)\s]+))(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(text: str) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    links = []
    for angled, plain in LINK.findall(text):
        target = angled or plain
        if target.startswith("#") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # anchors, URLs, mailto:
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path:
            links.append(path)
    return links


def test_relative_markdown_links_point_to_existing_files():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for doc in docs:
        for path in relative_links(doc.read_text(encoding="utf-8")):
            if not (doc.parent / path).exists():
                broken.append(f"{doc.relative_to(ROOT).as_posix()}: ]({path})")
    assert not broken, "relative links to files that do not exist:\n" + "\n".join(broken)


def test_the_link_reader_finds_what_it_should():
    text = ("[a](training.md#resume) [b](https://x.org/a.md) [c](#local) [d](<sub dir/x.png>) "
            "`[e](not-a-link.md)` [f](toy-model.md \"title\")\n```\n[g](in-a-fence.md)\n```\n")
    assert relative_links(text) == ["training.md", "sub dir/x.png", "toy-model.md"]
