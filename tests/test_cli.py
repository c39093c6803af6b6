"""The `logitspec` command line: every option explains itself and shows its default, and the
defaults are the configuration dataclasses' own (written once, there)."""

import argparse
import dataclasses

import pytest

from decoding.config import EngineConfig
from decoding.verify import SamplingParams
from server.cli import HelpFormatter, _config, _settings, build_parser
from server.settings import ServerSettings


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("name", ["generate", "bench", "serve"])
def test_every_option_has_help_and_shows_its_default(name):
    parser = subcommands()[name]
    assert parser.formatter_class is HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        assert action.help and len(action.help) > 8, f"{name} {flag} has no help text"
        shown = " ".join(parser._get_formatter()._format_action(action).split())  # as --help prints it
        if action.required or action.nargs == 0:  # --prompt; on/off flags
            assert "(default:" not in shown, shown
        elif action.default is None:  # the help says what happens without it
            assert "default: " in shown, shown
        else:  # (argparse may wrap a long default after a hyphen: "/tmp/ci- clone/...")
            assert f"(default: {action.default})".replace(" ", "") in shown.replace(" ", ""), shown


def test_serve_defaults_are_the_dataclasses_defaults(monkeypatch):
    monkeypatch.delenv("LOGITSPEC_API_KEYS", raising=False)
    args = build_parser().parse_args(["serve"])
    assert _config(args, args.method, max_batch=args.max_running) == EngineConfig(max_batch=args.max_running)
    assert _settings(args) == ServerSettings(model_name="default")


@pytest.mark.parametrize("command", [["bench"], ["generate", "--prompt", "hi"]])
def test_generate_and_bench_defaults_are_the_dataclasses_defaults(command):
    args = build_parser().parse_args(command)
    config = _config(args, args.method if command[0] == "generate" else "ar")
    if command[0] == "generate":
        # one-shot: a quick calibration when the cache has none (see decoding/calibration_cache.py)
        assert config == EngineConfig(calibration_rounds=3)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        assert params == SamplingParams()
    else:
        assert config == dataclasses.replace(EngineConfig(), method="ar")


def test_flags_reach_the_config():
    args = build_parser().parse_args(["serve", "--no-adaptive", "--recalibrate", "--calibration-rounds", "3",
                                      "--draft-margin", "0.2", "--max-running", "2", "--session-memory-mb", "1",
                                      "--attention", "per-sequence", "--compile", "--no-access-log",
                                      "--runner", "transformers"])
    config = _config(args, args.method, max_batch=args.max_running)
    assert (config.adaptive, config.recalibrate, config.calibration_rounds, config.draft_margin, config.max_batch,
            config.attention, config.compile, config.runner) == (False, True, 3, 0.2, 2, "per-sequence", True,
                                                                 "transformers")
    assert _settings(args).session_bytes == 2**20
    assert _settings(args).access_log is False
