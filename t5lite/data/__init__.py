"""t5lite data: embedded corpus, vocabulary, seqio tasks and the numpy batch pipeline.

Importing the package registers the embedded-corpus seqio Tasks and Mixtures and the
downstream tasks (downstream.py) and zero-shot benchmarks (zero_shot.py).
"""

import tensorflow as tf

# tf.data only feeds JAX: keep TensorFlow off any GPU so it claims none of JAX's memory.
tf.config.set_visible_devices([], "GPU")

from t5lite.data import downstream, tasks, zero_shot  # noqa: E402, F401
