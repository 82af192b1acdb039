"""The data: lm1b-layout shards to per-rank sentence streams to batches (dataset), the vocabulary
(vocab), the built-in demo language (demo_corpus) and the real benchmark's download."""
