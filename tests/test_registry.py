from typing import Optional

import pytest

from modavg_plugin import AveragingStrategy, ConfigurationError, MovingAverage, Registrable, SelectNBestMean


class Shape(Registrable):
    default_implementation = "square"


class Tiling(Registrable):
    pass


@pytest.fixture(autouse=True)
def clean_registry():
    yield
    for family in (Shape, Tiling):
        Registrable._registry.pop(family, None)


def register_shapes():
    @Shape.register("circle")
    class Circle(Shape):
        def __init__(self, radius: float = 1.0) -> None:
            self.radius = radius

    @Shape.register("square")
    class Square(Shape):
        def __init__(self, side: float = 1.0) -> None:
            self.side = side

    return Circle, Square


def test_register_and_by_name():
    circle, square = register_shapes()
    assert Shape.by_name("circle") is circle
    assert Shape.by_name("square") is square
    assert Shape.name_of(circle) == "circle"


def test_list_available_puts_default_first():
    register_shapes()
    assert Shape.list_available() == ["square", "circle"]


def test_families_are_separate():
    register_shapes()
    with pytest.raises(ConfigurationError, match="not a registered Tiling"):
        Tiling.by_name("circle")
    assert "circle" not in AveragingStrategy.list_available()


def test_register_twice_needs_exist_ok():
    circle, _ = register_shapes()

    class OtherCircle(Shape):
        pass

    with pytest.raises(ConfigurationError, match="'circle' is already registered.*exist_ok=True"):
        Shape.register("circle")(OtherCircle)
    Shape.register("circle", exist_ok=True)(OtherCircle)
    assert Shape.by_name("circle") is OtherCircle


def test_register_refuses_a_class_outside_the_family():
    with pytest.raises(ConfigurationError, match="not a Shape"):
        Shape.register("dict")(dict)


def test_unknown_name_lists_available_and_suggests_closest():
    register_shapes()
    with pytest.raises(ConfigurationError) as error:
        Shape.from_config({"type": "circel"})
    message = str(error.value)
    assert "'circel'" in message and "'square', 'circle'" in message and "did you mean 'circle'" in message


def test_configuration_error_is_a_value_error():
    assert issubclass(ConfigurationError, ValueError)


def test_from_config_uses_default_and_arguments():
    circle, square = register_shapes()
    built = Shape.from_config({"side": 3.0})
    assert isinstance(built, square) and built.side == 3.0
    assert Shape.from_config().side == 1.0
    assert Shape.from_config("circle").radius == 1.0
    assert Shape.from_config({"type": "circle", "radius": 2.5}).radius == 2.5


def test_from_config_names_unknown_key():
    register_shapes()
    with pytest.raises(ConfigurationError, match="unknown key 'radus' for 'circle'.*did you mean 'radius'"):
        Shape.from_config({"type": "circle", "radus": 2.0})


def test_from_config_without_default_needs_type():
    with pytest.raises(ConfigurationError, match="no default implementation"):
        Tiling.from_config({})


def test_nested_registrable_arguments_are_built_recursively():
    register_shapes()

    @Tiling.register("grid")
    class Grid(Tiling):
        def __init__(self, tile: Optional[Shape] = None, strategy: Optional[AveragingStrategy] = None) -> None:
            self.tile = tile
            self.strategy = strategy

    grid = Tiling.from_config({"type": "grid", "tile": {"type": "circle", "radius": 4.0}, "strategy": "mean"})
    assert grid.tile.radius == 4.0
    assert isinstance(grid.strategy, SelectNBestMean) and grid.strategy.num_models == 5


def test_extras_are_passed_only_where_accepted_and_never_clash():
    register_shapes()
    assert Shape.from_config({"type": "circle"}, radius=7.0, colour="red").radius == 7.0
    with pytest.raises(ConfigurationError, match="'radius' is given both"):
        Shape.from_config({"type": "circle", "radius": 1.0}, radius=7.0)


def test_builtin_defaults():
    assert MovingAverage.default_implementation == "exponential"
    assert MovingAverage.list_available()[0] == "exponential"
    assert AveragingStrategy.list_available()[:2] == ["mean", "softmax"]


def test_top_level_import_of_the_core_does_not_import_gluonts():
    import subprocess
    import sys

    code = "import sys, modavg_plugin; print('gluonts' in sys.modules); modavg_plugin.AveragingCallback; print('gluonts' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert output == ["False", "True"]


def test_every_public_name_is_importable_from_the_top_level():
    import modavg_plugin

    for name in modavg_plugin.__all__:
        assert getattr(modavg_plugin, name) is not None, name
