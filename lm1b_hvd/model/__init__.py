"""The model: the LSTMP language model's variables and forward pass (language_model), its
vocabulary tables (tables), the hand-written backwards (ops) with their CPU kernels
(cpu_kernels, kernels/) and the choice between them (compute_plan), the sampled softmax's
candidates (candidates), the dropouts (regularisation), the EMA (averaging), and its cost."""
