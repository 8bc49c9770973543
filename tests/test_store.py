"""Unit tests of the server's persistence (leantune.serve.store) and upload checks (leantune.serve.uploads)."""
import json
import re
import sqlite3
import threading

import pytest

from leantune.serve import store as store_mod
from leantune.serve.store import Store, fs_name, safe_component
from leantune.serve.uploads import (
    UploadError,
    normalize_finetune_jsonl,
    validate_finetune_jsonl,
)

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                     {"role": "assistant", "content": "Hello."}]}
FILE_KEYS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status"}
JOB_KEYS = {
    "id", "object", "model", "created_at", "finished_at", "fine_tuned_model", "organization_id", "result_files",
    "status", "validation_file", "training_file", "hyperparameters", "trained_tokens", "error", "seed",
    "user_provided_suffix", "method", "estimated_finish", "integrations",
}


@pytest.fixture
def st(tmp_path):
    s = Store(tmp_path / "data")
    yield s
    s.close()


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def add_job(st, owner="A", **kw):
    return st.add_job(owner, "base", "file-x", None, {"n_epochs": 1}, None, 7, {"type": "supervised"}, **kw)


# ---- layout and schema ----------------------------------------------------------------------------------
def test_creates_layout_wal_and_schema_version(tmp_path):
    s = Store(tmp_path / "d")
    for name in ("store.sqlite3", "files", "jobs", "adapters"):
        assert (tmp_path / "d" / name).exists()
    assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s._conn.execute("PRAGMA user_version").fetchone()[0] == store_mod.SCHEMA_VERSION
    s.close()


