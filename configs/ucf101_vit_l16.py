"""Table 5: UCF-101 middle frames (split 1) with an ImageNet-pretrained ViT-L/16 and a new linear head, images
resized to 224x224. Needs torchvision's ImageNet weights file (see docs/models.md, "Pretrained weights")."""
from oat_jax.config_schema import finetune_config
from oat_jax.paper_figures import paper_cell


def get_config():
    config = finetune_config("ucf101", "vit_l16")
    config.paper = paper_cell("Table 5", "UCF-101, ViT-L/16")
    return config
