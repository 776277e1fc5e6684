"""Every attention implementation against the fp32 reference, with and without packed documents.

On CPU, pallas and splash run in Pallas interpret mode (slow), so shapes are tiny; T=128 because
splash needs T % 128 == 0. The `gpu` tests run only where jax's default backend is a GPU.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import attention as attn
from lmjax import config
from lmjax.attention import attention, kernels, reference
from lmjax.attention import check as attention_check
from lmjax.data import cache, loader

CPU_IMPLS = ("xla", "pallas", "splash")
# fp32 inputs on CPU: the kernels differ from the reference only in summation order.
FWD_ATOL, GRAD_ATOL = 1e-5, 5e-5

T = 128
# Packed rows: row 0 starts with a 1-token tail and holds a 3-token document (the packer's
# shortest); row 1 is one document; row 2 has ids that skip values and a 1-token head at the end.
SEGMENTS = np.array(
    [
        [1] * 1 + [2] * 40 + [3] * 3 + [4] * 60 + [5] * 24,
        [1] * T,
        [2] * 70 + [5] * 57 + [9] * 1,
    ],
    np.int32,
)
on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
# fp32 exactness of the kernels in interpret mode; on an accelerator the bf16 `gpu` tests stand in.
on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks CPU (interpret-mode) numerics")


def _qkv(B=3, T=T, H=4, K=2, E=16, dtype=jnp.float32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, H, E), dtype)
    k = jax.random.normal(kk, (B, T, K, E), dtype)
    v = jax.random.normal(kv, (B, T, K, E), dtype)
    return q, k, v


def _fwd_and_grad(impl, q, k, v, segments):
    """Output and d(loss)/d(q, k, v) for a loss that weights every output element differently."""
    w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

    def loss(q, k, v):
        o = attention(q, k, v, segments, implementation=impl)
        return (o.astype(jnp.float32) * w).sum(), o

    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, grads


@functools.cache
def _reference_fwd_and_grad(segmented, H, K):
    q, k, v = _qkv(H=H, K=K)
    return _fwd_and_grad("reference", q, k, v, jnp.asarray(SEGMENTS) if segmented else None)


@on_cpu
@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize(
    "segmented, H, K",
    [(True, 4, 2), (False, 4, 2), (True, 2, 2)],
    ids=["segments-gqa", "plain-gqa", "segments-mha"],
)
def test_equals_reference_forward_and_grad(impl, segmented, H, K):
    q, k, v = _qkv(H=H, K=K)
    o, grads = _fwd_and_grad(impl, q, k, v, jnp.asarray(SEGMENTS) if segmented else None)
    o_ref, grads_ref = _reference_fwd_and_grad(segmented, H, K)
    np.testing.assert_allclose(o, o_ref, atol=FWD_ATOL)
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, atol=GRAD_ATOL, err_msg=f"d/d{name}")


@on_cpu
@pytest.mark.parametrize("impl", ["pallas", "splash"])
def test_kernels_run_per_shard_on_a_mesh(impl):
    """On a (data, fsdp, tensor) = (2, 2, 2) mesh the Pallas kernels run inside shard_map on each
    device's batch and heads (XLA cannot split them) and still equal the reference."""
    from lmjax import sharding

    exp = config.Experiment(mesh=config.Mesh(data=2, fsdp=2, tensor=2))
    q, k, v = _qkv(B=4, H=4, K=2)
    segments = jnp.asarray(np.concatenate([SEGMENTS, SEGMENTS[:1]]))
    with sharding.use(sharding.make_mesh(exp), exp.mesh.rules):
        run = jax.jit(functools.partial(attention, implementation=impl))
        assert "shard_map" in str(jax.make_jaxpr(run)(q, k, v, segments))
        out = run(q, k, v, segments)
    np.testing.assert_allclose(out, reference(q, k, v, segments), atol=FWD_ATOL)


@on_cpu
@pytest.mark.parametrize("impl", ("reference", *CPU_IMPLS))
def test_segments_never_see_each_other(impl):
    """Changing one document's keys and values (the 3-token segment 3) leaves every other
    document's outputs unchanged, before and after it."""
    q, k, v = _qkv(B=1, H=2, K=2)
    segments = jnp.asarray(SEGMENTS[:1])
    in_3 = SEGMENTS[0] == 3
    run = jax.jit(functools.partial(attention, implementation=impl))
    out = run(q, k, v, segments)
    out2 = run(q, k.at[:, in_3].add(5.0), v.at[:, in_3].add(5.0), segments)
    np.testing.assert_allclose(out[:, ~in_3], out2[:, ~in_3], atol=1e-6)
    assert not np.allclose(out[:, in_3], out2[:, in_3])


