"""The ``modavg`` command: average ``.params`` checkpoints, or rebuild a post-hoc EMA, without writing code.

``modavg average FILE [FILE ...] -o OUT`` writes the equal-weight mean of
the files; ``modavg average FOLDER`` selects from the folder's
``*-epoch-info.json`` records with a registered :class:`~modavg_plugin.AveragingStrategy`
and writes ``FOLDER/averaged_model-0000.params`` (or ``-o OUT``). Gluon files
(plain names) and Module checkpoints (``arg:``/``aux:`` names) are both
accepted, names kept as they are. Files are streamed (one checkpoint in
memory at a time) and the result is written atomically.

Every file's array names are read up front (headers only), so mixed formats,
differing parameters and unreadable files are reported before any averaging.
A file the user named is required: an unreadable one is an error. In a
folder, an epoch-info record that is unusable (broken JSON, wrong types, a
missing or unreadable parameter file, a ``params_path`` outside the folder
without ``--allow-outside-folder``) is skipped with a warning before the
strategy selects, and a selected checkpoint that turns unreadable afterwards
is skipped with the remaining weights renormalised, like
:meth:`~modavg_plugin.AveragingStrategy.apply`.

``modavg posthoc FOLDER (--sigma-rel S | --gamma G) [--step T] -o OUT``
rebuilds the power-function EMA of width ``S`` (or exponent ``G``) at step
``T`` (default: the last saved) from the snapshots
:class:`~modavg_plugin.PostHocSnapshots` saved in ``FOLDER``, a
signed combination of them (:func:`~modavg_plugin.posthoc.plan_posthoc`),
streamed one file at a time and written atomically. Unusable snapshot
records are skipped with one warning; ``--dry-run`` prints each snapshot
used with its coefficient and the fit's residual.

User errors exit with status 1 (2 for wrong arguments) and one line on
stderr, ``modavg: error: ...``, naming the culprit. This module imports only
the core (not GluonTS), so the command starts quickly.
"""

import argparse
import contextlib
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, NoReturn, Optional, Sequence, Tuple

from tqdm import tqdm

from .averages import MAX_SIGMA_REL
from .checks import CheckpointError
from .files import save_params
from .folders import EPOCH_INFO_SUFFIX, POSTHOC_INFO_SUFFIX
from .params_files import read_array_names
from .posthoc import PosthocPlan, check_output_path, combine_snapshots, plan_posthoc
from .registry import ConfigurationError
from .strategies import AVERAGED_MODEL_NAME, AveragingStrategy
from .weighted_sum import average_checkpoint_files, check_same_names

__all__ = ["main"]

PROGRAM = "modavg"
LIBRARY_LOGGER = "modavg_plugin"
logger = logging.getLogger(__name__)

MODULE_PREFIXES = ("arg:", "aux:")
MODULE_FORMAT = "Module names (arg:/aux: prefixes)"
GLUON_FORMAT = "Gluon names (no arg:/aux: prefixes)"
FOLDER_OPTIONS = {
    "strategy": "--strategy",
    "num_models": "--num-models",
    "metric": "--metric",
    "maximize": "--maximize",
    "allow_outside_folder": "--allow-outside-folder",
    "run_id": "--run",
}
STRATEGY_OPTIONS = ("num_models", "metric", "maximize")  # passed to the strategy's constructor
USER_ERRORS = (CheckpointError, ConfigurationError, ValueError, OSError, KeyError)
USAGE_EXIT_CODE = 2
ERROR_EXIT_CODE = 1
INTERRUPTED_EXIT_CODE = 130


class UsageError(Exception):
    """The command line itself is wrong (an unknown option, a missing argument...)."""


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


