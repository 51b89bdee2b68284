"""What a run measures (metrics) and the files it writes (report)."""
