"""What the embeddings say about the data (`inspect`) and which backbone and layer transfer best
(`compare`): streamed vectors → kNN graph → duplicates, leakage, label errors, outliers → report."""
