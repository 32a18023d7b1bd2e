"""The README's configuration reference, generated from the registry and the docstrings.

For each family (:data:`FAMILIES`) and each registered name, default first:
the name, the class, the description of its docstring (every paragraph
before the first section) and a table of its constructor arguments with
their type annotations, defaults and the descriptions given in the numpy
``Parameters`` section. Then the same for :class:`ModuleAveraging`, which
is not a registry family. An argument without a description, or a
description of an argument that does not exist, stops the generation.

The docstrings are read by :func:`parameter_descriptions`, a small parser of
the numpy layout as this project writes it, rather than a dependency: no
docstring parser is installed, and the part needed here (entry lines of one
or more comma-separated names, an optional `` : type``, indented
descriptions) is a few lines.
"""

import importlib
import inspect
import json
import re
import typing
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx

from modavg_plugin import AveragingStrategy, MovingAverage, Registrable
from modavg_plugin.module import ModuleAveraging
from modavg_plugin.triggers import AveragingTrigger

with warnings.catch_warnings():  # GluonTS's advice to install a faster JSON library, on import
    warnings.filterwarnings("ignore", message="Using `json`-module", category=UserWarning)
    from modavg_plugin.callbacks import AveragingCallback

__all__ = [
    "FAMILIES",
    "README_BLOCKS",
    "DocumentationError",
    "configuration_reference",
    "constructor_arguments",
    "family_section",
    "parameter_descriptions",
]

FAMILIES: Tuple[type, ...] = (MovingAverage, AveragingStrategy, AveragingTrigger, AveragingCallback)
SECTION_UNDERLINE = re.compile(r"^-{3,}$")
CROSS_REFERENCE = re.compile(r":(?P<role>\w+):`~?(?:[\w.]*\.)?(?P<name>\w+)`")
SEE_OTHER_CLASS = re.compile(r"^As in :class:`~?(?P<target>[\w.]+)`\.?$")
TYPING_NAMES = {tuple: "Tuple", list: "List", dict: "Dict", set: "Set", frozenset: "FrozenSet", type: "Type"}
MXNET_NAMESPACES = (("mx", mx), ("mx.gluon", mx.gluon), ("mx.mod", mx.mod), ("mx.nd", mx.nd))


class DocumentationError(ValueError):
    """A docstring does not document a constructor argument, or documents one that does not exist."""


@dataclass(frozen=True)
class Argument:
    """One constructor argument, ready to print."""

    name: str
    annotation: str  # "" when not annotated
    default: Optional[str]  # None when required
    description: str


# Docstrings --------------------------------------------------------------------


def _sections(docstring: Optional[str]) -> Tuple[List[str], Dict[str, List[str]]]:
    """The description lines (before the first section) and each numpy section's lines by title."""
    lines = inspect.cleandoc(docstring or "").splitlines()
    starts = [i for i in range(len(lines) - 1) if lines[i].strip() and SECTION_UNDERLINE.match(lines[i + 1].strip())]
    bounds = zip(starts, starts[1:] + [len(lines)])
    sections = {lines[start].strip(): lines[start + 2 : end] for start, end in bounds}
    return lines[: starts[0] if starts else len(lines)], sections


def parameter_descriptions(docstring: Optional[str]) -> Dict[str, str]:
    """Argument name -> description, from the docstring's numpy ``Parameters`` section.

    An entry line may name several arguments (``decay, numerator``), each
    getting the description; `` : type`` after the names and leading ``*``
    (``**extras``) are dropped. Descriptions are joined into one line.
    """
    descriptions: Dict[str, str] = {}
    names: List[str] = []
    for line in _sections(docstring)[1].get("Parameters", []):
        if line.strip() and not line[0].isspace():
            names = [name.strip().lstrip("*") for name in line.split(" : ")[0].split(",")]
            descriptions.update({name: "" for name in names})
        elif line.strip():
            descriptions.update({name: f"{descriptions[name]} {line.strip()}".strip() for name in names})
    return descriptions


def description_paragraphs(cls: type) -> List[str]:
    """The paragraphs of ``cls``'s own docstring before its first section, each on one line."""
    paragraphs, current = [], []
    for line in _sections(cls.__dict__.get("__doc__"))[0] + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


