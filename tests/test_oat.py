"""Independent tests for ``oat_jax.oat`` (Online Anchor-based Training).

The expected values come from (i) small examples worked out by hand in the
comments, (ii) a NumPy float64 reference written here from the specification,
including an analytic backward pass checked against central finite differences,
and (iii) when PyTorch is importable, a replica of the authors' released
PyTorch code.

Specification summary (B real rows, C classes, outputs z, labels y):
  released anchor  a = softmax(mean_b softmax(z_b))
  paper anchor     a = softmax(mean_b z_b)
  anchor floor     a = max(a, ANCHOR_FLOOR)
  targets          t = onehot(y) / a - 1
  loss             mean over rows and classes of (z - t)^2
  gradient         released: flows through a;  paper: a is a constant
  decode           r = a * (z + 1);  predict = argmax r, a from the batch itself

Speed: on CPU, eager JAX compiles every primitive for every new shape, which
costs about a second per released-variant call here.  So almost every check
goes through ``run_all``: one jitted function (variant static) that evaluates
every public function, both loss modes and their gradients at once, used on a
small shared set of shapes so that compilations are reused across tests.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from oat_jax.oat import (
    ANCHOR_FLOOR,
    anchor_statistics,
    batch_anchor,
    decode,
    grouped_oat_loss,
    oat_loss,
    oat_targets,
    predict,
)

VARIANTS = ("released", "paper")
# unmasked shapes (B, C) shared by the tests; masked tests pad a batch of
# shape (B, C) with PAD garbage rows, i.e. run on (B + PAD, C)
SHAPES = [(1, 3), (2, 2), (4, 5), (8, 10)]
GRAD_SHAPES = [(1, 3), (4, 5), (8, 10)]
PAD = 3


def batch_loss(values, where=None):
    """The caller's reduction of per-example losses (B,): their mean over the real rows."""
    return jnp.mean(values) if where is None else jnp.sum(values) / jnp.maximum(jnp.sum(where), 1)


def _loss_of_outputs(z, *, labels, variant, anchor_gradient, where):
    return batch_loss(oat_loss(z, labels, variant=variant, anchor_gradient=anchor_gradient, where=where), where)


@functools.partial(jax.jit, static_argnames=("variant",))
def _run_all(z, y, where, variant):
    C = z.shape[-1]
    a = batch_anchor(z, variant=variant, where=where)
    out = {
        "anchor": a,
        "targets": oat_targets(y, a, C),
        "decode": decode(z, a),
        "predict": predict(z, variant=variant, where=where),
    }
    for name, ag in (("default", None), ("flow", True), ("const", False)):
        loss_fn = functools.partial(_loss_of_outputs, labels=y, variant=variant, anchor_gradient=ag, where=where)
        out["loss_" + name], out["grad_" + name] = jax.value_and_grad(loss_fn)(z)
    return out


def run_all(z, y, variant, where=None):
    """All public functions on one batch, as float64/int NumPy arrays."""
    z = jnp.asarray(z)
    y = jnp.asarray(y, dtype=jnp.int32)
    w = None if where is None else jnp.asarray(where, dtype=bool)
    out = _run_all(z, y, w, variant)
    return {k: np.asarray(v) for k, v in out.items()}


# --------------------------------------------------------------------------
# NumPy float64 reference
# --------------------------------------------------------------------------


def np_softmax(x, axis=-1):
    x = np.asarray(x, dtype=np.float64)
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def _real(z, y=None, where=None):
    z = np.asarray(z, dtype=np.float64)
    if where is not None:
        w = np.asarray(where, dtype=bool)
        z = z[w]
        if y is not None:
            y = np.asarray(y)[w]
    return z, y


def ref_anchor_unclamped(z, variant):
    z = np.asarray(z, dtype=np.float64)
    if variant == "released":
        m = np.mean(np_softmax(z, axis=1), axis=0)
    elif variant == "paper":
        m = np.mean(z, axis=0)
    else:
        raise ValueError(variant)
    return np_softmax(m)


def ref_anchor(z, variant, where=None):
    z, _ = _real(z, where=where)
    return np.maximum(ref_anchor_unclamped(z, variant), ANCHOR_FLOOR)


def ref_targets(y, a, num_classes):
    onehot = np.eye(num_classes, dtype=np.float64)[np.asarray(y)]
    return onehot / np.asarray(a, dtype=np.float64)[None, :] - 1.0


def ref_loss(z, y, variant, where=None):
    z, y = _real(z, y, where)
    a = ref_anchor(z, variant)
    t = ref_targets(y, a, z.shape[1])
    return np.mean((z - t) ** 2)


def ref_decode(z, a):
    return np.asarray(a, np.float64)[None, :] * (np.asarray(z, np.float64) + 1.0)


def ref_predict(z, variant, where=None):
    a = ref_anchor(z, variant, where)
    return np.argmax(ref_decode(z, a), axis=1)


def ref_grad(z, y, variant, anchor_gradient, where=None):
    """Analytic gradient of ref_loss w.r.t. the full (padded) z.

    L = 1/(B C) sum (z - t)^2, t_bc = onehot_bc / a_c - 1.
    Direct part:   dL/dz = 2 (z - t) / (B C)
    Through a:     dL/da_c = sum_b 2 (z_bc - t_bc) onehot_bc / (B C a_c^2)
                   (zero where the floor is active)
    a = softmax(m):  g_m = a * (g_a - <g_a, a>)
    paper:    m = mean_b z_b           -> g_z_b += g_m / B
    released: m = mean_b softmax(z_b)  -> g_p_b = g_m / B,
                                          g_z_b += p_b * (g_p_b - <g_p_b, p_b>)
    """
    z_full = np.asarray(z, dtype=np.float64)
    zr, yr = _real(z_full, y, where)
    B, C = zr.shape
    a_raw = ref_anchor_unclamped(zr, variant)
    a = np.maximum(a_raw, ANCHOR_FLOOR)
    onehot = np.eye(C)[np.asarray(yr)]
    t = onehot / a[None, :] - 1.0
    g = 2.0 * (zr - t) / (B * C)
    if anchor_gradient:
        g_a = np.sum(2.0 * (zr - t) * onehot, axis=0) / (B * C) / a**2
        g_a = np.where(a_raw > ANCHOR_FLOOR, g_a, 0.0)
        g_m = a_raw * (g_a - np.dot(g_a, a_raw))
        if variant == "paper":
            g = g + g_m[None, :] / B
        else:
            p = np_softmax(zr, axis=1)
            g_p = np.broadcast_to(g_m[None, :] / B, p.shape)
            g = g + p * (g_p - np.sum(g_p * p, axis=1, keepdims=True))
    out = np.zeros_like(z_full)
    if where is None:
        out[...] = g
    else:
        out[np.asarray(where, dtype=bool)] = g
    return out


