"""Sphinx directives for pages generated from the code at build time.

``.. registry-reference::`` writes the configuration reference: for each
class named in its content (one dotted name a line), a section. A registry
family (a :class:`~modavg_plugin.Registrable` subclass) gets how to build it
from a config, the options of every member when the family's own constructor
takes keyword-only options, then one subsection per registered name (the
default first) with the class's description and a table of its constructor
arguments: name, type, default and description. Any other class (the
``Module.fit`` adapter) gets its description and table.

Nothing is parsed by hand: the descriptions are numpydoc's reading of the
numpy ``Parameters`` sections (:class:`numpydoc.docscrape.NumpyDocString`),
the types Sphinx's own rendering of the annotations (``restify``, with links),
and the text stays reStructuredText, so ``:class:`...``` references in the
docstrings become links checked by the strict build. An argument that no
class of the family describes, or a family defined in ``modavg_plugin`` that
the page does not list, is a warning, so the strict build fails. (An argument a docstring describes
but the constructor does not take is numpydoc's check PR02, turned on in
``conf.py`` for the whole API.)

``{demo-results}`` and ``{bench-results}`` (in Markdown pages) write the
forecasting demo's tables from the committed ``demo-output/results.json``
and ``make bench``'s from ``bench/results.json`` (``demo_results.py`` and
``bench_results.py`` beside this file).
"""

import importlib
import inspect
import json
import typing
from typing import Any, Dict, List, Sequence

from docutils.statemachine import StringList
from numpydoc.docscrape import NumpyDocString
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles
from sphinx.util.typing import restify

LOGGER = logging.getLogger(__name__)
SECTION_MARKS = {"family": "-", "member": "~"}


def import_object(dotted: str) -> Any:
    module_name, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def full_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def heading(text: str, mark: str, label: str = "") -> List[str]:
    return ([f".. _{label}:", ""] if label else []) + [text, mark * len(text), ""]


def documented_name(cls: type) -> str:
    """Where the API reference documents ``cls``: the package's page for what ``modavg_plugin`` exports."""
    import modavg_plugin

    exported = cls.__name__ in modavg_plugin.__all__ and getattr(modavg_plugin, cls.__name__, None) is cls
    return f"modavg_plugin.{cls.__name__}" if exported else full_name(cls)


def in_context_of(cls: type) -> List[str]:
    """Resolve the docstring's short references (``:meth:`apply```) as autodoc does: inside ``cls``."""
    return [f".. registry-context:: {documented_name(cls)}", ""]


def docstring_of(cls: type) -> NumpyDocString:
    """numpydoc's reading of the class's own docstring (not an inherited one)."""
    return NumpyDocString(inspect.cleandoc(cls.__dict__.get("__doc__") or ""))


def described_arguments(cls: type) -> Dict[str, List[str]]:
    """Argument name -> description lines, from ``cls``'s own ``Parameters`` section."""
    described = {}
    for parameter in docstring_of(cls)["Parameters"]:
        for name in parameter.name.split(","):  # numpy style: "decay, numerator" shares one description
            described[name.strip().lstrip("*")] = parameter.desc
    return described


def description_lines(cls: type) -> List[str]:
    document = docstring_of(cls)
    return [*document["Summary"], "", *document["Extended Summary"], ""]


def render_default(parameter: inspect.Parameter) -> str:
    if parameter.kind is inspect.Parameter.VAR_KEYWORD:
        return "``{}``"
    if parameter.default is inspect.Parameter.empty:
        return "required"
    value = parameter.default
    return f"``{json.dumps(value) if isinstance(value, str) else repr(value)}``"  # strings as a config writes them


def argument_table(cls: type, documented_in: Sequence[type]) -> List[str]:
    """A list-table of ``cls.__init__``'s arguments, each described by the first of ``documented_in`` that does."""
    hints = typing.get_type_hints(cls.__init__)
    descriptions = [described_arguments(documenting) for documenting in documented_in]
    rows = ["argument", "type", "default", "description"]
    lines = [".. list-table::", "   :header-rows: 1", "   :class: arguments", ""]
    lines += [f"   {'*' if index == 0 else ' '} - {cell}" for index, cell in enumerate(rows)]
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        description = next((described[name] for described in descriptions if described.get(name)), None)
        if description is None:
            LOGGER.warning(  # with -W the build fails, after naming every one
                "%s: argument %r has no description; add it to the Parameters section of its docstring (%s)",
                full_name(cls),
                name,
                inspect.getsourcefile(cls),
                type="modavg",
                subtype="undocumented_argument",
            )
            description = ["(undocumented)"]
        variadic = parameter.kind is inspect.Parameter.VAR_KEYWORD
        annotation = "" if variadic or name not in hints else restify(hints[name], "smart")
        cells = [f"``{'**' if variadic else ''}{name}``", annotation or " ", render_default(parameter)]
        lines += ["   * - " + cells[0], *(f"     - {cell}" for cell in cells[1:])]
        lines += ["     - " + description[0], *(f"       {line}" if line else "" for line in description[1:])]
    return lines + [""]