@dataclass(frozen=True)
class AveragingPlan:
    """What to average, with which weights (summing to 1), and where to write the result."""

    paths: List[str]
    weights: List[float]
    output: str


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``modavg`` command.

    Parameters
    ----------
    argv
        The arguments after the program name; ``sys.argv[1:]`` when ``None``.

    Returns
    -------
    int
        The exit status: 0 on success, 1 for unusable checkpoints or options,
        2 for a malformed command line, 130 when interrupted.
    """
    with library_warnings_on_stderr():
        try:
            arguments = build_parser().parse_args(argv)
            return arguments.run(arguments)
        except SystemExit as exit_request:  # --help
            return exit_request.code if isinstance(exit_request.code, int) else 0
        except UsageError as error:
            print_error(str(error))
            return USAGE_EXIT_CODE
        except USER_ERRORS as error:
            print_error(error_message(error))
            return ERROR_EXIT_CODE
        except KeyboardInterrupt:
            print_error("interrupted")
            return INTERRUPTED_EXIT_CODE


def build_parser() -> ArgumentParser:
    """The command-line parser: ``modavg average ...`` and ``modavg posthoc ...``."""
    parser = ArgumentParser(
        prog=PROGRAM, description="Average MXNet .params checkpoints (Gluon or Module), or rebuild a post-hoc EMA."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_average_command(commands)
    add_posthoc_command(commands)
    return parser


def add_average_command(commands: "argparse._SubParsersAction[ArgumentParser]") -> None:
    """``modavg average``: the (weighted) mean of files, or of a folder's selected checkpoints."""
    average = commands.add_parser(
        "average",
        help="write the (weighted) mean of checkpoints",
        description=(
            "Average .params files with equal weights (give the files and -o OUT), or select from a folder's "
            f"*{EPOCH_INFO_SUFFIX} records with a strategy (give one folder)."
        ),
    )
    average.add_argument(
        "sources", nargs="+", metavar="PATH", help=".params files to average equally, or one checkpoint folder"
    )
    average.add_argument(
        "-o", "--output", metavar="OUT", help=f"file to write (required for files; for a folder: {AVERAGED_MODEL_NAME})"
    )
    average.add_argument(
        "--strategy", metavar="NAME", help="folder only: a registered AveragingStrategy (default: mean)"
    )
    average.add_argument(
        "--num-models", type=positive_integer, metavar="N", help="folder only: how many checkpoints (default: 5)"
    )
    average.add_argument("--metric", metavar="NAME", help="folder only: the epoch-info key to rank by (default: score)")
    average.add_argument(
        "--maximize", action="store_const", const=True, help="folder only: rank high metric values first"
    )
    average.add_argument(
        "--allow-outside-folder",
        action="store_const",
        const=True,
        help="folder only: accept epoch info whose params_path lies outside the folder (refused by default)",
    )
    average.add_argument(
        "--run",
        dest="run_id",
        metavar="ID",
        help="folder only: the run whose checkpoints to average, when the folder holds several",
    )
    average.add_argument("--dry-run", action="store_true", help="print the files, weights and output; write nothing")
    average.set_defaults(run=run_average)


def add_posthoc_command(commands: "argparse._SubParsersAction[ArgumentParser]") -> None:
    """``modavg posthoc``: a power-function EMA rebuilt from post-hoc snapshots."""
    posthoc = commands.add_parser(
        "posthoc",
        help="rebuild a power-function EMA of any width from post-hoc snapshots",
        description=(
            "Rebuild the power-function EMA of a given width (--sigma-rel) or exponent (--gamma) at a training step "
            "from the snapshots PostHocSnapshots saved in FOLDER (Karras et al. 2024, sec. 3): a least-squares "
            "combination of them, with signed coefficients."
        ),
    )
    posthoc.add_argument(
        "folder",
        metavar="FOLDER",
        help=f"folder of posthoc-*.params snapshots and their *{POSTHOC_INFO_SUFFIX} records",
    )
    target = posthoc.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--sigma-rel",
        type=sigma_rel_number,
        metavar="S",
        help=f"the EMA's width relative to the run, in (0, {MAX_SIGMA_REL:.4f}); 0.05 averages about the last tenth",
    )
    target.add_argument("--gamma", type=positive_number, metavar="G", help="the EMA's exponent instead, a number > 0")
    posthoc.add_argument(
        "--step",
        type=positive_integer,
        metavar="T",
        help="the training step to rebuild the EMA at, between the first and last snapshot's (default: the last)",
    )
    posthoc.add_argument("-o", "--output", required=True, metavar="OUT", help="file to write (.params, Gluon names)")
    posthoc.add_argument(
        "--run", dest="run_id", metavar="ID", help="the run whose snapshots to use, when the folder holds several"
    )
    posthoc.add_argument(
        "--dry-run",
        action="store_true",
        help="print the snapshots, their coefficients, the residual and the error bound; write nothing",
    )
    posthoc.set_defaults(run=run_posthoc)


def positive_integer(text: str) -> int:
    """``text`` as an integer >= 1, or an ``argparse`` error stating the allowed range."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def finite_number(text: str) -> float:
    """``text`` as a finite float, or an ``argparse`` error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def sigma_rel_number(text: str) -> float:
    """``text`` as a number in ``(0, MAX_SIGMA_REL)``, or an ``argparse`` error stating the allowed range."""
    value = _number_or_range_error(text, f"a number in (0, {MAX_SIGMA_REL:.4f})")
    if not 0.0 < value < MAX_SIGMA_REL:
        raise argparse.ArgumentTypeError(f"must be a number in (0, {MAX_SIGMA_REL:.4f}), got {text}")
    return value


