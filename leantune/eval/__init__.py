"""Evaluations run against a served model through its OpenAI-compatible API (`leantune eval ...`)."""
