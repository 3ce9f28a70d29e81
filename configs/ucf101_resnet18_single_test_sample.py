"""Sec. 3.5: UCF-101 with ResNet-18, evaluated one test sample at a time, so that each sample's OAT
anchor is its own (the paper: 73.407 with OAT, 72.403 without)."""
from oat_jax.config_schema import finetune_config
from oat_jax.paper_figures import paper_cell


def get_config():
    config = finetune_config("ucf101", "resnet18")
    config.eval_batch_size = 1
    config.paper = paper_cell("Sec. 3.5 text", "UCF-101, ResNet-18, test batch of one")
    return config
