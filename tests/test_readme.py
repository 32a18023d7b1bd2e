"""The README's generated blocks are current, and the configuration reference covers every name and argument."""

import inspect
import json
import pathlib
import sys
from typing import Dict, Optional, Union

import mxnet as mx
import pytest

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))  # tools/ is not installed with the package

from modavg_plugin import ExponentialMovingAverage, Registrable
from modavg_plugin.module import ModuleAveraging

from tools import configuration_reference, readme_sections
from tools.configuration_reference import DocumentationError
from tools.readme_sections import ReadmeSectionError, render_readme

README = (REPOSITORY_ROOT / "README.md").read_text(encoding="utf-8")


class Gadget(Registrable):
    default_implementation = "plain"


@pytest.fixture
def gadgets():
    yield Gadget
    Registrable._registry.pop(Gadget, None)


def sections_by_heading(markdown: str) -> Dict[str, str]:
    """Heading line -> the text up to the next heading."""
    sections: Dict[str, str] = {}
    heading = ""
    for line in markdown.splitlines():
        if line.startswith("#"):
            heading = line
            sections[heading] = ""
        elif heading:
            sections[heading] += line + "\n"
    return sections


def argument_rows(section: str) -> Dict[str, list]:
    """Argument name -> its table cells (name, type, default, description)."""
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if line.startswith("| `") and len(cells) == 4:
            rows[cells[0].strip("`")] = cells
    return rows


def expected_default(parameter: inspect.Parameter) -> str:
    if parameter.default is inspect.Parameter.empty:
        return "required"
    default = parameter.default
    return f"`{json.dumps(default)}`" if isinstance(default, str) else f"`{default!r}`"


