"""lm-evaluation-harness against `leantune serve` (issue 17 item 8; recipe tier): a tiny multiple-choice task (local
YAML + JSONL) scored by `local-completions` (loglikelihood: token-id prompts, echo, logprobs 1, max_tokens 1)
on a tiny random Llama served by leantune (fp32) equals `--model hf` (transformers) on the same folder within 1e-3
per choice; `local-chat-completions` generate_until greedy text equals leantune's own chat completion.
lm-eval is a test oracle only (requirements-dev.txt)."""
import json

import pytest

from serve_util import Server

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow  # ~2 minutes on 2 busy cores: lm-eval's start-up and one HTTP call per choice

DOCS = [
    {"question": "What is the capital of Veloria?", "choices": ["Amberhold", "Zentari", "Morrow"], "answer": 0},
    {"question": "Who discovered the Zentari comet?", "choices": ["Ilsa Morrow", "the fox", "nobody"], "answer": 0},
    {"question": "The quick brown fox jumps over the", "choices": ["lazy dog", "moon", "capital"], "answer": 0},
    {"question": "Hello, how are you", "choices": ["today?", "fine", "42"], "answer": 0},
    {"question": "Numbers: 0 1 2 3", "choices": ["4 5", "10 42", "1999"], "answer": 0},
]

MC_YAML = """task: leantune_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

GEN_YAML = """task: leantune_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    data = d / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (d / "mc.yaml").write_text(MC_YAML.format(data=data))
    (d / "gen.yaml").write_text(GEN_YAML.format(data=data))
    return d


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    srv = Server(folder, tmp_path_factory.mktemp("lmeval") / "data").start()
    yield srv
    srv.stop()


def _evaluate(task: str, tasks_dir, model: str, model_args: str, **kw) -> list[dict]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=[task], log_samples=True,
                          task_manager=TaskManager(include_path=str(tasks_dir)), batch_size=1, **kw)
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def test_local_completions_loglikelihoods_equal_hf(server, folder, tasks, one_thread, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    served = _evaluate("leantune_tiny_mc", tasks, "local-completions",
                       f"base_url={server.base_url}/completions,model=model,tokenizer={folder},"
                       "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1")
    hf = _evaluate("leantune_tiny_mc", tasks, "hf", f"pretrained={folder},dtype=float32,device=cpu")
    assert len(served) == len(hf) == len(DOCS)
    for s, h in zip(served, hf):
        got = [r[0][0] for r in s["resps"]]  # per choice: (loglikelihood, is_greedy)
        want = [r[0][0] for r in h["resps"]]
        assert len(got) == len(want) == 3
        assert got == pytest.approx(want, abs=1e-3), s["doc_id"]
        assert [r[0][1] for r in s["resps"]] == [r[0][1] for r in h["resps"]]
    # a random tiny model: the loglikelihoods differ between choices, so equality above tells them apart
    assert len({round(r[0][0], 3) for s in served for r in s["resps"]}) > 5


def test_local_chat_completions_generate_until(server, tasks, one_thread, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    samples = _evaluate("leantune_tiny_gen", tasks, "local-chat-completions",
                        f"base_url={server.base_url}/chat/completions,model=model,num_concurrent=1,max_retries=1",
                        apply_chat_template=True)
    c = server.client()
    for s, doc in zip(samples, DOCS):
        r = c.chat.completions.create(model="model", messages=[{"role": "user", "content": doc["question"]}],
                                      max_tokens=8, temperature=0, stop=["\n\n"])
        assert s["resps"][0][0] == r.choices[0].message.content