def test_newer_schema_is_refused(tmp_path):
    Store(tmp_path).close()
    con = sqlite3.connect(tmp_path / "store.sqlite3")
    con.execute(f"PRAGMA user_version={store_mod.SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(tmp_path)


# ---- files ------------------------------------------------------------------------------------------------
def test_file_crud(st):
    data = jsonl(CHAT)
    f = st.add_file("A", "train.jsonl", "fine-tune", data)
    assert set(f) == FILE_KEYS
    assert re.fullmatch(r"file-[0-9a-f]{24}", f["id"])
    assert (f["object"], f["bytes"], f["filename"], f["purpose"], f["status"]) == (
        "file", len(data), "train.jsonl", "fine-tune", "processed")
    assert isinstance(f["created_at"], int)
    assert st.get_file("A", f["id"]) == f
    assert st.file_path("A", f["id"]).read_bytes() == data
    assert st.list_files("A") == [f]
    assert st.delete_file("A", f["id"]) is True
    assert st.get_file("A", f["id"]) is None and st.file_path("A", f["id"]) is None
    assert list((st.data_dir / "files").iterdir()) == []
    assert st.delete_file("A", f["id"]) is False


def test_list_files_newest_first_and_by_purpose(st):
    a = st.add_file("A", "a.jsonl", "fine-tune", b"{}")
    b = st.add_file("A", "b.jsonl", "batch", b"{}")
    c = st.add_file("A", "c.jsonl", "fine-tune", b"{}")
    assert [x["id"] for x in st.list_files("A")] == [c["id"], b["id"], a["id"]]
    assert [x["id"] for x in st.list_files("A", purpose="fine-tune")] == [c["id"], a["id"]]
    assert st.list_files("A", purpose="vision") == []


def test_file_owner_isolation(st):
    f = st.add_file("A", "a.jsonl", "fine-tune", b"{}")
    assert st.get_file("B", f["id"]) is None
    assert st.file_path("B", f["id"]) is None
    assert st.list_files("B") == []
    assert st.delete_file("B", f["id"]) is False
    assert st.get_file("A", f["id"]) == f  # still there for its owner


def test_file_write_is_atomic_no_tmp_left(st):
    st.add_file("A", "a.jsonl", "fine-tune", b"x" * 10_000)
    assert not [p for p in (st.data_dir / "files").iterdir() if p.name.endswith(".tmp")]


def test_failing_write_leaves_no_row_and_no_file(st, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        st.add_file("A", "a.jsonl", "fine-tune", b"{}")
    assert st.list_files("A") == []
    assert list((st.data_dir / "files").iterdir()) == []


def test_failing_insert_removes_written_bytes(st, monkeypatch):
    def boom(*a, **k):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(st, "_write", boom)
    with pytest.raises(sqlite3.OperationalError):
        st.add_file("A", "a.jsonl", "fine-tune", b"{}")
    assert list((st.data_dir / "files").iterdir()) == []


def test_add_file_rejects_bad_arguments(st):
    with pytest.raises(ValueError, match="owner"):
        st.add_file("", "a.jsonl", "fine-tune", b"{}")
    with pytest.raises(ValueError, match="purpose"):
        st.add_file("A", "a.jsonl", "", b"{}")
    with pytest.raises(TypeError, match="bytes"):
        st.add_file("A", "a.jsonl", "fine-tune", "text")


# ---- jobs -------------------------------------------------------------------------------------------------
def test_job_crud_and_shape(st):
    j = st.add_job("A", "base", "file-t", "file-v", {"n_epochs": 2}, "mine", 3, {"type": "supervised"})
    assert set(j) == JOB_KEYS
    assert "owner" not in j and "A" not in json.dumps(j)
    assert re.fullmatch(r"ftjob-[0-9a-f]{24}", j["id"])
    assert (j["object"], j["status"], j["organization_id"], j["user_provided_suffix"]) == (
        "fine_tuning.job", "queued", "leantune", "mine")
    assert (j["training_file"], j["validation_file"], j["seed"], j["hyperparameters"]) == (
        "file-t", "file-v", 3, {"n_epochs": 2})
    assert j["result_files"] == [] and j["integrations"] == [] and j["estimated_finish"] is None
    assert st.get_job("A", j["id"]) == j
    assert st.job_owner(j["id"]) == "A" and st.job_owner("ftjob-none") is None


def test_job_defaults(st):
    j = st.add_job("A", "base", "file-t")
    assert j["hyperparameters"] == {} and j["method"] == {"type": "supervised"}
    assert j["validation_file"] is None and j["seed"] is None


def test_update_job(st):
    j = add_job(st)
    err = {"code": "invalid_file", "message": "bad", "param": "training_file"}
    u = st.update_job(j["id"], status="failed", error=err, finished_at=123, trained_tokens=99)
    assert (u["status"], u["error"], u["finished_at"], u["trained_tokens"]) == ("failed", err, 123, 99)
    assert st.get_job("A", j["id"]) == u
    u = st.update_job(j["id"], status="succeeded", fine_tuned_model="ft:base:x:abc", error=None)
    assert st.get_job("A", j["id"])["fine_tuned_model"] == "ft:base:x:abc"


def test_update_job_errors(st):
    j = add_job(st)
    with pytest.raises(ValueError, match="owner"):
        st.update_job(j["id"], owner="B")
    with pytest.raises(ValueError, match="job status"):
        st.update_job(j["id"], status="done")
    with pytest.raises(ValueError, match="error must be a dict"):
        st.update_job(j["id"], error="oops")
    with pytest.raises(KeyError, match="ftjob-missing"):
        st.update_job("ftjob-missing", status="running")
    assert st.get_job("A", j["id"]) == j  # nothing changed


def test_job_owner_isolation(st):
    j = add_job(st, "A")
    assert st.get_job("B", j["id"]) is None
    assert st.list_jobs("B") == ([], False)
    assert st.list_jobs("A")[0] == [j]


def test_list_jobs_newest_first_with_pagination(st):
    ids = [add_job(st)["id"] for _ in range(5)]
    add_job(st, "B")
    newest = ids[::-1]
    page, more = st.list_jobs("A", limit=2)
    assert [x["id"] for x in page] == newest[:2] and more
    page, more = st.list_jobs("A", after=page[-1]["id"], limit=2)
    assert [x["id"] for x in page] == newest[2:4] and more
    page, more = st.list_jobs("A", after=page[-1]["id"], limit=2)
    assert [x["id"] for x in page] == newest[4:] and not more
    page, more = st.list_jobs("A", limit=5)
    assert len(page) == 5 and not more
    assert st.list_jobs("A", after=ids[0]) == ([], False)


def test_list_jobs_bad_cursor_and_limit(st):
    a, b = add_job(st, "A"), add_job(st, "B")
    with pytest.raises(ValueError, match="after"):
        st.list_jobs("A", after="ftjob-nope")
    with pytest.raises(ValueError, match="after"):
        st.list_jobs("A", after=b["id"])  # another owner's job is no cursor for A
    for bad in (0, -1, "3", True):
        with pytest.raises(ValueError, match="limit"):
            st.list_jobs("A", limit=bad)
    assert st.list_jobs("A")[0] == [a]


def test_jobs_with_status_all_owners_oldest_first(st):
    a, b, c = add_job(st, "A"), add_job(st, "B"), add_job(st, "A")
    st.update_job(b["id"], status="running")
    st.update_job(c["id"], status="succeeded")
    assert [j["id"] for j in st.jobs_with_status("queued", "running", "validating_files")] == [a["id"], b["id"]]
    assert [j["id"] for j in st.jobs_with_status("succeeded")] == [c["id"]]
    assert st.jobs_with_status() == []
    with pytest.raises(ValueError, match="job status"):
        st.jobs_with_status("bogus")


# ---- events -----------------------------------------------------------------------------------------------
def test_events(st):
    j = add_job(st)
    e1 = st.add_event(j["id"], "queued")
    e2 = st.add_event(j["id"], "step 1", data={"step": 1, "train_loss": 2.5}, type="metrics")
    e3 = st.add_event(j["id"], "failed", level="error")
    st.add_event("ftjob-other", "elsewhere")
    assert set(e1) == {"id", "object", "created_at", "level", "message", "data", "type"}
    assert re.fullmatch(r"ftevent-[0-9a-f]{24}", e1["id"])
    assert (e1["object"], e1["level"], e1["data"], e1["type"]) == ("fine_tuning.job.event", "info", None, "message")
    assert e2["data"] == {"step": 1, "train_loss": 2.5}
    assert st.list_events(j["id"]) == ([e3, e2, e1], False)
    assert st.list_events(j["id"], limit=2) == ([e3, e2], True)
    assert st.list_events(j["id"], after=e2["id"], limit=2) == ([e1], False)
    with pytest.raises(ValueError, match="after"):
        st.list_events("ftjob-other", after=e1["id"])


def test_event_validation(st):
    with pytest.raises(ValueError, match="event level"):
        st.add_event("ftjob-x", "m", level="debug")
    with pytest.raises(ValueError, match="event type"):
        st.add_event("ftjob-x", "m", type="log")


# ---- checkpoints ------------------------------------------------------------------------------------------
def test_checkpoints(st):
    j = add_job(st)
    cks = [st.add_checkpoint(j["id"], s, {"train_loss": 1.0 / s}, f"/ck/{s}", f"ft:base:x:abc:ckpt-step-{s}")
           for s in (10, 20, 30)]
    c = cks[0]
    assert set(c) == {"id", "object", "created_at", "fine_tuned_model_checkpoint", "fine_tuning_job_id", "metrics",
                      "step_number"}
    assert re.fullmatch(r"ftckpt-[0-9a-f]{24}", c["id"])
    assert (c["object"], c["fine_tuning_job_id"], c["step_number"]) == ("fine_tuning.job.checkpoint", j["id"], 10)
    assert st.list_checkpoints(j["id"]) == (cks[::-1], False)
    assert st.list_checkpoints(j["id"], limit=1) == ([cks[2]], True)
    assert st.list_checkpoints(j["id"], after=cks[2]["id"], limit=1) == ([cks[1]], True)
    assert st.list_checkpoints(j["id"], after=cks[1]["id"], limit=1) == ([cks[0]], False)
    assert st.latest_checkpoint(j["id"]) == {**cks[2], "path": "/ck/30"}
    assert st.latest_checkpoint("ftjob-none") is None


def test_latest_checkpoint_is_highest_step(st):
    st.add_checkpoint("ftjob-a", 50, {}, "/ck/50", "m1")
    st.add_checkpoint("ftjob-a", 40, {}, "/ck/40", "m2")  # e.g. written late
    assert st.latest_checkpoint("ftjob-a")["path"] == "/ck/50"


def test_checkpoint_validation(st):
    with pytest.raises(ValueError, match="step"):
        st.add_checkpoint("ftjob-a", -1, {}, "/p", "m")
    with pytest.raises(ValueError, match="path"):
        st.add_checkpoint("ftjob-a", 1, {}, "", "m")


# ---- adapters ---------------------------------------------------------------------------------------------
def test_adapters(st):
    a = st.add_adapter("A", "ft:base:mine:abc123", "/p/a", "base", "job")
    assert a["name"] == "ft:base:mine:abc123" and a["owner"] == "A"
    assert set(a) == {"name", "owner", "path", "base", "source", "created_at"}
    b = st.add_adapter("B", "sql-lora", "/p/b", "base", "api")
    assert st.get_adapter("sql-lora") == b
    assert st.list_adapters() == [a, b]
    assert st.list_adapters("A") == [a]
    with pytest.raises(ValueError, match="already exists"):
        st.add_adapter("A", "sql-lora", "/p/c", "base", "api")
    assert st.delete_adapter("sql-lora") is True and st.delete_adapter("sql-lora") is False
    assert st.get_adapter("sql-lora") is None
    with pytest.raises(ValueError, match="adapter name"):
        st.add_adapter("A", "../evil", "/p", "base", "api")


# ---- paths --------------------------------------------------------------------------------------------------
BAD_NAMES = ["../x", "/abs", "a/b", "", "x" * 200, "..", "a..b", ".hidden", "a b", "a\\b", "a\x00b", None, 5]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_names_rejected(st, name):
    with pytest.raises(ValueError, match="invalid"):
        safe_component(name)
    with pytest.raises(ValueError, match="adapter name"):
        st.adapter_dir(name)
    with pytest.raises(ValueError, match="job id"):
        st.job_dir(name)


def test_dirs_stay_inside_data_dir(st):
    d = st.job_dir("ftjob-0123")
    assert d == st.data_dir / "jobs" / "ftjob-0123" and not d.exists()
    assert st.adapter_dir("my-lora") == st.data_dir / "adapters" / "my-lora"
    assert safe_component("x" * 128) == "x" * 128


def test_adapter_dir_maps_colons(st):
    d = st.adapter_dir("ft:base:suffix:abc123")
    assert ":" not in d.name and d.name.startswith("ft--base--suffix--abc123-")
    assert d.parent == st.data_dir / "adapters"
    d.mkdir()  # a real folder can be made with that name


def test_fs_name_is_one_to_one():
    names = ["a:b", "a--b", "A-b", "a-b", "Ab", "ab", "a.", "nul", "con.txt", "ft:x:y", "ft--x--y"]
    mapped = [fs_name(n).lower() for n in names]  # lower: as a case-insensitive file system sees them
    assert len(set(mapped)) == len(names)
    assert fs_name("a-b") == "a-b" and fs_name("ab.v2") == "ab.v2"
    assert not any(m.endswith(".") or m.split(".")[0] in {"nul", "con"} for m in mapped)


# ---- persistence and threads --------------------------------------------------------------------------------
def test_reopen_sees_everything_without_close(tmp_path):
    s1 = Store(tmp_path)  # never closed: simulates a crash
    f = s1.add_file("A", "a.jsonl", "fine-tune", b"{}")
    j = add_job(s1)
    j = s1.update_job(j["id"], status="running")
    e = s1.add_event(j["id"], "started")
    c = s1.add_checkpoint(j["id"], 5, {"loss": 1.0}, "/ck/5", "m:ckpt")
    a = s1.add_adapter("A", "ft:base::abc", "/p", "base", "job")
    s2 = Store(tmp_path)
    assert s2.get_file("A", f["id"]) == f and s2.file_path("A", f["id"]).read_bytes() == b"{}"
    assert s2.get_job("A", j["id"]) == j
    assert s2.jobs_with_status("running") == [j]
    assert s2.list_events(j["id"]) == ([e], False)
    assert s2.latest_checkpoint(j["id"]) == {**c, "path": "/ck/5"}
    assert s2.get_adapter("ft:base::abc") == a
    s2.close()


def test_concurrent_writers(st):
    j = add_job(st)

    def work(k):
        for i in range(25):
            st.add_event(j["id"], f"{k}-{i}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events, more = st.list_events(j["id"], limit=1000)
    assert len(events) == 100 and not more


# ---- upload validation -----------------------------------------------------------------------------------
def bad(data: bytes, match: str, line: int, max_bytes: int = 10**6):
    with pytest.raises(UploadError, match=match) as e:
        validate_finetune_jsonl(data, "training.jsonl", max_bytes)
    assert e.value.line == line
    assert isinstance(e.value, ValueError)
    return str(e.value)


def test_valid_chat_and_completion_files():
    data = b"\n" + jsonl(CHAT, CHAT) + b"\n  \n"
    assert validate_finetune_jsonl(data, "t.jsonl", 10**6) == 2
    assert validate_finetune_jsonl(jsonl({"prompt": "a", "completion": "b"}), "t.jsonl", 10**6) == 1
    assert validate_finetune_jsonl(b"\xef\xbb\xbf" + jsonl(CHAT), "t.jsonl", 10**6) == 1  # BOM
    assert validate_finetune_jsonl(jsonl(CHAT).replace(b"\n", b"\r\n"), "t.jsonl", 10**6) == 1
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                          {"role": "assistant", "content": "Yo", "weight": 1}]}
    assert validate_finetune_jsonl(jsonl(parts), "t.jsonl", 10**6) == 1


def test_empty_and_too_big():
    assert "training.jsonl is empty" in bad(b"", "is empty", 0)
    bad(b"\n \n", "is empty", 0)
    data = jsonl(CHAT)
    assert f"is {len(data)} bytes; the limit is 10" in bad(data, "limit", 0, max_bytes=10)


def test_not_utf8():
    bad(jsonl(CHAT) + b'{"prompt": "\xff\xfe", "completion": "x"}\n', "training.jsonl:2: not valid UTF-8", 2)


def test_not_json():
    msg = bad(jsonl(CHAT) + b"\n" + b'{"messages": [\n', "training.jsonl:3: malformed JSON", 3)
    assert "column" in msg


@pytest.mark.parametrize("row", [[1, 2], "text", None, 5])
def test_row_not_object(row):
    bad(jsonl(CHAT, row), "training.jsonl:2: expected a JSON object", 2)


def test_missing_messages():
    bad(jsonl({"msgs": []}), "training.jsonl:1: cannot tell the data format from the keys \\['msgs'\\]", 1)
    bad(jsonl({"messages": "x"}), "training.jsonl:1: 'messages' is a string that is not valid JSON", 1)


def test_bad_role_names_line_message_and_roles():
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}
    msg = bad(jsonl(CHAT, CHAT, row), "training.jsonl:3", 3)
    assert "messages[1]" in msg and "'bot'" in msg and "system, user, assistant, tool" in msg
    assert msg.startswith("training.jsonl:3:")


