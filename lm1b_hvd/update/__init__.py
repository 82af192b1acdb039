"""The update a training step applies: the step itself (step: loss scaling, clipping, exchange,
Adagrad, EMA) and the optimizer with its learning-rate schedule (optimizer)."""
