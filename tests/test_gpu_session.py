"""benchmarks/gpu_session.sh (the device-side script of the GPU checks), benchmarks/gpu_pack.sh and gpu_summary.py:
the stages and the documented device calls are well formed (command <= 2000 characters, carried paths git-ignored,
the same calls in the README), the packed .gpu/ (where built) is what the experiment reuses, the summary's
acceptance logic; and (-m slow) the `--cpu-smoke compare` stage end to end."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_session.sh"
PACK = REPO / ".gpu"

pytestmark = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")),
                                reason="needs bash and coreutils timeout")


def sh(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def device_runs() -> list[dict]:
    out = sh("--device-runs")
    assert out.returncode == 0, out.stderr
    runs = []
    for line in out.stdout.splitlines():
        stage, timeout_s, carry, command = (x.strip() for x in line.split("|", 3))
        runs.append({"stage": stage, "timeout_s": int(timeout_s), "carry": carry.split(","), "command": command})
    return runs


def test_scripts_parse_and_list_their_stages():
    for name in ("gpu_session.sh", "gpu_pack.sh"):
        r = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / name)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    out = sh("--list")
    assert out.returncode == 0 and out.stdout.split() == ["compare", "bench", "all"]
    bad = sh("nonsense", env={"OUT": "/nonexistent"})
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_documented_device_calls_fit_the_run_tool(tmp_path):
    runs = device_runs()
    assert {r["stage"] for r in runs} == {"compare", "bench", "all"}
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for r in runs:
        assert len(r["command"]) <= 2000 and 1 <= r["timeout_s"] <= 600
        assert r["command"].split()[:3] == ["bash", "benchmarks/gpu_session.sh", r["stage"]]
        assert 1 <= len(r["carry"]) <= 8
        assert f"`{r['command']}`" in readme, f"README lacks the device command {r['command']!r}"
        for path in r["carry"]:
            if shutil.which("git") and (REPO / ".git").exists():
                ignored = subprocess.run(["git", "check-ignore", "-q", f"{path}/"], cwd=REPO)
                assert ignored.returncode == 0, f"carried path {path} is not git-ignored"
    # the bench call's own budget stays inside its timeout
    bench = next(r for r in runs if r["stage"] == "bench")
    assert int(bench["command"].split()[3]) < bench["timeout_s"]


@pytest.mark.skipif(not (PACK / "data" / "meta.json").is_file(), reason="no .gpu/ here (benchmarks/gpu_pack.sh)")
def test_packed_data_and_peers_are_what_the_experiment_reuses(tmp_path):
    """The session copies .gpu/data to OUT/data: the experiment must take it as prepared (no prepare on the device)
    with the config's vocabulary, and .gpu/peers.json must match the config's search settings (the fallback)."""
    from dwml.experiments.stages import ensure_data, ensure_peers
    from dwml.experiments.config import load_experiment
    from dwml.data.shards import load_meta

    cfg = load_experiment(REPO / "configs" / "gpu-compare-9min.toml")
    (tmp_path / "data").symlink_to(PACK / "data")
    shutil.copy(PACK / "peers.json", tmp_path / "peers.json")
    logs: list[str] = []
    prepared = ensure_data(cfg, tmp_path, logs.append)
    assert int(load_meta(prepared)["vocab_size"]) == cfg.prepare.vocab_size
    peers = ensure_peers(cfg, tmp_path, cfg.prepare.vocab_size, logs.append)
    assert len(peers) == cfg.search.peers
    assert logs == [f"data: {tmp_path / 'data'} (prepared)"]  # nothing prepared, nothing searched
    assert (PACK / "eval" / "ewok" / "ewok_data_babylm.zip").is_file()
    assert not list((PACK / "eval" / "ewok").glob("*.jsonl"))  # EWoK stays in its zip
    for task in ("blimp_filtered", "blimp_supplement"):
        assert list((PACK / "eval" / task).glob("*.jsonl"))


def summary(exp: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_summary.py"), str(exp), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_summary_acceptance_checks(tmp_path):
    assert "not decided (no results)" in summary(tmp_path, "--wall", "600", "--rc", "124")
    mlm = {"name": "peer0", "arch": "MB-L5", "valid_loss": 4.4, "plateau_exit_step": 60,
           "zero_shot": {"blimp_filtered": 63.0, "blimp_supplement": 55.0, "ewok": 51.0}}
    results = {"host": {"gpu": "H200"}, "data": {}, "wall_time_s": 500.0,
               "runs": [{"name": "mlm", "method": "mlm", "status": "done", "n_students": 1, "models": [mlm],
                         "budget": {"tokens_per_student": 1000}, "timing": {"wall_s": 10.0}}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = summary(tmp_path, "--wall", "530", "--rc", "0")
    assert "wall <= 540 s: PASS (530 s)" in out and "MLM valid loss <= 4.5: PASS (4.400)" in out
    assert "MLM BLiMP-filtered >= 62%: PASS (63.0)" in out and "100 tokens/s per student" in out
    out = summary(tmp_path, "--wall", "545", "--rc", "124")
    assert "FAIL (stopped by the timeout after 545 s)" in out and "--report-only" in out
    mlm["zero_shot"]["blimp_filtered"] = 61.9
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert "BLiMP-filtered >= 62%: FAIL (61.9)" in summary(tmp_path, "--wall", "100", "--rc", "0")
    assert "predates this call" in summary(tmp_path, "--since", str(2**40))


@pytest.mark.slow
@pytest.mark.skipif(not (PACK / "data" / "meta.json").is_file(), reason="no .gpu/ here (benchmarks/gpu_pack.sh)")
def test_cpu_smoke_compare_stage(tmp_path):
    """The device's `compare` stage on the CPU with tiny --set overrides (~45 s here): wheels installed with the
    device's pip line, the packed data reused, report and results back in $OUT, the summary printed."""
    out = tmp_path / "out"
    r = sh("--cpu-smoke", "compare", env={"OUT": str(out)}, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["experiment.tar.gz", "report.md", "results.json",
                                                    "session.log", "summary.txt"]
    log = (out / "session.log").read_text()
    assert "/exp/data (prepared)" in log and "data: prepare" not in log
    assert "/site/bayes_opt)" in log  # imported from the --target install, as on the device
    text = (out / "summary.txt").read_text()
    assert "compare: dwml experiment exit 0" in text and "acceptance (issue 9): wall <= 540 s: PASS" in text
    assert json.loads((out / "results.json").read_text())["data"]["vocab_size"] == 16384
    assert "Differences vs MLM" in (out / "report.md").read_text()
