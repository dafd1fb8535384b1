"""The per-run training loop (run by Ray Train workers, inside Tune trials, or in-process) and its runner."""
