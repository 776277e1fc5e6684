import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.attention import attention, reference


def _qkv(B=2, T=16, H=4, K=2, E=8, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, H, E))
    k = jax.random.normal(kk, (B, T, K, E))
    v = jax.random.normal(kv, (B, T, K, E))
    segments = jnp.array([[1] * 5 + [2] * 7 + [3] * 4, [1] * 16])
    return q, k, v, segments


@pytest.mark.parametrize("use_segments", [True, False])
def test_xla_equals_reference_forward_and_grad(use_segments):
    q, k, v, segments = _qkv()
    seg = segments if use_segments else None
    np.testing.assert_allclose(
        attention(q, k, v, seg, implementation="xla"), reference(q, k, v, seg), atol=1e-5
    )

    def loss(impl):
        return lambda q, k, v: (attention(q, k, v, seg, implementation=impl) ** 2).sum()

    got = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_reference_by_hand():
    """One query, two keys in its segment: the output is the softmax-weighted mix of values."""
    q = jnp.ones((1, 3, 1, 2))
    k = jnp.array([[[[1.0, 0.0]], [[0.0, 2.0]], [[5.0, 5.0]]]])
    v = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]], [[9.0, 9.0]]]])
    out = reference(q, k, v, jnp.array([[1, 1, 2]]))
    w = jax.nn.softmax(jnp.array([1.0, 2.0]) / np.sqrt(2))
    np.testing.assert_allclose(out[0, 1, 0], w, rtol=1e-6)  # token 1 sees tokens 0 and 1
    np.testing.assert_allclose(out[0, 2, 0], [9.0, 9.0], rtol=1e-6)  # token 2 is alone in its segment


def test_segment_isolation():
    """Changing one document's keys and values never changes another document's outputs."""
    q, k, v, segments = _qkv()
    out = attention(q, k, v, segments, implementation="xla")
    k2, v2 = k.at[0, :5].add(3.0), v.at[0, :5].add(3.0)
    out2 = attention(q, k2, v2, segments, implementation="xla")
    np.testing.assert_allclose(out[0, 5:], out2[0, 5:], atol=1e-6)
    assert not np.allclose(out[0, :5], out2[0, :5])


def test_cudnn_refuses_segment_ids():
    q, k, v, segments = _qkv()
    with pytest.raises(ValueError, match="segment ids"):
        attention(q.astype(jnp.bfloat16), k, v, segments, implementation="cudnn")


def test_auto_never_drops_segments_on_cpu():
    q, k, v, segments = _qkv()
    np.testing.assert_allclose(attention(q, k, v, segments), reference(q, k, v, segments), atol=1e-5)