def fd_grad(f, z, h=1e-6):
    """Central finite differences of a float64 scalar function."""
    z = np.asarray(z, dtype=np.float64)
    g = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        zp = z.copy()
        zm = z.copy()
        zp[idx] += h
        zm[idx] -= h
        g[idx] = (f(zp) - f(zm)) / (2 * h)
    return g


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def make_batch(seed, B, C, scale=2.0):
    rng = np.random.default_rng(seed)
    z = (scale * rng.standard_normal((B, C))).astype(np.float32)
    y = rng.integers(0, C, size=B).astype(np.int32)
    return z, y


def pad_batch(z, y, seed, n_pad=PAD, garbage=100.0):
    """Interleave real rows with garbage rows; return padded z, y, mask."""
    rng = np.random.default_rng(seed + 1000)
    B, C = z.shape
    total = B + n_pad
    real_pos = np.sort(rng.choice(total, size=B, replace=False))
    mask = np.zeros(total, dtype=bool)
    mask[real_pos] = True
    zp = (garbage * rng.uniform(-1, 1, size=(total, C))).astype(z.dtype)
    yp = rng.integers(0, C, size=total).astype(np.int32)
    zp[real_pos] = z
    yp[real_pos] = y
    return zp, yp, mask


def close(actual, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        rtol=rtol,
        atol=atol,
    )


def grad_close(actual, expected, rtol=1e-4, rel_atol=1e-4):
    """Float32 gradients vs a float64 reference: atol relative to the largest entry."""
    expected = np.asarray(expected, dtype=np.float64)
    atol = rel_atol * float(np.max(np.abs(expected))) + 1e-7
    close(actual, expected, rtol=rtol, atol=atol)


@pytest.fixture
def x64():
    """Enable float64 in JAX for one test and restore the previous setting."""
    try:
        prev = bool(jax.config.read("jax_enable_x64"))
    except Exception:  # pragma: no cover - other config API
        prev = bool(getattr(jax.config, "jax_enable_x64", False))
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", prev)


# --------------------------------------------------------------------------
# 0. the reference itself is self-consistent
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("anchor_gradient", [False, True])
def test_reference_analytic_grad_matches_finite_differences(variant, anchor_gradient):
    z, y = make_batch(0, 3, 4)
    z = z.astype(np.float64)
    t = ref_targets(y, ref_anchor(z, variant), 4)

    def f(zz):
        if anchor_gradient:
            return ref_loss(zz, y, variant)  # target recomputed from z
        return np.mean((zz - t) ** 2)  # target held constant

    np.testing.assert_allclose(
        ref_grad(z, y, variant, anchor_gradient), fd_grad(f, z), rtol=1e-6, atol=1e-8
    )


# --------------------------------------------------------------------------
# 1. hand-computed values
# --------------------------------------------------------------------------

LN2 = math.log(2.0)
SQRT2 = math.sqrt(2.0)
Z_HAND = np.array([[0.0, LN2], [0.0, 0.0]], dtype=np.float32)
Y_HAND = np.array([1, 0], dtype=np.int32)


