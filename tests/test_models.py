import jax
import jax.numpy as jnp
import pytest

from oat_jax import models


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (16, 20, 2)])
def test_lightweight_any_input_size(shape):
    model = models.create_model("lightweight", num_classes=7)
    variables = model.init(jax.random.key(0), jnp.zeros((1,) + shape))
    assert model.apply(variables, jnp.ones((3,) + shape)).shape == (3, 7)


def test_lightweight_layers_follow_the_paper():
    model = models.create_model("lightweight", num_classes=10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    shapes = {name: layer["kernel"].shape for name, layer in params.items()}
    # conv 6@5x5, conv 16@5x5 (each followed by a 2x2 pool: 32 -> 28 -> 14 -> 10 -> 5), FC 400->128->64->10
    assert shapes == {"Conv_0": (5, 5, 3, 6), "Conv_1": (5, 5, 6, 16), "Dense_0": (400, 128),
                      "Dense_1": (128, 64), "head": (64, 10)}


def test_too_small_images_are_refused_clearly():
    model = models.create_model("lightweight", num_classes=3)
    with pytest.raises(ValueError, match="at least 16x16"):
        model.init(jax.random.key(0), jnp.zeros((1, 12, 12, 1)))


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="lightweight"):
        models.create_model("resnet9000", num_classes=3)
