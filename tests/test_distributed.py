"""`leantune finetune` under torchrun (train.distributed): 2 CPU processes on gloo against one process with the same
global batch, for DDP and FSDP2, LoRA, QLoRA and full finetuning; resume after a rank is killed, on 2 ranks and on
1 (DCP resharding); bad input stops every rank with the same message.

Each run is the real command in a subprocess with a timeout: `python -m torch.distributed.run --nproc_per_node 2
-m leantune finetune ...`, one thread per rank, fp32, a tiny random Llama and a few steps.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
import torch.distributed as dist  # noqa: E402

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
QA = [(f"What is item {i}?", f"Item {i} is the {w} one.") for i, w in
      enumerate(["red", "green", "blue", "small", "large", "odd", "even", "first", "last"])]
# 9 rows, 4 per global micro-batch: batches of 4, 4, 1 rows, so in the last one rank 1 holds no row (it runs a
# row without loss tokens) and the window of two micro-batches straddles an epoch. lr 1e-3: AdamW's update of an
# element with a tiny gradient is ~lr whatever the gradient's last bits, so rounding (the ranks sum in another
# order) moves such a weight by up to ~lr * 1e-2; at 1e-3 that stays within the 1e-5 the weights must match to
COMMON = ("--no-progress", "--eval-fraction", "0", "--dtype", "fp32", "--batch-size", "4", "--grad-accum", "2",
          "--max-steps", "3", "--lr", "1e-3", "--report-to", "none", "--seed", "3")
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def run_single(args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leantune", "finetune", *map(str, args)], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=TIMEOUT)


def run_torchrun(args, nproc: int = 2, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master-port",
           str(_free_port()), "-m", "leantune", "finetune", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(out: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def weights(out: Path) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if (out / "model.safetensors").exists() else "adapter_model.safetensors"
    return load_file(str(out / name))


def assert_same_run(ref: Path, out: Path) -> None:
    a, b = losses(ref), losses(out)
    assert len(a) == len(b) == 3
    assert a[-1] != a[0]  # it trained
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    ea, eb = losses(ref, "eval_loss"), losses(out, "eval_loss")
    assert len(ea) == len(eb) == 2 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(ea, eb)), (ea, eb)
    wa, wb = weights(ref), weights(out)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5), k


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_folder import make_tiny_model_folder

    root = tmp_path_factory.mktemp("dist")
    model = make_tiny_model_folder(root / "model")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n" for q, a in QA))
    # held-out loss every 2 steps (the whole model evaluated on every rank) and gradient checkpointing (blocks
    # recomputed in backward, re-gathered by FSDP) ride along
    return root, ["--model", model, "--data", data, "--eval-data", data, "--eval-every", "2",
                  "--gradient-checkpointing", *COMMON]


@pytest.fixture(scope="module")
def reference(setup):
    """One-process runs, per method."""
    root, base = setup
    runs = {}

    def get(method: str) -> Path:
        if method not in runs:
            out = root / f"ref-{method}"
            ok(run_single([*base, "--method", method, "--output", out]))
            runs[method] = out
        return runs[method]

    return get


@pytest.mark.parametrize("method,parallel", [("lora", "fsdp"), ("lora", "ddp"), ("full", "fsdp"), ("full", "ddp")])
def test_two_ranks_equal_one_process(setup, reference, method, parallel):
    root, base = setup
    out = root / f"{method}-{parallel}"
    args = [*base, "--method", method, "--parallel", parallel, "--output", out]
    # full + ddp through `leantune finetune --nproc 2`, which relaunches itself under torchrun (--standalone)
    proc = ok(run_single([*args, "--nproc", "2"]) if (method, parallel) == ("full", "ddp") else run_torchrun(args))
    assert f"--parallel {parallel} on 2 processes" in proc.stderr
    assert_same_run(reference(method), out)
    # one set of files, written by rank 0, in the one-process format: a PEFT adapter (or an HF model folder)
    if method == "full":
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    else:
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert proc.stdout.count("adapter saved to") == 1


def test_qlora_base_is_replicated_not_sharded(setup):
    """QLoRA under FSDP2: the packed 4-bit base is uint8 buffers, which fully_shard leaves whole on every rank;
    only the (float) adapter parameters become sharded DTensors."""
    from torch.distributed.tensor import DTensor

    from leantune import methods
    from leantune.methods import QLoraConfig
    from leantune.models.loader import load_model
    from leantune.precision import resolve_precision
    from leantune.train.distributed import Parallel
    from leantune.train.objectives import SFTObjective

    root, base = setup
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        spec = methods.get_method("qlora")
        model, _ = load_model(str(base[1]), resolve_precision("fp32", "cpu"),
                              quantize=spec.quantize(QLoraConfig()))
        model = methods.apply(model, "qlora", config=QLoraConfig())
        packed = {n: b.clone() for n, b in model.named_buffers() if b.dtype == torch.uint8}
        assert packed
        Parallel(0, 1, 0, "fsdp", torch.device("cpu")).wrap(model, SFTObjective())
        after = dict(model.named_buffers())
        for n, b in packed.items():
            assert not isinstance(after[n], DTensor) and torch.equal(after[n], b), n
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(isinstance(p, DTensor) for p in trainable)
    finally:
        dist.destroy_process_group()


def test_resume_after_a_rank_is_killed_on_two_ranks_and_on_one(setup, reference):
    """QLoRA under FSDP2 (--parallel auto): rank 1 dies after step 2 (checkpoint step-2 on disk); --resume on 2
    ranks and in one process (DCP reshards the 2-rank checkpoint) gives the uninterrupted one-process run's losses
    and adapter."""
    root, base = setup
    out = root / "killed"
    args = [*base, "--method", "qlora", "--save-every", "2", "--output", out]
    proc = run_torchrun(args, LEANTUNE_TEST_EXIT_AFTER_STEP="2")
    assert proc.returncode != 0
    assert not (out / "adapter_model.safetensors").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
    assert (out / "checkpoints" / "step-2" / "dcp" / ".metadata").exists()
    one = root / "killed-1"
    shutil.copytree(out, one)
    proc = ok(run_torchrun([*args, "--resume"]))
    assert "resumed at step 2" in proc.stderr and "--parallel fsdp on 2 processes" in proc.stderr
    assert_same_run(reference("qlora"), out)
    ok(run_single([*base, "--method", "qlora", "--save-every", "2", "--output", one, "--resume"]))
    assert_same_run(reference("qlora"), one)


def test_bad_input_stops_every_rank_with_the_same_message(setup):
    root, base = setup
    proc = run_torchrun([*base, "--batch-size", "3", "--output", root / "bad"])
    assert proc.returncode != 0
    msg = "--batch-size 3 is the global micro-batch and must divide evenly over the 2 processes"
    assert proc.stderr.count(msg) == 2  # rank 0 and rank 1
    proc = run_single([*base, "--parallel", "ddp", "--output", root / "bad"])
    assert proc.returncode == 2 and "launch it with torchrun" in proc.stderr
    proc = run_torchrun([*base, "--method", "adalora", "--output", root / "bad"])
    assert proc.returncode != 0 and proc.stderr.count("--method adalora changes gradients or weights") == 2


def test_estimate_per_rank_divides_what_fsdp_shards(setup):
    """`estimate --nproc N`: FSDP divides adapter, gradients and optimizer state by N and the float weights but
    for the gathered root and blocks; QLoRA's 4-bit base stays whole; DDP replicates everything."""
    from leantune.recipes.estimate import EstimateConfig, estimate

    model = str(setup[1][1])
    kw = dict(model=model, device="cpu", dtype="fp32", batch=8, seq=64)
    one = estimate(EstimateConfig(**kw))
    half = estimate(EstimateConfig(**{**kw, "batch": 4}))  # 4 rows: more than one rank of 4 has
    fsdp = estimate(EstimateConfig(**kw, nproc=4, parallel="fsdp"))
    ddp = estimate(EstimateConfig(**kw, nproc=4, parallel="ddp"))
    assert ddp["weights"] == one["weights"] and ddp["optimizer"] == one["optimizer"]
    assert fsdp["adapter"] == one["adapter"] // 4 and fsdp["optimizer"] == one["optimizer"] // 4
    assert fsdp["gradients"] < ddp["gradients"] and ddp["total"] < one["total"]
    # a quarter of the weights, plus the gathered root (the rest of it) and two gathered blocks
    split = one["weight_split"]
    assert split["replicated"] == 0
    assert fsdp["weights"] == one["weights"] // 4 + split["root"] * 3 // 4 + 2 * split["block"]
    q1 = estimate(EstimateConfig(**kw, method="qlora"))
    q4 = estimate(EstimateConfig(**kw, method="qlora", nproc=4))
    assert q4["weights"] >= q1["weight_split"]["replicated"] > 0
    with pytest.raises(ValueError, match="multiple of --nproc 3"):
        EstimateConfig(**kw, nproc=3)
