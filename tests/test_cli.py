"""The `logitspec` command line: every option explains itself and shows its default, and the
defaults are the configuration dataclasses' own (written once, there)."""

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

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
    # a server keeps its acceptance statistics across restarts (decoding/statistics_cache.py)
    assert _config(args, args.method, max_batch=args.max_running) == EngineConfig(max_batch=args.max_running,
                                                                                  persist_statistics=True)
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


# Run in a fresh interpreter: records GOMP_SPINCOUNT at the moment torch is first imported, which is
# when libgomp reads it. (Without the default, plain decoding on a 2-core CPU shared with two busy
# processes ran at 0.8 tok/s; see server/cli.py.)
SPINCOUNT_AT_TORCH_IMPORT = """
import os, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT"))
sys.meta_path.insert(0, Watch())
import server.cli
import torch
print(seen[0] if seen else "torch imported before server.cli")
"""


@pytest.mark.parametrize("env, expected", [({}, "1000"), ({"GOMP_SPINCOUNT": "50"}, "50"),
                                           ({"OMP_WAIT_POLICY": "ACTIVE"}, "None")])
def test_openmp_threads_do_not_spin_for_long_unless_asked(env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", SPINCOUNT_AT_TORCH_IMPORT], env={**base, **env}, check=True,
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True).stdout
    assert out.strip() == expected
