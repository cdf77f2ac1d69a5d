"""Serving: an OpenAI-compatible HTTP server (app) over a thread that runs the engine's rounds (scheduler)."""
