"""`leantune eval`: the metrics against hand-computed values (and `rouge-score` as an oracle), each metric end to
end through the CLI on a tiny random model, checked against transformers' own numbers; bad options refused."""
import json
from pathlib import Path

import pytest
import torch

from leantune import cli
from leantune.eval.metrics import exact_match, lcs_length, rouge_l

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTIONS = ["What is the capital of Veloria?", "Who discovered the Zentari comet?", "Hello, how are you today?",
             "Numbers: 0 1 2 3?"]


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_exact_match_normalizes_case_punctuation_and_article():
    assert exact_match("The Amberhold.", "amberhold") == 1.0
    assert exact_match("Amberhold city", "Amberhold") == 0.0


def test_rouge_l_hand_computed():
    # pred "the cat sat" vs gold "a cat sat down": LCS "cat sat" = 2, P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7
    assert rouge_l("The cat sat!", "a cat sat down") == pytest.approx(4 / 7)
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # CLRS's example
    assert rouge_l("", "x") == 0.0 and rouge_l("a b", "c d") == 0.0 and rouge_l("A-b", "a b") == 1.0


def test_rouge_l_matches_rouge_score():
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rs.RougeScorer(["rougeL"])
    pairs = [("the quick brown fox jumps", "quick fox jumped over the dog"), ("Item 3 is red.", "item 3 is blue"),
             ("a b c d e f", "f e d c b a"), ("x1 y2-z3", "X1 z3")]
    for pred, gold in pairs:
        assert rouge_l(pred, gold) == pytest.approx(scorer.score(gold, pred)["rougeL"].fmeasure)


@pytest.fixture(scope="module")
def replies(folder):
    """The tiny model's greedy replies (8 new tokens) to QUESTIONS, through the generate recipe's own path."""
    from leantune.data.answers import Query, query_ids
    from leantune.models.generate import GenerationConfig, generate_text
    from leantune.precision import resolve_precision
    from leantune.recipes.generate import load_with_adapter

    model, tok = load_with_adapter(str(folder), [], resolve_precision("fp32", "cpu"))
    with torch.no_grad():
        out = generate_text(model, tok, [query_ids(Query.of_text(q), tok) for q in QUESTIONS],
                            GenerationConfig(max_new_tokens=8))
    return [r.strip() for r in out]


def run_eval(folder, data, metric, out: Path, *extra) -> dict:
    assert cli.run(["eval", "--model", str(folder), "--data", data, "--metric", metric, "--dtype", "fp32",
                    "--max-new-tokens", "8", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_exact_and_rouge_l_score_the_greedy_replies(folder, replies, tmp_path):
    assert all(replies)  # a reply to score (else exact match of "" would be vacuous)
    golds = [replies[0], replies[1].upper() + "!", "zzz qqq", "zzz " + replies[3]]
    data = write_jsonl(tmp_path / "qa.jsonl", [chat(q, g) for q, g in zip(QUESTIONS, golds)])
    rep = run_eval(folder, data, "exact", tmp_path / "exact.json")
    assert rep["metric"] == "exact" and rep["n"] == 4 and rep["score"] == pytest.approx(0.5)
    assert [e["reply"] for e in rep["examples"]] == replies
    rep = run_eval(folder, data, "rouge-l", tmp_path / "rouge.json")
    expected = [rouge_l(r, g) for r, g in zip(replies, golds)]
    assert rep["score"] == pytest.approx(sum(expected) / 4)
    assert 0.5 < rep["score"] < 1.0  # the fourth row's partial overlap counts


def test_loss_is_transformers_token_mean_nll_on_the_answers(folder, tmp_path):
    import transformers

    from leantune.data import load_dataset
    from leantune.models.tokenizer import Tokenizer

    rows = [chat(q, a) for q, a in zip(QUESTIONS, ["Amberhold.", "Ilsa Morrow.", "I am fine.", "42"])]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    rep = run_eval(folder, data, "loss", tmp_path / "loss.json")
    tok = Tokenizer.from_folder(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, n = 0.0, 0
    for ex in load_dataset(data, tok, 512):
        ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
        with torch.no_grad():
            logits = hf(ids).logits[0, :-1]  # (T-1, V): position t predicts token t+1
        tgt = labels[0, 1:]
        keep = tgt != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], tgt[keep], reduction="sum"))
        n += int(keep.sum())
    assert n > 0 and rep["n"] == 4
    assert rep["score"] == pytest.approx(total / n, rel=1e-4)


def test_accuracy_picks_the_likeliest_label(folder, tmp_path):
    import transformers

    from leantune.data.answers import Query, answer_ids
    from leantune.models.tokenizer import Tokenizer

    classes = ["Amberhold", "fox", "42"]
    tok = Tokenizer.from_folder(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def nll(text, label):  # transformers' summed NLL of the label tokens as the reply
        ids, labels = answer_ids(Query.of_text(text), label, tok)
        with torch.no_grad():
            logp = hf(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        tgt = torch.tensor(labels[1:])
        keep = tgt != -100
        return -float(logp[keep].gather(1, tgt[keep, None]).sum())

    best = [min(classes, key=lambda c: nll(q, c)) for q in QUESTIONS]
    wrong = [next(c for c in classes if c != b) for b in best]
    rows = [{"text": q, "label": b if i % 2 == 0 else w} for i, (q, b, w) in enumerate(zip(QUESTIONS, best, wrong))]
    rep = run_eval(folder, write_jsonl(tmp_path / "cls.jsonl", rows), "accuracy", tmp_path / "acc.json")
    assert rep["score"] == pytest.approx(0.5) and [e["reply"] for e in rep["examples"]] == best


def test_eval_refuses_bad_options_before_loading(tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", [chat("q", "a")])
    missing = str(tmp_path / "no-model")  # never read: each error comes first
    with pytest.raises(ValueError, match="--metric must be one of"):
        cli.run(["eval", "--model", missing, "--data", data, "--metric", "bleu"])
    with pytest.raises(ValueError, match="--metric accuracy needs classification rows"):
        cli.run(["eval", "--model", missing, "--data", data, "--metric", "accuracy"])
    with pytest.raises(ValueError, match="--max-new-tokens must be >= 1"):
        cli.run(["eval", "--model", missing, "--data", data, "--max-new-tokens", "0"])
    cls = write_jsonl(tmp_path / "cls.jsonl", [{"text": "t", "label": "x"}])
    with pytest.raises(ValueError, match="--metric exact needs rows with one gold answer"):
        cli.run(["eval", "--model", missing, "--data", cls, "--metric", "exact"])
    assert not list(tmp_path.glob("*.json"))


def test_eval_knowledge_still_parses_as_a_subcommand():
    args = cli.build_parser(["eval", "knowledge", "--model", "m", "--n-epochs", "3"]).parse_args(
        ["eval", "knowledge", "--model", "m", "--n-epochs", "3"])
    assert args.eval_command == "knowledge" and args.model == "m" and args.n_epochs == 3
    args = cli.build_parser().parse_args(["eval", "--model", "m", "--data", "d", "--metric", "loss"])
    assert args.eval_command is None and args.metric == "loss"
