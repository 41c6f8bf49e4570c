"""t5lite: pretrain, evaluate and fine-tune T5-style and decoder-only language models in JAX."""

import os

# TensorFlow (used by seqio for the input pipeline only) must not log device chatter or claim
# accelerator memory that JAX needs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
