"""A training run and its log directory: the state it persists (state), its checkpoints
(checkpoints, earlier_format), the loop (loop), the heldout evaluation (evaluation), what it
reports (reporting), and what keeps it safe unattended (lock, watchdog, stop_requests)."""
