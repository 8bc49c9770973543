"""QST (`--method qst`, methods-more.md §1): the oracles (a)-(e) on tiny models, the options, the saved folder, the
recipe through the CLI, generate and the serving engine."""
import json
import math

import pytest
import torch

import leantune.methods as lm
from leantune import cli
from leantune.data.batching import Batch
from leantune.methods.qst import QSTConfig, QSTForCausalLM
from leantune.models.generate import GenerationConfig, generate
from leantune.optim import build_optimizer
from leantune.train.loss import lm_loss_sum
from lt_tiny import tiny_lt_model

pytestmark = pytest.mark.usefixtures("one_thread")
V = 64  # the tiny LMs' vocabulary


def progression_batch(g, B=16, T=24) -> Batch:
    """'Pretraining' text of the base tiny LM: arithmetic progressions mod V with a random step of 1..3."""
    start, step = torch.randint(0, V, (B, 1), generator=g), torch.randint(1, 4, (B, 1), generator=g)
    ids = (start + step * torch.arange(T)) % V
    return Batch(ids, ids.clone(), torch.arange(T).expand_as(ids), None, ids.numel())


def copy_batch(g, B=16, k=6) -> Batch:
    """A new task: BOS a_1..a_k SEP a_1..a_k, loss on the copy only."""
    a = torch.randint(2, V, (B, k), generator=g)
    ids = torch.cat([torch.ones(B, 1, dtype=torch.long), a, torch.zeros(B, 1, dtype=torch.long), a], 1)
    labels = ids.clone()
    labels[:, : k + 2] = -100
    return Batch(ids, labels, torch.arange(ids.shape[1]).expand_as(ids), None, int((labels != -100).sum()))


def train(model, steps: int, lr: float, g, make_batch) -> list[float]:
    """Plain steps with leantune's loss and optimizer; the per-step token-mean losses."""
    opt = build_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss, n = lm_loss_sum(model, make_batch(g))
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()) / n)
    return losses


@pytest.fixture(scope="module")
def base_lm():
    """The base tiny LM: 2 layers, d=64, 4 heads, trained 150 steps on progressions (loss 4.2 -> ~0.1)."""
    model = tiny_lt_model(tie=True, vocab=V)
    losses = train(model, 150, 3e-3, torch.Generator().manual_seed(1), progression_batch)
    assert losses[-1] < 0.5 * losses[0]
    return model.eval()


def fresh_base(base_lm):
    model = tiny_lt_model(tie=True, vocab=V)
    model.load_state_dict(base_lm.state_dict())
    return model


def qst_model(base_lm, **kw) -> QSTForCausalLM:
    return lm.apply(fresh_base(base_lm), "qst", **{"reduction": 4, "peft_hidden_size": 8, **kw})


# ---------------------------------------------------------------------------------------------
# the model


def test_shapes_init_and_what_trains(base_lm):
    m = qst_model(base_lm)
    side = m.side
    assert side.side_cfg.hidden_size == 16 and side.side_cfg.intermediate_size == 32
    assert side.side_cfg.num_heads == 4 and side.side_cfg.head_dim == 4
    assert torch.all(side.gates == 0.5) and torch.all(side.out_gate == 1.0)  # z_i, z_out (official defaults)
    assert all(not p.requires_grad for p in m.base.parameters())
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"side." + n for n, _ in side.named_parameters()}
    assert lm.list_adapters(m) == ["default"]
    from leantune.quant import linear4bit_layers

    assert len(linear4bit_layers(m.base)) == 2 * 7  # the base's decoder linears are NF4 (+ double quant)
    assert linear4bit_layers(m.base)[0][1].quant_state.nested
    # trainable count: D_i 2*(64*8 + 8*16 + 2*16), side blocks, gates, side norm, U (16*64 + 64), z_out
    blocks = sum(p.numel() for p in side.layers.parameters())
    expect = 2 * (64 * 8 + 8 * 16 + 2 * 16) + blocks + 2 * 16 + 16 + 16 * 64 + 64 + 64
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == expect


@pytest.mark.parametrize("kind", ["avgpool", "maxpool"])
def test_pool_downsamplers_have_no_weights(base_lm, kind):
    m = qst_model(base_lm, downsample=kind)
    assert all(sum(p.numel() for p in d.parameters()) == 0 for d in m.side.downsample)
    x = torch.randn(2, 3, 64)
    groups = x.view(2, 3, 16, 4)
    want = groups.mean(-1) if kind == "avgpool" else groups.amax(-1)
    assert torch.equal(m.side.downsample[0](x), want)
    m(torch.randint(0, V, (2, 5))).sum().backward()  # trains without them


