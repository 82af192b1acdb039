"""The names of the files of a log directory that more than one module reads or writes.

No TensorFlow import here: lm1b_hvd.status reads these files on login nodes, quickly.
"""
HPARAMS_FILE = "hparams.json"  # the record the run started with (run/checkpoints.py)
CHECKPOINT_STATE_FILE = "checkpoint"  # TensorFlow's list of the latest checkpoints
BEST_DIR = "best"  # the best checkpoint by heldout perplexity, and BEST_FILE beside it
BEST_FILE = "best.json"
PROGRESS_FILE = "progress.json"  # the figures of the latest progress line (run/reporting.py)
LOCK_FILE = "run.lock"  # the lock rank 0 holds for the run's life (run/lock.py)
