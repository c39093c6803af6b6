"""Metrics through a real Prometheus, the Grafana dashboard's queries, promtool, the Compose file
against the Compose specification schema, and the Dockerfile's start command."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from server_process import ROOT, ServerProcess, free_port

pytestmark = pytest.mark.slow

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "logitspec.json"


# The environment's own commands (check-jsonschema, logitspec), found even when it is not activated.
BIN = str(Path(sys.executable).parent)


def need(tool: str, package: str = "prometheus") -> str:
    """CI installs these Debian packages (scripts/install.sh test, as root), so there a missing one is a
    failure; elsewhere (a plain user cannot apt-get install) a skip that says what to install."""
    path = shutil.which(tool) or (f"/usr/bin/{tool}" if os.path.exists(f"/usr/bin/{tool}") else None)
    if path is None:
        message = f"{tool} is not installed: as root, scripts/install.sh test installs the Debian package {package}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-context", "2048", "--max-running", "4")
    yield s
    s.stop()


def traffic(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for i, text in enumerate(["Write a list of five fruits, one per line.", "Repeat: a b c a b c a b c"]):
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}],
                                                        "max_tokens": 48, "temperature": 0, "stream": i == 1})
            assert r.status_code == 200
        assert http.post("/v1/chat/completions", json={"messages": []}).status_code == 400


def test_metrics_exposition_passes_promtool(server):
    promtool = need("promtool")
    traffic(server)
    text = httpx.get(server.url + "/metrics").text
    for name in ("logitspec_spec_decode_num_drafts_total", "logitspec_spec_decode_num_draft_tokens_total",
                 "logitspec_spec_decode_num_accepted_tokens_total", "logitspec_spec_decode_acceptance_length_bucket",
                 "logitspec_spec_decode_speedup", "logitspec_time_to_first_token_seconds_bucket",
                 'logitspec_requests_total{endpoint="/v1/chat/completions",status="400"}'):
        assert name in text, name
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "error" not in (r.stdout + r.stderr).lower()


def test_every_dashboard_query_returns_data_through_prometheus(server, tmp_path):
    prometheus = need("prometheus")
    traffic(server)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "logitspec", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}]}]}))
    prom = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                up = httpx.get(f"{api}/query", params={"query": "up"}).json()
                if up["data"]["result"] and up["data"]["result"][0]["value"][1] == "1":
                    break
            except (httpx.HTTPError, ValueError, KeyError, IndexError):  # not ready yet: not JSON or no data
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("Prometheus never scraped the server")
        time.sleep(3)
        traffic(server)  # rates need samples on both sides of new traffic
        time.sleep(4)
        panels = json.loads(DASHBOARD.read_text())["panels"]
        assert len(panels) >= 15
        empty = []
        for panel in panels:
            for target in panel["targets"]:
                r = httpx.get(f"{api}/query", params={"query": target["expr"]}).json()
                assert r["status"] == "success", (panel["title"], r)
                if not r["data"]["result"]:
                    empty.append(panel["title"])
        assert not empty, f"dashboard panels without data: {empty}"
    finally:
        prom.terminate()
        prom.wait(10)


def test_prometheus_config_is_valid():
    r = subprocess.run([need("promtool"), "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_file_validates_against_compose_spec(tmp_path):
    ok = subprocess.run([shutil.which("check-jsonschema", path=BIN) or "check-jsonschema", "--builtin-schema", "vendor.compose-spec",
                         str(ROOT / "docker-compose.yml")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  x:\n    ports: 5\n    deploy: {resources: {reservations: {devices: 3}}}\n")
    bad = subprocess.run([shutil.which("check-jsonschema", path=BIN) or "check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(broken)],
                         capture_output=True, text=True)
    assert bad.returncode != 0
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), src
    gpu = compose["services"]["logitspec"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def dockerfile():
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    health = re.search(r"HEALTHCHECK .*? CMD (.*)$", text, re.M).group(1)
    return text, env, cmd, health


def test_dockerfile_start_command_and_healthcheck_work():
    """No Docker engine runs here: run the image's CMD and HEALTHCHECK with its ENV defaults."""
    text, env, cmd, health = dockerfile()
    assert "USER logitspec" in text and "EXPOSE 8000" in text
    assert env["LOGITSPEC_PORT"] == "8000"
    need("curl", "curl")  # the HEALTHCHECK's
    port = free_port()
    # The image has its venv's bin first on PATH (its `logitspec`); here, this environment's.
    run_env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
               **{k: v for k, v in env.items() if k.startswith("LOGITSPEC_")},
               "LOGITSPEC_HOST": "127.0.0.1", "LOGITSPEC_PORT": str(port), "LOGITSPEC_MAX_RUNNING": "2",
               "LOGITSPEC_CACHE": os.environ.get("LOGITSPEC_CACHE", str(Path.home() / ".cache" / "logitspec"))}
    proc = subprocess.Popen(cmd, env=run_env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            r = subprocess.run(["sh", "-c", health], env=run_env, capture_output=True)
            if r.returncode == 0:
                break
            assert proc.poll() is None, "the image's start command exited"
            time.sleep(0.5)
        assert r.returncode == 0, "HEALTHCHECK never passed"
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert models["data"][0]["id"].startswith("SmolLM2")
    finally:
        proc.terminate()
        proc.wait(20)
