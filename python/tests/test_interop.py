"""fastfeedforward and UltraFastBERT layers through ffwd's kernels: committed fixtures and
NumPy references; the torch tests skip when torch is not installed."""

import numpy as np
import pytest

import ffwd
from conftest import FIXTURES


def gelu(z):
    from math import erf, sqrt

    return np.vectorize(lambda v: 0.5 * v * (1.0 + erf(v / sqrt(2.0))))(z)


@pytest.mark.parametrize("depth", [2, 3])
def test_fastfeedforward_fixture_equals_eval_forward_plus_leaf_bias(depth):
    st = pytest.importorskip("safetensors.numpy")
    state = st.load_file(FIXTURES / f"fff_d{depth}_state.safetensors")
    io = st.load_file(FIXTURES / f"fff_d{depth}_io.safetensors")
    fast = ffwd.layers.FFF.from_fastfeedforward(state)
    leaf = io["leaf"].astype(np.int64)
    want = io["y_eval"] + state["b2s"][leaf]
    np.testing.assert_allclose(fast.forward(io["x"]), want, rtol=1e-5, atol=1e-6)
    # the node decisions on the path plus the leaf's hidden units
    assert fast.neurons_per_inference == depth + state["w1s"].shape[2]


def ultrafastbert_reference(state, x, trees):
    """UltraFastBERT's forward (training/cramming/architectures/fff.py), in NumPy."""
    w_in, b_in, w_out = state["linear_in.weight"], state["linear_in.bias"], state["linear_out.weight"]
    n = w_in.shape[0] // trees
    depth = int(np.log2(n + 1)) - 1
    logits = (x @ w_in.T + b_in).reshape(len(x), trees, n)
    y = np.zeros((len(x), w_out.shape[0]), np.float64)
    for b in range(len(x)):
        for t in range(trees):
            node = 0
            for _ in range(depth + 1):
                z = logits[b, t, node]
                y[b] += gelu(z) * w_out[:, t * n + node]
                node = 2 * node + 1 + int(z > 0)
    return y


@pytest.mark.parametrize("trees,depth", [(1, 3), (4, 2)])
def test_ultrafastbert_layout_with_parallel_trees(trees, depth):
    r = np.random.default_rng(trees)
    n, d_in, d_out = 2 ** (depth + 1) - 1, 12, 7
    state = {
        "linear_in.weight": r.normal(size=(trees * n, d_in)).astype(np.float32),
        "linear_in.bias": r.normal(size=trees * n).astype(np.float32),
        "linear_out.weight": r.normal(size=(d_out, trees * n)).astype(np.float32),
    }
    x = r.normal(size=(33, d_in)).astype(np.float32)
    tree = ffwd.layers.UltraFastTree.from_state_dict(state, trees=trees)
    assert tree.neurons_per_inference == trees * (depth + 1)
    np.testing.assert_allclose(tree.forward(x), ultrafastbert_reference(state, x, trees), rtol=1e-4, atol=1e-4)
    prefixed = {"encoder.0.fff." + k: v for k, v in state.items()}
    np.testing.assert_array_equal(ffwd.layers.UltraFastTree.from_state_dict(prefixed, prefix="encoder.0.fff.", trees=trees).forward(x), tree.forward(x))
    with pytest.raises(ValueError, match="missing tensor"):
        ffwd.layers.UltraFastTree.from_state_dict(state, prefix="nope.")
    if trees > 1:
        with pytest.raises(ValueError, match="trees"):
            ffwd.layers.UltraFastTree.from_state_dict(state, trees=trees + 1)


def test_fastfeedforward_module_and_torch_wrapper():
    torch = pytest.importorskip("torch")
    fastfeedforward = pytest.importorskip("fastfeedforward")
    import ffwd.torch

    torch.manual_seed(0)
    for depth in (2, 4):
        m = fastfeedforward.FFF(16, 8, 5, depth, activation=torch.nn.ReLU()).eval()
        x = torch.randn(64, 16)
        fast = ffwd.layers.FFF.from_fastfeedforward(m)
        with torch.no_grad():
            ref = m.eval_forward(x)
            # 0.2.1's eval_forward drops the leaf bias b2s: add it at each sample's leaf
            node = torch.zeros(64, dtype=torch.long)
            for _ in range(depth):
                z = (x * m.node_weights[node]).sum(-1) + m.node_biases[node].squeeze(-1)
                node = 2 * node + 1 + (z >= 0).long()
            leaf = node - (2**depth - 1)
            want = (ref + m.b2s[leaf]).numpy()
        np.testing.assert_allclose(fast.forward(x.numpy()), want, rtol=1e-4, atol=1e-5)
        wrapped = torch.nn.Sequential(torch.nn.Identity(), ffwd.torch.from_fastfeedforward(m))
        y = wrapped(x.reshape(4, 16, 16))
        assert y.shape == (4, 16, 5)
        np.testing.assert_allclose(y.reshape(64, 5).numpy(), want, rtol=1e-4, atol=1e-5)
