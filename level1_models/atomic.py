"""Atomic writes now live in ``competition.atomic`` (level 2 needs them too and may not import
level 1); this name stays for level 1's imports."""
from competition.atomic import atomic_path, remove_stale_temporaries, write_csv, write_json, write_parquet

__all__ = ["atomic_path", "remove_stale_temporaries", "write_csv", "write_json", "write_parquet"]
