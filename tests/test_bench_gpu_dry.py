"""`bench/gpu_train.py --dry`: the GPU benchmark's code path (random-init models built per layer, QLoRA and LoRA
on both sides, one subprocess per run, the table and the JSON) on the CPU with tiny shapes in fp32; and
`bench/gpu.sh` itself on the CPU, its co-serving part (`bench/coserve.py`) on the tiny model."""
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
    assert [r["status"] for r in line["runs"]] == ["skipped"] * 9
    assert [(r["system"], r["model"], r["method"]) for r in line["runs"]][:2] == [
        ("leantune", "8b", "qlora"), ("peer", "8b", "qlora")]


def test_gpu_sh_dry_runs_coserve(tmp_path):
    """bench/gpu.sh end to end on the CPU: nothing installed, no GPU tests, the training bench with no budget, and
    the co-serving bench on the tiny model (COSERVE_ARGS come after the script's `--device cuda`, and win)."""
    pytest.importorskip("transformers")  # tests/tiny_folder.py builds the tiny model with it
    out = tmp_path / "out"
    cs_args = ("--device cpu --model tiny --phase-s 1 --steps 2 --serve-iters 30 --output-len 8 --adapter-output 8 "
               "--adapter-reps 1 --n-adapters 4")
    env = {**os.environ, "PY": sys.executable, "SKIP_INSTALL": "1", "TESTS_S": "0",
           "BENCH_ARGS": "--dry --budget-s 0", "COSERVE_ARGS": cs_args,
           "FSDP_S": "0",  # the FSDP2 smoke is a torchrun launch of its own: tests/test_distributed.py covers it
           "SERVE_S": "0"}  # bench/serve.py --quick has its own test (tests/test_bench_cpu.py)
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(out)], capture_output=True, text=True,
                       timeout=180, env=env, cwd=ROOT, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    parts = {line.split(":")[0]: line for line in summary.splitlines()}
    assert set(parts) == {"install", "tests", "fsdp", "bench", "coserve", "serve", "total"}, summary
    assert parts["serve"].startswith("serve: skipped"), summary
    assert parts["fsdp"].startswith("fsdp: skipped"), summary
    assert parts["tests"].startswith("tests: skipped"), summary
    assert parts["bench"].startswith("bench: rc=0"), summary
    log = (out / "coserve.log").read_text()
    assert parts["coserve"].startswith("coserve: rc=0"), summary + log[-3000:]
    assert "--device cpu --model tiny" in parts["coserve"] and "(a) co-serve FT / FT-only" in parts["coserve"]
    text = (out / "coserve.json").read_text()
    assert "NaN" not in text  # strict JSON: NaN written as null
    res = json.loads(text)
    assert res["bench"] == "coserve" and res["complete"] is True
    assert (res["device"], res["dtype"], res["model"], res["clock"]) == ("cpu", "float32", "tiny", "cpu")
    assert res["settings"]["output_len"] == 8 and res["phase_s"] == 1
    assert res["serve"]["gen_tok_s"] > 0 and res["serve"]["iterations"] >= 10  # the minimum: output-len + 2
    assert res["ft_only"]["steps"] >= 1 and res["ft_only"]["ft_tok_s"] > 0
    assert res["coserve"]["steps"] >= 1 and res["coserve"]["gen_tokens"] > 0
    assert res["temporal"]["steps"] >= 1 and res["adapters"]["n"] == 4 and res["adapters"]["ratio"] > 0
    assert set(res["ratios"]) >= {"coserve_ft_fraction", "coserve_tpot_p99_ratio", "paired_tpot_p99_ratio",
                                  "adapters_ratio", "adapters_ratio_q_v"}
    assert res["paired"]["windows"] >= 4 and res["paired"]["job"]["requests"] > 0
    assert not list(out.glob(".coserve.json.*"))  # the atomic write left no temporary file


def test_gpu_bench_dry_full_galore_row():
    """The 8B full finetuning + per-layer GaLore row (leantune only) on its --dry CPU path: every weight
    trains, the optimizer is GaLore's with the per-layer hooks, and the step trains."""
    env = {**os.environ, "BENCH_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--dry", "--only",
                        "leantune:8b:full-galore", "--budget-s", "170", "--min-run-s", "1", "--steps", "3"],
                       capture_output=True, text=True, timeout=180, env=env, cwd=ROOT, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    line = json.loads(p.stdout.strip().splitlines()[-1])
    (r,) = line["runs"]
    assert r["status"] == "ok", r.get("error")
    assert r["optimizer"] == "GaLoreAdamW" and r["per_layer"] is True and r["adapter_dtype"] == "float32"
    assert r["trainable"] > 2 * 512 * 64  # more than its embeddings + untied head: every weight trains
    assert r["finite"] and r["losses"][-1] < r["losses"][0], r["losses"]
    assert "8b full-galore" in p.stdout
