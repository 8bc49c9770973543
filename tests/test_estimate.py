"""`leantune estimate`: the activation rules equal the tensors autograd saves (tiny models, every code path the
rules name), the formula behaves (linear in batch x seq, qlora < lora, checkpointing < none), the CLI prints
its table, and on the real SmolLM2-135M the predicted step memory is within 15% of the measured peak RSS
growth of real training steps (slow; in a fresh subprocess).

Run this file as a script to print the measurement: `python tests/test_estimate.py BATCH SEQ [gc]`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from leantune.models.config import ModelConfig
from leantune.recipes.estimate import (
    EstimateConfig,
    activation_bytes,
    estimate_memory,
    make_plan,
    nf4_bytes,
    read_model_config,
)

TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2, "tie_word_embeddings": True}


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def saved_bytes(model, batch: int, seq: int) -> int:
    """Bytes of the distinct storages autograd saves for backward during one loss forward, parameters and
    buffers excluded: what the activation rules predict."""
    from leantune.train.loss import lm_loss_sum

    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    b = SimpleNamespace(input_ids=ids, labels=ids.clone(), positions=None, segment_ids=None)
    own = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in own:
            seen.setdefault(st._cdata, st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss_sum(model, b)
    return sum(seen.values())


def tiny_model(cfg: ModelConfig, dtype=torch.float32, targets="all-linear", dropout=0.0, quantize=False):
    import leantune
    from leantune.models.llama import LlamaForCausalLM
    from leantune.methods.targets import parse_targets

    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype)
    if quantize:
        from leantune.quant import quantize_model

        quantize_model(model)
    leantune.apply(model, "lora", r=4, alpha=8, targets=parse_targets(targets), dropout=dropout)
    return model.train()


CASES = [  # (dtype, targets, dropout): the fused paths, a partial target list, dropout, a half base
    (torch.float32, "all-linear", 0.0),
    (torch.float32, "q_proj,v_proj", 0.0),
    (torch.float32, "o_proj,down_proj", 0.0),
    (torch.float32, "gate_proj,up_proj", 0.0),
    (torch.float32, "all-linear", 0.1),
    (torch.bfloat16, "all-linear", 0.0),
]


@pytest.mark.parametrize("dtype,targets,dropout", CASES)
def test_activation_rules_equal_what_autograd_saves(one_thread, dtype, targets, dropout):
    cfg = tiny_cfg()
    model = tiny_model(cfg, dtype, targets, dropout)
    plan = make_plan(cfg, "lora", 4, targets, dropout, 2 if dtype == torch.bfloat16 else 4, "cpu")
    for batch, seq in ((2, 16), (1, 24)):
        assert activation_bytes(plan, batch, seq)["total"] == saved_bytes(model, batch, seq), (batch, seq)


@pytest.mark.parametrize("dtype,targets", [(torch.float32, "all-linear"), (torch.float32, "v_proj,o_proj"),
                                           (torch.float32, "q_proj"), (torch.bfloat16, "all-linear")])
def test_activation_rules_for_qwen3_qk_norms(one_thread, dtype, targets):
    cfg = tiny_cfg(model_type="qwen3", qk_norm=True, head_dim=32)
    model = tiny_model(cfg, dtype, targets)
    plan = make_plan(cfg, "lora", 4, targets, 0.0, 2 if dtype == torch.bfloat16 else 4, "cpu")
    assert activation_bytes(plan, 2, 16)["total"] == saved_bytes(model, 2, 16)
    plain = make_plan(tiny_cfg(head_dim=32), "lora", 4, targets, 0.0, 2 if dtype == torch.bfloat16 else 4, "cpu")
    assert activation_bytes(plan, 2, 16)["total"] > activation_bytes(plain, 2, 16)["total"]


GEMMA2 = dict(model_type="gemma2", head_dim=32, hidden_act="gelu_pytorch_tanh", norm_unit_offset=True,
              embed_scale=True, sandwich_norms=True, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
              final_logit_softcapping=3.0, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
GEMMA3 = dict(GEMMA2, model_type="gemma3_text", qk_norm=True, attn_logit_softcapping=None,
              final_logit_softcapping=None, rope_local_theta=100.0)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
@pytest.mark.parametrize("dtype,targets", [(torch.float32, "all-linear"), (torch.float32, "q_proj,v_proj"),
                                           (torch.float32, "down_proj"), (torch.bfloat16, "all-linear"),
                                           (torch.bfloat16, "q_proj,v_proj")])
def test_activation_rules_for_gemma(one_thread, family, dtype, targets):
    """Gemma's four (1 + w) norms, GeGLU, a window shorter than the sequence on the local layers; Gemma 2's
    soft-capped attention (math path) and head; Gemma 3's q/k norms and second RoPE table."""
    cfg = tiny_cfg(**(GEMMA2 if family == "gemma2" else GEMMA3))
    model = tiny_model(cfg, dtype, targets)
    plan = make_plan(cfg, "lora", 4, targets, 0.0, 2 if dtype == torch.bfloat16 else 4, "cpu")
    for batch, seq in ((2, 16), (1, 24)):
        assert activation_bytes(plan, batch, seq)["total"] == saved_bytes(model, batch, seq), (batch, seq)


