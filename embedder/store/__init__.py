"""The Parquet embedding store: shards, the id index, provenance."""
