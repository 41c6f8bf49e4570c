"""Initialisation schemes (TransformerConfig.init_scheme) and the token embedding from word vectors.

The expected std of each parameter is written out here from the formulas of
docs/configuration-and-training.md ("Initialisation"), not read from t5lite.model.init_schemes, and
checked to 5% on tensors of at least 4k values (the sampling error is under 1%; the schemes differ by
20% or more on every shape below: d=64 against h*k=128 and f=256, N_e=4 against N_d=3).
"""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from t5lite import train as train_lib
from t5lite.data.vocab import get_default_vocabulary, pieces
from t5lite.errors import UserError
from t5lite.model import word_vectors
from t5lite.model.config import TransformerConfig
from t5lite.model.models import Model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIMS = dict(vocab_size=1024, emb_dim=64, num_heads=4, head_dim=32, mlp_dim=256)
FAMILIES = {
    "encoder_decoder": dict(architecture="encoder_decoder", num_encoder_layers=4, num_decoder_layers=3),
    "decoder_only": dict(architecture="decoder_only", num_decoder_layers=3),
    "llama": dict(architecture="decoder_only", num_decoder_layers=3, position_encoding="rope", num_kv_heads=2,
                  mlp_activation="silu", layer_norm_epsilon=1e-5),
    "encoder_decoder_unscanned_tied": dict(architecture="encoder_decoder", num_encoder_layers=2, num_decoder_layers=2,
                                           scan_layers=False, tie_embeddings=True),
}
SCHEMES = ("t5", "scaled", "t_fixup")


def _config(family: str, **overrides) -> TransformerConfig:
    return TransformerConfig(**DIMS, **FAMILIES[family], **overrides)


@functools.cache
def _params(family: str, scheme: str = "t5") -> dict[str, np.ndarray]:
    """A fresh init (PRNGKey(0)) of the family under the scheme, by "/"-joined parameter name (cached:
    the golden test reuses the "t5" inits)."""
    model = Model(_config(family, init_scheme=scheme))
    shapes = model.input_shapes(2, {"inputs": 8, "targets": 8})
    boxed = jax.jit(lambda rng: model.init(rng, shapes))(jax.random.PRNGKey(0))["params"]  # jitted: one compile
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]
    return {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in flat}


def _expected(config: TransformerConfig, name: str) -> tuple[float, str] | None:
    """(std, "normal" | "uniform") of parameter `name` under config.init_scheme; None for the parameters no
    scheme changes (norm scales, relative-position tables)."""
    d, k, f, scheme = config.emb_dim, config.head_dim, config.mlp_dim, config.init_scheme
    kind, stack = name.rsplit("/", 1)[-1], name.split("/")[0]
    kv = config.kv_heads if "self_attention" in name else config.num_heads
    layers = config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers
    rope = config.position_encoding == "rope"
    if kind == "embedding":
        if scheme == "t_fixup":
            return d ** -0.5 * (9 * config.num_decoder_layers) ** -0.25, "normal"
        return (d ** -0.5 if rope else 1.0), "normal"
    fans = {"query": (d, config.num_heads * k), "key": (d, kv * k), "value": (d, kv * k),
            "out": (config.num_heads * k, d), "wi_0": (d, f), "wi_1": (d, f), "wo": (f, d),
            "logits_dense": (d, config.vocab_size)}
    if kind not in fans:
        return None
    fan_in, fan_out = fans[kind]
    if scheme == "t_fixup":  # Xavier; value, out and the MLP scaled per stack
        std, distribution = (2 / (fan_in + fan_out)) ** 0.5, "uniform"
        if kind in ("value", "out", "wi_0", "wi_1", "wo"):
            std *= 0.67 * layers ** -0.25 if stack == "encoder" else (9 * layers) ** -0.25
    else:  # T5's fan-in normal; "scaled" divides the residual branches' outputs by sqrt(2N)
        std, distribution = fan_in ** -0.5, "normal"
        if scheme == "scaled" and kind in ("out", "wo"):
            std /= (2 * layers) ** 0.5
    if kind == "query" and not rope:  # T5 folds the logits' 1/sqrt(head_dim) into the query
        std /= k ** 0.5
    return std, distribution


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", ["encoder_decoder", "decoder_only", "llama"])
def test_every_parameter_starts_with_its_schemes_std(family, scheme):
    config = _config(family, init_scheme=scheme)
    checked = set()
    for name, x in _params(family, scheme).items():
        expected = _expected(config, name)
        if expected is None:
            continue
        std, distribution = expected
        assert x.size >= 4096, name
        assert np.std(x) == pytest.approx(std, rel=0.05), name
        assert abs(np.mean(x)) < 0.05 * std, name
        if distribution == "uniform":  # Xavier: U(-a, a), a = sqrt(3) std, and filled up to near a
            assert 0.98 * 3 ** 0.5 * std < np.max(np.abs(x)) <= 3 ** 0.5 * std * (1 + 1e-6), name
        checked.add(name)
    stacks = ("encoder", "decoder") if config.is_encoder_decoder else ("decoder",)
    assert len(checked) == 2 + 7 * len(stacks) + 4 * config.is_encoder_decoder  # embedding, logits, q k v o wi wi wo


