"""The README's configuration reference names every registered implementation and argument."""

import inspect
import pathlib

from modavg_plugin import AveragingCallback, AveragingStrategy, MovingAverage

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def reference_rows() -> dict:
    rows = {}
    for line in README.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and cells[1].startswith('`"'):
            rows[(cells[0].strip("`"), cells[1].split("`")[1].strip('"'))] = cells
    return rows


def test_every_registered_name_and_argument_is_documented():
    rows = reference_rows()
    for family in (MovingAverage, AveragingStrategy, AveragingCallback):
        for name in family.list_available():
            implementation = family.by_name(name)
            family_name, _, class_cell, arguments_cell = rows[(family.__name__, name)]
            assert class_cell.strip("`") == implementation.__name__
            for argument in inspect.signature(implementation.__init__).parameters.values():
                if argument.name != "self":
                    assert f"`{argument.name}" in arguments_cell or argument.name in arguments_cell, (name, argument)
                    if argument.default not in (inspect.Parameter.empty, None):
                        assert f"{argument.name}={argument.default!r}".replace("'", '"') in arguments_cell


def test_readme_gives_the_two_commands():
    assert "make demo" in README and "make test" in README


def test_module_adapter_arguments_are_documented():
    from modavg_plugin.module import ModuleAveraging

    paragraph = README[README.index("`ModuleAveraging` (not a registry family") :].split("\n\n")[0]
    for argument in inspect.signature(ModuleAveraging.__init__).parameters.values():
        if argument.name == "self":
            continue
        assert f"`{argument.name}" in paragraph, argument.name
        if argument.default not in (inspect.Parameter.empty, None):
            assert f"{argument.name}={argument.default!r}".replace("'", '"') in paragraph, argument.name