def test_dropout_acts_when_set_and_not_otherwise(base_lm):
    """The official AdapterLinear uses Identity when dropout > 0 (inverted); here dropout > 0 drops in training."""
    ids = torch.randint(0, V, (2, 8))
    m = qst_model(base_lm, dropout=0.5).train()
    assert isinstance(m.side.downsample[0].dropout, torch.nn.Dropout)
    assert not torch.equal(m(ids), m(ids))
    m.eval()
    assert torch.equal(m(ids), m(ids))
    m0 = qst_model(base_lm, dropout=0.0).train()
    assert isinstance(m0.side.downsample[0].dropout, torch.nn.Identity) and torch.equal(m0(ids), m0(ids))


def test_oracle_e_output_gate_one_gives_the_frozen_llm_exactly(base_lm):
    m = qst_model(base_lm).eval()
    ids = torch.randint(0, V, (3, 11))
    with torch.no_grad():
        m.side.out_gate.fill_(math.inf)  # sigmoid(z_out) = 1
        assert torch.equal(m(ids), m.base(ids))
        m.side.out_gate.fill_(1.0)
        assert not torch.allclose(m(ids), m.base(ids))  # at init (sigmoid(1) = 0.73) QST is not the base


def _params_in_history(t: torch.Tensor) -> set[int]:
    """ids of the leaf tensors (AccumulateGrad variables) reachable from t's autograd history."""
    seen, out, todo = set(), set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            out.add(id(fn.variable))
        todo.extend(f for f, _ in fn.next_functions)
    return out


