"""Table 6: ERA with an ImageNet-pretrained ResNet-18 and a new linear head, images resized to
224x224. Needs torchvision's ImageNet weights file (see docs/models.md, "Pretrained weights")."""
from oat_jax.config_schema import finetune_config
from oat_jax.paper_figures import paper_cell


def get_config():
    config = finetune_config("era", "resnet18")
    config.paper = paper_cell("Table 6", "ERA, ResNet-18")
    return config
