"""--dtype auto: the precision rule per device and CPU, and what a bf16 run computes (leantune.precision).

The rule is tested with CpuInfo values standing for each kind of x86 CPU, so it holds on whatever CPU
runs the suite; bf16 models are tiny, so their (possibly emulated) bf16 matmuls take milliseconds.
"""
import json

import pytest
import torch

import leantune
from leantune import cli
from leantune.methods import lora as lora_mod
from leantune.models.loader import load_model
from leantune.precision import CpuInfo, cpu_info, parse_dtype, resolve_precision

AVX2 = CpuInfo("AMD EPYC 7B13", "AVX2", frozenset({"avx2", "fma"}), 2)
ZEN4 = CpuInfo("AMD EPYC 9B14", "AVX512", frozenset({"avx2", "avx512f", "avx512_bf16"}), 2)
SPR = CpuInfo("Intel Xeon Platinum 8481C", "AVX512", frozenset({"avx512f", "amx_bf16", "amx_tile"}), 2)
SKX = CpuInfo("Intel Xeon Gold 6154", "AVX512", frozenset({"avx512f", "avx512bw"}), 2)  # AVX-512, no bf16


@pytest.mark.parametrize("cpu,expected", [(AVX2, torch.float32), (SKX, torch.float32),
                                          (ZEN4, torch.bfloat16), (SPR, torch.bfloat16)])
def test_auto_is_bf16_only_where_the_cpu_computes_it_natively(cpu, expected):
    p = resolve_precision("auto", "cpu", cpu)
    assert p.dtype == expected and p.device == "cpu"
    assert cpu.name in p.reason and p.name in p.describe()


def test_forced_dtypes_and_their_reasons():
    assert resolve_precision("fp32", "cpu", ZEN4).dtype == torch.float32
    slow = resolve_precision("bf16", "cpu", AVX2)
    assert slow.dtype == torch.bfloat16 and "emulated" in slow.reason  # allowed, and said to be slow
    assert "emulated" not in resolve_precision("bfloat16", "cpu", SPR).reason
    assert resolve_precision("fp32", "cuda").dtype == torch.float32  # no GPU needed to force a dtype
    for bad in ("fp16", "half", "BF16", ""):
        with pytest.raises(ValueError, match="--dtype must be auto, fp32 or bf16"):
            parse_dtype(bad)


def test_training_base_weights_in_full_needs_fp32():
    p = resolve_precision("auto", "cpu", ZEN4, full_weights="--reinit-top")
    assert p.dtype == torch.float32 and "--reinit-top" in p.reason
    with pytest.raises(ValueError, match="--reinit-top trains base weights in full.*--dtype fp32"):
        resolve_precision("bf16", "cpu", ZEN4, full_weights="--reinit-top")
    assert resolve_precision("auto", "cpu", AVX2, full_weights="--reinit-top").dtype == torch.float32


def test_this_cpu_is_described():
    info = cpu_info()
    assert info.capability == torch.backends.cpu.get_cpu_capability()
    d = info.as_dict()
    assert d["native_bf16"] == info.native_bf16 and d["threads"] == torch.get_num_threads()
    assert resolve_precision("auto", "cpu").dtype == (torch.bfloat16 if info.native_bf16 else torch.float32)


def test_lora_auto_adapter_math_follows_native_bf16(monkeypatch, one_thread):
    """On a bf16 base, fp32 adapters take the fused op in bf16 (autocast's rule) where bf16 is native,
    and PEFT's fp32 module path where it is emulated."""
    layer = leantune.methods.LoraLinear
    net = torch.nn.Sequential(torch.nn.Linear(64, 32)).to(torch.bfloat16)
    leantune.apply(net, "lora", r=4, alpha=8, targets=["0"])
    assert net[0].lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for native in (True, False):
        monkeypatch.setattr(lora_mod, "native_bf16_cpu", lambda native=native: native)
        assert layer.adapter_math == "auto"
        assert (net[0].fused_linear_params(x) is not None) == native
        assert net[0](x).dtype == torch.bfloat16


def test_load_model_bf16_keeps_rope_fp32_and_4bit_codes_of_fp32(folder, one_thread):
    bf16 = resolve_precision("bf16", "cpu")
    model, _ = load_model(folder, bf16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32  # as transformers loads a bf16 model
    ref, _ = leantune.load(folder)
    assert torch.equal(model.inv_freq, ref.inv_freq)
    q16, _ = load_model(folder, bf16, quantize="nf4")
    q32, _ = leantune.load(folder, quantize="nf4")
    a, b = q16.model.layers[1].mlp.down_proj, q32.model.layers[1].mlp.down_proj
    assert torch.equal(a.weight, b.weight) and torch.equal(a.quant_state.absmax, b.quant_state.absmax)
    assert a.compute_dtype == torch.bfloat16 and q16.model.norm.weight.dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 20, 33, 100, 7, 250]])
    with torch.no_grad():
        for m, r in ((model, ref), (q16, q32)):
            out = m(ids)
            assert out.dtype == torch.bfloat16
            assert (out.float() - r(ids)).abs().max() <= 5e-2 * r(ids).abs().max()


