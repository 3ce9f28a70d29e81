"""Table 2: UCF-101 with ResNet-18 at batch size 32, 64 or 128 (training and test batches alike), one
command each: ``--config configs/table2_batch_size.py:64``."""
from oat_jax.config_schema import finetune_config
from oat_jax.paper_figures import paper_cell

BATCH_SIZES = (32, 64, 128)


def get_config(batch_size: str = "32"):
    if not batch_size.isdigit() or int(batch_size) not in BATCH_SIZES:
        raise ValueError(f"Table 2 has batch sizes {', '.join(map(str, BATCH_SIZES))}; got {batch_size}")
    config = finetune_config("ucf101", "resnet18")
    config.batch_size = config.eval_batch_size = int(batch_size)
    config.paper = paper_cell("Table 2", f"batch size {batch_size}")
    return config