@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_t5_scheme_is_the_initialisation_t5lite_always_had(family):
    """Pinned to the values the code gave before init_scheme existed: the same seed gives the same params,
    so runs recorded in the docs reproduce. (Changing jax's random number generator would change them too.)"""
    with open(os.path.join(REPO, "tests", "data", "init_t5_golden.json")) as f:
        golden = json.load(f)[family]
    params = _params(family)  # the default scheme
    assert _config(family).init_scheme == "t5"
    assert sorted(params) == sorted(golden)
    got = [[float(np.sqrt(np.sum(params[n].astype(np.float64) ** 2))), float(params[n].ravel()[0])] for n in golden]
    np.testing.assert_allclose(got, list(golden.values()), rtol=1e-5, atol=1e-9)


def test_an_unknown_scheme_names_the_choices():
    with pytest.raises(UserError, match=r"init_scheme='fixup'; choose one of \('t5', 'scaled', 't_fixup'\)"):
        TransformerConfig(init_scheme="fixup")


# --- The token embedding from a word-vector file ---------------------------------------------------------------

VECTORS = {"the": 0.5, "The": -0.25, "of": 2.0, "king": 1.0, "zzqx": 3.0}  # word -> a fill value of its vector


def _write_vectors(path, dim: int, header: bool = True) -> str:
    """A GloVe-format file (word2vec's "count dim" header first if `header`): word i's vector is
    (value, value + 1/dim, value + 2/dim, ...)."""
    lines = [f"{len(VECTORS)} {dim}"] if header else []
    for word, value in VECTORS.items():
        lines.append(" ".join([word] + [f"{value + j / dim:.6f}" for j in range(dim)]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _vector(word: str, dim: int) -> np.ndarray:
    return np.asarray([float(f"{VECTORS[word] + j / dim:.6f}") for j in range(dim)], np.float32)


def _mapped_words(vocabulary_pieces) -> dict[int, str]:
    """id -> the word of VECTORS its piece takes: the piece without "▁", exactly, else in lower case."""
    out = {}
    for i, piece in enumerate(vocabulary_pieces):
        word = piece.removeprefix("▁")
        for candidate in (word, word.lower()):
            if word and candidate in VECTORS:
                out[i] = candidate
                break
    return out


@pytest.mark.parametrize("scheme, keep_scale", [("t5", False), ("t_fixup", False), ("t5", True)])
def test_word_vectors_fill_their_pieces_rows_and_leave_the_others(tmp_path, capsys, scheme, keep_scale):
    config = TransformerConfig(**{**DIMS, "vocab_size": 8192}, init_scheme=scheme,
                               embedding_init_file=_write_vectors(tmp_path / "vectors.txt", 64),
                               embedding_init_keep_scale=keep_scale)
    vocabulary_pieces = pieces(get_default_vocabulary())
    before = np.random.default_rng(0).normal(size=(8192, 64)).astype(np.float32)  # stands for the scheme's init
    params = {"token_embedder": {"embedding": jax.numpy.asarray(before)}, "decoder": {}}
    after = np.asarray(word_vectors.with_word_vectors(params, config, vocabulary_pieces)["token_embedder"]["embedding"])

    mapped = _mapped_words(vocabulary_pieces)
    ids = vocabulary_pieces.index("▁the"), vocabulary_pieces.index("▁of")
    assert mapped[ids[0]] == "the" and mapped[ids[1]] == "of"
    assert "▁The" in vocabulary_pieces and mapped[vocabulary_pieces.index("▁The")] == "The"  # exact before lower
    vectors = np.stack([_vector(mapped[i], 64) for i in sorted(mapped)])
    target_std = 1.0 if scheme == "t5" else 64 ** -0.5 * (9 * config.num_decoder_layers) ** -0.25
    scale = 1.0 if keep_scale else target_std / np.std(vectors)
    np.testing.assert_allclose(after[sorted(mapped)], vectors * scale, rtol=1e-5)
    others = np.setdiff1d(np.arange(8192), sorted(mapped))
    np.testing.assert_array_equal(after[others], before[others])
    assert f"embedding rows from word vectors: {len(mapped)} of 8100" in capsys.readouterr().out


@pytest.mark.parametrize("header", [True, False], ids=["word2vec_header", "glove"])
def test_word_vectors_of_another_dimension_are_one_line_naming_both(tmp_path, header):
    path = _write_vectors(tmp_path / "vectors.txt", 32, header=header)
    with pytest.raises(UserError, match=r"has 32-dimensional vectors but TransformerConfig.emb_dim=64") as e:
        word_vectors.read_word_vectors(path, {"the"}, 64)
    assert "\n" not in str(e.value)


def test_a_missing_word_vector_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="Cannot read TransformerConfig.embedding_init_file"):
        word_vectors.read_word_vectors(str(tmp_path / "absent.txt"), {"the"}, 64)


def test_word_vectors_keep_a_sharded_embeddings_layout():
    """On 4 devices (vocab over 2, embed over 2) each device's part of the new table is its part of the
    vectors where the table has one and of the old embedding elsewhere."""
    code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from t5lite.model.word_vectors import embedding_with_vectors
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
sharding = NamedSharding(mesh, P("a", "b"))
old = jax.device_put(np.arange(64, dtype=np.float32).reshape(16, 4), sharding)
table = np.full((16, 4), np.nan, np.float32)
table[[1, 9]] = -1.0
new = embedding_with_vectors(old, table)
expected = np.where(np.isnan(table), np.arange(64, dtype=np.float32).reshape(16, 4), table)
assert new.sharding == sharding, new.sharding
assert all(np.array_equal(s.data, expected[s.index]) for s in new.addressable_shards)
print("ok")
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# --- Through `python -m t5lite.train` ---------------------------------------------------------------------------

@pytest.mark.slow  # two runs, ~1 min on 2 CPU cores
def test_train_runs_with_t_fixup_and_word_vectors_on_a_fresh_run_only(tmp_path, capsys):
    model_dir = tmp_path / "run"
    args = ["--gin_file=gin/base.gin", "--gin_file=gin/models/t5_1_1_tiny.gin",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.BATCH_SIZE=4",
            "--gin.EvalConfig.batches=1", "--gin.EvalConfig.every=1000", "--gin.LoopConfig.log_every=1",
            f"--gin.MODEL_DIR='{model_dir}'", '--gin.TransformerConfig.init_scheme="t_fixup"',
            f"--gin.TransformerConfig.embedding_init_file='{_write_vectors(tmp_path / 'vectors.txt', 64)}'"]
    assert train_lib.main(args + ["--gin.TRAIN_STEPS=2"]) == 0
    out = capsys.readouterr().out
    assert "embedding rows from word vectors:" in out and "step 2/2" in out
    assert "init_scheme='t_fixup'" in (model_dir / "model-info.txt").read_text()
    # Resuming keeps the trained embedding: the vectors are not read again.
    gin.clear_config()
    assert train_lib.main(args + ["--gin.TRAIN_STEPS=3"]) == 0
    out = capsys.readouterr().out
    assert "Resumed from" in out and "embedding rows from word vectors" not in out
