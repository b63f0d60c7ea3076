"""An OpenAI-compatible HTTP server over one Engine (the optional "serve" extra: FastAPI,
uvicorn, prometheus_client). `python -m jaxinfer serve --model DIR`; in Python,
`jaxinfer.server.start(engine, name, tokenizer)` serves in a background thread.

engine_thread.py (the thread that owns the engine), protocol.py (request bodies), app.py (the
endpoints), chat_template.py, metrics.py, serve.py (start / run / shutdown).
"""

from jaxinfer.server.chat_template import ChatTemplate, load_chat_template
from jaxinfer.server.serve import Running, run, start

__all__ = ["ChatTemplate", "Running", "load_chat_template", "run", "start"]