def _resolve_reference(description: str, name: str, documented_by: type) -> str:
    """``description``, or for "As in :class:`X`." the description ``X`` gives of ``name``."""
    match = SEE_OTHER_CLASS.match(description)
    if match is None:
        return description
    module_name, _, class_name = match.group("target").rpartition(".")
    target = getattr(importlib.import_module(module_name or documented_by.__module__), class_name, None)
    if not inspect.isclass(target):
        raise DocumentationError(f"{documented_by.__name__} refers to {match.group('target')}, which is not a class")
    resolved = parameter_descriptions(target.__doc__).get(name, "")
    if not resolved or SEE_OTHER_CLASS.match(resolved):
        raise DocumentationError(
            f"{documented_by.__name__} refers to {target.__name__} for argument {name!r}, "
            f"which does not describe it itself"
        )
    return resolved


# Arguments -----------------------------------------------------------------------


def render_annotation(annotation: Any) -> str:
    """A type annotation as a reader writes it: ``Optional[str]``, ``Mapping[str, Any]``, ``mx.Context``."""
    if annotation is inspect.Parameter.empty:
        return ""
    if annotation is type(None):
        return "None"
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        others = [argument for argument in arguments if argument is not type(None)]
        inner = render_annotation(others[0]) if len(others) == 1 else f"Union[{_render_list(others)}]"
        return f"Optional[{inner}]" if len(others) < len(arguments) else inner
    if origin is typing.Literal:
        return f"Literal[{', '.join(_render_value(argument) for argument in arguments)}]"
    if origin is not None:
        name = TYPING_NAMES.get(origin, getattr(origin, "__name__", str(origin)))
        return f"{name}[{_render_list(arguments)}]" if arguments else name
    if inspect.isclass(annotation):
        return _class_name(annotation)
    return str(annotation).replace("typing.", "")


def _render_list(arguments: Iterable[Any]) -> str:
    rendered = []
    for argument in arguments:
        if argument is Ellipsis:
            rendered.append("...")
        elif isinstance(argument, list):  # Callable[[A, B], R]
            rendered.append(f"[{_render_list(argument)}]")
        else:
            rendered.append(render_annotation(argument))
    return ", ".join(rendered)


def _class_name(cls: type) -> str:
    """``cls``'s name as users import it (``mx.Context``, not ``mxnet.context.Context``)."""
    if cls.__module__.split(".")[0] == "mxnet":
        for prefix, namespace in MXNET_NAMESPACES:
            if getattr(namespace, cls.__name__, None) is cls:
                return f"{prefix}.{cls.__name__}"
    return cls.__qualname__