def family_lines(family: type) -> List[str]:
    names = family.list_available()

    def label(name: str) -> str:
        return f'``"{name}"``' + (" (default)" if name == family.default_implementation else "")

    lines = heading(family.__name__, SECTION_MARKS["family"], f"config-{family.__name__.lower()}")
    lines += [
        f'``{family.__name__}.from_config({{"type": NAME, ...}})`` (:class:`~{documented_name(family)}`), '
        f"NAME one of: {', '.join(label(name) for name in names)}.",
        "",
    ]
    init = vars(family).get("__init__")
    if init is not None and any(
        parameter.kind is inspect.Parameter.KEYWORD_ONLY for parameter in inspect.signature(init).parameters.values()
    ):
        lines += heading(f"Options of every {family.__name__}", SECTION_MARKS["member"])
        lines += in_context_of(family) + description_lines(family) + argument_table(family, [family])
    for name in names:
        implementation = family.by_name(name)
        title = f'"{name}"' + (" (default)" if name == family.default_implementation else "")
        label = f"config-{family.__name__.lower()}-{name.replace('_', '-')}"
        lines += heading(f"{title}: {implementation.__name__}", SECTION_MARKS["member"], label)
        lines += [f"Class: :class:`~{documented_name(implementation)}`", ""] + in_context_of(implementation)
        documented_in = [cls for cls in implementation.__mro__ if isinstance(cls, type) and issubclass(cls, family)]
        lines += description_lines(implementation) + argument_table(implementation, documented_in)
    return lines


def class_lines(cls: type) -> List[str]:
    lines = heading(cls.__name__, SECTION_MARKS["family"], f"config-{cls.__name__.lower()}")
    lines += [f"Class: :class:`~{documented_name(cls)}` (not a registry family)", ""] + in_context_of(cls)
    return lines + description_lines(cls) + argument_table(cls, [cls])


class RegistryReference(SphinxDirective):
    """``.. registry-reference::`` with one dotted class name a line."""

    has_content = True

    def run(self) -> list:
        from modavg_plugin import Registrable

        classes = [import_object(line.strip()) for line in self.content if line.strip()]
        for family in list(Registrable._registry):
            if family.__module__.startswith("modavg_plugin.") and family not in classes:
                LOGGER.warning(
                    "registry family %s is missing from this page's list",
                    full_name(family),
                    location=self.get_location(),
                    type="modavg",
                    subtype="missing_family",
                )
        lines: List[str] = []
        for cls in classes:
            is_family = issubclass(cls, Registrable) and cls in Registrable._registry
            lines += family_lines(cls) if is_family else class_lines(cls)
        module, py_class = self.env.ref_context.get("py:module"), self.env.ref_context.get("py:class")
        try:
            return self.parse_lines(lines)
        finally:  # the page's own context again after the generated text
            self.env.ref_context.update({"py:module": module, "py:class": py_class})

    def parse_lines(self, lines: List[str]) -> list:
        from docutils import nodes

        node = nodes.section()
        node.document = self.state.document
        source = self.get_source_info()[0]
        nested_parse_with_titles(self.state, StringList(lines, source=source), node)
        return node.children


class RegistryContext(SphinxDirective):
    """``.. registry-context:: modavg_plugin.Class``: the text that follows is read inside that class."""

    required_arguments = 1

    def run(self) -> list:
        module, _, name = self.arguments[0].rpartition(".")
        self.env.ref_context.update({"py:module": module, "py:class": name})
        return []


class GeneratedMarkdown(SphinxDirective):
    """Markdown a module beside this file writes from committed results, parsed by the page's own (MyST) parser."""

    module = ""  # the module's RESULTS_PATH is the file it reads, its `function` writes the Markdown
    function = ""

    def run(self) -> list:
        from docutils import nodes

        source = importlib.import_module(self.module)
        self.env.note_dependency(str(source.RESULTS_PATH))
        node = nodes.container()
        markdown = getattr(source, self.function)()
        self.state.nested_parse(StringList(markdown.splitlines(), source=str(source.RESULTS_PATH)), 0, node)
        return node.children


class DemoResults(GeneratedMarkdown):
    """``{demo-results}``: the forecasting demo's tables (``demo_results.py``)."""

    module, function = "demo_results", "demo_results"


class BenchResults(GeneratedMarkdown):
    """``{bench-results}``: ``make bench``'s figures (``bench_results.py``)."""

    module, function = "bench_results", "bench_results"


def setup(app) -> dict:
    app.add_directive("registry-reference", RegistryReference)
    app.add_directive("registry-context", RegistryContext)
    app.add_directive("demo-results", DemoResults)
    app.add_directive("bench-results", BenchResults)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
