"""t5lite data: embedded corpus, vocabulary, seqio tasks and the numpy batch pipeline.

Importing this package loads nothing: the corpus tools (cleaning, dedup) start without TensorFlow.
t5lite.data.pipeline registers the embedded-corpus seqio Tasks and Mixtures, the downstream tasks
(downstream.py), the zero-shot benchmarks (zero_shot.py) and the lm-evaluation-harness suite
(benchmarks.py, multiple_choice.py).
"""
