"""Where the anchor can move (results/fashion_mnist_longtail/README.md): the paper's protocol on a long-tailed Fashion-MNIST
(ρ = n_max / n_min = 100, about 14,600 training images), with 1,000 images (100 per class) held out for
validation before the profile is drawn, so that validation stays balanced; the lightweight CNN with PyTorch's
default initialisation; 10 epochs of cross-entropy, then 90 of each arm.

Arms: ``ce``; ``ce_logit_adjusted`` (cross-entropy on z + log π, Menon et al. 2021); ``oat`` (the released,
online anchor); ``oat_uniform`` (the anchor fixed at 1/C); ``oat_prior`` (the anchor fixed at softmax(π), where
the online anchor would sit if the mean softmax equalled the training prior). The stopping rule and the sweep
read the balanced validation accuracy (``make longtail-study``)."""
from oat_jax.config_schema import base_config


def get_config():
    config = base_config()
    config.dataset = "fashion_mnist"
    config.model = "lightweight"
    config.init = "torch"
    config.arms = "ce,ce_logit_adjusted,oat,oat_uniform,oat_prior"
    config.validation_size = 1000.0
    config.validation_seed = 0
    config.train_imbalance = 100.0
    config.imbalance_seed = 0
    return config
