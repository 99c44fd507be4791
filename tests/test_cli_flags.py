"""`train`'s flags are TrainConfig's fields: one source of truth for names, types, defaults and help."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest

from saescope.cli import build_parser
from saescope.cli.flags import Parser, add_config_flags, config_from_flags
from saescope.core.schema import config_field
from saescope.core.train import TrainConfig


def test_train_without_flags_is_the_default_config():
    a = build_parser().parse_args(["train"])
    assert config_from_flags(TrainConfig, a) == TrainConfig()


def test_every_config_field_is_a_train_flag_with_its_help():
    actions = {act.dest: act for act in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        assert f.name in actions, f"TrainConfig.{f.name} has no --{f.name.replace('_', '-')} flag"
        assert actions[f.name].help and f.metadata["help"].replace("%", "%%") in actions[f.name].help


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action.choices, dict):  # a command's subcommands (a flag's choices are a tuple)
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_commands_help_renders():
    # argparse %-formats help: a config's "20% comments" once crashed `saescope train --help` with a traceback
    helps = [p.format_help() for p in _parsers(build_parser())]
    assert len(helps) > 10
    assert any("20% real comments" in h for h in helps)


def test_flags_follow_the_dataclass():
    @dataclass
    class Demo:
        width: int = config_field(8, "how wide")
        rate: float | None = config_field(None, "how fast")
        name: str = config_field("x", "what", choices=("x", "y"))
        loud: bool = config_field(False, "a switch")

    p = Parser(prog="demo")
    add_config_flags(p, Demo)
    assert config_from_flags(Demo, p.parse_args([])) == Demo()
    got = config_from_flags(Demo, p.parse_args(["--width", "3", "--rate", "0.5", "--name", "y", "--loud"]))
    assert got == Demo(width=3, rate=0.5, name="y", loud=True)
    assert config_from_flags(Demo, p.parse_args(["--width", "3"]), width=4).width == 4  # explicit values win
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "z"])  # choices come from the field
    assert "how wide (default: 8)" in p.format_help()


def test_train_flag_values_reach_the_config():
    a = build_parser().parse_args(["train", "--k", "7", "--ctx-len", "64", "--skip-first-token", "--auxk-alpha", "0.1"])
    cfg = config_from_flags(TrainConfig, a)
    assert (cfg.k, cfg.ctx_len, cfg.skip_first_token, cfg.auxk_alpha) == (7, 64, True, 0.1)


def test_shared_data_flag_wins_over_an_unset_environment(tiny_sae_dir, tmp_path, monkeypatch, capsys):
    from tests.conftest import SHARED, assert_one_line_error

    from saescope.cli import main

    if not SHARED.is_dir():
        pytest.skip("needs the shared reference data (../shared/data)")
    monkeypatch.delenv("SAESCOPE_SHARED_DATA", raising=False)
    out = tmp_path / "c.json"
    argv = ["inspect", "--sae", str(tiny_sae_dir), "--texts", "mgsm_fr", "--baseline", "mgsm_en", "--limit", "4", "--layers", "1",
            "--out", str(out)]
    assert_one_line_error(main(argv), capsys.readouterr().err, "shared reference data folder is not set")
    assert main([*argv, "--shared-data", str(SHARED)]) == 0 and out.exists()
    monkeypatch.delenv("SAESCOPE_SHARED_DATA", raising=False)
    assert_one_line_error(main([*argv, "--shared-data", str(tmp_path / "nowhere")]), capsys.readouterr().err,
                          "--shared-data")
