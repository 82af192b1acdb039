"""lm1b_hvd: LSTM language models on lm1b, trained with TensorFlow 2 and Horovod."""
