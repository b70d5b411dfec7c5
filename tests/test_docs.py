"""The README stays a short user's guide, and every reference the code, the sweeps and the docs make resolves
inside the repository: `docs/...` paths and Markdown links exist, every "paper 00N" has a citation in
docs/papers.md, nothing points at the project notes that are not in the repo, and no sweep comment records a
commit (figures and their commits live in docs/results/)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("ebm_scale", "sweeps", "tests", "benchmarks", "experiments", "clusters", "docs")
SUFFIXES = {".py", ".yaml", ".yml", ".md", ".toml", ".txt", ".cfg"}
# Built from pieces so that this file does not contain what it forbids.
OLD_NOTES = "METHODS" + ".md"


def _files() -> list[Path]:
    files = [ROOT / "README.md"]
    for name in SOURCE_DIRS:
        folder = ROOT / name
        if folder.is_dir():
            files += sorted(
                p for p in folder.rglob("*") if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts
            )
    return files


FILES = _files()


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_readme_is_short_and_has_the_quick_start():
    text = _text(ROOT / "README.md")
    assert len(text.splitlines()) <= 200, f"README.md has {len(text.splitlines())} lines (at most 200)"
    for command in ("uv run ebm-scale sweep quickstart", "uv run pytest"):
        assert command in text, f"README.md lost the quick-start command {command!r}"


def test_readme_points_at_every_doc():
    text = _text(ROOT / "README.md")
    for doc in ("docs/results/", "docs/performance.md", "docs/methods/", "docs/papers.md", "docs/adding-a-method.md"):
        assert doc in text, f"README.md does not say where {doc} is"


# A `docs/...` path as code, YAML and prose write it; stops at a placeholder such as docs/results/<name>.md.
DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w./-]*")


def test_every_docs_path_exists():
    missing = []
    for path in FILES:
        for match in DOCS_PATH.finditer(_text(path)):
            target = match.group(0).rstrip(".,;:")
            if not (ROOT / target).exists():
                missing.append(f"{_rel(path)}: {target}")
    assert not missing, "docs paths that do not exist:\n" + "\n".join(missing)


MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _prose(markdown: str) -> str:
    """Markdown without code: fenced blocks, indented blocks and `inline code` (formulas there look like links)."""
    markdown = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    markdown = "\n".join(line for line in markdown.splitlines() if not line.startswith("    "))
    return re.sub(r"`[^`\n]*`", "", markdown)


def test_every_markdown_link_resolves():
    broken = []
    for path in FILES:
        if path.suffix != ".md":
            continue
        for match in MD_LINK.finditer(_prose(_text(path))):
            link = match.group(1).split("#")[0]
            if not link or re.match(r"[a-z]+:", link):  # in-page anchors, http(s):, mailto:
                continue
            if not (path.parent / link).exists():
                broken.append(f"{_rel(path)}: {link}")
    assert not broken, "Markdown links that do not resolve:\n" + "\n".join(broken)


def test_the_docs_exist_for_every_method():
    for method in ("mle", "vaebm", "nt_ebm", "ddaebm", "diffebm"):
        assert (ROOT / "docs" / "methods" / f"{method}.md").is_file(), method
        assert (ROOT / "docs" / "results" / f"{method}.md").is_file(), method
    for doc in ("performance.md", "papers.md", "adding-a-method.md"):
        assert (ROOT / "docs" / doc).is_file(), doc


def _cited_papers() -> set[str]:
    rows = re.findall(r"^\|\s*paper (\d{3})\s*\|(.+)$", _text(ROOT / "docs" / "papers.md"), flags=re.M)
    # An entry is a citation, not an empty row: authors or "Anonymous", and an italic title.
    return {number for number, rest in rows if re.search(r"\*[^*]{10,}\*", rest)}


def test_every_paper_reference_has_a_citation():
    cited = _cited_papers()
    assert cited >= {"000", "001", "002", "003", "004"}, f"docs/papers.md cites only {sorted(cited)}"
    unresolved = []
    for path in FILES:
        for number in re.findall(r"\bpaper (\d{3})\b", _text(path), flags=re.I):
            if number not in cited:
                unresolved.append(f"{_rel(path)}: paper {number}")
    assert not unresolved, "papers without an entry in docs/papers.md:\n" + "\n".join(sorted(set(unresolved)))


def test_nothing_refers_to_notes_outside_the_repo():
    offenders = [_rel(p) for p in FILES if OLD_NOTES in _text(p)]
    assert not offenders, f"{OLD_NOTES} is not in the repository; cite docs/methods/ instead: {offenders}"


# 7 to 40 hex digits with at least one letter and one digit: a (short) commit hash, not a number.
COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").rglob("*.yaml")), ids=lambda p: _rel(p))
def test_sweep_comments_hold_no_commit(path):
    for number, line in enumerate(_text(path).splitlines(), 1):
        if "#" not in line:
            continue
        comment = line[line.index("#") :]
        assert not COMMIT.search(comment), (
            f"{_rel(path)}:{number}: a commit in a comment ({comment.strip()!r}); figures and the commit they "
            "were measured at belong in docs/results/"
        )


def test_commit_pattern_tells_hashes_from_numbers():
    assert COMMIT.search("# measured at 5905ba2")
    assert not COMMIT.search("# 20000 iterations, lr 1.0e-3, 1000000 samples, decade")
