"""Table 6: ERA with an ImageNet-pretrained Wide-ResNet-50-2 and a new linear head, images resized to
224x224. Needs torchvision's ImageNet weights file (see docs/models.md, "Pretrained weights")."""
from oat_jax.config_schema import finetune_config
from oat_jax.paper_figures import paper_cell


def get_config():
    config = finetune_config("era", "wide_resnet50_2")
    config.paper = paper_cell("Table 6", "ERA, WRN-50-2")
    return config
