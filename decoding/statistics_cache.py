"""Acceptance statistics kept per model, so that a restarted server starts from what it had learned.

The statistics (`AcceptanceStats`: how often a draft node of each kind was accepted) price every
node the cost model considers. A process that starts with none prices every kind at the prior:
for its first few hundred steps it drafts nodes that do not pay and cuts streaks that would,
and in a replay of Spec-Bench's categories, each started from empty statistics, LogitSpec ran
4-7% slower than from what the other categories had taught it, PLD 1-5% (bench/draft_replay.py
--restart-statistics, docs/replay_cost_aware.txt section 13; the real engine:
bench/restart_statistics.py). A server started with
`persist_statistics` (the default of `logitspec serve`) reads them from `<cache>/statistics/`
at start, and writes them there at most every SAVE_EVERY seconds as requests end, and when it
stops.

What a kind's acceptance depends on is the model and the drafters' kinds, so that is the key:
the model's identity (as the calibration cache keys it) and FORMAT. Not the machine: a kind's
acceptance is a property of the text the model writes, not of how fast it runs. The file holds
counts per kind and nothing of any request's text.

A process with nothing saved (a first start, a fresh replica or container, `generate`, `bench`)
starts from a prior shipped for the model when there is one (`priors/`, `prior_statistics`):
the statistics the engine learned answering bench/prior_prompts.jsonl, questions written for it
and not Spec-Bench's (bench/make_prior.py writes it). Its key names the model by what survives a
copy to another machine (name, size, architecture), not by where it lies.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from decoding.calibration_cache import cache_folder, keyed_path, model_identity, write_json
from decoding.loader import LoadedModel

PRIORS = Path(__file__).resolve().parent / "priors"  # shipped priors (package data), one file per model
FORMAT = 2  # bump when node kinds change (a drafter's families, details, their buckets), so older files are ignored; 2: corpus
SAVE_EVERY = 60.0  # seconds between writes while serving; a crash loses at most this much learning


def statistics_key(loaded: LoadedModel) -> dict:
    return {"format": FORMAT, "model": model_identity(loaded)}


def folder() -> Path:
    """LOGITSPEC_STATISTICS_CACHE, else `statistics` in the cache root (LOGITSPEC_CACHE)."""
    return cache_folder("LOGITSPEC_STATISTICS_CACHE", "statistics")


def entry_path(key: dict) -> Path:
    return keyed_path(folder(), key)


def load(key: dict) -> tuple[dict, str] | None:
    """The saved statistics (AcceptanceStats.state) and when they were saved, or None when there
    is no entry for this key (missing, unreadable, or of another model or format)."""
    try:
        entry = json.loads(entry_path(key).read_text())
        if entry["key"] != key:
            return None
        return entry["statistics"], str(entry["saved_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(key: dict, state: dict) -> Path | None:
    """Write the entry atomically; None when the cache folder is not writable (serving goes on)."""
    path = entry_path(key)
    entry = {"key": key, "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "statistics": state}
    return path if write_json(path, entry) else None


def prior_key(loaded: LoadedModel) -> dict:
    """The model as a shipped prior names it: its file name, the bytes of its weights (the .gguf
    file, else the folder's safetensors), its architecture and shape."""
    files = [loaded.gguf] if loaded.gguf is not None else sorted(loaded.folder.glob("*.safetensors"))
    config = loaded.hf_config
    return {"format": FORMAT, "name": loaded.name, "bytes": sum(f.stat().st_size for f in files),
            "architecture": config.get("model_type"), "layers": config.get("num_hidden_layers"),
            "hidden": config.get("hidden_size"), "vocab": config.get("vocab_size")}


def prior_path(loaded: LoadedModel) -> Path:
    return PRIORS / f"{loaded.name}.json"


def load_prior(loaded: LoadedModel) -> dict | None:
    """The shipped prior for this model (AcceptanceStats.state), or None: no file for its name,
    or one whose key does not match (another model of that name, or an older FORMAT)."""
    try:
        entry = json.loads(prior_path(loaded).read_text())
        return entry["statistics"] if entry["key"] == prior_key(loaded) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_prior(loaded: LoadedModel, state: dict, source: str, path: Path | None = None) -> Path:
    """Write a prior for this model (bench/make_prior.py): to `path`, by default where load_prior
    reads it. A kind a line, counts to 4 decimals (rounding keeps accepted <= offered)."""
    path = path or prior_path(loaded)
    kinds = [[*k[:4], round(k[4], 4), round(k[5], 4)] for k in state["kinds"]]
    kinds.sort(key=lambda k: (k[0], k[2], k[3], k[1]))
    lines = ",\n".join("  " + json.dumps(k) for k in kinds)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'{{"key": {json.dumps(prior_key(loaded))},\n "source": {json.dumps(source)},\n'
                    f' "statistics": {{"kinds": [\n{lines}\n ]}}}}\n')
    return path
