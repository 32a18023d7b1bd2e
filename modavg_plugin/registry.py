"""Families of named implementations, buildable from plain config dicts.

A family is a base class that derives from :class:`Registrable`; each family
has its own names (``MovingAverage`` and ``AveragingStrategy`` may both have a
``"mean"``), a ``default_implementation`` and a ``from_config`` builder that
turns ``{"type": NAME, **arguments}`` into an object, recursively for
arguments whose annotated type is itself registrable.
"""

import difflib
import inspect
import typing
from collections import defaultdict
from typing import Any, Callable, Dict, List, Mapping, Optional, Type, TypeVar, Union

__all__ = ["ConfigurationError", "Registrable", "constructor_parameters"]

T = TypeVar("T", bound="Registrable")

TYPE_KEY = "type"


class ConfigurationError(ValueError):
    """A configuration (a name, a key or a value given by the user) is wrong."""


def _closest(name: str, available: List[str]) -> str:
    matches = difflib.get_close_matches(name, available, n=1, cutoff=0.5)
    return f"; did you mean {matches[0]!r}?" if matches else ""


def _registrable_type(annotation: Any) -> Optional[Type["Registrable"]]:
    """The registrable class inside ``annotation`` (``Optional[X]`` included)."""
    candidates = typing.get_args(annotation) if typing.get_origin(annotation) is Union else (annotation,)
    for candidate in candidates:
        if inspect.isclass(candidate) and issubclass(candidate, Registrable):
            return candidate
    return None


class Registrable:
    """Base for a family of named implementations (AllenNLP style).

    Examples
    --------
    >>> class Shape(Registrable):
    ...     default_implementation = "square"
    >>> @Shape.register("square")
    ... class Square(Shape):
    ...     def __init__(self, side: float = 1.0) -> None:
    ...         self.side = side
    >>> Shape.from_config({"side": 2.0}).side
    2.0
    """

    _registry: Dict[type, Dict[str, type]] = defaultdict(dict)
    default_implementation: Optional[str] = None

    @classmethod
    def _family(cls) -> type:
        """The base class whose registry ``cls`` belongs to."""
        for klass in cls.__mro__:
            if klass in Registrable._registry:
                return klass
        return cls

    @classmethod
    def register(cls: Type[T], name: str, exist_ok: bool = False) -> Callable[[type], type]:
        """Register a subclass of ``cls`` under ``name``.

        Parameters
        ----------
        name
            The name used in configs (``{"type": name}``) and by :meth:`by_name`.
        exist_ok
            Replace an implementation already registered under ``name``
            instead of raising :class:`ConfigurationError`.
        """
        registry = Registrable._registry[cls]

        def add_to_registry(subclass: type) -> type:
            if name in registry and not exist_ok and registry[name] is not subclass:
                raise ConfigurationError(
                    f"{name!r} is already registered for {cls.__name__} as "
                    f"{registry[name].__name__}; pass exist_ok=True to replace it"
                )
            if not (inspect.isclass(subclass) and issubclass(subclass, cls)):
                raise ConfigurationError(f"{subclass!r} cannot be registered as {name!r}: it is not a {cls.__name__}")
            registry[name] = subclass
            return subclass

        return add_to_registry

    @classmethod
    def by_name(cls: Type[T], name: str) -> Type[T]:
        """The implementation registered under ``name`` in ``cls``'s family."""
        registry = Registrable._registry.get(cls._family(), {})
        if name not in registry:
            available = cls.list_available()
            raise ConfigurationError(
                f"{name!r} is not a registered {cls._family().__name__}; "
                f"available: {', '.join(map(repr, available)) or 'none'}{_closest(name, available)}"
            )
        return registry[name]

    @classmethod
    def list_available(cls) -> List[str]:
        """Registered names, the default implementation first."""
        names = list(Registrable._registry.get(cls._family(), {}))
        default = cls._family().default_implementation
        if default in names:
            names.remove(default)
            names.insert(0, default)
        return names

    @classmethod
    def name_of(cls, implementation: type) -> Optional[str]:
        """The name ``implementation`` is registered under in this family, if any."""
        for name, registered in Registrable._registry.get(cls._family(), {}).items():
            if registered is implementation:
                return name
        return None

    @classmethod
    def from_config(cls: Type[T], config: Union[None, str, Mapping[str, Any]] = None, **extras: Any) -> T:
        """Build an implementation from a plain config.

        Parameters
        ----------
        config
            ``{"type": NAME, **arguments}``; without ``"type"`` the family's
            ``default_implementation`` is built. A bare string is a name with
            default arguments. Arguments whose annotated type is registrable
            may themselves be configs (dicts or names).
        **extras
            Further constructor arguments that do not belong in a config
            (e.g. ``parameters=net.collect_params().items()``); passed only to
            constructors that accept them.
        """
        if isinstance(config, str):
            config = {TYPE_KEY: config}
        config = dict(config or {})
        if not isinstance(config, dict):
            raise ConfigurationError(f"a {cls.__name__} config must be a dict or a name, not {type(config).__name__}")
        name = config.pop(TYPE_KEY, None) or cls._family().default_implementation
        if name is None:
            raise ConfigurationError(f"{cls.__name__} has no default implementation: give {TYPE_KEY!r}")
        implementation = cls.by_name(name)
        arguments = _constructor_arguments(implementation, name, config, extras)
        return implementation(**arguments)

    @classmethod
    def from_params(cls: Type[T], params: Any = None, **extras: Any) -> T:
        """AllenNLP's name for :meth:`from_config`, with the same meaning.

        ``params`` is a config dict, a name, or AllenNLP's ``Params`` (anything
        with ``as_dict()``); ``extras`` as in :meth:`from_config`.
        """
        config = params.as_dict() if hasattr(params, "as_dict") else params
        return cls.from_config(config, **extras)


def _constructor_arguments(
    implementation: type, name: str, config: Dict[str, Any], extras: Dict[str, Any]
) -> Dict[str, Any]:
    """Check ``config`` against ``implementation.__init__`` and build nested configs."""
    parameters = constructor_parameters(implementation)
    accepted = set(parameters)
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ConfigurationError(
            f"unknown key {unknown[0]!r} for {name!r} ({implementation.__name__}); "
            f"accepted keys: {', '.join(sorted(accepted))}{_closest(unknown[0], sorted(accepted))}"
        )
    clashing = sorted(set(config) & set(extras))
    if clashing:
        raise ConfigurationError(f"key {clashing[0]!r} is given both in the config and as an extra argument")
    arguments: Dict[str, Any] = {}
    for key, value in config.items():
        family = _registrable_type(parameters[key].annotation)
        if family is not None and isinstance(value, (dict, str)):
            value = family.from_config(value)
        arguments[key] = value
    arguments.update({key: value for key, value in extras.items() if key in accepted})
    return arguments


def constructor_parameters(implementation: type) -> Dict[str, inspect.Parameter]:
    """The named arguments ``implementation(...)`` accepts, annotations resolved.

    A constructor ending in ``**options`` that it hands to ``super().__init__``
    (as the moving averages do with their shared options) accepts the named
    arguments of the next constructor up the class hierarchy too, and so on.
    """
    accepted: Dict[str, inspect.Parameter] = {}
    for cls in implementation.__mro__:
        if "__init__" not in vars(cls):
            continue
        signature = inspect.signature(cls.__init__)
        hints = typing.get_type_hints(cls.__init__)
        forwards = False
        for name, parameter in signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif name != "self" and parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
                accepted.setdefault(name, parameter.replace(annotation=hints.get(name, parameter.annotation)))
        if not forwards:
            break
    return accepted
