"""Serving: an OpenAI-compatible HTTP server with continuous batching, and a web chat page.

    app.py        the FastAPI routes (/v1/models, /v1/chat/completions, /v1/completions, /health, /)
    protocol.py   request bodies (pydantic), tools and tool_choice, server limits -> SamplingParams
    replies.py    generated text -> reasoning_content, content and tool_calls (also used by `acornlm chat`)
    errors.py     OpenAI-shaped error responses
    server.py     load a checkpoint's engine, run uvicorn (or a background server for tests)
    static/       the chat page (plain HTML/CSS/JS, no build step)

Needs the `serve` extra (`pip install "acornlm[serve]"`: fastapi and uvicorn); nothing is
imported here so that `import acornlm` works without it (replies.py needs neither).
"""
