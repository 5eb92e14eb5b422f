"""The OpenAI-compatible HTTP server (`turbollm serve`): FastAPI + uvicorn over AsyncEngine."""
