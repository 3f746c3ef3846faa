"""The typed lasp-train command line: choices, errors naming the flag, no abbreviations, help for every
field, the flags of the README, the Makefile and the notes; the progress ETA and throughput fixes."""

from __future__ import annotations

import re
import shlex
import time
import typing
from pathlib import Path

import pytest

from models.cli import build_parser, config_from_args
from models.progress import Progress
from models.train import StepClock
from models.train_config import SECTIONS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "args, flag, words",
    [
        (["--steps", "abc"], "--run.steps", "expected int, got 'abc'"),
        (["--strategy", "ringg"], "--mesh.strategy", "invalid choice 'ringg'"),
        (["--remat", "most"], "--run.remat", "invalid choice 'most'"),
        (["--fsdp", "maybe"], "--mesh.fsdp", "expected a boolean"),
        (["--data.source", "csv"], "--data.source", "invalid choice 'csv'"),
        (["--model.norm", "batch"], "--model.norm", "invalid choice 'batch'"),
        (["--model.layer_types", "linear,sofmax"], "--model.layer_types", "invalid choice 'sofmax'"),
        (["--preset", "tnl-2b"], "--preset", "unknown preset"),
        (["--ste", "5"], "unrecognized arguments", "--ste"),  # no prefix abbreviations
    ],
)
def test_bad_values_name_their_flag(args, flag, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and words in err, err


def test_values_and_choices_parse():
    config = config_from_args(
        ["--strategy", "allgather", "--remat", "dots", "--fsdp", "on", "--dp", "none", "--time-limit-s", "9.5"]
        + ["--model.layer_types", "linear,softmax", "--model.n_layers", "2", "--data.eod_token", "3"]
    )
    mesh, run = config.mesh, config.run
    assert (mesh.strategy, run.remat, mesh.fsdp, mesh.dp) == ("allgather", "dots", True, None)
    assert config.run.time_limit_s == 9.5 and config.model.layer_types == ("linear", "softmax")
    assert config.data.eod_token == 3


def test_choices_cover_the_layers_strategies():
    from lasp_jax import STRATEGIES as LINEAR
    from lasp_jax.delta_rule import STRATEGIES as DELTA_RULE
    from lasp_jax.softmax import STRATEGIES as SOFTMAX
    from models.train_config import SoftmaxStrategy, Strategy

    assert set(LINEAR) | set(DELTA_RULE) <= set(typing.get_args(Strategy))
    assert set(SOFTMAX) <= set(typing.get_args(SoftmaxStrategy))


def test_help_documents_every_field():
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}  # argparse keeps no public list
    for section, cls in SECTIONS.items():
        for name in cls.__dataclass_fields__:
            action = actions[f"{section}.{name}"]
            assert action.help and not action.help.startswith(" ("), f"--{section}.{name} has no help"
    for name in ("d_model", "n_layers", "family", "layer_types", "vocab_size"):
        assert actions[f"model.{name}"].help.strip(), name
    assert "--run.tensorboard" in parser.format_help()


def documented_commands() -> list[list[str]]:
    """Every lasp-train command line in the README, the Makefile and the notes (continuations joined)."""
    commands = []
    for path in [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "notes").glob("*.md"))]:
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            match = re.search(r"(?:lasp-train|-m models\.train)\s+(--.*)", line)
            if match:
                args = shlex.split(match.group(1).split("`")[0].split("#")[0])
                if "--help" not in args and "--run.init_from" not in args:  # (init_from reads a checkpoint)
                    commands.append(args)
    return commands


def test_documented_commands_parse():
    commands = documented_commands()
    assert len(commands) >= 3, commands
    for args in commands:
        config_from_args(args)


def test_eta_counts_steps_since_resume():
    bar = Progress(1000, start=900, enabled=False)
    assert bar.eta(950, elapsed=10.0) == pytest.approx(10.0)  # 50 steps in 10 s, 50 left
    assert Progress(1000, enabled=False).eta(500, elapsed=10.0) == pytest.approx(10.0)


def test_first_throughput_window_excludes_compilation():
    clock = StepClock(5)
    time.sleep(0.6)  # the first step: compilation
    clock.exclude_first_step(6)
    time.sleep(0.02)
    seconds, steps, _ = clock.lap(8)
    assert steps == 2 and seconds < 0.5  # ≥ 0.62 with the first step; the margin is for a loaded machine
    clock = StepClock(0)
    time.sleep(0.05)
    clock.exclude_first_step(1)
    seconds, steps, _ = clock.lap(1)
    assert steps == 1 and seconds >= 0.05  # a report at the first step keeps its time
