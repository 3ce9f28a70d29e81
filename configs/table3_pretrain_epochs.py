"""Table 3: UCF-101 with ResNet-18, OAT after 0, 5, 10 or 20 epochs of cross-entropy pre-training (100
epochs in all), one command each: ``--config configs/table3_pretrain_epochs.py:5``."""
from oat_jax.config_schema import finetune_config
from oat_jax.paper_figures import paper_cell

PRETRAIN_EPOCHS = (0, 5, 10, 20)


def get_config(pretrain_epochs: str = "10"):
    if not pretrain_epochs.isdigit() or int(pretrain_epochs) not in PRETRAIN_EPOCHS:
        raise ValueError(f"Table 3 has {', '.join(map(str, PRETRAIN_EPOCHS))} pre-training epochs; "
                         f"got {pretrain_epochs}")
    config = finetune_config("ucf101", "resnet18")
    config.pretrain_epochs = int(pretrain_epochs)
    config.paper = paper_cell("Table 3", f"{pretrain_epochs} pre-training epochs")
    return config
