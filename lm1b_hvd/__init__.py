"""lm1b_hvd: LSTM language models on lm1b, trained with TensorFlow 2 and Horovod."""
import os

# TensorFlow's start-up notes (oneDNN, CPU features, CUDA plugins) would bury the first lines a
# user reads; a TF_CPP_MIN_LOG_LEVEL the user set still wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
