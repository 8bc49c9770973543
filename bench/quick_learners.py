"""Benchmark (not a test): "Instruction-tuned models are quick learners" (Gupta et al. 2023) at toy scale, the
oracle of reference/methods-more.md §12: on held-out tasks, the ROUGE-L-vs-k curve of first-k finetunes from an
instruction-tuned start lies above the curve from a non-instruction start, and min_k to reach the full-data
score is smaller.

Tasks: 25 synthetic string transformations written as instructions (reverse the words, upper case, the n-th
word, sort the letters, count the vowels, ...), each an instruction + inputs of 3-5 words drawn from a small
vocabulary, deterministic by seed (`task_rows`). A row is a chat: user = "<instruction>\nInput: <words>",
assistant = the output. The first 20 tasks are the instruction-pretraining tasks, the last 5 (`HELD_OUT`) are
held out; each held-out task is a new combination of skills the pretraining tasks use (the third word, move
the last word to the front, join with "and", the first word three times, drop the last word).

Model: a random Llama (2 layers, hidden 64 by default) with a byte-level BPE tokenizer built as
tests/tiny_folder.py builds it (same specials and ChatML template), trained on this bench's own text so its
words are single tokens (the tests' 400-token vocabulary splits them into bytes).

The two starts, from the same random init and the same rows of the 20 pretraining tasks, the same steps:
- instruct: `leantune finetune --method full` on the instruction chats (the instruction-tuned start);
- base: `leantune finetune --method full` on the same rows as plain text "<input>\n<output>", without the
  instruction and without the chat format (a language model of the same text, the T5 side of the paper).

Then for each held-out task, `leantune sweep --axis data-fraction` (its Python function) from each start over
the first k of the task's training rows, k in --ks (default 8,32,all = 128), each cell an ordinary full
finetune (--epochs 2, as the paper), scored by `leantune eval --metric rouge-l` on the task's 16 test rows. k=0
is each start itself, unfinetuned. Prints the CPU, the table start x k -> ROUGE-L (mean over held-out tasks),
and min_k: the smallest k whose mean reaches the base start's full-data score (the bar; the paper's "matches the
full-data model"). Writes quick_learners.md and quick_learners.json to --out.

    nice -n 19 .venv/bin/python bench/quick_learners.py [--held-out 5] [--pretrain-steps 800] [--ks 8,32,all]
        [--n-train 128] [--work DIR] [--out bench/results]

~13 min on 2 busy cores (of which ~11 min pretraining the two starts); the starts are reused from --work.
A 4-layer, hidden-128 model, 256 rows per task and k = 128 as well were planned, and cost too much CPU time here.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ("cat", "dog", "sun", "tree", "bird", "fish", "red", "blue", "moon", "star", "rain", "book", "lamp", "door",
         "apple", "river", "stone", "cloud", "green", "house", "milk", "road", "ship", "wind")
VOWELS = set("aeiou")
QUIET = ("--dtype", "fp32", "--no-progress", "--eval-fraction", "0", "--report-to", "none")
N_TEST = 16  # test rows per task: the first N_TEST of its rows (the paper: test = the first 100 instances)


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    fn: Callable[[list[str]], str]  # the input's words -> the output


TASKS = [  # the first 20: instruction pretraining; the last 5: held out
    Task("copy", "Repeat the input exactly.", lambda w: " ".join(w)),
    Task("reverse", "Reverse the order of the words.", lambda w: " ".join(reversed(w))),
    Task("upper", "Write the input in upper case.", lambda w: " ".join(w).upper()),
    Task("first", "Give the first word.", lambda w: w[0]),
    Task("last", "Give the last word.", lambda w: w[-1]),
    Task("second", "Give the second word.", lambda w: w[1]),
    Task("drop_first", "Remove the first word.", lambda w: " ".join(w[1:])),
    Task("count_words", "How many words are there? Answer with a number.", lambda w: str(len(w))),
    Task("swap_ends", "Swap the first and the last word.", lambda w: " ".join([w[-1], *w[1:-1], w[0]])),
    Task("sort_words", "Sort the words alphabetically.", lambda w: " ".join(sorted(w))),
    Task("double_each", "Write every word twice.", lambda w: " ".join(x for x in w for _ in range(2))),
    Task("initials", "Give the first letter of each word.", lambda w: " ".join(x[0] for x in w)),
    Task("first_len", "How many letters does the first word have?", lambda w: str(len(w[0]))),
    Task("vowels_first", "Count the vowels in the first word.", lambda w: str(sum(c in VOWELS for c in w[0]))),
    Task("rotate_left", "Move the first word to the end.", lambda w: " ".join([*w[1:], w[0]])),
    Task("capitalize", "Capitalize every word.", lambda w: " ".join(x.capitalize() for x in w)),
    Task("sort_letters", "Sort the letters of the first word.", lambda w: "".join(sorted(w[0]))),
    Task("last_letters", "Give the last letter of each word.", lambda w: " ".join(x[-1] for x in w)),
    Task("first_twice", "Write the first word two times.", lambda w: f"{w[0]} {w[0]}"),
    Task("longest", "Give the longest word.", lambda w: max(w, key=len)),
    # held out
    Task("third", "Give the third word.", lambda w: w[2]),
    Task("rotate_right", "Move the last word to the front.", lambda w: " ".join([w[-1], *w[:-1]])),
    Task("join_and", "Join the words with the word and.", lambda w: " and ".join(w)),
    Task("first_thrice", "Write the first word three times.", lambda w: " ".join([w[0]] * 3)),
    Task("drop_last", "Remove the last word.", lambda w: " ".join(w[:-1])),
]
N_PRETRAIN_TASKS = 20
HELD_OUT = TASKS[N_PRETRAIN_TASKS:]


def task_inputs(task_index: int, n: int, seed: int = 0) -> list[list[str]]:
    """n inputs of 3-5 distinct words, seeded by (seed, task): the same call gives the same inputs."""
    rng = random.Random(f"{seed}:{task_index}")
    return [rng.sample(WORDS, rng.randint(3, 5)) for _ in range(n)]


def task_rows(task_index: int, n: int, seed: int = 0) -> list[dict]:
    """The task's first n rows as chats (instruction + input -> output); the first N_TEST are its test rows."""
    t = TASKS[task_index]
    return [{"messages": [{"role": "user", "content": f"{t.instruction}\nInput: {' '.join(w)}"},
                          {"role": "assistant", "content": t.fn(w)}]} for w in task_inputs(task_index, n, seed)]


