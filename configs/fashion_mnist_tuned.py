"""The tuned study (results/fashion_mnist_tuned/README.md): the paper's protocol on Fashion-MNIST with the lightweight
CNN (10 epochs of cross-entropy, then 90 of each arm; one learning rate for both phases), PyTorch's default
initialisation, and 6,000 training images (600 per class) held out for validation, on which each arm's
learning rate and stopping epoch are chosen (``python -m oat_jax.sweep``; ``make tuned-study``).

Arms: ``ce``, ``ce_smooth`` (label smoothing 0.1), ``oat`` (the released anchor), ``oat_uniform`` (the anchor
fixed at 1/C) and ``square`` (Hui & Belkin's square loss, k = 1, M = 1)."""
from oat_jax.config_schema import base_config


def get_config():
    config = base_config()
    config.dataset = "fashion_mnist"
    config.model = "lightweight"
    config.init = "torch"
    config.arms = "ce,ce_smooth,oat,oat_uniform,square"
    config.validation_size = 6000.0
    config.validation_seed = 0
    return config
