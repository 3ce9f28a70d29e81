import jax
import jax.numpy as jnp
import numpy as np
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


def test_the_lightweight_cnns_max_pool_has_flaxs_values_and_gradient():
    """The 2x2 max-pool written as a reshape: the same outputs as flax's reduce-window pool, and the same
    gradient, ties included (the first maximum of a window, row by row, takes it), for odd sizes too."""
    import flax.linen as nn
    from oat_jax.models.lightweight import max_pool_2x2
    rng = np.random.default_rng(0)
    for shape in [(3, 8, 10, 2), (2, 9, 7, 3)]:
        x = rng.integers(0, 3, shape).astype(np.float32)  # small integers: many tied maxima
        reference, pull_reference = jax.vjp(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), x)
        pooled, pull = jax.vjp(max_pool_2x2, x)
        np.testing.assert_array_equal(pooled, reference)
        gradient = rng.normal(size=reference.shape).astype(np.float32)
        np.testing.assert_array_equal(pull(gradient)[0], pull_reference(gradient)[0])


def test_torch_init_draws_pytorchs_default_bounds_for_conv_and_dense_layers():
    """init="torch": every conv and dense kernel and bias uniform in ±1/sqrt(fan_in), as PyTorch's nn.Conv2d and
    nn.Linear draw them (checked against torch's own layers where torch is installed)."""
    from oat_jax.config_schema import base_config
    from oat_jax.state import create_train_state

    config = base_config()
    params = create_train_state(models.create_model("lightweight", 10), (28, 28, 1), config, seed=0).params
    fan_ins = {"Conv_0": 5 * 5 * 1, "Conv_1": 5 * 5 * 6, "Dense_0": 4 * 4 * 16, "Dense_1": 128, "head": 64}
    assert sorted(params) == sorted(fan_ins)
    for layer, fan_in in fan_ins.items():
        bound = 1 / np.sqrt(fan_in)
        for name in ("kernel", "bias"):
            values = np.asarray(params[layer][name])
            assert np.abs(values).max() <= bound, (layer, name)
            # Uniform over the whole range: its largest draw is near the bound, its spread bound / sqrt 3.
            assert np.abs(values).max() > (0.9 if values.size > 20 else 0.5) * bound, (layer, name)
            if values.size > 1000:
                assert np.std(values) == pytest.approx(bound / np.sqrt(3), rel=0.05), (layer, name)
    config.init = "flax"  # Flax's own: LeCun-normal kernels and zero biases
    flax_params = create_train_state(models.create_model("lightweight", 10), (28, 28, 1), config, seed=0).params
    assert not np.any(flax_params["head"]["bias"]) and np.abs(flax_params["Conv_0"]["kernel"]).max() > 0.2

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    for layer, bound in ((torch.nn.Conv2d(6, 16, 5), 1 / np.sqrt(150)), (torch.nn.Linear(256, 128), 1 / 16)):
        for tensor in (layer.weight, layer.bias):
            values = tensor.detach().numpy()
            assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound


def test_wrn28_10_keeps_its_reference_codes_he_initialisation():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parents[1] / "configs" / "cifar10_wrn28_10.py"
    spec = importlib.util.spec_from_file_location("wrn_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.get_config().init == "flax"