def test_rope_in_a_bf16_model_is_exact_at_long_positions(folder):
    model, _ = load_model(folder, resolve_precision("bf16", "cpu"))
    model.to(torch.float32).to(torch.bfloat16)  # casts both ways keep it fp32 and exact
    ref, _ = leantune.load(folder)
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, ref.inv_freq)


def _train_rows(path):
    rows = [{"messages": [{"role": "user", "content": f"What is {i}?"},
                          {"role": "assistant", "content": f"It is {i}."}]} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_finetune_bf16_follows_the_fp32_run(folder, tmp_path, one_thread, method, capsys):
    """A bf16 run (frozen base in bf16, fp32 adapters, optimizer state and loss) tracks the fp32 run."""
    data = _train_rows(tmp_path / "t.jsonl")
    runs = {}
    for dt in ("fp32", "bf16"):
        out = tmp_path / dt
        assert cli.run(["finetune", "--model", str(folder), "--data", str(data), "--output", str(out),
                        "--method", method, "--max-steps", "6", "--lr", "1e-2", "--eval-fraction", "0",
                        "--no-progress", "--dtype", dt]) == 0
        runs[dt] = _losses(out)
    assert "precision: bf16 on cpu (--dtype bf16" in capsys.readouterr().err
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert bf16[-1] < bf16[0] - 0.3  # it learns
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) <= 0.02 * fp32[0]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert saved and all(v.dtype == torch.float32 for v in saved.values())  # fp32 adapters, as trained


def test_finetune_refuses_bf16_for_full_weight_training(folder, tmp_path):
    data = _train_rows(tmp_path / "t.jsonl")
    with pytest.raises(ValueError, match="--reinit-top trains base weights in full"):
        cli.run(["finetune", "--model", str(folder), "--data", str(data), "--output", str(tmp_path / "o"),
                 "--reinit-top", "1", "--dtype", "bf16", "--max-steps", "1", "--no-progress"])
    with pytest.raises(ValueError, match="--dtype must be auto, fp32 or bf16"):
        cli.run(["finetune", "--model", str(folder), "--data", str(data), "--dtype", "fp16"])


def test_generate_and_serve_take_dtype(folder, tmp_path, capsys):
    assert cli.run(["generate", "--model", str(folder), "--prompt", "Hello", "--max-new-tokens", "4",
                    "--dtype", "bf16"]) == 0
    assert "precision: bf16 on cpu" in capsys.readouterr().err
    from leantune.recipes.serve import ServeConfig, build_server

    _, engine = build_server(ServeConfig(model=str(folder), data_dir=str(tmp_path / "d"), dtype="bf16",
                                         device="cpu", num_blocks=16))
    assert engine.model.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype"):
        ServeConfig(dtype="float16")


def test_load_model_takes_a_4bit_folder_as_it_is_stored(folder, tmp_path, one_thread):
    """A prequantized FP4 folder loads at any precision with its own quant type; its layers decode to bf16."""
    q, tok = leantune.load(folder, quantize="fp4")
    saved = leantune.save_hf_folder(q, tok, tmp_path / "fp4")
    model, _ = load_model(saved, resolve_precision("bf16", "cpu"))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.quant_type == "fp4" and layer.compute_dtype == torch.bfloat16
    assert torch.equal(layer.weight, q.model.layers[0].self_attn.q_proj.weight)


def test_device_is_checked_before_any_weight_is_read(tmp_path):
    from leantune.precision import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "cpu:1", "gpu"):
        with pytest.raises(ValueError, match=r"use cpu, cuda, cuda:N or auto"):
            resolve_device(bad)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=rf"--device cuda:{n}: torch .* sees {n} CUDA device"):
        resolve_device(f"cuda:{n}")
    # through the recipe: the model path does not exist, and the device error comes first
    data = _train_rows(tmp_path / "t.jsonl")
    with pytest.raises(ValueError, match=r"--device 'tpu': use cpu, cuda"):
        cli.run(["finetune", "--model", str(tmp_path / "no-model"), "--data", str(data), "--device", "tpu",
                 "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
