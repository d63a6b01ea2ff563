"""FAISS indexes over a store: plan, build, quality, search, generations, on-disk lists, Ray, GPU."""