def saved_tensors(model, batch) -> list[torch.Tensor]:
    """Every tensor autograd saves for backward in one training forward of `model` on `batch`."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, n = lm_loss_sum(model, batch)
    (loss / n).backward()
    return saved


def saved_bytes(tensors) -> int:
    """Bytes of the distinct storages among `tensors` (a view and its base count once)."""
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def test_oracle_a_no_gradient_and_nothing_of_the_base_kept_for_backward(base_lm):
    m = qst_model(base_lm).train()
    batch = copy_batch(torch.Generator().manual_seed(0))
    saved = saved_tensors(m, batch)
    base = list(m.base.parameters()) + list(m.base.buffers())
    assert saved and all(p.grad is None for p in m.base.parameters())
    assert all(p.grad is not None for p in m.side.parameters())
    base_ids, base_ptrs = {id(p) for p in base}, {p.untyped_storage().data_ptr() for p in base}
    for t in saved:
        assert id(t) not in base_ids and t.untyped_storage().data_ptr() not in base_ptrs
        assert not (_params_in_history(t) & base_ids)


def test_oracle_b_saved_activations_under_half_of_lora(base_lm):
    batch = copy_batch(torch.Generator().manual_seed(0))
    # r = 8: the largest reduction this model (d = 64, 4 heads) allows, nearest the default 16
    qst = saved_bytes(saved_tensors(qst_model(base_lm, reduction=8).train(), batch))
    for method in ("lora", "qlora"):  # the same tiny model and batch; LoRA's default targets (q, v)
        other = lm.apply(fresh_base(base_lm), method, r=8, alpha=16).train()
        lora = saved_bytes(saved_tensors(other, batch))
        assert qst < 0.5 * lora, (method, qst, lora)


def test_oracle_c_nf4_round_trip_and_quantized_perplexity(base_lm):
    from leantune.quant.nf4 import block_absmax, dequantize_4bit, quantize_4bit

    w = torch.randn(128, 64) * 0.05
    packed, state = quantize_4bit(w, 64, "nf4", double_quant=True)
    err = (dequantize_4bit(packed, state) - w).abs().view(-1, 64)
    absmax = w.abs().view(-1, 64).amax(1)
    # the oracle's bound holds for each block's mean error; the largest single error is bounded by half NF4's
    # widest gap (levels -1 and -0.696), so it may exceed 0.1 * absmax (plus the 8-bit absmax of double quant)
    assert torch.all(err.mean(1) < 0.1 * absmax)
    half_gap = float(state.code.diff().max()) / 2
    assert 0.15 < half_gap < 0.16 and torch.all(err.amax(1) <= (half_gap + 0.01) * absmax)
    assert torch.allclose(block_absmax(state), absmax, rtol=0.02)  # double quant: absmax in 8 bits
    # a quantized tiny LM's perplexity within 5% of fp32 (the base QST trains beside)
    q = qst_model(base_lm).base
    batch = progression_batch(torch.Generator().manual_seed(9), B=32)
    with torch.no_grad():
        ppl = [math.exp(float(lm_loss_sum(x, batch)[0]) / batch.num_loss_tokens) for x in (base_lm, q)]
    assert abs(ppl[1] / ppl[0] - 1) < 0.05, ppl


def test_oracle_d_learns_a_new_task_beside_the_frozen_base(base_lm):
    m = qst_model(base_lm, peft_hidden_size=16, dropout=0.0).train()
    before = {k: v.clone() for k, v in m.base.state_dict().items()}
    losses = train(m, 199, 1e-2, torch.Generator().manual_seed(2), copy_batch)
    smooth = [sum(losses[i:i + 5]) / 5 for i in range(len(losses) - 4)]
    assert min(smooth) <= 0.5 * losses[0], (losses[0], min(smooth))
    after = m.base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base did not move


def test_generate_with_the_kv_cache_equals_full_forwards(base_lm):
    m = qst_model(base_lm).eval()
    with torch.no_grad():
        for p in m.side.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # a side network that matters
    prompts = [[1, 5, 9, 13, 17], [1, 7, 14]]
    out = generate(m, prompts, GenerationConfig(max_new_tokens=6))
    for p, toks in zip(prompts, out):
        seq = list(p)
        for t in toks:
            assert int(m(torch.tensor([seq]))[0, -1].argmax()) == t
            seq.append(t)


def test_rows_routed_elsewhere_get_the_base(base_lm):
    from leantune.models.llama import ForwardMeta

    m = qst_model(base_lm).eval()
    ids = torch.randint(0, V, (3, 7))
    slot = lm.adapter_slots(m)["default"]
    with torch.no_grad():
        mixed = m(ids, ForwardMeta(adapter_ids=torch.tensor([slot, -1, slot])))
        assert torch.equal(mixed[1], m.base(ids)[1])
        assert torch.equal(mixed[[0, 2]], m(ids)[[0, 2]])


# ---------------------------------------------------------------------------------------------
# options and bad input


def test_config_checks():
    for bad, flag in ((dict(reduction=0), "--qst-reduction"), (dict(downsample="conv"), "--qst-downsample"),
                      (dict(dropout=1.0), "--dropout"), (dict(peft_hidden_size=0), "--qst-hidden-size"),
                      (dict(gate_init_logit=math.nan), "--qst-gate-init-logit")):
        with pytest.raises(ValueError, match=flag):
            QSTConfig(**bad)
    mc = tiny_lt_model().config  # d = 64, 4 heads
    QSTConfig(reduction=8).check_model(mc)  # d/r = 8: two dims per head
    with pytest.raises(ValueError, match=r"--qst-reduction 32: .* 2 must be a multiple of the model's 4 attention "
                                         r"heads .* use one of \[1, 2, 4, 8\]"):
        QSTConfig(reduction=32).check_model(mc)
    with pytest.raises(ValueError, match="--qst-reduction 16: .* even size per head"):
        QSTConfig(reduction=16).check_model(mc)  # one dim per head: RoPE needs pairs
    with pytest.raises(ValueError, match="--qst-reduction 3 does not divide"):
        QSTConfig(reduction=3).check_model(mc)


def test_bad_reduction_stops_before_any_weight_is_read(folder, tmp_path, capsys, monkeypatch):
    import leantune.models.loader as loader

    def no_load(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loader, "load_model", no_load)
    monkeypatch.setattr(loader, "load", no_load)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello there"}) + "\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--model", str(folder), "--data", str(data), "--output", str(tmp_path / "out"),
                  "--method", "qst", "--qst-reduction", "32", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--qst-reduction 32" in err and "use one of" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "qst_model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# saved folder, recipe, generate, serve


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("qst")
    data = out / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i}?"},
                          {"role": "assistant", "content": f"It is {i}."}]} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.run(["finetune", "--model", str(folder), "--data", str(data), "--output", str(out / "run"),
                    "--method", "qst", "--qst-reduction", "4", "--max-steps", "12", "--lr", "1e-2",
                    "--eval-fraction", "0", "--dtype", "fp32", "--no-progress"]) == 0
    return out / "run"


def test_recipe_trains_and_writes_its_folder(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["train_loss"] < summary["first_loss"]
    meta = json.loads((trained / "qst_config.json").read_text())
    assert meta["format"] == "leantune-qst" and meta["config"]["reduction"] == 4 and meta["base_model_name_or_path"]
    assert json.loads((trained / "leantune.json").read_text())["base_quantization"] == {
        "quant_type": "nf4", "blocksize": 64, "double_quant": True}
    assert not (trained / "adapter_model.safetensors").exists()
    from safetensors.torch import load_file

    saved = load_file(str(trained / "qst_model.safetensors"))
    assert all(not k.startswith("base") for k in saved) and "out_gate" in saved
    assert summary["trainable_parameters"] == sum(t.numel() for t in saved.values())


def test_saved_folder_reloads_with_the_same_logits(folder, tmp_path):
    from leantune import load
    from leantune.precision import resolve_precision
    from leantune.recipes.generate import load_with_adapter

    model, _ = load(folder)
    m = lm.apply(model, "qst", reduction=4, gate_init_logit=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 9), generator=g)
    train(m, 3, 1e-2, g, lambda _: Batch(ids, ids.clone(), torch.arange(9).expand(2, 9), None, 18))
    lm.save(m, tmp_path / "a", base_model_name_or_path=str(folder))  # + leantune.json: the 4-bit base to rebuild
    assert (tmp_path / "a" / "leantune.json").is_file()
    m.eval()
    back, _ = load_with_adapter(str(folder), str(tmp_path / "a"), resolve_precision("fp32"))
    assert isinstance(back, QSTForCausalLM) and not any(p.requires_grad for p in back.parameters())
    with torch.no_grad():
        assert torch.equal(back(ids), m(ids))
    # a folder for another base is refused before anything changes
    other = tiny_lt_model(vocab=256)  # the folder's model has 512
    with pytest.raises(ValueError, match="another base model"):
        lm.load_adapter(other, tmp_path / "a")


def test_generate_chat_merge_through_the_cli(trained, folder, capsys):
    assert cli.run(["generate", "--model", str(folder), "--adapter", str(trained), "--prompt", "What is 3?",
                    "--max-new-tokens", "4", "--dtype", "fp32"]) == 0
    with pytest.raises(SystemExit) as e:
        cli.main(["merge", "--model", str(folder), "--adapter", str(trained), "--output", str(trained.parent / "m")])
    assert e.value.code == 2 and "cannot be merged" in capsys.readouterr().err


def test_server_serves_the_qst_adapter_and_the_base(trained, folder, tmp_path):
    from leantune.recipes.generate import load_with_adapter
    from leantune.precision import resolve_precision
    from leantune.recipes.serve import ServeConfig, build_server
    from leantune.serve.requests import GenRequest

    ref, tok = load_with_adapter(str(folder), str(trained), resolve_precision("fp32"))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (5, 17, 9)]
    want = {"q": [generate(ref, [p], GenerationConfig(max_new_tokens=6))[0] for p in prompts],
            "model": [generate(ref.base, [p], GenerationConfig(max_new_tokens=6))[0] for p in prompts]}
    _, engine = build_server(ServeConfig(model=str(folder), adapter=[f"q={trained}"], data_dir=str(tmp_path / "d"),
                                         dtype="fp32", served_model_name="model", num_blocks=32, block_size=4))
    events = {}
    for name in want:  # both in the same batches: rows routed by adapter slot
        for i, p in enumerate(prompts):
            engine.add_request(GenRequest(p, name, max_tokens=6, temperature=0, ignore_eos=True),
                               events.setdefault((name, i), []).append)
    for _ in range(1000):
        if not engine.iteration():
            break
    for (name, i), evs in events.items():
        assert "".join(ev["text"] for ev in evs) == tok.decode(want[name][i]), (name, i)


def test_gradient_checkpointing_recomputes_the_side_with_equal_gradients(base_lm):
    batch = copy_batch(torch.Generator().manual_seed(3))
    grads = []
    for ckpt in (False, True):
        m = qst_model(base_lm, dropout=0.0).train()
        m.gradient_checkpointing = ckpt
        saved = saved_bytes(saved_tensors(m, batch))
        grads.append(({n: p.grad for n, p in m.side.named_parameters()}, saved))
    (plain, plain_bytes), (ck, ck_bytes) = grads
    assert all(torch.allclose(plain[n], ck[n], atol=1e-6) for n in plain)
    assert ck_bytes < plain_bytes


def test_export_and_a_running_server_refuse_it(trained, folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--model", str(folder), "--adapter", str(trained), "--output", str(tmp_path / "m.gguf")])
    assert e.value.code == 2 and "cannot be merged or exported" in capsys.readouterr().err
    from leantune.recipes.serve import ServeConfig, build_server

    _, engine = build_server(ServeConfig(model=str(folder), data_dir=str(tmp_path / "d"), dtype="fp32"))
    with pytest.raises(ValueError, match="start the server with it"):
        engine.load_adapter("q", str(trained), None)


def test_gpu_bench_qst_row_runs_dry(tmp_path):
    """bench/gpu_train.py's 8B QST row (measured on a GPU against its QLoRA row), on its --dry CPU path."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(root / "bench" / "gpu_train.py"), "--dry", "--only", "leantune:8b:qst",
                        "--budget-s", "170", "--min-run-s", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=180, cwd=root, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["status"] == "ok" and run["finite"] and run["trainable"] > 0, run.get("error")