def positive_number(text: str) -> float:
    """``text`` as a finite number > 0, or an ``argparse`` error stating the allowed range."""
    value = _number_or_range_error(text, "a finite number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _number_or_range_error(text: str, allowed: str) -> float:
    try:
        return finite_number(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None


def run_average(arguments: argparse.Namespace) -> int:
    """``modavg average``: plan, then print the plan (``--dry-run``) or write the average."""
    (first, *others) = arguments.sources
    if not others and not os.path.exists(first) and not first.endswith(".params"):
        raise CheckpointError(f"checkpoint folder {first} does not exist")  # not "-o is required when averaging files"
    if len(arguments.sources) == 1 and os.path.isdir(arguments.sources[0]):
        plan = plan_folder(arguments.sources[0], folder_options(arguments), arguments.output)
    else:
        plan = plan_files(arguments.sources, folder_options(arguments), arguments.output)
    check_output(plan)
    if arguments.dry_run:
        print_plan(plan)
    else:
        write_average(plan)
        print(plan.output)
    return 0


def folder_options(arguments: argparse.Namespace) -> Dict[str, Any]:
    """The folder-only options given on the command line, by attribute name."""
    return {name: getattr(arguments, name) for name in FOLDER_OPTIONS if getattr(arguments, name) is not None}


def plan_files(paths: Sequence[str], options: Dict[str, Any], output: Optional[str]) -> AveragingPlan:
    """Equal weights for the named files, every one of which must be readable."""
    folders = [path for path in paths if os.path.isdir(path)]
    if folders:
        raise UsageError(f"{folders[0]} is a folder: give either .params files or one folder")
    if options:
        raise UsageError(f"{FOLDER_OPTIONS[next(iter(options))]} applies only when averaging a folder")
    if output is None:
        raise UsageError("-o/--output is required when averaging files")
    check_same_parameters([(path, read_array_names(path)) for path in paths])
    return AveragingPlan(list(paths), [1.0 / len(paths)] * len(paths), output)


def plan_folder(folder: str, options: Dict[str, Any], output: Optional[str]) -> AveragingPlan:
    """The checkpoints a strategy selects in ``folder``, unreadable ones skipped with a warning."""
    strategy = build_strategy(options)
    allow_outside_folder = bool(options.get("allow_outside_folder"))
    records = strategy.get_checkpoint_information(
        folder, allow_outside_folder=allow_outside_folder, run=options.get("run_id")
    )
    selected, weights = strategy.select_checkpoints(records)
    readable: List[Tuple[str, float, List[str]]] = []
    for path, weight in zip(selected, weights):
        try:
            readable.append((path, weight, read_array_names(path)))
        except CheckpointError as error:
            logger.warning("skipping %s", error)
    if not readable:
        raise CheckpointError(f"none of the {len(selected)} selected checkpoints in {folder} is readable")
    check_same_parameters([(path, names) for path, _, names in readable])
    total = sum(weight for _, weight, _ in readable)
    if total <= 0:
        raise CheckpointError(f"the readable selected checkpoints in {folder} all have weight 0")
    output = output if output is not None else os.path.join(folder, AVERAGED_MODEL_NAME)
    return AveragingPlan([path for path, _, _ in readable], [weight / total for _, weight, _ in readable], output)


def build_strategy(options: Dict[str, Any]) -> AveragingStrategy:
    """The strategy named by ``--strategy`` (default ``mean``) with the other folder options."""
    config = {key: value for key, value in options.items() if key in STRATEGY_OPTIONS}
    if "strategy" in options:
        config["type"] = options["strategy"]
    return AveragingStrategy.from_config(config)


def checkpoint_format(names: Sequence[str]) -> str:
    """Module (every name prefixed ``arg:`` or ``aux:``, as ``Module.save_checkpoint`` writes) or Gluon."""
    if names and all(name.startswith(MODULE_PREFIXES) for name in names):
        return MODULE_FORMAT
    return GLUON_FORMAT


def check_same_parameters(names_by_path: Sequence[Tuple[str, List[str]]]) -> None:
    """Every file in the same format and with the same array names as the first; the error names the file and key."""
    first_path, first_names = names_by_path[0]
    first_format = checkpoint_format(first_names)
    for path, names in names_by_path[1:]:
        if checkpoint_format(names) != first_format:
            raise CheckpointError(
                f"mixed checkpoint formats: {path} has {checkpoint_format(names)} but {first_path} has {first_format}"
            )
        check_same_names(names, path, first_names, first_path)


def check_output(plan: AveragingPlan) -> None:
    """The output can be written: a file name, not a folder, in an existing folder, not one of the inputs."""
    if not plan.output.strip():
        raise CheckpointError("the output is an empty name; give a file name with -o OUT")
    if os.path.isdir(plan.output):
        raise CheckpointError(f"output {plan.output} is a folder; give a file name such as {AVERAGED_MODEL_NAME}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(plan.output))):
        raise CheckpointError(f"the folder of output {plan.output} does not exist")
    inputs = {os.path.realpath(path) for path in plan.paths}
    if os.path.realpath(plan.output) in inputs:
        raise CheckpointError(f"output {plan.output} is one of the checkpoints being averaged; choose another name")


def print_plan(plan: AveragingPlan) -> None:
    """``--dry-run``: the output, then each file with its weight."""
    print(f"would average {len(plan.paths)} checkpoints into {plan.output} (dry run, nothing written):")
    for path, weight in zip(plan.paths, plan.weights):
        print(f"  {weight:<12.6g}  {path}")


def write_average(plan: AveragingPlan) -> None:
    """Stream the files into the weighted mean (a progress bar on a terminal) and write it atomically."""
    with tqdm(total=len(plan.paths), disable=None, file=sys.stderr, unit="checkpoint", desc=PROGRAM) as bar:
        averaged = average_checkpoint_files(plan.paths, plan.weights, progress=lambda _path: bar.update())
    save_params(plan.output, averaged)


def run_posthoc(arguments: argparse.Namespace) -> int:
    """``modavg posthoc``: plan, then print the plan (``--dry-run``) or write the rebuilt EMA."""
    plan = plan_posthoc(
        arguments.folder,
        sigma_rel=arguments.sigma_rel,
        gamma=arguments.gamma,
        step=arguments.step,
        run=arguments.run_id,
    )
    check_output_path(arguments.output, plan)
    if arguments.dry_run:
        print_posthoc_plan(plan, arguments.output)
    else:
        write_posthoc(plan, arguments.output)
        print(arguments.output)
    return 0


def print_posthoc_plan(plan: PosthocPlan, output: str) -> None:
    """``--dry-run``: the target and output, each snapshot with its coefficient, then the residual and error bound."""
    print(
        f"would rebuild the EMA of sigma_rel {plan.sigma_rel:.4g} (gamma {plan.gamma:.4g}) at step {plan.step} "
        f"from {len(plan.snapshots)} snapshots into {output} (dry run, nothing written):"
    )
    print(f"  {'coefficient':<14}  {'step':>10}  {'gamma':<10}  snapshot")
    for record, coefficient in zip(plan.snapshots, plan.coefficients):
        print(f"  {coefficient:<14.6g}  {record['step']:>10}  {record['gamma']:<10.4g}  {record['params_path']}")
    print(
        f"residual {plan.residual:.3g} (sum over steps of |combined profile - target profile|), error bound "
        f"{plan.error_bound:.3g} (the residual plus the snapshots' float32 rounding as the coefficients scale it): "
        "each value is within error bound * max |weight| over training of the exact EMA"
    )


def write_posthoc(plan: PosthocPlan, output: str) -> None:
    """Stream the snapshots into their signed sum (a progress bar on a terminal) and write it atomically."""
    with tqdm(total=len(plan.snapshots), disable=None, file=sys.stderr, unit="snapshot", desc=PROGRAM) as bar:
        arrays = combine_snapshots(plan, progress=lambda _path: bar.update())
    save_params(output, arrays)


def error_message(error: BaseException) -> str:
    """The message of a user error (a ``KeyError``'s without its quotes)."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error) or type(error).__name__


def one_line(text: str) -> str:
    """``text`` with its lines joined by spaces."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def print_error(message: str) -> None:
    print(f"{PROGRAM}: error: {one_line(message)}", file=sys.stderr)


class OneLineFormatter(logging.Formatter):
    """Formats each log record as one line."""

    def format(self, record: logging.LogRecord) -> str:
        return one_line(super().format(record))


@contextlib.contextmanager
def library_warnings_on_stderr() -> Iterator[None]:
    """Show the library's warnings on the current stderr, ``modavg: warning: ...``, while the command runs.

    A handler on the library's logger (added and removed here) rather than
    ``logging.basicConfig``, so calling :func:`main` repeatedly in one process
    neither stacks handlers nor writes to a stale stream.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(OneLineFormatter(f"{PROGRAM}: warning: %(message)s"))
    library_logger = logging.getLogger(LIBRARY_LOGGER)
    library_logger.addHandler(handler)
    try:
        yield
    finally:
        library_logger.removeHandler(handler)