def test_tools_tool_calls_and_tool_role_accepted_and_checked():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "c1", "content": "2"}, {"role": "assistant", "content": "c"}],
           "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    assert validate_finetune_jsonl(jsonl(row), "t.jsonl", 10**6) == 1
    stored = json.loads(normalize_finetune_jsonl(jsonl(row), "t.jsonl", 10**6))
    assert stored["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}  # parsed for templates
    broken = json.loads(json.dumps(row))
    broken["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{x: 1"
    assert "write the arguments as a JSON object" in bad(
        jsonl(CHAT, broken), r"training.jsonl:2: messages\[1\].tool_calls\[0\].function.arguments is not valid JSON", 2)
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "function", "content": "b"},
                        {"role": "assistant", "content": "c"}]}
    bad(jsonl(row), "messages\\[1\\] has unknown role 'function'", 1)
    bad(jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c",
                                                                 "tool_calls": []}]}), "non-empty list", 1)


def test_non_string_content():
    row = {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]}
    bad(jsonl(row), r"messages\[0\].content.*must be a string", 1)
    bad(jsonl({"messages": "hi"}), "a string that is not valid JSON", 1)
    bad(jsonl({"messages": 5}), "non-empty list", 1)
    bad(jsonl({"messages": []}), "non-empty list", 1)
    bad(jsonl({"messages": [{"role": "user"}]}), r"messages\[0\] must be an object", 1)


