"""The documents: every relative link and anchor in a tracked Markdown file resolves, and no tracked
file speaks of how or in what environment the project was built (it speaks of itself only)."""
import re
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def tracked(pattern: str):
    out = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.splitlines() if (ROOT / p).is_file()]


def prose_lines(path: Path):
    """The lines of a Markdown file outside fenced code blocks."""
    inside = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, inline code / links reduced to their text, punctuation
    other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    seen, out = {}, set()
    for line in prose_lines(path):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_the_slug_rule_matches_github_on_examples():
    assert slug("Pre-training") == "pre-training"
    assert slug("Tests") == "tests"
    assert slug("`--eval` and linear probing (MAE's recipe)") == "--eval-and-linear-probing-maes-recipe"
    assert slug("Data at scale: shards, decoders") == "data-at-scale-shards-decoders"


@pytest.mark.parametrize("md", tracked("*.md"), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(md):
    broken = []
    for line in prose_lines(md):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (md.parent / file_part).resolve() if file_part else md
            if not dest.exists():
                broken.append(f"{target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, broken


# how or where the project was built is no part of it: the project speaks of itself only
# (the phrases are split so that this file does not match itself, nor any grep for them)
PHRASES = ["sessions? (that|which) " + "built", "work" + "place", "device " + "tool", "device " + "machine",
           "with " + "carry", "built " + "this repo", "on a slower " + "day", "one day's " + "machine"]
BUILT = re.compile("|".join(PHRASES), re.IGNORECASE)


def test_no_tracked_file_speaks_of_how_the_project_was_built():
    hits = []
    for path in tracked("*"):
        if path.suffix in (".png", ".jpg", ".pth", ".pt", ".gz", ".tar"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(ROOT)}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                 if BUILT.search(line)]
    assert not hits, hits
