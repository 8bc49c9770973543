"""Benchmark: one LoRA training step per model family, leantune vs transformers + PEFT, on the CPU.

Tiny-but-not-trivial random configs of Qwen3, Gemma 2 and Mixtral (the families with a skeleton of their
own: q/k norms; soft-capping, sliding windows and pre+post norms; routed experts), written once as HF
folders by `transformers` and loaded by both sides from the same files. Same work on both sides, as
bench/lora_step.py does it (its workers run here): batch 2 x 256 random tokens, loss on every token, LoRA
r=8 alpha=16 on all linear layers, AdamW, fp32, median step time after warm-up, peak RSS, each side in its
own subprocess. The first losses must agree (same weights, same data), or the run stops.

What "all linear layers" covers differs by family and side: the trainable-parameter counts are printed.

    .venv/bin/python bench/families.py [--families qwen3,gemma2,mixtral] [--steps 5] [--seq 256] [--clock cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# One shape for all: ~25-40M parameters, big enough that matmuls, not Python, dominate a step.
COMMON = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    # window 128 < seq 256, so the alternating local layers really mask
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=128, query_pre_attn_scalar=64,
                                                           attn_logit_softcapping=50.0,
                                                           final_logit_softcapping=30.0)),
    # 8 experts, 2 active: the expert MLPs are narrower so the model stays the same order of size
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=512, num_local_experts=8,
                                                            num_experts_per_tok=2, sliding_window=None)),
}


def write_folder(family: str, path: Path) -> None:
    import torch
    import transformers as tf

    cfg_cls, model_cls, extra = FAMILIES[family]
    cfg = getattr(tf, cfg_cls)(**{**COMMON, **extra})
    torch.manual_seed(0)
    getattr(tf, model_cls)(cfg).save_pretrained(path)
    # The steps feed random ids; leantune's loader still wants a tokenizer.json, so a word-level one of the
    # model's vocabulary size stands in.
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(path / "tokenizer.json"))


def run_side(who: str, folder: Path, args) -> dict:
    cmd = [sys.executable, str(HERE / "lora_step.py"), "--worker", who, "--folder", str(folder),
           "--method", "lora", "--dtype", "fp32", f"--steps={args.steps}", f"--warmup={args.warmup}",
           f"--batch={args.batch}", f"--seq={args.seq}", f"--rank={args.rank}", f"--clock={args.clock}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{who} on {folder.name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: time steps by the process's CPU time, far less disturbed by other jobs on a shared "
                         "machine (use with BENCH_THREADS=1)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE))
    from lora_step import check_same_work

    from leantune.precision import cpu_info

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"--families: unknown {unknown}; choose from {list(FAMILIES)}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fam in families:
            folder = Path(tmp) / fam
            write_folder(fam, folder)
            lt, peer = run_side("leantune", folder, args), run_side("peer", folder, args)
            check_same_work(lt, {"peer": peer})
            rows[fam] = {"leantune": lt, "peer": peer, "time_ratio": lt["median_step_s"] / peer["median_step_s"],
                         "memory_ratio": lt["peak_rss_mib"] / peer["peak_rss_mib"]}
    cpu = cpu_info()
    print(f"cpu: {cpu.describe()}")
    print(f"LoRA step per family, fp32, batch {args.batch}x{args.seq}, r={args.rank} all-linear, "
          f"{os.environ.get('BENCH_THREADS', '2')} threads, median of {args.steps} after {args.warmup} warm-up, "
          f"{args.clock} clock; "
          "peer: transformers+PEFT")
    print(f"{'family':<10}{'step s':>9}{'peer':>9}{'ratio':>7}{'RSS MiB':>10}{'peer':>9}{'ratio':>7}"
          f"{'trainable':>12}{'peer':>12}")
    for fam, r in rows.items():
        lt, pr = r["leantune"], r["peer"]
        print(f"{fam:<10}{lt['median_step_s']:>9.3f}{pr['median_step_s']:>9.3f}{r['time_ratio']:>7.2f}"
              f"{lt['peak_rss_mib']:>10.0f}{pr['peak_rss_mib']:>9.0f}{r['memory_ratio']:>7.2f}"
              f"{lt['trainable']:>12,}{pr['trainable']:>12,}")
    print(json.dumps({"bench": "families", "cpu": cpu.as_dict(), "args": vars(args), "results": rows}))


if __name__ == "__main__":
    main()