def plain_text(row: dict) -> dict:
    """The base start's row: the same input and output as plain text, no instruction, no chat format."""
    user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
    return {"text": f"{user.split('Input: ', 1)[1]}\n{answer}"}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def run_cli(argv: list) -> None:
    from leantune import cli

    with contextlib.redirect_stdout(sys.stderr):  # the run's own report; stdout carries the benchmark's
        rc = cli.run([str(a) for a in argv])
    if rc != 0:
        raise SystemExit(f"leantune {argv[0]} failed with {rc}: {argv}")


# ---------------------------------------------------------------------------------------------
# the two starts


def build_init(work: Path, args) -> Path:
    """The random Llama + tokenizer both starts begin from (tests/tiny_folder.py's recipe, this bench's text)."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    from leantune.models.tokenizer import Tokenizer

    init = work / "init"
    corpus = [r["messages"][0]["content"] + "\n" + r["messages"][1]["content"]
              for i in range(len(TASKS)) for r in task_rows(i, 64, args.seed)]
    tk = HFTok(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus + ["<|im_start|>user\n<|im_start|>assistant\n"] * 20, trainers.BpeTrainer(
        vocab_size=args.vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    cfg = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(args.seed)
    tf.LlamaForCausalLM(cfg).save_pretrained(init)
    Tokenizer(tk, chat_template=CHATML, bos_token=None, eos_token="<|im_end|>",
              pad_token="<|endoftext|>").save(init)
    return init


def build_starts(work: Path, args) -> dict[str, Path]:
    """{"base": ..., "instruct": ...}: the same init trained the same steps on the same rows of the 20
    pretraining tasks, with instructions (chats) or without (plain text). Reused when already in --work."""
    starts = {"base": work / "base", "instruct": work / "instruct"}
    if all((p / "config.json").exists() for p in starts.values()):
        print(f"reusing the starts in {work}", file=sys.stderr)
        return starts
    work.mkdir(parents=True, exist_ok=True)
    init = build_init(work, args)
    rows = [r for i in range(N_PRETRAIN_TASKS) for r in task_rows(i, args.pretrain_rows, args.seed)]
    random.Random(args.seed).shuffle(rows)
    data = {"instruct": write_jsonl(work / "pretrain-instruct.jsonl", rows),
            "base": write_jsonl(work / "pretrain-base.jsonl", [plain_text(r) for r in rows])}
    for name, path in starts.items():
        run_cli(["finetune", "--model", init, "--data", data[name], "--output", path, "--method", "full",
                 "--lr", args.pretrain_lr, "--max-steps", args.pretrain_steps, "--batch-size", 16,
                 "--warmup-steps", 10, "--seed", args.seed, *QUIET])
    return starts


# ---------------------------------------------------------------------------------------------
# the sweeps


def parse_ks(text: str, n_train: int) -> list[int]:
    ks = [n_train if k == "all" else int(k) for k in text.split(",")]
    if any(not 0 < k <= n_train for k in ks) or ks != sorted(set(ks)):
        raise SystemExit(f"--ks must rise within 1..{n_train} (--n-train), got {text}")
    return ks


def run_task(task_index: int, starts: dict[str, Path], work: Path, ks: list[int], args) -> dict:
    """{start: {k: ROUGE-L}} for one held-out task: k = 0 is the start itself, the rest `leantune sweep`."""
    from leantune.recipes.eval import EvalConfig, evaluate
    from leantune.recipes.sweep import SweepConfig, sweep

    d = work / TASKS[task_index].name
    d.mkdir(parents=True, exist_ok=True)
    rows = task_rows(task_index, N_TEST + args.n_train, args.seed)
    test = write_jsonl(d / "test.jsonl", rows[:N_TEST])
    train = write_jsonl(d / "train.jsonl", rows[N_TEST:])
    values = ",".join(repr(k / args.n_train) for k in ks)  # round(f * n) = k: the first k rows
    out = {}
    for name, start in starts.items():
        ev = dict(metric="rouge-l", max_new_tokens=args.max_new_tokens, dtype="fp32")
        scores = {0: evaluate(EvalConfig(model=str(start), data=test, **ev))["score"]}
        cfg = SweepConfig(axis=["data-fraction", values], data=train, model=str(start), metric="rouge-l",
                          eval_data=test, max_new_tokens=args.max_new_tokens, eval_dtype="fp32",
                          output=str(d / f"sweep-{name}"), finetune_args=[
                              "--method", "full", "--epochs", "2", "--batch-size", "8", "--lr", str(args.lr),
                              "--warmup-steps", "0", "--seed", str(args.seed), *QUIET])
        with contextlib.redirect_stdout(sys.stderr):
            results = sweep(cfg)
        scores.update({r["n_data"]: r["score"] for r in results})
        out[name] = scores
        print(f"{TASKS[task_index].name} from {name}: " + ", ".join(f"k={k} {s:.3f}" for k, s in scores.items()),
              file=sys.stderr, flush=True)
    return out


def summarize(per_task: dict[str, dict], ks: list[int]) -> dict:
    """Mean over tasks per (start, k), and min_k per start: the smallest k (0 = the start itself) whose mean
    reaches the base start's full-data mean."""
    mean = {s: {k: statistics.fmean(per_task[t][s][k] for t in per_task) for k in [0, *ks]}
            for s in ("base", "instruct")}
    bar = mean["base"][ks[-1]]
    min_k = {s: next((k for k in [0, *ks] if mean[s][k] >= bar - 1e-9), None) for s in mean}
    above = all(mean["instruct"][k] > mean["base"][k] for k in ks)
    return {"mean": mean, "bar": bar, "min_k": min_k, "instruct_above_at_every_k": above}


