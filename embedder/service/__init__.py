"""`embedder serve`: the search as an HTTP service (engine, micro-batcher, FastAPI app, web page)."""
