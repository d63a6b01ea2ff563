"""The HTTP routers: search, indexes and items, and the public ones (health, page, docs)."""
