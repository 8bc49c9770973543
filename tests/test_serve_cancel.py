"""A client that goes away mid-generation frees its KV blocks at once (recipe tier, tiny model, a real uvicorn
server on a loopback port in this process, so the test can read the engine's block manager and scheduler, and a
raw socket client that closes its connection): streaming (the SSE stream closed) and non-streaming (the
connection dropped while the server waits for the completion)."""
import json
import socket
import threading
import time

import pytest

from serve_util import free_port

uvicorn = pytest.importorskip("uvicorn")
MAX_TOKENS = 2000  # far more than the engine makes before the client leaves: only an abort ends it early


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from tiny_folder import make_tiny_model_folder

    from leantune.recipes.serve import ServeConfig, build_server

    tmp = tmp_path_factory.mktemp("cancel")
    folder = make_tiny_model_folder(tmp / "model")
    port = free_port()
    app, engine = build_server(ServeConfig(model=str(folder), data_dir=str(tmp / "data"), port=port, dtype="fp32"))
    engine.start()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait(lambda: server.started, "the server did not start")
    yield engine, port
    server.should_exit = True
    thread.join(30)
    engine.stop()


def _wait(cond, what: str, deadline_s: float = 60):
    """Poll cond() until it is truthy; fail with `what` once the deadline passes (a bound, not a timing)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(what() if callable(what) else what)


def _engine_state(engine) -> dict:
    """A consistent snapshot, read in the engine thread between iterations."""
    def snap():
        return {"used": engine.blocks.num_used, "running": engine.sched.num_running,
                "waiting": engine.sched.num_waiting, "reqs": len(engine.reqs),
                "generated": engine.stats.generated_tokens}
    return engine.call(snap).result(timeout=60)


def _send(port: int, stream: bool) -> socket.socket:
    body = json.dumps({"model": "model", "prompt": "The quick brown fox", "max_tokens": MAX_TOKENS,
                       "temperature": 0, "ignore_eos": True, "stream": stream}).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return s


def _assert_freed_by_abort(engine, before: dict):
    _wait(lambda: (st := _engine_state(engine))["used"] == 0 and st["running"] == st["waiting"] == st["reqs"] == 0,
          lambda: f"the request still holds KV blocks or runs after its client left: {_engine_state(engine)}")
    made = _engine_state(engine)["generated"] - before["generated"]
    assert 0 < made < MAX_TOKENS, made  # it ran and was cut short: freed by the abort, not by finishing


def test_closed_stream_frees_kv_blocks(live):
    engine, port = live
    before = _engine_state(engine)
    s = _send(port, stream=True)
    s.settimeout(60)
    got = b""
    while b"data: " not in got:  # the first SSE chunk: the request is running
        got += s.recv(4096)
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    assert _engine_state(engine)["used"] > 0
    s.close()
    _assert_freed_by_abort(engine, before)


def test_dropped_connection_frees_kv_blocks(live):
    engine, port = live
    before = _engine_state(engine)
    s = _send(port, stream=False)
    _wait(lambda: _engine_state(engine)["generated"] > before["generated"], "the request never started")
    assert _engine_state(engine)["used"] > 0
    s.close()  # no answer was read: the server is still waiting for the whole completion
    _assert_freed_by_abort(engine, before)


def test_server_serves_after_the_aborts(live):
    engine, port = live
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                 data=json.dumps({"model": "model", "prompt": "Hello", "max_tokens": 4,
                                                  "ignore_eos": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())
    assert out["usage"]["completion_tokens"] == 4
    assert _engine_state(engine)["used"] == 0
