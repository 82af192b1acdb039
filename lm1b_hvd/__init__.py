"""lm1b_hvd: LSTM language models on lm1b, trained with TensorFlow 2 and Horovod."""
import importlib.util
import os

# TensorFlow's start-up notes (oneDNN, CPU features, CUDA plugins) would bury the first lines a
# user reads; a TF_CPP_MIN_LOG_LEVEL the user set still wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Keras 2, whose optimizer internals lm1b_hvd.pinned_stack relies on: TensorFlow 2.15's tf.keras is
# Keras 2; from 2.16 on, tf.keras is Keras 3 unless TF_USE_LEGACY_KERAS=1 makes it the tf-keras
# package, which only the stacks with such a TensorFlow install (stacks/2.20/requirements.txt).
# Without tf-keras the variable is dropped: inherited from a process of the other stack, it would
# make TensorFlow 2.15 look for tf-keras and fail. Set before TensorFlow is imported, which every
# module of the package does after this one.
if importlib.util.find_spec("tf_keras") is not None:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
else:
    os.environ.pop("TF_USE_LEGACY_KERAS", None)
