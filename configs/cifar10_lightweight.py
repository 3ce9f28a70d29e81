"""Table 4, left column: CIFAR-10 (32x32x3) with the lightweight CNN, the paper's protocol."""
from oat_jax.config_schema import base_config
from oat_jax.paper_figures import paper_cell


def get_config():
    config = base_config()
    config.dataset = "cifar10"
    config.model = "lightweight"
    config.paper = paper_cell("Table 4", "CIFAR-10, lightweight CNN")
    return config
