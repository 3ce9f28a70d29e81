"""Table 4, right column: CIFAR-10 (32x32x3, no resize) with WRN-28-10 trained from scratch, the paper's
protocol. The paper calls its network a "modified" WRN-28-10 without saying how; this is the standard one."""
from oat_jax.config_schema import base_config
from oat_jax.paper_figures import paper_cell


def get_config():
    config = base_config()
    config.dataset = "cifar10"
    config.model = "wrn28_10"
    config.init = "flax"  # the model's own He initialisation, as its reference code has
    config.paper = paper_cell("Table 4", "CIFAR-10, WRN-28-10")
    return config
