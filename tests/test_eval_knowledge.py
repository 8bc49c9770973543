"""`leantune eval knowledge` (FineTuneBench's protocol) end to end against leantune's own server, in-process (the
official client over Starlette's TestClient) and through the CLI against a server process; and its loaders and
scoring."""
import json
import types

import openai
import pytest
from starlette.testclient import TestClient

from leantune.eval.knowledge import (Fact, KnowledgeRun, builtin_facts, evaluate, exact_match, judge, load_facts,
                                     normalize, training_rows)
from serve_util import Server
from test_serve_api import FACTS

REPHRASED = ["Veloria's capital city is called what?", "Who was the first to see the Zentari comet?"]


def _facts():
    return [Fact(a, [q], [r]) for (q, a), r in zip(FACTS, REPHRASED)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny_folder import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", initializer_range=0.15)


def _check_report(report, client, facts):
    """The report's shape, and its scores are the exact matches of the fine-tuned model's real answers."""
    assert report["status"] == "succeeded" and report["fine_tuned_model"].startswith("ft:model:knowledge:")
    assert report["facts"] == len(facts) and report["scoring"] == "exact match (normalized)"
    items = report["items"]
    assert [(i["set"], i["question"]) for i in items] == [
        (kind, q) for f in facts for kind, qs in (("memorization", f.questions), ("generalization", f.rephrased))
        for q in qs]
    for it in items:
        again = client.chat.completions.create(
            model=report["fine_tuned_model"], temperature=0, max_tokens=report["settings"]["max_tokens"],
            messages=[{"role": "system", "content": report["settings"]["system"]},
                      {"role": "user", "content": it["question"]}])
        assert again.choices[0].message.content == it["response"]  # what was scored is what the model says
        assert it["correct"] == exact_match(it["response"], it["answer"])
    for kind in ("memorization", "generalization"):
        got = [i["correct"] for i in items if i["set"] == kind]
        assert report[kind] == {"accuracy": sum(got) / len(got), "correct": sum(got), "total": len(got)}


def test_protocol_in_process_against_leantunes_server(folder, tmp_path):
    from leantune.recipes.serve import ServeConfig, build_server

    app, engine = build_server(ServeConfig(model=str(folder), data_dir=str(tmp_path / "data"), dtype="fp32",
                                           max_tokens_per_step=64))
    engine.start()
    try:
        with TestClient(app) as http:
            client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
            facts = _facts()
            steps = []
            run = KnowledgeRun(client, "model", hyperparameters={"n_epochs": 30, "batch_size": 2,
                                                                 "learning_rate_multiplier": 20}, poll_s=0.2)
            report = evaluate(run, facts, progress=lambda s, t: steps.append((s, t)))
            assert steps and steps[-1][1] == 30 and [s for s, _ in steps] == sorted({s for s, _ in steps})
            _check_report(report, client, facts)
            # the uploaded training file holds the memorization questions only, never a rephrasing
            rows = client.files.content(report["training_file"]).text
            assert all(q in rows for q, _ in FACTS) and not any(r in rows for r in REPHRASED)
    finally:
        engine.stop()


def test_cli_writes_the_report_and_prints_a_summary(folder, tmp_path, capsys):
    from leantune import cli

    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps({"question": f.questions[0], "answer": f.answer, "rephrased": f.rephrased})
                              for f in _facts()))
    srv = Server(folder, tmp_path / "data", "--max-tokens-per-step", "64", key="k1").start()
    try:
        out = tmp_path / "report.json"
        assert cli.run(["eval", "knowledge", "--base-url", srv.base_url, "--api-key", "k1", "--model", "model",
                        "--data", str(data), "--n-epochs", "3", "--batch-size", "2", "--out", str(out),
                        "--poll", "0.2"]) == 0
        report = json.loads(out.read_text())
        _check_report(report, srv.client(), _facts())
        assert report["hyperparameters"]["n_epochs"] == 3
        printed = capsys.readouterr().out
        assert "memorization:" in printed and "generalization:" in printed and str(out) in printed
    finally:
        srv.stop()


def test_loaders_builtin_jsonl_and_finetunebench_csv(tmp_path):
    facts = builtin_facts()
    assert len(facts) >= 10 and all(f.questions and f.rephrased and f.answer for f in facts)
    assert load_facts(None) == facts
    j = tmp_path / "d.jsonl"
    j.write_text('{"prompt": "Q1?", "answer": "A1", "rephrased": "R1?"}\n\n{"questions": ["Q2?", "Q2b?"], '
                 '"answer": "A2"}\n')
    assert load_facts(j) == [Fact("A1", ["Q1?"], ["R1?"]), Fact("A2", ["Q2?", "Q2b?"], [])]
    j.write_text('{"question": "Q1?"}\n')
    with pytest.raises(ValueError, match="d.jsonl:1"):
        load_facts(j)
    mem, reph = tmp_path / "m.csv", tmp_path / "r.csv"
    mem.write_text("id,prompt,answer,used_in_analysis\n1,Q1?,A1,True\n2,Q2?,A2,False\n3,Q3?,A3,True\n")
    reph.write_text("id,prompt,answer\n1,R1?,A1\n3,R3?,A3\n3,R3b?,A3\n")
    assert load_facts(mem, reph) == [Fact("A1", ["Q1?"], ["R1?"]), Fact("A3", ["Q3?"], ["R3?", "R3b?"])]
    rows = [json.loads(r) for r in training_rows(load_facts(mem)).decode().splitlines()]
    assert [r["messages"][-1] for r in rows] == [{"role": "assistant", "content": "A1"},
                                                {"role": "assistant", "content": "A3"}]


def test_exact_match_normalizes_and_judge_reads_the_verdict():
    assert normalize("  The  Answer.\n") == "the answer"
    assert exact_match('"Amberhold."', "amberhold") and not exact_match("Amberhold is it", "Amberhold")

    def client(reply):
        sent = []

        def create(**kw):
            sent.append(kw)
            return types.SimpleNamespace(choices=[types.SimpleNamespace(message=types.SimpleNamespace(content=reply))])

        return types.SimpleNamespace(chat=types.SimpleNamespace(completions=types.SimpleNamespace(create=create))), sent

    for reply, want in (("Correct", True), ("correct.", True), ("Incorrect", False), ("", False)):
        c, sent = client(reply)
        assert judge(KnowledgeRun(c, "m", judge_model="j"), "It is Amberhold", "Amberhold") is want
        assert sent[0]["model"] == "j" and "Amberhold" in sent[0]["messages"][0]["content"]
