"""`lmforge serve`: an OpenAI-compatible HTTP server for a trained model.

- `model.py`: the served model: prompts rendered as training saw them, one generation at a time in
  a worker thread, token by token, stopped at the next token when its client goes away.
- `protocol.py`: the OpenAI request bodies (validated) and response bodies, and the error shape.
- `app.py`: `create_app` (the FastAPI app: routes, API key, error handlers) and `serve` (uvicorn).
"""
