"""Recipe tier for QLoRA: `finetune --method qlora` on a 4-bit NF4 base, the adapter in PEFT on
transformers + bitsandbytes, and `merge` onto the dequantized base."""
import json

import pytest
import torch

from leantune import cli, methods
from leantune.models.loader import load

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
from bnb_exact import exact_reference, xfail_unless_bnb_exact  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora")
    data = out / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i}?"},
                          {"role": "assistant", "content": f"It is {i}."}]} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.run(["finetune", "--model", str(folder), "--data", str(data), "--output", str(out / "run"),
                    "--method", "qlora", "--max-steps", "6", "--lr", "1e-2", "--eval-fraction", "0",
                    "--no-progress"]) == 0
    return out / "run"


def bnb_model(folder):
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, device_map="cpu",
                                                             dtype=torch.float32).eval()


def test_qlora_trains_only_the_adapter_and_records_its_base(trained):
    metrics = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert methods.read_sidecar(trained) == {"quant_type": "nf4", "blocksize": 64, "double_quant": True}
    cfg = json.loads((trained / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"


def ours_and_ids(trained, folder):
    model, tok = load(folder, quantize="nf4")
    methods.load_adapter(model, trained)
    ids = torch.tensor([tok.encode("What is 3? It is 3.")])
    with torch.no_grad():
        return model(ids), ids


def test_qlora_adapter_loads_in_peft_on_bitsandbytes_base(trained, folder):
    """PEFT's LoRA on the bnb model whose 4-bit layers compute bnb's codes in plain fp32 (bnb_exact):
    the same logits as leantune's 4-bit model with the adapter, on any CPU."""
    ours, ids = ours_and_ids(trained, folder)
    ref = peft.PeftModel.from_pretrained(exact_reference(bnb_model(folder)), trained).eval()
    with torch.no_grad():
        assert (ours - ref(ids).logits).abs().max().item() <= 1e-4


def test_qlora_adapter_in_peft_on_bitsandbytes_kernels(request, trained, folder):
    """Documents the peer: with bnb's own CPU kernels the logits agree only where they are fp32 math."""
    xfail_unless_bnb_exact(request)
    ours, ids = ours_and_ids(trained, folder)
    peer = peft.PeftModel.from_pretrained(bnb_model(folder), trained).eval()
    with torch.no_grad():
        assert (ours - peer(ids).logits).abs().max().item() <= 1e-4


def test_merge_writes_the_dequantized_base_plus_delta(trained, folder, tmp_path):
    assert cli.run(["merge", "--model", str(folder), "--adapter", str(trained), "--output", str(tmp_path / "m")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in cfg  # a plain float folder
    model, tok = load(folder, quantize="nf4")
    methods.load_adapter(model, trained)
    base, _ = load(folder)
    ids = torch.tensor([tok.encode("What is 7?")])
    with torch.no_grad():
        assert (merged(ids).logits - model(ids)).abs().max().item() <= 1e-4
        assert (merged(ids).logits - base(ids)).abs().max().item() > 1e-3