def assert_every_argument_is_listed(cls: type, section: str) -> None:
    rows = argument_rows(section)
    parameters = [p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"]
    assert list(rows) == [listed_name(parameter) for parameter in parameters], cls
    for parameter in parameters:
        _, annotation, default, description = rows[listed_name(parameter)]
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:  # the options passed on to the family's constructor
            assert default == "`{}`" and "MovingAverage" in description, (cls, parameter.name)
            continue
        assert default == expected_default(parameter), (cls, parameter.name)
        assert annotation.startswith("`") and description, (cls, parameter.name)


def listed_name(parameter: inspect.Parameter) -> str:
    return ("**" if parameter.kind is inspect.Parameter.VAR_KEYWORD else "") + parameter.name


# The README ----------------------------------------------------------------------


def test_readme_generated_blocks_are_up_to_date():
    assert readme_sections.stale_blocks(README) == [], "run: python tools/readme_sections.py"


def test_check_names_a_stale_block_and_rewriting_restores_it(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README.replace("| `decay` |", "| `decai` |", 1), encoding="utf-8")
    assert readme_sections.main(["--check", "--readme", str(readme)]) == 1
    assert "stale generated block(s): configuration-reference" in capsys.readouterr().err
    assert readme_sections.main(["--readme", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == README


def test_readme_gives_the_two_commands():
    assert "make demo" in README and "make test" in README


# The generic tool ------------------------------------------------------------------


def test_render_replaces_only_the_block_contents():
    text = "intro\n<!-- generated: numbers -->\nold\n<!-- end generated: numbers -->\noutro\n"
    rendered = render_readme(text, {"numbers": lambda: "1 2 3\n"})
    assert rendered.startswith("intro\n<!-- generated: numbers -->\n")
    assert rendered.endswith("\n\n1 2 3\n\n<!-- end generated: numbers -->\noutro\n")
    assert "old" not in rendered
    assert render_readme(rendered, {"numbers": lambda: "1 2 3\n"}) == rendered


def test_a_generator_without_its_block_is_an_error_naming_the_block():
    with pytest.raises(ReadmeSectionError, match="block 'demo-results' is missing from the README"):
        render_readme("# A README\n", {"demo-results": lambda: "table"})


def test_a_block_without_a_generator_or_with_unpaired_markers_is_an_error():
    block = "<!-- generated: numbers -->\nold\n<!-- end generated: numbers -->\n"
    with pytest.raises(ReadmeSectionError, match="block 'numbers' has no generator"):
        render_readme(block, {})
    with pytest.raises(ReadmeSectionError, match="block 'numbers': its markers are unpaired"):
        render_readme("<!-- generated: numbers -->\nold\n", {"numbers": lambda: "new"})


# The configuration reference ---------------------------------------------------------


def test_every_registered_name_and_argument_is_in_the_reference():
    sections = sections_by_heading(configuration_reference.configuration_reference())
    for family in configuration_reference.FAMILIES:
        assert f"### `{family.__name__}`" in sections
        for name in family.list_available():
            implementation = family.by_name(name)
            default = " (default)" if name == family.default_implementation else ""
            section = sections[f'#### `"{name}"`{default}: `{implementation.__name__}`']
            assert_every_argument_is_listed(implementation, section)
    module_heading = next(heading for heading in sections if heading.startswith("### `ModuleAveraging`"))
    assert_every_argument_is_listed(ModuleAveraging, sections[module_heading])


def test_an_undocumented_argument_stops_the_generation(gadgets):
    @gadgets.register("plain")
    class Plain(Gadget):
        """A gadget.

        Parameters
        ----------
        size
            How big, > 0.
        """

        def __init__(self, size: float = 1.0, colour: str = "red") -> None:
            self.size, self.colour = size, colour

    with pytest.raises(DocumentationError, match="Plain: argument 'colour' has no description"):
        configuration_reference.family_section(gadgets)


def test_a_described_argument_that_does_not_exist_stops_the_generation(gadgets):
    @gadgets.register("plain")
    class Plain(Gadget):
        """A gadget.

        Parameters
        ----------
        size, colour
            How big, > 0, and which colour.
        """

        def __init__(self, size: float = 1.0) -> None:
            self.size = size

    with pytest.raises(DocumentationError, match="describes 'colour', which __init__ does not take"):
        configuration_reference.family_section(gadgets)


def test_shared_entries_references_and_inherited_descriptions(gadgets):
    class Base(Gadget):
        """Base.

        Parameters
        ----------
        size
            How big, > 0.
        """

        def __init__(self, size: float = 1.0, decay: float = 0.5, numerator: float = 1.0) -> None:
            self.size = size

    @gadgets.register("plain")
    class Plain(Base):
        """A gadget for tests.

        Parameters
        ----------
        decay, numerator
            As in :class:`~modavg_plugin.ExponentialMovingAverage`.
        """

    rows = argument_rows(configuration_reference.family_section(gadgets))
    assert rows["size"][3] == "How big, > 0."
    ema_descriptions = configuration_reference.parameter_descriptions(ExponentialMovingAverage.__doc__)
    for name in ("decay", "numerator"):
        assert rows[name][3] == configuration_reference.markdown(ema_descriptions[name])


def test_parameter_descriptions_reads_numpy_entries():
    docstring = """Summary.

    Parameters
    ----------
    first, second : float
        Two lines
        of description.
    **extras
        Passed on.

    Returns
    -------
    int
        Not a parameter.
    """
    assert configuration_reference.parameter_descriptions(docstring) == {
        "first": "Two lines of description.",
        "second": "Two lines of description.",
        "extras": "Passed on.",
    }


@pytest.mark.parametrize(
    "annotation, text",
    [
        (Optional[str], "Optional[str]"),
        (Union[None, str, mx.Context], "Optional[Union[str, mx.Context]]"),
        (Dict[str, Optional[int]], "Dict[str, Optional[int]]"),
        (mx.mod.Module, "mx.mod.Module"),
        (inspect.Parameter.empty, ""),
    ],
)
def test_annotations_render_as_written(annotation, text):
    assert configuration_reference.render_annotation(annotation) == text
