"""A quick look at both arms on real Fashion-MNIST: the paper's protocol shortened to 4 epochs (2 of
cross-entropy pre-training, then 2 more of each arm), a few minutes on 2 CPU cores."""
from oat_jax.config_schema import base_config


def get_config():
    config = base_config()
    config.dataset = "fashion_mnist"
    config.model = "lightweight"
    config.num_epochs = 4
    config.pretrain_epochs = 2
    return config
