"""The full-size rehearsal: every stage of the pipeline at the real counts, measured (see rehearsal.run)."""