def test_activation_rules_for_a_4bit_base(one_thread):
    pytest.importorskip("leantune.quant")
    from leantune import quant

    if not hasattr(quant, "quantize_model"):
        pytest.skip("4-bit quantization is not available yet")
    cfg = tiny_cfg()
    model = tiny_model(cfg, quantize=True)
    plan = make_plan(cfg, "qlora", 4, "all-linear", 0.0, 4)
    assert activation_bytes(plan, 2, 16)["total"] == saved_bytes(model, 2, 16)


def test_estimate_is_linear_in_tokens_and_orders_methods():
    cfg = tiny_cfg(num_layers=4, intermediate_size=256, vocab_size=512)

    def est(**kw):
        return estimate_memory(cfg, **{"batch": 2, "seq": 64, "loss_chunk": 10**9, **kw})

    base, double_b, double_t = est(), est(batch=4), est(seq=127)
    # activations are exactly linear in batch x seq (the loss's rows are batch x (seq - 1))
    assert double_b.activations == 2 * base.activations
    assert est(batch=3).activations - base.activations == base.activations - est(batch=1).activations
    assert double_b.transient > base.transient and double_t.activations > base.activations
    assert double_b.weights == base.weights and double_b.optimizer == base.optimizer
    smollm2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                          num_kv_heads=3, tie_word_embeddings=True)
    for device in ("cpu", "cuda"):
        qlora, lora = (estimate_memory(smollm2, m, batch=1, seq=512, device=device) for m in ("qlora", "lora"))
        assert qlora.weights < lora.weights / 2 and qlora.total < lora.total
    gc = est(gradient_checkpointing=True)
    assert gc.activations < base.activations and gc.total < base.total
    assert est(rank=16).adapter == 2 * base.adapter
    # SmolLM2's LoRA tensors at r=8 are all below the paging threshold (1e5 elements); at r=256 most are not
    assert estimate_memory(smollm2, rank=8, optimizer="paged_adamw").optimizer == estimate_memory(smollm2).optimizer
    paged, plain = (estimate_memory(smollm2, rank=256, optimizer=o) for o in ("paged_adamw", "adamw"))
    assert paged.optimizer < plain.optimizer / 10
    assert 2 * est(dtype="bf16").weights == base.weights
    assert base.step == base.optimizer + base.gradients + base.activations + base.transient + base.first_step


def test_nf4_bytes_is_4_127_bits_per_param():
    n = 4096 * 4096
    assert abs(nf4_bytes(n) * 8 / n - 4.127) < 1e-3


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_weight_bytes_equal_the_loaded_model(one_thread, method):
    """Float weights, or NF4 codes + DQ scales + tables (+ the fp32 offset) for the decoder linears."""
    cfg = tiny_cfg(hidden_size=128, intermediate_size=320, num_layers=2, tie_word_embeddings=False)
    if method == "qlora":
        pytest.importorskip("leantune.quant")
    model = tiny_model(cfg, quantize=method == "qlora")
    base = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if "lora_" not in n and n != "inv_freq"]
    held = sum(t.numel() * t.element_size() for t in base)
    held += sum(m.quant_state.nbytes() + 4 for m in model.modules() if getattr(m, "quant_state", None) is not None)
    est = estimate_memory(cfg, method, batch=1, seq=8, rank=4)
    assert est.weights == held
    assert est.adapter == sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    if method == "qlora":
        assert est.weights < estimate_memory(cfg, "lora", batch=1, seq=8, rank=4).weights / 3