def table(summary: dict, ks: list[int], n_train: int) -> str:
    head = ["start", *(f"k={'all (' + str(k) + ')' if k == n_train else k}" for k in [0, *ks]), "min_k"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in ("base", "instruct"):
        md.append(f"| {s} | " + " | ".join(f"{summary['mean'][s][k]:.3f}" for k in [0, *ks])
                  + f" | {summary['min_k'][s] if summary['min_k'][s] is not None else 'not reached'} |")
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--held-out", type=int, default=5, help="how many of the 5 held-out tasks to sweep")
    ap.add_argument("--ks", default="8,32,all", help="first-k subset sizes; all = --n-train")
    ap.add_argument("--n-train", type=int, default=128, help="training rows of each held-out task")
    ap.add_argument("--pretrain-rows", type=int, default=64, help="rows of each of the 20 pretraining tasks")
    ap.add_argument("--pretrain-steps", type=int, default=800)
    ap.add_argument("--pretrain-lr", type=float, default=5e-3)
    ap.add_argument("--lr", type=float, default=2e-3, help="lr of every sweep cell (full finetune, 2 epochs)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="folder of the starts (reused) and the sweeps (default: temp)")
    ap.add_argument("--out", default="bench/results", help="where quick_learners.md / .json go")
    args = ap.parse_args(argv)
    if not 1 <= args.held_out <= len(HELD_OUT):
        raise SystemExit(f"--held-out must be in 1..{len(HELD_OUT)}")
    ks = parse_ks(args.ks, args.n_train)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the cells' processes: tiny models run fastest on one thread
    import torch

    from leantune.precision import cpu_info

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cpu = cpu_info().describe()
    print(f"cpu: {cpu}", flush=True)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        starts = build_starts(work, args)
        t_pre = time.perf_counter() - t0
        per_task = {TASKS[i].name: run_task(i, starts, work, ks, args)
                    for i in range(N_PRETRAIN_TASKS, N_PRETRAIN_TASKS + args.held_out)}
    summary = summarize(per_task, ks)
    md = table(summary, ks, args.n_train)
    wall = time.perf_counter() - t0
    header = (f"held-out tasks {list(per_task)}; {args.n_train} training rows each, {N_TEST} test rows; starts: "
              f"a random Llama ({args.layers} layers, hidden {args.hidden}) trained {args.pretrain_steps} steps "
              f"(batch 16, lr {args.pretrain_lr}) on {N_PRETRAIN_TASKS} tasks x {args.pretrain_rows} rows, with "
              f"instructions (instruct) or as plain text (base); cells: full finetune, 2 epochs, batch 8, lr "
              f"{args.lr}; ROUGE-L mean over held-out tasks; min_k: smallest k reaching the base start's "
              f"full-data score {summary['bar']:.3f}; {wall:.0f} s in all ({t_pre:.0f} s pretraining)")
    verdict = ("instruct start above the base start at every k > 0: "
               f"{'yes' if summary['instruct_above_at_every_k'] else 'no'}; min_k instruct "
               f"{summary['min_k']['instruct']} vs base {summary['min_k']['base']}")
    print(header)
    print(md)
    print(verdict)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "quick_learners.md").write_text(f"cpu: {cpu}\n{header}\n\n{md}\n{verdict}\n", encoding="utf-8")
    result = {"cpu": cpu, "args": vars(args), "per_task": per_task, **summary, "wall_s": wall}
    (outdir / "quick_learners.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    print(json.dumps({"bench": "quick_learners", "min_k": summary["min_k"], "bar": summary["bar"],
                      "instruct_above_at_every_k": summary["instruct_above_at_every_k"], "wall_s": round(wall, 1)}))
    return result


if __name__ == "__main__":
    main()
