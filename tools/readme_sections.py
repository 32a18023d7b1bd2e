"""Keep README.md's generated blocks in step with the code.

A generated block is the text between two markers in README.md::

    <!-- generated: NAME -->
    ...
    <!-- end generated: NAME -->

Its content comes from a *generator*: a function of no arguments returning
Markdown. :data:`GENERATORS` maps block names to generators; it is filled
from the ``README_BLOCKS`` dict (block name -> generator) of every module
listed in :data:`GENERATOR_MODULES`. To add a block, write a module with a
``README_BLOCKS`` dict, list the module there, and put the two markers where
the block goes in README.md. A generator reports a problem (e.g. an
undocumented argument) by raising ``ValueError`` with a one-line message.

Usage, from the repository root::

    python tools/readme_sections.py           # rewrite every generated block in place
    python tools/readme_sections.py --check   # exit 1, naming the stale blocks, if any differ
"""

import argparse
import importlib
import pathlib
import re
import sys
from typing import Callable, Dict, List, Mapping, Optional, Sequence

__all__ = [
    "GENERATORS",
    "GENERATOR_MODULES",
    "ReadmeSectionError",
    "load_generators",
    "main",
    "render_readme",
    "stale_blocks",
]

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
README_PATH = REPOSITORY_ROOT / "README.md"

Generator = Callable[[], str]

#: Modules with a ``README_BLOCKS`` dict, imported with the repository root on ``sys.path``.
GENERATOR_MODULES: List[str] = ["tools.configuration_reference", "tools.demo_results", "tools.bench_results"]

#: Block name -> function returning the block's Markdown.
GENERATORS: Dict[str, Generator] = {}

BLOCK_NAME_PATTERN = re.compile(r"[\w.-]+")
BLOCK_PATTERN = re.compile(
    r"<!-- generated: (?P<name>[\w.-]+) -->\n(?P<content>.*?)<!-- end generated: (?P=name) -->", re.DOTALL
)
MARKER_PATTERN = re.compile(r"<!-- (?:end )?generated: (?P<name>[\w.-]+) -->")
EDIT_WARNING = "<!-- do not edit this block: `python tools/readme_sections.py` writes it -->"


class ReadmeSectionError(ValueError):
    """README.md's markers do not match the registered generators."""


def load_generators() -> Dict[str, Generator]:
    """:data:`GENERATORS`, with the ``README_BLOCKS`` of every module of :data:`GENERATOR_MODULES` added."""
    if str(REPOSITORY_ROOT) not in sys.path:
        sys.path.insert(0, str(REPOSITORY_ROOT))
    for module_name in GENERATOR_MODULES:
        blocks = getattr(importlib.import_module(module_name), "README_BLOCKS", None)
        if not isinstance(blocks, Mapping):
            raise ReadmeSectionError(f"{module_name} has no README_BLOCKS dict (block name -> generator)")
        for name, function in blocks.items():
            _add_generator(name, function, module_name)
    return GENERATORS


def _add_generator(name: str, function: Generator, module_name: str) -> None:
    if not BLOCK_NAME_PATTERN.fullmatch(name):
        raise ReadmeSectionError(f"{module_name}: block name {name!r} may use only letters, digits, '_', '.' and '-'")
    registered = GENERATORS.setdefault(name, function)
    if registered is not function:
        raise ReadmeSectionError(f"{module_name}: block {name!r} already has a generator, {registered.__qualname__}")


def _block(name: str, markdown: str) -> str:
    """A whole block, markers included, around ``markdown``."""
    return f"<!-- generated: {name} -->\n{EDIT_WARNING}\n\n{markdown.strip()}\n\n<!-- end generated: {name} -->"


def _check_markers(text: str, generators: Mapping[str, Generator]) -> None:
    """Every generator has exactly one well-formed block, and every block a generator."""
    blocks = [match.group("name") for match in BLOCK_PATTERN.finditer(text)]
    markers = [match.group("name") for match in MARKER_PATTERN.finditer(text)]
    for name in sorted(set(markers)):
        if markers.count(name) != 2 * blocks.count(name):
            raise ReadmeSectionError(
                f"block {name!r}: its markers are unpaired or out of order; "
                f"write <!-- generated: {name} --> and <!-- end generated: {name} --> on lines of their own"
            )
    for name in sorted(set(blocks)):
        if blocks.count(name) > 1:
            raise ReadmeSectionError(f"block {name!r} appears {blocks.count(name)} times in the README")
        if name not in generators:
            raise ReadmeSectionError(f"block {name!r} has no generator; registered: {', '.join(sorted(generators))}")
    missing = sorted(set(generators) - set(blocks))
    if missing:
        raise ReadmeSectionError(
            f"block {missing[0]!r} is missing from the README: "
            f"add <!-- generated: {missing[0]} --> and <!-- end generated: {missing[0]} --> where it goes"
        )


def render_readme(text: str, generators: Optional[Mapping[str, Generator]] = None) -> str:
    """``text`` with every generated block rewritten from its generator.

    Parameters
    ----------
    text
        The README's contents.
    generators
        Block name -> generator; ``None``: :func:`load_generators`.
    """
    generators = load_generators() if generators is None else generators
    _check_markers(text, generators)
    contents = {name: _block(name, function()) for name, function in generators.items()}
    return BLOCK_PATTERN.sub(lambda match: contents[match.group("name")], text)


def stale_blocks(text: str, generators: Optional[Mapping[str, Generator]] = None) -> List[str]:
    """Names of the blocks of ``text`` that differ from what their generators write."""
    return _differing_blocks(text, render_readme(text, generators))


def _differing_blocks(text: str, rendered: str) -> List[str]:
    current = {match.group("name"): match.group(0) for match in BLOCK_PATTERN.finditer(text)}
    fresh = {match.group("name"): match.group(0) for match in BLOCK_PATTERN.finditer(rendered)}
    return sorted(name for name in fresh if current.get(name) != fresh[name])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Rewrite README.md's generated blocks, or with ``--check`` report the stale ones."""
    parser = argparse.ArgumentParser(description="Rewrite (or check) the generated blocks of README.md.")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    parser.add_argument("--readme", type=pathlib.Path, default=README_PATH, help="default: %(default)s")
    arguments = parser.parse_args(argv)
    text = arguments.readme.read_text(encoding="utf-8")
    try:
        rendered = render_readme(text)
    except ValueError as error:  # ReadmeSectionError, or a generator's report
        print(f"{arguments.readme}: {error}", file=sys.stderr)
        return 1
    stale = _differing_blocks(text, rendered)
    if stale and arguments.check:
        message = f"stale generated block(s): {', '.join(stale)}; run python tools/readme_sections.py"
        print(f"{arguments.readme}: {message}", file=sys.stderr)
        return 1
    if stale:
        arguments.readme.write_text(rendered, encoding="utf-8")
    print(f"{arguments.readme}: {'rewrote ' + ', '.join(stale) if stale else 'generated blocks up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