def _hand_values(variant):
    if variant == "paper":
        # mean_b z = [0, ln2/2]; softmax -> [1, sqrt2] / (1 + sqrt2)
        #   a = [sqrt2 - 1, 2 - sqrt2]            (~[0.41421, 0.58579], sums to 1)
        # row 0, label 1: t = [-1, 1/(2-sqrt2) - 1] = [-1, sqrt2/2]
        # row 1, label 0: t = [1/(sqrt2-1) - 1, -1] = [sqrt2, -1]
        # squared errors: 1, (ln2 - sqrt2/2)^2, 2, 1
        # loss = (4 + (ln2 - sqrt2/2)^2) / 4 ~= 1.0000487
        # decode: row0 = [sqrt2-1, (2-sqrt2)(1+ln2)] ~= [0.414, 0.992] -> 1
        #         row1 = [sqrt2-1, 2-sqrt2]          ~= [0.414, 0.586] -> 1
        a = np.array([SQRT2 - 1, 2 - SQRT2])
        t = np.array([[-1.0, SQRT2 / 2], [SQRT2, -1.0]])
        loss = (4 + (LN2 - SQRT2 / 2) ** 2) / 4
        assert abs(loss - 1.0000487) < 1e-6
    else:
        # row softmaxes: softmax([0, ln2]) = [1/3, 2/3]; softmax([0, 0]) = [1/2, 1/2]
        # mean = [5/12, 7/12]; a = softmax(mean) = [sig(-1/6), sig(1/6)]
        #   (sig = logistic; a ~= [0.458430, 0.541570])
        # 1/sig(x) - 1 = exp(-x), so
        # row 0, label 1: t = [-1, exp(-1/6)]
        # row 1, label 0: t = [exp(1/6), -1]
        # loss = (1 + (ln2 - exp(-1/6))^2 + exp(1/3) + 1) / 4
        #      ~= (2 + 0.023512 + 1.395612) / 4 ~= 0.854781
        # decode: row0 ~= [0.45843, 0.54157 * 1.69315] -> 1; row1 ~= [0.458, 0.542] -> 1
        a = np.array([1.0 / (1.0 + math.exp(1 / 6)), 1.0 / (1.0 + math.exp(-1 / 6))])
        t = np.array([[-1.0, math.exp(-1 / 6)], [math.exp(1 / 6), -1.0]])
        loss = (2 + (LN2 - math.exp(-1 / 6)) ** 2 + math.exp(1 / 3)) / 4
        assert abs(loss - 0.854781) < 1e-6
    r = a[None, :] * (Z_HAND.astype(np.float64) + 1)
    return a, t, loss, r, np.array([1, 1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_hand_example_eager(variant):
    a_hand, t_hand, loss_hand, r_hand, pred_hand = _hand_values(variant)
    z, y = jnp.asarray(Z_HAND), jnp.asarray(Y_HAND)
    a = batch_anchor(z, variant=variant)
    close(a, a_hand, rtol=1e-6, atol=1e-7)
    close(oat_targets(y, a, 2), t_hand, rtol=1e-6, atol=1e-6)
    close(oat_loss(z, y, variant=variant).mean(), loss_hand, rtol=1e-6)
    close(oat_loss(z, y, num_classes=2, variant=variant).mean(), loss_hand, rtol=1e-6)
    close(decode(z, a), r_hand, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(predict(z, variant=variant)), pred_hand)
    if variant == "released":  # the default variant
        close(batch_anchor(z), a_hand, rtol=1e-6, atol=1e-7)
        close(oat_loss(z, y).mean(), loss_hand, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(predict(z)), pred_hand)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hand_example_jit(variant):
    a_hand, t_hand, loss_hand, r_hand, pred_hand = _hand_values(variant)
    out = run_all(Z_HAND, Y_HAND, variant)
    close(out["anchor"], a_hand, rtol=1e-6, atol=1e-7)
    close(out["targets"], t_hand, rtol=1e-6, atol=1e-6)
    for k in ("loss_default", "loss_flow", "loss_const"):
        close(out[k], loss_hand, rtol=1e-6)
    close(out["decode"], r_hand, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out["predict"], pred_hand)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hand_single_sample_zero_outputs_values_and_gradients(variant):
    # z = [[0, 0, 0]], label 0, C = 3: both variants give the uniform anchor 1/3.
    # t = 3 * onehot - 1 = [2, -1, -1]; loss = (4 + 1 + 1) / 3 = 2.
    # constant-target gradient: 2 (z - t) / (B C) = [-4/3, 2/3, 2/3]
    # through the anchor: dL/da = [2 * (0 - 2) / (3 * (1/9)), 0, 0] = [-12, 0, 0]
    #   g_m = a * (g_a - <g_a, a>) = (1/3) * ([-12, 0, 0] + 4) = [-8/3, 4/3, 4/3]
    #   paper:    + g_m                          -> total [-4, 2, 2]
    #   released: p = 1/3 uniform, <g_m, p> = 0  -> + g_m / 3 -> total [-20/9, 10/9, 10/9]
    out = run_all(np.zeros((1, 3), np.float32), [0], variant)
    close(out["anchor"], [1 / 3] * 3, rtol=1e-6)
    close(out["targets"], [[2, -1, -1]], rtol=1e-6, atol=1e-6)
    close(out["loss_default"], 2.0, rtol=1e-6)
    close(out["grad_const"], [[-4 / 3, 2 / 3, 2 / 3]], rtol=1e-5, atol=1e-6)
    expected = [[-4, 2, 2]] if variant == "paper" else [[-20 / 9, 10 / 9, 10 / 9]]
    close(out["grad_flow"], expected, rtol=1e-5, atol=1e-5)
    close(out["grad_default"], expected if variant == "released" else out["grad_const"], rtol=1e-6, atol=1e-7)
    # and the reference agrees with the hand values
    close(ref_grad(np.zeros((1, 3)), [0], variant, True), expected, rtol=1e-12, atol=1e-12)


def test_hand_targets_and_statistics():
    a = jnp.array([0.5, 0.25, 0.25], jnp.float32)
    y = jnp.array([0, 2, 1], jnp.int32)
    close(oat_targets(y, a, 3), [[1, -1, -1], [-1, -1, 3], [-1, 3, -1]], rtol=1e-6, atol=1e-6)
    s = anchor_statistics(a)
    # -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 1.5 ln 2
    close(s["entropy"], 1.5 * LN2, rtol=1e-6)
    close(s["min"], 0.25, rtol=1e-7)
    close(s["max"], 0.5, rtol=1e-7)


def test_hand_anchor_changes_decision():
    # paper, batch [[1, 0.9], [-5, 5]]: mean = [-2, 2.95]; a ~= [0.00703, 0.99297]
    # row 0: argmax z = 0 but r ~= [0.0070 * 2, 0.9930 * 1.9] -> class 1
    # batch [[1, 0.9], [5, -5]]: mean = [3, -2.05]; a ~= [0.99363, 0.00637]
    # row 0: r ~= [0.9936 * 2, 0.0064 * 1.9] -> class 0
    z2 = np.array([[1.0, 0.9], [-5.0, 5.0]], np.float32)
    z1 = np.array([[1.0, 0.9], [5.0, -5.0]], np.float32)
    out2 = run_all(z2, [0, 1], "paper")
    out1 = run_all(z1, [0, 0], "paper")
    close(out2["anchor"], np_softmax(np.array([-2.0, 2.95])), rtol=1e-5)
    close(out1["anchor"], np_softmax(np.array([3.0, -2.05])), rtol=1e-5)
    assert out2["predict"][0] == 1 and out1["predict"][0] == 0
    np.testing.assert_array_equal(out2["predict"], [1, 1])
    np.testing.assert_array_equal(out1["predict"], [0, 0])


# --------------------------------------------------------------------------
# 2. NumPy reference on random batches, with and without masks
# --------------------------------------------------------------------------


def check_against_reference(out, z, y, variant, where=None):
    """Compare a run_all result with the float64 reference (real rows only)."""
    C = z.shape[1]
    w = np.ones(len(z), bool) if where is None else np.asarray(where, bool)
    a_ref = ref_anchor(z, variant, where)
    assert out["anchor"].shape == (C,)
    close(out["anchor"], a_ref, rtol=1e-5, atol=1e-7)
    assert out["targets"].shape == z.shape
    close(out["targets"][w], ref_targets(np.asarray(y)[w], a_ref, C), rtol=1e-4, atol=1e-5)
    loss_ref = ref_loss(z, y, variant, where)
    for k in ("loss_default", "loss_flow", "loss_const"):
        assert out[k].shape == ()
        close(out[k], loss_ref, rtol=1e-4)
    assert out["decode"].shape == z.shape
    close(out["decode"][w], ref_decode(z, a_ref)[w], rtol=1e-5, atol=1e-6)
    assert out["predict"].shape == (len(z),)
    assert np.issubdtype(out["predict"].dtype, np.integer)
    np.testing.assert_array_equal(out["predict"][w], ref_predict(z, variant, where)[w])
    flows = variant == "released"
    grad_close(out["grad_default"], ref_grad(z, y, variant, flows, where))
    grad_close(out["grad_flow"], ref_grad(z, y, variant, True, where))
    grad_close(out["grad_const"], ref_grad(z, y, variant, False, where))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_against_numpy_reference(variant, shape):
    B, C = shape
    z, y = make_batch(B * 31 + C, B, C)
    check_against_reference(run_all(z, y, variant), z, y, variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(1, 3), (4, 5)])
def test_masked_equals_unpadded_and_reference(variant, shape):
    B, C = shape
    z, y = make_batch(B * 7 + C, B, C)
    zp, yp, mask = pad_batch(z, y, seed=B + C)
    out_m = run_all(zp, yp, variant, where=mask)
    out_u = run_all(z, y, variant)
    check_against_reference(out_m, zp, yp, variant, where=mask)
    close(out_m["anchor"], out_u["anchor"], rtol=1e-6, atol=1e-7)
    for k in ("loss_default", "loss_flow", "loss_const"):
        close(out_m[k], out_u[k], rtol=1e-5)
    np.testing.assert_array_equal(out_m["predict"][mask], out_u["predict"])
    close(out_m["targets"][mask], out_u["targets"], rtol=1e-5, atol=1e-6)
    for k in ("grad_default", "grad_flow", "grad_const"):
        g = out_m[k]
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g[~mask], 0.0)  # padded rows get no gradient
        close(g[mask], out_u[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant", VARIANTS)
def test_mask_all_true_equals_no_mask(variant):
    z, y = make_batch(5, 4, 5)
    out_m = run_all(z, y, variant, where=np.ones(4, bool))
    out_u = run_all(z, y, variant)
    for k in out_u:
        close(out_m[k], out_u[k], rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------
# 3. gradients
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", GRAD_SHAPES)
def test_grad_constant_target_is_analytic(variant, shape):
    B, C = shape
    z, y = make_batch(100 + B * C, B, C)
    out = run_all(z, y, variant)
    t = ref_targets(y, ref_anchor(z, variant), C)
    grad_close(out["grad_const"], 2.0 * (z.astype(np.float64) - t) / (B * C))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", GRAD_SHAPES)
def test_grad_through_anchor_matches_finite_differences(variant, shape):
    B, C = shape
    z, y = make_batch(200 + B * C, B, C)
    out = run_all(z, y, variant)
    fd = fd_grad(lambda zz: ref_loss(zz, y, variant), z)  # target recomputed from z
    grad_close(out["grad_flow"], fd, rtol=1e-3, rel_atol=2e-4)
    grad_close(out["grad_flow"], ref_grad(z, y, variant, True))


@pytest.mark.parametrize("variant", VARIANTS)
def test_grad_float64_tight(x64, variant):
    z, y = make_batch(7, 4, 5)
    z64 = z.astype(np.float64)
    out = _run_all(jnp.asarray(z64), jnp.asarray(y), None, variant)
    assert out["grad_flow"].dtype == jnp.float64
    for k, ag in (("grad_const", False), ("grad_flow", True)):
        np.testing.assert_allclose(np.asarray(out[k]), ref_grad(z64, y, variant, ag), rtol=1e-7, atol=1e-9)
    fd = fd_grad(lambda zz: ref_loss(zz, y, variant), z64)
    np.testing.assert_allclose(np.asarray(out["grad_flow"]), fd, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(float(out["loss_default"]), ref_loss(z64, y, variant), rtol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_anchor_gradient_changes_gradient(variant):
    z, y = make_batch(11, 4, 5)
    out = run_all(z, y, variant)
    assert np.max(np.abs(out["grad_flow"] - out["grad_const"])) > 1e-3
    diff_ref = ref_grad(z, y, variant, True) - ref_grad(z, y, variant, False)
    assert np.max(np.abs(diff_ref)) > 1e-3
    grad_close(out["grad_flow"] - out["grad_const"], diff_ref, rtol=1e-3, rel_atol=1e-3)
    # the loss value itself does not depend on the gradient mode
    close(out["loss_flow"], out["loss_const"], rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_anchor_gradient_defaults_per_variant(variant):
    # released: the gradient flows through the anchor; paper: constant targets
    z, y = make_batch(12, 8, 10)
    out = run_all(z, y, variant)
    same, other = ("grad_flow", "grad_const") if variant == "released" else ("grad_const", "grad_flow")
    close(out["grad_default"], out[same], rtol=1e-6, atol=1e-8)
    assert np.max(np.abs(out["grad_default"] - out[other])) > 1e-3


# --------------------------------------------------------------------------
# 4. PyTorch replica of the released code (skipped when torch is missing)
# --------------------------------------------------------------------------


def _torch_replica(z, y, variant, dtype_name="float64", floor=False):
    """The released code's step in torch: anchor, targets, loss (torch's MSELoss), its gradient w.r.t. z, and
    the predictions argmax a * (z + 1) (eq. 4), as float64/int NumPy arrays. ``floor`` clamps the anchor at
    ANCHOR_FLOOR, which the released code does not (see test_against_torch_on_extreme_inputs)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    dtype = getattr(torch, dtype_name)
    zt = torch.tensor(np.asarray(z), dtype=dtype, requires_grad=True)
    yt = torch.tensor(np.asarray(y), dtype=torch.long)
    C = zt.shape[1]
    onehot = F.one_hot(yt, C).to(dtype)
    if variant == "released":
        # as released: anchor from softmaxed outputs, targets NOT detached
        a = F.softmax(torch.mean(F.softmax(zt, 1), 0), 0)
    else:
        a = F.softmax(torch.mean(zt, 0), 0)
    if floor:
        a = torch.clamp(a, min=ANCHOR_FLOOR)
    t = onehot / a - 1
    if variant == "paper":
        t = t.detach()
    loss = torch.nn.MSELoss()(zt, t)
    loss.backward()
    with torch.no_grad():
        predict = torch.argmax(a[None, :] * (zt + 1), dim=1)
    return {"anchor": a.detach().numpy().astype(np.float64), "targets": t.detach().numpy().astype(np.float64),
            "loss": float(loss.detach()), "grad": zt.grad.detach().numpy().astype(np.float64),
            "predict": predict.numpy()}


def _torch_loss_and_grad(z, y, variant, dtype_name="float64"):
    replica = _torch_replica(z, y, variant, dtype_name)
    return replica["loss"], replica["grad"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_against_torch_released_code(variant, shape):
    pytest.importorskip("torch")
    B, C = shape
    z, y = make_batch(300 + B * C, B, C)
    loss_t, grad_t = _torch_loss_and_grad(z, y, variant)
    out = run_all(z, y, variant)
    close(out["loss_default"], loss_t, rtol=1e-4)
    grad_close(out["grad_default"], grad_t)
    # torch float32 as well, so the float64 replica hides nothing
    loss_t32, grad_t32 = _torch_loss_and_grad(z, y, variant, "float32")
    close(loss_t32, loss_t, rtol=1e-4)
    grad_close(grad_t32, grad_t, rtol=1e-3, rel_atol=1e-3)
    # our NumPy reference agrees with torch too
    close(ref_loss(z, y, variant), loss_t, rtol=1e-10)
    np.testing.assert_allclose(ref_grad(z, y, variant, variant == "released"), grad_t, rtol=1e-8, atol=1e-12)


def _check_against_torch(out, replica, rows=None):
    """A run_all result against the torch replica of its real rows (``rows``: their mask in a padded batch)."""
    rows = np.ones(len(out["predict"]), bool) if rows is None else rows
    close(out["anchor"], replica["anchor"], rtol=1e-5, atol=1e-7)
    close(out["targets"][rows], replica["targets"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["predict"][rows], replica["predict"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(1, 3), (4, 5)])
@pytest.mark.parametrize("garbage", [100.0, 3e38])
def test_against_torch_on_masked_batches(variant, shape, garbage):
    """The released code has no mask: a padded batch is, to it, the batch of its real rows. Ours, given the
    padded batch (padding of +-100, or up to +-3e38 where (z - t)^2 overflows) and its mask, gives that batch's
    anchor, targets, loss and predictions, its gradient on the real rows, and none on the padding."""
    pytest.importorskip("torch")
    B, C = shape
    z, y = make_batch(400 + B * C, B, C)
    zp, yp, mask = pad_batch(z, y, seed=400 + B * C, garbage=garbage)
    out = run_all(zp, yp, variant, where=mask)
    replica = _torch_replica(z, y, variant)
    _check_against_torch(out, replica, mask)
    close(out["loss_default"], replica["loss"], rtol=1e-4)
    grad_close(out["grad_default"][mask], replica["grad"])
    np.testing.assert_array_equal(out["grad_default"][~mask], 0.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_against_torch_on_extreme_inputs(variant):
    """Outputs at float32's limits (+-3e38, +-3.4e38) and outputs so spread that the paper's anchor underflows,
    against the released code in float64, where these values are exact and nothing overflows. The released
    code has no anchor floor: where the paper's anchor underflows, its targets 1/a - 1 are inf in float32 (its
    loss NaN); the replica applies ours (it never acts on the released anchor, which is >= 1/(e*C)).

    Where the loss itself exceeds float32's range, ours is inf, as the released code's is in float32; the
    released variant's gradient then overflows too (through 1/a^2, in the released code as well), so it is
    compared where the loss is finite. The paper variant's constant-target gradient is compared everywhere."""
    pytest.importorskip("torch")
    batches = [(z, (np.arange(len(z)) % z.shape[1]).astype(np.int32)) for z in _extreme_batches()]
    for z, y in batches + _spread_batches():
        out = run_all(z, y, variant)
        replica = _torch_replica(z, y, variant, floor=True)
        _check_against_torch(out, replica)
        if replica["loss"] <= float(F32MAX):
            close(out["loss_default"], replica["loss"], rtol=1e-4)
        else:
            assert out["loss_default"] == np.inf, (z, out["loss_default"])
        if variant == "paper" or np.isfinite(out["loss_default"]):
            grad_close(out["grad_default"], replica["grad"])
    # the spread batches do reach the floor in the paper variant, where the released code's float32 loss is NaN
    if variant == "paper":
        z, y = _spread_batches()[1]
        assert np.isnan(_torch_replica(z, y, variant, "float32")["loss"])
        assert np.isfinite(run_all(z, y, variant)["loss_default"])


# --------------------------------------------------------------------------
# 5. decode / predict
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_of_one_uses_its_own_anchor(variant):
    z, y = make_batch(21, 1, 3)
    z[0] = [0.3, -1.2, 2.5]
    out = run_all(z, y, variant)
    z64 = z[0].astype(np.float64)
    own = np_softmax(np_softmax(z64)) if variant == "released" else np_softmax(z64)
    close(out["anchor"], own, rtol=1e-5, atol=1e-7)
    expected = int(np.argmax(own * (z64 + 1)))
    np.testing.assert_array_equal(out["predict"], [expected])
    # the single sample inside a padded batch gets the same anchor and prediction
    zp, yp, mask = pad_batch(z, y, seed=21)
    out_m = run_all(zp, yp, variant, where=mask)
    close(out_m["anchor"], own, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(out_m["predict"][mask], [expected])


def test_decode_is_anchor_times_outputs_plus_one():
    rng = np.random.default_rng(3)
    z = (5 * rng.standard_normal((4, 5))).astype(np.float32)
    a = rng.dirichlet(np.ones(5)).astype(np.float32)
    r = np.asarray(jax.jit(decode)(jnp.asarray(z), jnp.asarray(a)))
    assert r.shape == (4, 5)
    close(r, a[None, :].astype(np.float64) * (z.astype(np.float64) + 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_predict_is_argmax_of_decode_with_batch_anchor(variant):
    z, y = make_batch(22, 8, 10, scale=3.0)
    out = run_all(z, y, variant)
    np.testing.assert_array_equal(out["predict"], np.argmax(out["decode"], axis=1))
    close(out["decode"], out["anchor"][None, :].astype(np.float64) * (z.astype(np.float64) + 1),
          rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# 6. numerical safety
# --------------------------------------------------------------------------

BIG = np.float32(3e38)
F32MAX = np.finfo(np.float32).max


def test_anchor_floor_constant():
    assert isinstance(float(ANCHOR_FLOOR), float)
    assert 0.0 < ANCHOR_FLOOR < 1e-3


def _spread_batches():
    # (1, 3): softmax([0, 200, -200]) = [e^-200, ~1, e^-400]: underflows in float32
    z1 = np.array([[0.0, 200.0, -200.0]], np.float32)
    # (4, 5): column means [-100, 100, 0, 50, -50] -> four entries below the floor
    z4 = np.array([[0.0, 200.0, -200.0, 100.0, -100.0],
                   [-200.0, 0.0, 200.0, 0.0, 0.0],
                   [-200.0, 200.0, 0.0, 100.0, -100.0],
                   [0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    return [(z1, np.array([0], np.int32)), (z4, np.array([0, 2, 4, 1], np.int32))]


@pytest.mark.parametrize("case", [0, 1])
def test_paper_spread_outputs_are_safe(case):
    z, y = _spread_batches()[case]
    out = run_all(z, y, "paper")
    a = out["anchor"]
    assert np.all(np.isfinite(a))
    assert np.all(a >= np.float32(ANCHOR_FLOOR))
    a_ref = ref_anchor(z, "paper")
    assert np.sum(a_ref == ANCHOR_FLOOR) >= 2  # the floor really is active here
    close(a, a_ref, rtol=1e-5, atol=0)  # clamped entries equal the floor
    assert np.all(np.isfinite(out["targets"]))
    close(out["targets"], ref_targets(y, a_ref, z.shape[1]), rtol=1e-5, atol=1e-5)
    for k in ("loss_default", "loss_flow", "loss_const"):
        assert np.isfinite(out[k])
        close(out[k], ref_loss(z, y, "paper"), rtol=1e-4)
    for k in ("grad_default", "grad_flow", "grad_const"):
        assert np.all(np.isfinite(out[k])), k
    grad_close(out["grad_const"], ref_grad(z, y, "paper", False))
    assert np.all(np.isfinite(out["decode"]))
    np.testing.assert_array_equal(out["predict"], ref_predict(z, "paper"))


def _extreme_batches():
    rng = np.random.default_rng(5)
    ones = [
        np.array([[BIG, -BIG, 0.0]], np.float32),
        np.array([[F32MAX, -F32MAX, 0.0]], np.float32),
        np.array([[-BIG, -BIG, -BIG]], np.float32),
        np.array([[F32MAX, F32MAX, F32MAX]], np.float32),
    ]
    fours = [
        # every column sum overflows float32 unless the mean is taken carefully
        np.full((4, 5), BIG, np.float32),
        np.full((4, 5), -F32MAX, np.float32),
        np.array([[BIG, BIG, -BIG, 0.0, 1.0],
                  [BIG, -BIG, BIG, -BIG, 0.0],
                  [BIG, BIG, BIG, BIG, BIG],
                  [BIG, -BIG, 0.0, 1.0, -BIG]], np.float32),
        (rng.choice([-1.0, 1.0], size=(4, 5)) * BIG).astype(np.float32),
        (rng.uniform(-1, 1, size=(4, 5)) * F32MAX).astype(np.float32),
    ]
    return ones + fours


@pytest.mark.parametrize("variant", VARIANTS)
def test_extreme_finite_inputs(variant):
    for z in _extreme_batches():
        B, C = z.shape
        y = (np.arange(B) % C).astype(np.int32)
        zp, yp, mask = pad_batch(z, y, seed=B, garbage=float(BIG))
        for out, rows in ((run_all(z, y, variant), np.ones(B, bool)), (run_all(zp, yp, variant, where=mask), mask)):
            a = out["anchor"]
            assert np.all(np.isfinite(a)), (z, a)
            assert np.all(a >= np.float32(ANCHOR_FLOOR)), (z, a)
            assert np.all(a <= 1.0 + 1e-6), (z, a)
            assert np.all(np.isfinite(out["targets"])), z
            assert np.all(np.isfinite(out["decode"])), z
            p = out["predict"][rows]
            assert np.all((p >= 0) & (p < C)), (z, p)
        if variant == "released":
            # well conditioned (the row softmaxes are bounded): masked == unpadded.
            # The paper anchor of +-3e38 outputs is not: one ulp of 1e38 in the
            # batch mean (e.g. from FMA contraction under jit) is a logit gap of
            # ~1e31, so only finiteness is asked of it.
            close(run_all(zp, yp, variant, where=mask)["anchor"], run_all(z, y, variant)["anchor"],
                  rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_results_ignore_extreme_finite_padding(variant):
    # Padded rows "must not enter anything": with finite but extreme padding
    # (+-3e38, where (z - t)^2 and even 2 (z - t) overflow) the masked loss, its
    # gradient (real rows equal to the unpadded ones, padded rows exactly 0) and
    # everything else must still equal the unpadded batch's.
    z, y = make_batch(31, 4, 5)
    zp, yp, mask = pad_batch(z, y, seed=31)
    zp[~mask] = BIG * np.array([1.0, -1.0, 1.0, -1.0, 1.0], np.float32)
    zp[np.flatnonzero(~mask)[1]] *= -1
    out_m = run_all(zp, yp, variant, where=mask)
    out_u = run_all(z, y, variant)
    close(out_m["anchor"], out_u["anchor"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out_m["predict"][mask], out_u["predict"])
    for k in ("loss_default", "loss_flow", "loss_const"):
        close(out_m[k], out_u[k], rtol=1e-5)
    for k in ("grad_default", "grad_flow", "grad_const"):
        g = out_m[k]
        assert np.all(np.isfinite(g[mask])), (k, g)
        close(g[mask], out_u[k], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(g[~mask], 0.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_grad_of_jitted_loss_ignores_extreme_finite_padding(variant):
    # Same requirement, with the gradient taken outside the jitted loss (as
    # jax.grad(jax.jit(loss)) does), where XLA cannot simplify 0 * inf away.
    z, y = make_batch(31, 4, 5)
    zp, yp, mask = pad_batch(z, y, seed=31)
    zp[~mask] = BIG
    loss_j = jax.jit(lambda z, y, variant, where: batch_loss(oat_loss(z, y, variant=variant, where=where), where),
                     static_argnames=("variant",))
    g = np.asarray(jax.grad(loss_j)(jnp.asarray(zp), jnp.asarray(yp), variant=variant, where=jnp.asarray(mask)))
    g_u = run_all(z, y, variant)["grad_default"]
    assert np.all(np.isfinite(g[mask])), g
    close(g[mask], g_u, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g[~mask], 0.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_finite_at_1e15(variant):
    z = np.array([[1e15, -1e15, 0.0, 1e15, 3.0],
                  [-1e15, 1e15, 1e15, 0.0, -1e15],
                  [1e15, 1e15, 1e15, 1e15, 1e15],
                  [0.0, -1e15, 1.0, -1e15, 1e15]], np.float32)
    y = np.array([0, 2, 4, 1], np.int32)
    out = run_all(z, y, variant)
    for k in ("loss_default", "loss_flow", "loss_const"):
        assert np.isfinite(out[k]), k
    # the loss is dominated by z^2; the targets are at most 1/ANCHOR_FLOOR
    close(out["loss_default"], np.mean(z.astype(np.float64) ** 2), rtol=1e-3)


HYP_SHAPES = [(1, 3), (4, 5)]  # a batch of one and a regular batch; padded to (4, 3), (7, 5)


@st.composite
def _batches(draw, bound):
    B, C = draw(st.sampled_from(HYP_SHAPES))
    if bound is None:  # every finite float32, up to +-3.4e38
        elems = st.floats(width=32, allow_nan=False, allow_infinity=False)
    else:
        b = float(np.float32(bound))
        elems = st.floats(-b, b, width=32, allow_nan=False, allow_infinity=False)
    z = draw(hnp.arrays(np.float32, (B, C), elements=elems))
    y = draw(hnp.arrays(np.int32, (B,), elements=st.integers(0, C - 1)))
    zpad = draw(hnp.arrays(np.float32, (PAD, C), elements=elems))
    positions = draw(st.permutations(range(B + PAD)))
    real = np.sort(np.asarray(positions[:B]))
    mask = np.zeros(B + PAD, bool)
    mask[real] = True
    zp = np.empty((B + PAD, C), np.float32)
    zp[mask] = z
    zp[~mask] = zpad
    yp = np.zeros(B + PAD, np.int32)
    yp[mask] = y
    return z, y, zp, yp, mask


_HYP = settings(
    max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@_HYP
@given(batch=_batches(None), variant=st.sampled_from(VARIANTS))
def test_property_no_nan_any_finite_input(batch, variant):
    z, y, zp, yp, mask = batch
    C = z.shape[1]
    for out, rows in ((run_all(z, y, variant), slice(None)), (run_all(zp, yp, variant, where=mask), mask)):
        assert np.all(np.isfinite(out["anchor"]))
        assert np.all(out["anchor"] >= np.float32(ANCHOR_FLOOR))
        assert np.all(np.isfinite(out["targets"][rows]))
        assert np.all(np.isfinite(out["decode"][rows]))
        p = out["predict"][rows]
        assert np.all((p >= 0) & (p < C))


@_HYP
@given(batch=_batches(1e15), variant=st.sampled_from(VARIANTS))
def test_property_loss_finite_up_to_1e15(batch, variant):
    # At |z| ~ 1e15 float32 rounding of the batch mean makes the (paper) anchor
    # itself imprecise, so the loss is checked against the reference given the
    # implementation's own anchor.
    z, y, zp, yp, mask = batch
    C = z.shape[1]
    for out, zz, yy in ((run_all(z, y, variant), z, y), (run_all(zp, yp, variant, where=mask), z, y)):
        for k in ("loss_default", "loss_flow", "loss_const"):
            assert np.isfinite(out[k]), k
        a = out["anchor"].astype(np.float64)
        expected = np.mean((zz.astype(np.float64) - ref_targets(yy, a, C)) ** 2)
        close(out["loss_default"], expected, rtol=1e-4, atol=1e-6)


@_HYP
@given(batch=_batches(100.0), variant=st.sampled_from(VARIANTS))
def test_property_matches_reference(batch, variant):
    z, y, zp, yp, mask = batch
    out_u = run_all(z, y, variant)
    out_m = run_all(zp, yp, variant, where=mask)
    loss_ref = ref_loss(z, y, variant)
    close(out_u["loss_default"], loss_ref, rtol=1e-3, atol=1e-6)
    close(out_m["loss_default"], loss_ref, rtol=1e-3, atol=1e-6)
    a_ref = ref_anchor(z, variant)
    close(out_u["anchor"], a_ref, rtol=1e-3, atol=1e-7)
    close(out_m["anchor"], out_u["anchor"], rtol=1e-4, atol=1e-7)
    assert np.all(out_m["grad_default"][~mask] == 0.0)


# --------------------------------------------------------------------------
# 7. anchor bounds
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_released_anchor_bounds_and_sum(shape):
    B, C = shape
    for scale in (0.1, 3.0, 1e4, 1e30):
        z, y = make_batch(400 + B * C, B, C, scale=scale)
        a = run_all(z, y, "released")["anchor"].astype(np.float64)
        lo, hi = 1.0 / (math.e * C), math.e / C
        assert np.all(a >= lo * (1 - 1e-5)), (a, lo)
        assert np.all(a <= hi * (1 + 1e-5)), (a, hi)
        close(a.sum(), 1.0, rtol=1e-5)
    # the extremes are approached by one-hot rows: all B rows put their mass on class 0
    z = np.full((B, C), -1e30, np.float32)
    z[:, 0] = 1e30
    a = run_all(z, np.zeros(B, np.int32), "released")["anchor"]
    close(a[0], math.e / (math.e + C - 1), rtol=1e-5)
    close(a[1:], 1.0 / (math.e + C - 1), rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 5), (8, 10)])
def test_paper_anchor_sums_to_one_when_floor_inactive(shape):
    B, C = shape
    z, y = make_batch(500 + B, B, C)
    a = run_all(z, y, "paper")["anchor"].astype(np.float64)
    assert np.all(a > ANCHOR_FLOOR)
    close(a.sum(), 1.0, rtol=1e-5)


# --------------------------------------------------------------------------
# 8. anchor statistics
# --------------------------------------------------------------------------


@pytest.mark.parametrize("C", [2, 10, 100])
def test_anchor_statistics_uniform(C):
    s = anchor_statistics(jnp.full((C,), 1.0 / C, jnp.float32))
    assert set(s) >= {"entropy", "min", "max"}
    for k in ("entropy", "min", "max"):
        assert np.shape(s[k]) == ()
    close(s["entropy"], math.log(C), rtol=1e-5)
    close(s["min"], 1.0 / C, rtol=1e-6)
    close(s["max"], 1.0 / C, rtol=1e-6)


def test_anchor_statistics_of_batch_anchor():
    z, y = make_batch(600, 8, 10)
    a = run_all(z, y, "released")["anchor"]
    s = jax.jit(anchor_statistics)(jnp.asarray(a))
    a64 = a.astype(np.float64)
    close(s["entropy"], -np.sum(a64 * np.log(a64)), rtol=1e-5)
    close(s["min"], a64.min(), rtol=1e-6)
    close(s["max"], a64.max(), rtol=1e-6)
    assert float(s["entropy"]) <= math.log(10) + 1e-5


# --------------------------------------------------------------------------
# 9. errors and jit
# --------------------------------------------------------------------------


def test_unknown_variant_raises():
    z = jnp.zeros((2, 3))
    y = jnp.zeros((2,), jnp.int32)
    for bad in ("bogus", "Released", "PAPER", ""):
        with pytest.raises(ValueError):
            batch_anchor(z, variant=bad)
        with pytest.raises(ValueError):
            oat_loss(z, y, variant=bad)
        with pytest.raises(ValueError):
            predict(z, variant=bad)
    with pytest.raises(ValueError):
        jax.jit(oat_loss, static_argnames=("variant",))(z, y, variant="bogus")


@pytest.mark.parametrize("variant", VARIANTS)
def test_jit_compatible(variant):
    # run_all is itself a jit with a static variant; here the public functions
    # are jitted one by one, with the mask and labels traced.
    z, y = make_batch(700, 4, 5)
    zp, yp, mask = pad_batch(z, y, seed=700)
    zj, yj, mj = jnp.asarray(zp), jnp.asarray(yp), jnp.asarray(mask)
    anchor_j = jax.jit(batch_anchor, static_argnames=("variant",))
    loss_j = jax.jit(oat_loss, static_argnames=("num_classes", "variant", "anchor_gradient"))
    pred_j = jax.jit(predict, static_argnames=("variant",))
    targets_j = jax.jit(oat_targets, static_argnums=(2,))
    a = anchor_j(zj, variant=variant, where=mj)
    a_ref = ref_anchor(zp, variant, where=mask)
    close(a, a_ref, rtol=1e-5, atol=1e-7)
    close(batch_loss(loss_j(zj, yj, variant=variant, where=mj), mj), ref_loss(zp, yp, variant, where=mask),
          rtol=1e-4)
    close(batch_loss(loss_j(zj, yj, num_classes=5, variant=variant, anchor_gradient=False, where=mj), mj),
          ref_loss(zp, yp, variant, where=mask), rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(pred_j(zj, variant=variant, where=mj))[mask],
                                  ref_predict(zp, variant, where=mask)[mask])
    close(np.asarray(targets_j(yj, a, 5))[mask], ref_targets(yp[mask], a_ref, 5), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# the per-device anchor: the batch in groups, each with its own anchor
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("anchor_gradient", [False, True])
def test_grouped_loss_and_gradient_against_the_reference_per_group(variant, anchor_gradient):
    """4 groups of 4 rows: one full, one with a padded row, one with a single real row, one all padding.
    The loss is the real rows' mean of their group's squared errors: sum_g n_g * ref_loss(group g) / N, and
    the gradient of group g's rows is n_g / N times the reference gradient of that group's own loss."""
    z, y = make_batch(41, 16, 5)
    where = np.ones(16, bool)
    where[[7, 9, 10, 11, 12, 13, 14, 15]] = False
    z[~where] = 1e3  # padding's values must not matter
    groups = [slice(4 * g, 4 * g + 4) for g in range(4)]
    counts = [int(where[g].sum()) for g in groups]
    assert counts == [4, 3, 1, 0]
    total = sum(counts)
    expected_loss = sum(n * ref_loss(z[g], y[g], variant, where=where[g]) for g, n in zip(groups, counts) if n) / total
    expected_grad = np.zeros(z.shape)
    for g, n in zip(groups, counts):
        if n:
            expected_grad[g] = n / total * ref_grad(z[g], y[g], variant, anchor_gradient, where=where[g])

    def loss(outputs):
        return batch_loss(grouped_oat_loss(outputs, y, where, groups=4, variant=variant,
                                           anchor_gradient=anchor_gradient), where)

    value, gradient = jax.value_and_grad(loss)(jnp.asarray(z))
    close(value, expected_loss, rtol=1e-5)
    grad_close(gradient, expected_grad)
    # Not the loss with the anchor of the whole batch.
    assert abs(float(value) - ref_loss(z, y, variant, where=where)) > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_group_is_the_loss_of_the_whole_batch(variant):
    z, y = make_batch(43, 8, 6)
    close(grouped_oat_loss(z, y, groups=1, variant=variant), oat_loss(z, y, variant=variant), rtol=1e-6)
    close(grouped_oat_loss(z, y, groups=8, variant=variant),
          [ref_loss(z[i:i + 1], y[i:i + 1], variant) for i in range(8)], rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_losses_are_per_example_and_zero_on_padding(variant):
    """Shaped like optax's losses: one value per row, each row's mean squared error against the targets of
    the batch's anchor (the NumPy reference), 0 on padded rows; their mean over the real rows is the batch's
    nn.MSELoss, as the released code reduces it."""
    z, y = make_batch(45, 6, 4)
    zp, yp, mask = pad_batch(z, y, seed=45)
    values = np.asarray(oat_loss(jnp.asarray(zp), jnp.asarray(yp), variant=variant, where=jnp.asarray(mask)))
    assert values.shape == (len(zp),)
    np.testing.assert_array_equal(values[~mask], 0.0)
    targets = ref_targets(y, ref_anchor(z, variant), 4)
    close(values[mask], np.mean((z - targets) ** 2, axis=1), rtol=1e-5)
    close(values.sum() / mask.sum(), ref_loss(z, y, variant), rtol=1e-5)
    grouped = np.asarray(grouped_oat_loss(jnp.asarray(zp), jnp.asarray(yp), jnp.asarray(mask), groups=len(zp) // 3,
                                          variant=variant))
    assert grouped.shape == (len(zp),) and np.all(grouped[~mask] == 0.0)


def test_groups_that_do_not_split_the_batch_are_refused():
    z, y = make_batch(44, 6, 3)
    with pytest.raises(ValueError, match="groups=4 does not split a batch of 6"):
        grouped_oat_loss(z, y, groups=4)
