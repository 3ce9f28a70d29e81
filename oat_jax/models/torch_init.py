"""PyTorch's default initialisation of convolution and linear layers, for models trained from scratch.

The paper's networks were trained in PyTorch, whose ``nn.Conv2d`` and ``nn.Linear`` draw their weights by
``kaiming_uniform_(a=sqrt(5))`` and their biases uniformly, both within ±1/sqrt(fan_in): about √3 smaller
weights than Flax's LeCun-normal, and biases that are not zero. At the paper's learning rate of 0.001 that
changes short-run accuracy by points, so ``config.init = "torch"`` redraws those layers this way.
"""
from __future__ import annotations

import math

import jax

# Flax kernels of nn.Conv (2-D: H, W, in, out; 3-D: T, H, W, in, out) and nn.Dense (in, out): the last axis is
# the output, the others make the fan-in. Other kernels (attention's DenseGeneral) keep their initialiser.
_KERNEL_DIMS = (2, 4, 5)


def torch_default_init(params: dict, key: jax.Array) -> dict:
    """``params`` with every conv and dense layer (a dict holding a 2-, 4- or 5-D ``kernel``) redrawn as
    PyTorch's defaults: kernel and bias uniform in ±1/sqrt(fan_in). Normalisation layers and embeddings are
    left as they are (PyTorch's and Flax's agree there). Layers are numbered in the tree's order, each drawing
    from its own key."""
    count = [0]

    def redraw(tree):
        if not isinstance(tree, dict):
            return tree
        layer = dict(tree)
        kernel = layer.get("kernel")
        if kernel is not None and not isinstance(kernel, dict) and kernel.ndim in _KERNEL_DIMS:
            bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))
            kernel_key, bias_key = jax.random.split(jax.random.fold_in(key, count[0]))
            count[0] += 1
            layer["kernel"] = jax.random.uniform(kernel_key, kernel.shape, kernel.dtype, -bound, bound)
            if "bias" in layer:
                bias = layer["bias"]
                layer["bias"] = jax.random.uniform(bias_key, bias.shape, bias.dtype, -bound, bound)
        return {name: redraw(child) for name, child in layer.items()}

    return redraw(params)