def _render_value(value: Any) -> str:
    """A default as it is written in a config: strings in double quotes."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def constructor_arguments(cls: type, documented_in: Sequence[type]) -> List[Argument]:
    """``cls.__init__``'s arguments, each with its description from the first of ``documented_in`` giving one.

    Raises
    ------
    DocumentationError
        An argument has no description, or ``cls``'s own ``Parameters``
        section describes an argument ``cls.__init__`` does not take.
    """
    signature = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    parameters = [parameter for name, parameter in signature.parameters.items() if name != "self"]
    parameters = [parameter for parameter in parameters if parameter.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(parameter_descriptions(cls.__dict__.get("__doc__"))) - {p.name for p in parameters})
    if unknown:
        raise DocumentationError(f"{cls.__name__}'s docstring describes {unknown[0]!r}, which __init__ does not take")
    return [
        Argument(
            name=("**" if parameter.kind is inspect.Parameter.VAR_KEYWORD else "") + parameter.name,
            annotation=""
            if parameter.kind is inspect.Parameter.VAR_KEYWORD
            else render_annotation(hints.get(parameter.name, parameter.annotation)),
            default=_default_of(parameter),
            description=_argument_description(cls, parameter.name, documented_in),
        )
        for parameter in parameters
    ]


def _default_of(parameter: inspect.Parameter) -> Optional[str]:
    """The default as code; ``None`` when the argument is required; ``{}`` for ``**options``."""
    if parameter.kind is inspect.Parameter.VAR_KEYWORD:
        return "{}"
    return None if parameter.default is inspect.Parameter.empty else _render_value(parameter.default)


def _argument_description(cls: type, name: str, documented_in: Sequence[type]) -> str:
    for documented_by in documented_in:
        description = parameter_descriptions(documented_by.__dict__.get("__doc__")).get(name)
        if description:
            return _resolve_reference(description, name, documented_by)
    raise DocumentationError(
        f"{cls.__name__}: argument {name!r} has no description; add it to the Parameters section of its docstring"
    )


# Markdown ------------------------------------------------------------------------


def markdown(text: str) -> str:
    """reStructuredText inline markup as Markdown: ``x``, :class:`~a.B`, :meth:`f` become `x`, `B`, `f()`."""

    def code(match: re.Match) -> str:
        call = "()" if match.group("role") in ("meth", "func") else ""
        return f"`{match.group('name')}{call}`"

    return CROSS_REFERENCE.sub(code, text.replace("``", "`"))


def argument_table(arguments: Sequence[Argument]) -> str:
    """One row per argument: name, type, default, description."""
    rows = ["| argument | type | default | description |", "|---|---|---|---|"]
    for argument in arguments:
        annotation = f"`{argument.annotation}`" if argument.annotation else ""
        default = "required" if argument.default is None else f"`{argument.default}`"
        cells = [f"`{argument.name}`", annotation, default, markdown(argument.description)]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def class_section(heading: str, cls: type, documented_in: Sequence[type]) -> str:
    """A heading, ``cls``'s description and its argument table."""
    parts = [heading, *(markdown(paragraph) for paragraph in description_paragraphs(cls))]
    return "\n\n".join(parts + [argument_table(constructor_arguments(cls, documented_in))])


def family_section(family: type) -> str:
    """The reference of one registry family: every registered name, default first."""
    names = family.list_available()
    listed = ", ".join(_name_label(family, name) for name in names)
    usage = f'`{family.__name__}.from_config({{"type": NAME, ...}})`, NAME one of: {listed}.'
    parts = [f"### `{family.__name__}`", usage]
    if constructor_takes_options(family):
        heading = f"#### Options of every `{family.__name__}`"
        parts.append(class_section(heading, family, [family]))
    for name in names:
        implementation = family.by_name(name)
        heading = f"#### {_name_label(family, name)}: `{implementation.__name__}`"
        documented_in = [cls for cls in implementation.__mro__ if issubclass(cls, family)]
        parts.append(class_section(heading, implementation, documented_in))
    return "\n\n".join(parts)


def constructor_takes_options(family: type) -> bool:
    """Whether the family's own constructor has keyword-only options its implementations pass on (``**options``)."""
    init = vars(family).get("__init__")
    return init is not None and any(
        parameter.kind is inspect.Parameter.KEYWORD_ONLY for parameter in inspect.signature(init).parameters.values()
    )


def _name_label(family: type, name: str) -> str:
    """``"name"`` in code, marked ``(default)`` for the family's default."""
    return f'`"{name}"`' + (" (default)" if name == family.default_implementation else "")


def module_adapter_section() -> str:
    """:class:`ModuleAveraging`'s reference (not a family: it wraps a live ``mx.mod.Module``)."""
    heading = "### `ModuleAveraging` (the `Module.fit` adapter; not a registry family)"
    return class_section(heading, ModuleAveraging, [ModuleAveraging])


def _check_every_family_is_listed() -> None:
    """A family defined in ``modavg_plugin`` but missing from :data:`FAMILIES` is an error."""
    for family in list(Registrable._registry):
        if family.__module__.startswith("modavg_plugin.") and family not in FAMILIES:
            raise DocumentationError(f"family {family.__name__} is not in tools/configuration_reference.py FAMILIES")


def configuration_reference() -> str:
    """The Markdown of the README block ``configuration-reference``."""
    _check_every_family_is_listed()
    return "\n\n".join([*(family_section(family) for family in FAMILIES), module_adapter_section()])


README_BLOCKS: Mapping[str, Callable[[], str]] = {"configuration-reference": configuration_reference}
