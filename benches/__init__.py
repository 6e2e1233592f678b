"""nerve's benchmark harness: nerve against its peers, side by side in one run (see run.py)."""
