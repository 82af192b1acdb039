"""Between the ranks: every Horovod call (collectives, the one module that imports Horovod), the
gradient exchange of the original's towers (gradients), the vocabulary sharded over the ranks
(vocab_parallel), and the interface library code is handed instead of Horovod (ranks)."""