def test_targets_that_match_nothing_are_an_error():
    with pytest.raises(ValueError, match="--targets"):
        make_plan(tiny_cfg(), "lora", 8, "nothing_here", 0.0, 4)
    with pytest.raises(ValueError, match="--method"):
        EstimateConfig(method="dora")  # not modelled: refused, never a LoRA estimate


def test_cli_prints_a_table_and_json(folder, capsys):
    from leantune import cli

    assert cli.run(["estimate", "--model", str(folder), "--device", "cpu", "--seq", "32", "--batch", "2",
                    "--dtype", "fp32", "--json"]) == 0
    out = capsys.readouterr().out
    assert "activations saved for backward" in out and "total" in out
    rec = json.loads(out.strip().splitlines()[-1])
    cfg, _ = read_model_config(str(folder))
    assert rec["total"] == estimate_memory(cfg, batch=2, seq=32).total
    assert cli.run(["estimate", "--model", str(folder), "--method", "qlora", "--device", "cuda", "--rank", "16",
                    "--targets", "q_proj,v_proj", "--gradient-checkpointing"]) == 0
    assert "qlora r=16" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the real model: predicted vs measured peak RSS growth of training steps


def measure_step_memory(batch: int, seq: int, steps: int = 3, gc: bool = False) -> dict:
    """Run in a fresh process: load SmolLM2-135M, apply LoRA r=8 to all linears, then `steps` real
    `Trainer.train_step`s; returns RSS before the first step and the peak RSS during the steps (MiB)."""
    import ctypes
    import tempfile
    import threading
    import time

    import leantune
    from leantune.data.formats import Example
    from leantune.train.loop import TrainConfig, Trainer

    torch.set_num_threads(2)
    model, _ = leantune.load(None)
    leantune.apply(model, "lora", r=8, alpha=16, targets="all-linear")
    g = torch.Generator().manual_seed(0)
    examples = [Example(ids, list(ids)) for ids in torch.randint(0, 49152, (batch * steps, seq), generator=g).tolist()]
    cfg = TrainConfig(batch_size=batch, max_length=seq, max_steps=steps, progress=False, lr=1e-4,
                      gradient_checkpointing=gc)
    trainer = Trainer(model, examples, [], cfg, tempfile.mkdtemp())
    model.gradient_checkpointing = gc
    batches = trainer._batches(0)[:steps]

    def status(key: str) -> float:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":")) / 1024

    ctypes.CDLL(None).malloc_trim(0)  # freed load-time memory goes back, so growth starts from live data
    before = status("VmRSS")
    try:  # reset the high-water mark to now (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_ok = status("VmHWM") <= before + 1
    except OSError:
        hwm_ok = False
    sampled, done = [before], threading.Event()

    def sample():  # fallback when the high-water mark cannot be reset
        while not done.is_set():
            sampled.append(status("VmRSS"))
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for b in batches:
        trainer.train_step([b])
    done.set()
    thread.join()
    peak = max(max(sampled), status("VmHWM") if hwm_ok else 0.0)
    return {"before": before, "peak": peak, "growth": peak - before, "hwm_reset": hwm_ok}


def _measure_in_subprocess(batch: int, seq: int, gc: bool) -> dict:
    # glibc's malloc would keep freed activations for reuse (RSS grows past live tensors, differently each
    # step); with a fixed mmap threshold RSS follows the live tensors, as CUDA's allocated bytes do.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, str(Path(__file__).resolve()), str(batch), str(seq)] + (["gc"] if gc else [])
    res = subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("batch,seq,gc", [(1, 256, False), (2, 256, True)])
def test_estimate_within_15_percent_of_measured_peak_rss(smollm2_path, batch, seq, gc):
    measured = _measure_in_subprocess(batch, seq, gc)
    cfg, _ = read_model_config(None)
    est = estimate_memory(cfg, "lora", batch, seq, rank=8, dtype="fp32", device="cpu", gradient_checkpointing=gc)
    predicted = est.step / 2**20
    print(f"\nbatch {batch} seq {seq} gc={gc}: predicted {predicted:.1f} MiB, measured {measured['growth']:.1f} MiB "
          f"({measured})")
    assert abs(predicted - measured["growth"]) <= 0.15 * measured["growth"]


if __name__ == "__main__":
    b, t = int(sys.argv[1]), int(sys.argv[2])
    print(json.dumps(measure_step_memory(b, t, gc="gc" in sys.argv[3:])))