def test_reference_by_hand():
    """One query, two keys in its segment: the output is the softmax-weighted mix of values."""
    q = jnp.ones((1, 3, 1, 2))
    k = jnp.array([[[[1.0, 0.0]], [[0.0, 2.0]], [[5.0, 5.0]]]])
    v = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]], [[9.0, 9.0]]]])
    out = reference(q, k, v, jnp.array([[1, 1, 2]]))
    w = jax.nn.softmax(jnp.array([1.0, 2.0]) / np.sqrt(2))
    np.testing.assert_allclose(out[0, 1, 0], w, rtol=1e-6)  # token 1 sees tokens 0 and 1
    np.testing.assert_allclose(out[0, 2, 0], [9.0, 9.0], rtol=1e-6)  # token 2 is alone in its segment


# --- cudnn_packed's lengths and offsets (the kernel itself needs Hopper) ---------------------


def test_packed_seqlens_offsets_by_hand():
    segments = jnp.array(
        [
            [1, 1, 1, 2, 2, 2, 2, 3],  # tail, document, 1-token head
            [5, 5, 5, 5, 5, 5, 5, 5],  # one document, id not 1
            [1, 2, 2, 2, 3, 3, 3, 4],  # the most segments the packer makes in 8 tokens
            [1, 1, 4, 4, 4, 4, 9, 9],  # ids that skip values
        ],
        jnp.int32,
    )
    assert kernels.max_packed_segments(8) == 4
    seqlen, offsets = kernels.packed_seqlens_offsets(segments, 4)
    assert seqlen.dtype == offsets.dtype == jnp.int32
    np.testing.assert_array_equal(seqlen, [[3, 4, 1, -1], [8, -1, -1, -1], [1, 3, 3, 1], [2, 4, 2, -1]])
    np.testing.assert_array_equal(
        offsets, [[0, 3, 7, -1, -1], [0, -1, -1, -1, -1], [0, 1, 4, 7, -1], [0, 2, 6, -1, -1]]
    )
    np.testing.assert_array_equal(kernels.segment_counts(segments), [3, 1, 4, 3])


def test_packed_seqlens_offsets_more_slots_than_tokens():
    """T=1: one segment, and M + 1 offset columns although there is only one token."""
    seqlen, offsets = kernels.packed_seqlens_offsets(
        jnp.array([[3]], jnp.int32), kernels.max_packed_segments(1)
    )
    np.testing.assert_array_equal(seqlen, [[1]])
    np.testing.assert_array_equal(offsets, [[0, -1]])


@pytest.mark.parametrize("seq_len", [1, 2, 3, 4, 5, 7, 8, 30, 128])
def test_max_packed_segments_bounds_the_packer(seq_len):
    """Through the real window code, with the shortest documents (<s> one token </s>): no window
    has more segments than the bound, and some window reaches it."""
    doc_tokens = 3
    n_docs = 3 * seq_len + 10
    starts = np.arange(n_docs) * doc_tokens
    split = cache.Split(np.full(n_docs * doc_tokens, 7, np.uint16), starts)
    window_starts = np.arange(doc_tokens * 4)  # every phase of the windows against the documents
    segments = loader.windows(split, window_starts, seq_len)["segment_ids"]
    counts = np.asarray(kernels.segment_counts(jnp.asarray(segments)))
    assert counts.max() == kernels.max_packed_segments(seq_len)


# --- which implementation runs --------------------------------------------------------------


@on_cpu
def test_auto_on_cpu_is_xla_and_keeps_segments():
    q, k, v = _qkv(T=16)
    segments = jnp.asarray(SEGMENTS[:, :16])
    assert attn.resolve("auto", q.shape, q.dtype, True) == "xla"
    assert attn.resolve("auto", q.shape, jnp.bfloat16, False) == "xla"
    np.testing.assert_allclose(attention(q, k, v, segments), reference(q, k, v, segments), atol=FWD_ATOL)


