"""Atomic writes (moved to ``competition.atomic``, the lowest floor, so every package shares them)."""
from competition.atomic import atomic_path, remove_stale_temporaries, write_csv, write_json, write_parquet

__all__ = ["atomic_path", "remove_stale_temporaries", "write_csv", "write_json", "write_parquet"]
