"""Table 4, left column: CIFAR-10 (32x32x3) with the lightweight CNN, the paper's protocol."""
from oat_jax.config_schema import base_config


def get_config():
    config = base_config()
    config.dataset = "cifar10"
    config.model = "lightweight"
    config.paper.source = "Table 4, CIFAR-10, lightweight CNN"
    config.paper.ce = 65.660
    config.paper.oat = 66.540
    return config
