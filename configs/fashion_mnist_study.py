"""Does the anchor matter? The paper's protocol on Fashion-MNIST with the lightweight CNN (10 epochs of
cross-entropy, then 90 of each arm from that one pre-training), PyTorch's default initialisation, and OAT beside
its controls (results/fashion_mnist_study/README.md):

- ``oat``: OAT with the released code's anchor, softmax(mean softmax z);
- ``oat_uniform``: the same loss with the anchor fixed at 1/C (targets C·onehot - 1): no online anchor;
- ``square``: Hui & Belkin's rescaled square loss with k = 1, M = 1;
- ``oat_paper``: OAT with the paper's anchor softmax(mean z) (eq. 1), last: it may diverge, which ends it alone;
- ``ce_smooth`` (label smoothing 0.1), added after the first seeds had finished: a run of its own per seed,
  ``--config.arms=ce_smooth``, which repeats the same pre-training; the report pools it with the others.

One seed a run: ``--config.seed=N --workdir results/fashion_mnist_study/seed_N`` (``make study`` runs both runs of each seed)."""
from oat_jax.config_schema import base_config


def get_config():
    config = base_config()
    config.dataset = "fashion_mnist"
    config.model = "lightweight"
    config.init = "torch"
    config.arms = "ce,oat,oat_uniform,square,oat_paper"
    return config
