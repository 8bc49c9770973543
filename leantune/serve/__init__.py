"""Serving: engine loop, scheduler + paged-KV block manager (pure Python), model runner, HTTP API, store."""
