"""`bench/gpu_train.py --dry`: the GPU benchmark's code path (random-init models built per layer, QLoRA and LoRA
on both sides, one subprocess per run, the table and the JSON) on the CPU with tiny shapes in fp32."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = "leantune:8b:qlora,peer:8b:qlora,leantune:8b:lora,peer:8b:lora"


def test_gpu_bench_dry_runs_both_systems(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "bench.json"
    env = {**os.environ, "BENCH_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--dry", "--only", RUNS,
                        "--budget-s", "170", "--min-run-s", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=180, env=env, cwd=ROOT, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    line = json.loads(p.stdout.strip().splitlines()[-1])
    assert line == json.loads(out.read_text())
    assert line["bench"] == "gpu_train" and line["dry"] is True
    runs = {(r["system"], r["model"], r["method"]): r for r in line["runs"]}
    assert set(runs) == {tuple(x.split(":")) for x in RUNS.split(",")}
    for key, r in runs.items():
        assert r["status"] == "ok", (key, r.get("error"))
        assert r["tokens_per_s"] > 0 and r["median_step_s"] > 0 and r["finite"], key
        assert len(r["losses"]) == line["warmup"] + line["steps"]
        assert r["losses"][-1] < r["losses"][0], (key, r["losses"])  # the step trains
    # the same LoRA placement on both sides: all 7 decoder linears per layer, not lm_head
    for method in ("lora", "qlora"):
        assert runs[("leantune", "8b", method)]["trainable"] == runs[("peer", "8b", method)]["trainable"]
    assert runs[("leantune", "8b", "qlora")]["optimizer"] == "PagedAdamW"
    assert runs[("peer", "8b", "qlora")]["bnb_linear4bit_layers"] == 14  # 2 layers x 7 linears
    assert runs[("peer", "8b", "lora")]["bnb_linear4bit_layers"] == 0
    row = next(r for r in line["rows"] if (r["model"], r["method"]) == ("8b", "qlora"))
    assert row["speed_ratio"] > 0 and row["anchor_h100_peer_tok_s"] == 5331
    assert "met" not in line["goal"]  # never claimed from a dry run
    assert "8b qlora" in p.stdout and "H100 peer tok/s" in p.stdout


def test_gpu_bench_budget_skips_runs():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--dry", "--budget-s", "0"],
                       capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    line = json.loads(p.stdout.strip().splitlines()[-1])
    assert [r["status"] for r in line["runs"]] == ["skipped"] * 7
    assert [(r["system"], r["model"], r["method"]) for r in line["runs"]][:2] == [
        ("leantune", "8b", "qlora"), ("peer", "8b", "qlora")]