def test_content_parts():
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "b"}]}
    assert "not supported" in bad(jsonl(image), r"content\[0\] must be a text part", 1)
    bad(jsonl({"messages": [{"role": "user", "content": []}, {"role": "assistant", "content": "b"}]}),
        "empty list", 1)
    bad(jsonl({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]},
                            {"role": "assistant", "content": "b"}]}), r"content\[0\] must be a text part", 1)


def test_needs_nonempty_assistant():
    bad(jsonl({"messages": [{"role": "user", "content": "a"}]}), "no assistant turn", 1)
    bad(jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}),
        "assistant message is empty", 1)


def test_weights_zero_or_one():
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "weight": 1}]}
    assert validate_finetune_jsonl(jsonl(row), "t.jsonl", 10**6) == 1
    row["messages"][1]["weight"] = 0.5
    assert "is 0 (leave this assistant turn out" in bad(jsonl(CHAT, row), r"training.jsonl:2: messages\[1\] has weight 0.5", 2)
    row["messages"][1]["weight"] = row["messages"][3]["weight"] = 0
    bad(jsonl(row), "every assistant turn has weight 0", 1)


def test_mixed_formats():
    msg = bad(jsonl(CHAT, {"prompt": "a", "completion": "b"}), "training.jsonl:2", 2)
    assert "one format per file" in msg
    bad(jsonl({"prompt": "a", "completion": "b"}, CHAT), "training.jsonl:2.*chat format", 2)


