"""bench/gpu_check.sh --dry-run: the GPU check's steps run end to end on the CPU with a tiny model,
so the script is known to work on the day a GPU is lent."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "OUT": str(tmp_path)})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "gpu_check: passed" in run.stdout
    bench = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert bench["forward_ms"].keys() == {"1", "2", "4", "8", "16", "32", "64"}
    assert [r["batched_calls"] for r in bench["plain_steps"]] == [2] * 5  # 2 layers, one call each
    assert [r["per-sequence_calls"] for r in bench["plain_steps"]] == [2 * b for b in (1, 4, 8, 16, 32)]
    assert set(bench["tok_s"]) >= {"ar", "logitspec", "transformers"}
    spec = json.loads((tmp_path / "specbench.json").read_text())
    assert spec["mismatches"] == {"pld": 0, "logitspec": 0}