def test_activation_rules_for_cuda_adapter_math(one_thread, monkeypatch):
    # on CUDA fp32 adapters on a bf16 model take the fused op in bf16 (LoraLinear.adapter_math "auto");
    # forcing that rule on CPU, what autograd saves must equal the estimate for device="cuda"
    from leantune.methods.lora import LoraLinear

    monkeypatch.setattr(LoraLinear, "adapter_math", "activation")
    cfg = tiny_cfg()
    model = tiny_model(cfg, torch.bfloat16, "all-linear", 0.0)
    plan = make_plan(cfg, "lora", 4, "all-linear", 0.0, 2, "cuda")
    assert activation_bytes(plan, 2, 16)["total"] == saved_bytes(model, 2, 16)
    import leantune.precision

    for native in (False, True):  # a CPU with native bf16 follows CUDA's rule (LoraLinear "auto")
        monkeypatch.setattr(leantune.precision, "native_bf16_cpu", lambda native=native: native)
        cpu_plan = make_plan(cfg, "lora", 4, "all-linear", 0.0, 2, "cpu")
        cpu, cuda = activation_bytes(cpu_plan, 2, 16)["total"], activation_bytes(plan, 2, 16)["total"]
        assert cpu == cuda if native else cpu > cuda


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen3", "llama-bias"])
def test_weight_bytes_equal_the_transformers_parameter_count(family):
    """The config alone gives the weights of transformers' own model: Gemma's four norms per layer, Gemma 3's
    and Qwen3's q/k norms, tied embeddings counted once, biases."""
    from hf_tiny import tiny_hf_model

    hf = tiny_hf_model(family)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    est = estimate_memory(cfg, "lora", batch=1, seq=8, rank=4)
    assert est.weights == 4 * sum(p.numel() for p in hf.parameters())