@pytest.mark.parametrize(
    "backend, capability, dtype, segmented, shape, want",
    [
        ("gpu", (9, 0), jnp.bfloat16, False, (2, 1024, 12, 64), "cudnn"),
        ("gpu", (9, 0), jnp.bfloat16, True, (2, 1024, 12, 64), "cudnn_packed"),
        ("gpu", (10, 0), jnp.float16, True, (2, 1024, 12, 64), "cudnn_packed"),
        ("gpu", (8, 0), jnp.bfloat16, True, (2, 1024, 12, 64), "pallas"),
        ("gpu", (8, 6), jnp.bfloat16, False, (2, 1024, 12, 64), "cudnn"),
        ("gpu", (8, 0), jnp.bfloat16, False, (2, 1024, 4, 160), "pallas"),  # head dim > cuDNN's 128
        ("gpu", (9, 0), jnp.bfloat16, True, (2, 1024, 4, 160), "cudnn_packed"),  # Hopper: up to 256
        ("gpu", (8, 0), jnp.bfloat16, False, (2, 1024, 12, 12), "xla"),  # fits neither cuDNN nor Triton
        ("gpu", None, jnp.bfloat16, False, (2, 1024, 12, 64), "xla"),  # not CUDA (ROCm)
        ("gpu", (7, 5), jnp.bfloat16, False, (2, 1024, 12, 64), "xla"),  # T4: no cuDNN/Triton flash
        ("gpu", (8, 0), jnp.bfloat16, True, (2, 1000, 12, 64), "xla"),  # T not a multiple of 16
        ("gpu", (9, 0), jnp.float32, True, (2, 1024, 12, 64), "xla"),
        ("gpu", (9, 0), jnp.float32, False, (2, 1024, 12, 64), "xla"),
        ("tpu", None, jnp.bfloat16, True, (2, 1024, 12, 64), "splash"),
        ("tpu", None, jnp.float32, False, (2, 1024, 12, 64), "splash"),
        ("tpu", None, jnp.bfloat16, True, (2, 1000, 12, 64), "xla"),
        ("cpu", None, jnp.bfloat16, False, (2, 1024, 12, 64), "xla"),
    ],
)
def test_auto_table(backend, capability, dtype, segmented, shape, want):
    assert attn.resolve("auto", shape, dtype, segmented, backend=backend, capability=capability) == want


def test_grouped_query_packed_cudnn_only_where_jax_strides_it_right():
    shape = (2, 1024, 12, 64)
    want = "cudnn_packed" if kernels.cudnn_packed_strides_kv_heads() else "pallas"
    assert (
        attn.resolve("auto", shape, jnp.bfloat16, True, kv_heads=4, backend="gpu", capability=(9, 0)) == want
    )
    assert attn.resolve("auto", shape, jnp.bfloat16, True, kv_heads=12, backend="gpu", capability=(9, 0)) == (
        "cudnn_packed"
    )


def test_explicit_choice_is_kept_and_unknown_refused():
    assert attn.resolve("splash", (1, 128, 2, 16), jnp.float32, True, backend="gpu") == "splash"
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attn.resolve("flash", (1, 128, 2, 16), jnp.float32, True)


def test_cudnn_refuses_segment_ids():
    q, k, v = _qkv(T=16)
    with pytest.raises(ValueError, match="segment ids.*cudnn_packed.*pallas"):
        attention(q.astype(jnp.bfloat16), k, v, jnp.asarray(SEGMENTS[:, :16]), implementation="cudnn")


@pytest.mark.parametrize("impl, T", [("splash", 64), ("pallas", 40)])
def test_kernels_refuse_lengths_they_cannot_block(impl, T):
    q, k, v = _qkv(T=T)
    with pytest.raises(ValueError, match="needs T"):
        attention(q, k, v, implementation=impl)


@pytest.mark.parametrize("impl, backend", [("splash", "gpu"), ("pallas", "tpu")])
def test_kernels_refuse_the_other_accelerator(impl, backend, monkeypatch):
    """Interpret mode is for CPU only: a TPU kernel on a GPU (and back) fails loudly, not slowly."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="kernel; on"):
        attention(q, k, v, implementation=impl)


# --- GPU kernels (bf16), skipped elsewhere: the same checks `python -m lmjax.attention_check` runs


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize(
    "impl, packed", attention_check.kernels_here() if jax.default_backend() == "gpu" else []
)
def test_gpu_kernel_equals_reference(impl, packed):
    result = attention_check.check(impl, packed, "bfloat16")
    assert result["ok"], result


def test_the_check_command_passes_here_and_writes_json(tmp_path):
    """On CPU: xla, and pallas and splash interpreted, all within fp32 tolerance of the reference."""
    assert attention_check.main(["--out", str(tmp_path / "check.json")]) == 0
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["ok"] and {r["implementation"] for r in report["results"]} >= {"xla", "pallas", "splash"}
    assert all(max(r["errors"].values()) < 1e-4 for r in report["results"])
