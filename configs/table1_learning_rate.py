"""Table 1: UCF-101 with ResNet-18 at learning rate 0.01, 0.001 or 0.0001, one command each:
``--config configs/table1_learning_rate.py:0.01``."""
from oat_jax.config_schema import finetune_config
from oat_jax.paper_figures import paper_cell

LEARNING_RATES = ("0.01", "0.001", "0.0001")


def get_config(learning_rate: str = "0.001"):
    if learning_rate not in LEARNING_RATES:
        raise ValueError(f"Table 1 has learning rates {', '.join(LEARNING_RATES)}; got {learning_rate}")
    config = finetune_config("ucf101", "resnet18")
    config.learning_rate = float(learning_rate)
    config.paper = paper_cell("Table 1", f"learning rate {learning_rate}")
    return config
