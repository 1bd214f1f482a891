"""The documentation keeps up with the code: every command and option of `batchcls` has its place in
docs/cli.md, every link from the README into docs/ (and between the docs) resolves, and the README stays a guide
that opens with the two commands."""
from __future__ import annotations

import re

import click
import pytest
from conftest import REPO

from batchcls.cli import cli

DOCS = REPO / "docs"
README = REPO / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def commands(cmd: click.Command = cli, path: tuple[str, ...] = ("batchcls",)):
    """(name path, command) for the root and every command below it, groups included."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from commands(sub, (*path, name))


def documented() -> list[tuple[str, click.Command]]:
    """Commands a user runs with their own options: the root and every leaf (a bare group only dispatches)."""
    return [(" ".join(p), c) for p, c in commands() if not isinstance(c, click.Group) or p == ("batchcls",)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def sections(text: str) -> dict[str, str]:
    """Heading text -> the text under it, up to the next heading of any level."""
    parts = re.split(r"^#{1,6} (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def anchors(path) -> set[str]:
    return {slug(h) for h in sections(path.read_text())}


def test_every_command_has_a_section_in_cli_md():
    heads = sections((DOCS / "cli.md").read_text())
    missing = [name for name, _ in documented() if name not in heads]
    assert not missing, f"docs/cli.md has no '## <command>' section for: {missing}"


@pytest.mark.parametrize("name, command", documented(), ids=[n for n, _ in documented()])
def test_every_option_and_argument_is_documented_in_its_section(name, command):
    text = sections((DOCS / "cli.md").read_text()).get(name, "")
    missing = []
    for param in command.params:
        if isinstance(param, click.Argument):
            if param.human_readable_name.upper() not in text:
                missing.append(param.human_readable_name.upper())
            continue
        missing += [o for o in param.opts + param.secondary_opts if f"`{o}`" not in text]
    assert not missing, f"docs/cli.md, section '{name}', does not mention: {missing}"


@pytest.mark.parametrize("name, command", list(commands()), ids=[" ".join(p) for p, _ in commands()])
def test_every_command_and_option_has_help(name, command):
    assert (command.help or "").strip(), f"{' '.join(name)} has no docstring"
    bare = [p.name for p in command.params if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not bare, f"{' '.join(name)}: options without help=: {bare}"


def _links(path) -> list[str]:
    return [m for m in LINK.findall(path.read_text()) if not re.match(r"[a-z]+://|mailto:", m)]


@pytest.mark.parametrize("doc", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_links_resolve(doc):
    """Every relative link (file and #anchor) from the README and between the docs points at something."""
    broken = []
    for link in _links(doc):
        target, _, anchor = link.partition("#")
        file = (doc.parent / target).resolve() if target else doc
        if not file.exists():
            broken.append(link)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(link)
    assert not broken, f"{doc.relative_to(REPO)}: broken links {broken}"


def test_readme_links_every_doc_and_stays_a_guide():
    text = README.read_text()
    linked = {link.split("#")[0] for link in _links(README)}
    unlinked = [p.name for p in DOCS.glob("*.md") if f"docs/{p.name}" not in linked]
    assert not unlinked, f"README links none of: {unlinked}"
    assert len(text.splitlines()) <= 250, "README.md is a guide: keep the depth in docs/"
    first_block = text[text.index("```"):].split("```")[1]
    assert [line.split()[:2] for line in first_block.splitlines()[1:3]] == [["make", "run"], ["make", "test"]]


def test_architecture_names_every_module():
    """docs/architecture.md is the one layout map: a module or package it does not name is missing from it."""
    text = (DOCS / "architecture.md").read_text()
    missing = []
    for package in ("batchcls", "train"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path.stem not in ("__init__", "__main__") and not re.search(rf"\b{path.stem}\b", text):
                missing.append(str(path.relative_to(REPO)))
        missing += [str(d.relative_to(REPO)) for d in sorted((REPO / package).iterdir())
                    if (d / "__init__.py").is_file() and f"{d.name}/" not in text]
    assert not missing, f"docs/architecture.md does not name: {missing}"
