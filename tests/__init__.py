"""lm1b_hvd's tests. The package is imported first: on a stack whose tf.keras is Keras 3, it
chooses Keras 2 (lm1b_hvd/__init__.py) before a test module imports TensorFlow."""
import lm1b_hvd  # noqa: F401