def test_completion_rows_checked():
    bad(jsonl({"prompt": "a"}), "missing key 'completion'", 1)
    bad(jsonl({"prompt": "a", "completion": 3}), "'completion' must be a string", 1)


def test_normalize_joins_text_parts_and_keeps_plain_files():
    plain = jsonl(CHAT)
    assert normalize_finetune_jsonl(plain, "t.jsonl", 10**6) == plain
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": "c"}]}
    out = normalize_finetune_jsonl(jsonl(parts), "t.jsonl", 10**6)
    assert json.loads(out)["messages"][0]["content"] == "a\nb"
    with pytest.raises(UploadError):
        normalize_finetune_jsonl(b"", "t.jsonl", 10)


def test_validated_file_loads_for_training(st):
    pytest.importorskip("tokenizers")
    from tiny_folder import CHATML, build_tokenizer

    from leantune.data import load_dataset
    from leantune.models.tokenizer import Tokenizer

    tok = Tokenizer(build_tokenizer(), chat_template=CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]},
                          {"role": "assistant", "content": "I am fine"}]}
    for data in (jsonl(CHAT, CHAT), jsonl({"prompt": "Hi", "completion": "Yo"}), jsonl(parts)):
        n = validate_finetune_jsonl(data, "t.jsonl", 10**6)
        f = st.add_file("A", "t.jsonl", "fine-tune", normalize_finetune_jsonl(data, "t.jsonl", 10**6))
        examples = load_dataset(st.file_path("A", f["id"]), tok, max_length=256)
        assert len(examples) == n and all(e.num_loss_tokens > 0 for e in examples)

