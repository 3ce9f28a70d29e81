"""The paper's protocol (Sec. 3.4) on Fashion-MNIST with the lightweight CNN: SGD lr 0.001, momentum 0.9,
batch 32, 100 epochs, of which 10 of cross-entropy pre-training before OAT. The paper has no Fashion-MNIST
figure, so none is printed beside ours."""
from oat_jax.config_schema import base_config


def get_config():
    config = base_config()
    config.dataset = "fashion_mnist"
    config.model = "lightweight"
    return config
