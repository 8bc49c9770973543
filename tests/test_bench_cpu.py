"""The CPU benchmarks' plumbing on the tiny model (their numbers are not asserted: timings live in bench/)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decode_bench_runs_both_precisions_and_names_the_cpu():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "decode.py"), "--model", "tiny", "--concurrency", "2",
                        "--prompt-len", "8", "--output-len", "4", "--serve-iters", "12"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("cpu: ")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["bench"] == "decode" and set(res["cpu"]) >= {"cpu", "capability", "native_bf16", "threads"}
    for dt in ("float32", "bfloat16"):
        assert res[dt]["gen_tokens"] > 0
    assert res["bf16_over_fp32"] > 0


def test_gemm_bench_measures_both_dtypes_and_names_the_cpu():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gemm.py"), "--m", "16", "--k", "32", "--n", "48",
                        "--reps", "2"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("cpu: ")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["bench"] == "gemm" and res["shape"] == [16, 32, 48] and "native_bf16" in res["cpu"]
    assert res["gflops"]["float32"] > 0 and res["gflops"]["bfloat16"] > 0 and res["bf16_over_fp32"] > 0


def test_budget_bench_runs_every_share_and_writes_its_files(tmp_path):
    """bench/budget.py at 2 steps per phase: the CPU first, a row per SFT share, the CSV / Markdown / PNG."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "budget.py"), "--seeds", "1", "--phase-steps", "2",
                        "--pretrain-epochs", "2", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("cpu: ")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["bench"] == "budget" and "native_bf16" in res["cpu"]
    cells = res["cells"]
    assert [c["share"] for c in cells] == [0.0, 0.1, 0.25, 0.5, 1.0]
    assert [(c["n_sft"], c["n_pairs"]) for c in cells] == [(0, 64), (6, 58), (16, 48), (32, 32), (64, 0)]
    assert all(0 <= c["accuracy"] <= c["format"] <= 1 for c in cells)
    out = tmp_path / "out"
    assert len((out / "budget.csv").read_text().splitlines()) == 6
    assert (out / "budget.md").read_text().startswith("cpu: ")
    assert (out / "budget.png").read_bytes().startswith(b"\x89PNG")


def test_serve_bench_quick_runs_every_scenario_and_the_json_schema_rows(folder):
    """bench/serve.py --quick on the tiny model: a row per (scenario, clients), each with measured latencies, and
    the JSON-schema decoding row (its ratio is computed from both runs, not asserted)."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--quick", "--model", str(folder),
                        "--threads", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["bench"] == "serve" and res["quick"] is True and res["cpu"]
    assert {(r["scenario"], r["clients"]) for r in res["rows"]} == {
        (s, c) for s in ("base", "16 adapters", "64 adapters, --max-loras 16") for c in (1, 2)}
    for r in res["rows"]:
        assert r["req_per_s"] > 0 and r["ttft_p50"] > 0 and r["ttft_p99"] >= r["ttft_p50"]
    (row,) = res["structured"]["rows"]
    assert row["free_tok_s"] > 0 and row["json_tok_s"] > 0
    assert abs(row["ratio"] - row["json_tok_s"] / row["free_tok_s"]) < 0.01