MOE = {"mixtral": dict(model_type="mixtral", num_experts=4, num_experts_per_tok=2),
       "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                         norm_topk_prob=False, qk_norm=True, head_dim=16, mlp_only_layers=[1])}


@pytest.mark.parametrize("family", list(MOE))
@pytest.mark.parametrize("dtype,targets", [(torch.float32, "all-linear"), (torch.float32, "q_proj,v_proj"),
                                           (torch.bfloat16, "all-linear")])
def test_activation_rules_for_moe(one_thread, family, dtype, targets):
    """The router, the routed copies and the experts' LoRA (all-linear adapts the stacked experts)."""
    cfg = tiny_cfg(**MOE[family])
    model = tiny_model(cfg, dtype, targets)
    plan = make_plan(cfg, "lora", 4, targets, 0.0, 2 if dtype == torch.bfloat16 else 4, "cpu")
    for batch, seq in ((2, 16), (1, 24)):
        assert activation_bytes(plan, batch, seq)["total"] == saved_bytes(model, batch, seq), (batch, seq)


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe"])
def test_moe_parameter_counts_and_weights_equal_the_models(family):
    """Total parameters equal transformers' model; active ones are those of top-k experts; weights and adapter
    bytes equal leantune's model with LoRA applied."""
    from hf_tiny import tiny_hf_model

    from leantune.recipes.estimate import param_counts

    hf = tiny_hf_model(family)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    total, active = param_counts(cfg)
    assert total == sum(p.numel() for p in hf.parameters())
    experts = [m for n, m in hf.named_modules() if n.endswith("mlp.experts")]
    per_expert = experts[0].gate_up_proj[0].numel() + experts[0].down_proj[0].numel()
    assert active == total - len(experts) * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert < total
    model = tiny_model(cfg)
    est = estimate_memory(cfg, "lora", batch=1, seq=8, rank=4)
    base = [t for n, t in model.named_parameters() if "lora_" not in n]
    assert est.weights == sum(t.numel() * t.element_size() for t in base)
    assert est.adapter == sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    q = tiny_model(cfg, quantize=True)  # QLoRA: 4-bit attention and per-expert 4-bit stacks, float router
    held = sum(t.numel() * t.element_size() for n, t in [*q.named_parameters(), *q.named_buffers()]
               if "lora_" not in n and n != "inv_freq")
    held += sum(m.quant_state.nbytes() + 4 for m in q.modules() if getattr(m, "quant_state", None) is not None)
    assert estimate_memory(cfg, "qlora", batch=1, seq=8, rank=4).weights == held


PHI3 = dict(model_type="phi3", fused_qkv=True, fused_gate_up=True)


@pytest.mark.parametrize("dtype,targets,extra", [
    (torch.float32, "all-linear", {}), (torch.float32, "qkv_proj", {}), (torch.float32, "o_proj,down_proj", {}),
    (torch.float32, "gate_up_proj", {}), (torch.bfloat16, "all-linear", {}),
    (torch.float32, "all-linear", {"partial_rotary_factor": 0.75})])  # Phi-4-mini: cos/sin of 3/4 of each head
def test_activation_rules_for_phi3_fused_linears(one_thread, dtype, targets, extra):
    cfg = tiny_cfg(**PHI3, **extra)
    model = tiny_model(cfg, dtype, targets)
    plan = make_plan(cfg, "lora", 4, targets, 0.0, 2 if dtype == torch.bfloat16 else 4, "cpu")
    assert activation_bytes(plan, 2, 16)["total"] == saved_bytes(model, 2, 16)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_phi3_weight_and_adapter_counts_equal_the_loaded_model(one_thread, method):
    cfg = tiny_cfg(**PHI3, hidden_size=128, intermediate_size=320, tie_word_embeddings=False)
    model = tiny_model(cfg, quantize=method == "qlora")
    assert {n.rpartition(".")[2] for n, m in model.named_modules() if hasattr(m, "lora_A")} == {
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    base = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if "lora_" not in n and n != "inv_freq"]
    held = sum(t.numel() * t.element_size() for t in base)
    held += sum(m.quant_state.nbytes() + 4 for m in model.modules() if getattr(m, "quant_state", None) is not None)
    est = estimate_memory(cfg, method, batch=1, seq=8, rank=4)
    assert est.weights == held
    assert est.adapter == sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    unfused = estimate_memory(tiny_cfg(hidden_size=128, intermediate_size=320, tie_word_embeddings=False), method,
                              batch=1, seq=8, rank=4)
    assert est.adapter < unfused.adapter  # one A per fused linear instead of three (two)
    with pytest.raises(ValueError, match="qkv_proj"):
        make_plan(cfg, "lora", 8, "q_proj", 0.0, 4)


# ---------------------------------------------------------------------------------------------
# full finetuning, GaLore, SaRA, QST: the estimate's trained-state bytes against a real Trainer step


def _trainer_step_bytes(model, optimizer: str, galore_rank: int = 8, galore_per_layer: bool = False,
                        proj_type: str | None = None) -> dict:
    """One real `Trainer.train_step`; bytes of the gradients the optimizer is handed (a step pre-hook counts them)
    and of every tensor in optimizer.state after the step."""
    import tempfile

    from leantune.data.formats import Example
    from leantune.train.loop import TrainConfig, Trainer

    g = torch.Generator().manual_seed(0)
    examples = [Example(ids, list(ids)) for ids in torch.randint(0, 256, (2, 12), generator=g).tolist()]
    cfg = TrainConfig(batch_size=2, max_length=12, max_steps=1, progress=False, lr=1e-4, optimizer=optimizer,
                      galore_rank=galore_rank, galore_per_layer=galore_per_layer, galore_proj_type=proj_type,
                      max_grad_norm=0.0 if galore_per_layer else 1.0)
    trainer = Trainer(model, examples, [], cfg, tempfile.mkdtemp())
    seen = {}

    def count_grads(opt, args, kwargs):  # noqa: ARG001
        seen["grads"] = sum(p.grad.numel() * p.grad.element_size() for grp in opt.param_groups
                            for p in grp["params"] if p.grad is not None)

    trainer.opt.register_step_pre_hook(count_grads)
    trainer.train_step(trainer._batches(0)[:1])
    state = [t for st in trainer.opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    proj = [t for st in trainer.opt.state.values() for k, t in st.items() if k in ("proj", "proj_right", "history")]
    return {"grads": seen.get("grads", 0), "state": sum(t.numel() * t.element_size() for t in state),
            "projectors": sum(t.numel() * t.element_size() for t in proj)}


def _hf_leantune_model(family: str = "llama"):
    """A tiny transformers model's config, and leantune's fp32 model of it."""
    from hf_tiny import tiny_hf_model

    from leantune.models.llama import LlamaForCausalLM

    cfg = ModelConfig.from_hf(tiny_hf_model(family).config.to_dict())
    torch.manual_seed(0)
    return cfg, LlamaForCausalLM(cfg).float()


@pytest.mark.parametrize("optimizer,proj_type", [("adamw", None), ("galore_adamw", None),
                                                 ("galore_adamw", "reverse_std"), ("natural_galore", "tucker")])
def test_full_and_galore_state_equal_a_trainer_step(one_thread, optimizer, proj_type):
    import leantune
    from leantune.recipes.estimate import trained_state

    cfg, model = _hf_leantune_model()
    model = leantune.apply(model, "full")
    got = _trainer_step_bytes(model, optimizer, proj_type=proj_type)
    st = trained_state(cfg, "full", optimizer, 4, "cpu", galore_rank=8, galore_proj_type=proj_type)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert st.gradients == got["grads"] == weights
    # Natural GaLore's history holds one row after one step; the estimate counts the steady state (20 rows)
    est_state = st.moments + st.projectors
    if optimizer == "natural_galore":
        from leantune.recipes.estimate import NATURAL_HISTORY

        rows = (st.projectors - got["projectors"])  # what the 19 missing rows of history weigh
        assert rows > 0 and rows % (NATURAL_HISTORY - 1) == 0
        est_state -= rows
    assert est_state == got["state"], (est_state, got)
    if optimizer == "adamw":
        assert st.moments == 2 * weights + 4 * len(list(model.parameters()))
    else:
        assert st.moments + st.projectors < 2 * weights


def test_galore_per_layer_keeps_one_gradient_and_the_same_state(one_thread):
    from leantune.recipes.estimate import trained_state

    cfg, _ = _hf_leantune_model()
    plain = trained_state(cfg, "full", "galore_adamw", 4, "cpu", galore_rank=8)
    per = trained_state(cfg, "full", "galore_adamw", 4, "cpu", galore_rank=8, galore_per_layer=True)
    assert per.moments == plain.moments and per.projectors == plain.projectors
    assert per.peak_gradients < plain.peak_gradients == plain.gradients


def test_sara_state_equals_a_trainer_step(one_thread):
    import leantune
    from leantune.recipes.estimate import trained_state

    cfg, model = _hf_leantune_model()
    total = sum(p.numel() for p in model.parameters())
    model = leantune.apply(model, "sara", threshold=2e-3)
    selected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    got = _trainer_step_bytes(model, "adamw")
    st = trained_state(cfg, "sara", "adamw", 4, "cpu", sara_fraction=selected / total)
    assert st.trainable == st.gradients == got["grads"] == selected * 4
    assert st.moments == got["state"]
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                  if n.rpartition(".")[2] in ("mask", "origin_idx", "origin_val"))
    assert st.buffers == buffers


def test_qst_state_equals_a_trainer_step(one_thread):
    import leantune
    from leantune.recipes.estimate import trained_state

    cfg, model = _hf_leantune_model()
    model = leantune.apply(model, "qst", reduction=4, peft_hidden_size=8)
    from leantune.methods.qst import QSTConfig

    got = _trainer_step_bytes(model, "adamw")
    st = trained_state(cfg, "qst", "adamw", 4, "cpu", qst=QSTConfig(reduction=4, peft_hidden_size=8))
    side = [p for p in model.parameters() if p.requires_grad]
    assert st.trainable == st.gradients == got["grads"] == sum(p.numel() * 4 for p in side)
    assert st.moments == got["state"]


def test_base_methods_in_the_cli_and_per_rank(folder, capsys):
    from leantune import cli

    base = ["estimate", "--model", str(folder), "--device", "cpu", "--seq", "32", "--batch", "8", "--json"]
    assert cli.run(base + ["--method", "full", "--optimizer", "galore_adamw", "--galore-rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "GaLore projectors" in out and "full, batch 8" in out
    one = json.loads(out.strip().splitlines()[-1])
    assert cli.run(base + ["--method", "full", "--optimizer", "galore_adamw", "--galore-rank", "8", "--nproc", "4"]) == 0
    out = capsys.readouterr().out
    assert "not runnable yet under --parallel" in out
    four = json.loads(out.strip().splitlines()[-1])
    assert four["optimizer"] == one["optimizer"] // 4 and four["gradients"] < one["gradients"]
    for bad in (["--method", "dora"], ["--method", "lora", "--optimizer", "galore_adamw"],
                ["--method", "full", "--galore-per-layer"]):
        with pytest.raises((ValueError, SystemExit)):
            EstimateConfig(**{a.lstrip("-").replace("-", "_"): (True if b is None else b)
                              for a, b in zip(bad[::2], bad[1::2] + [None])})
