"""Images to vectors: the batch embedder, streaming lanes, filling a store, the Ray engine."""
