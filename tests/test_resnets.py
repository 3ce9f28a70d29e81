"""ResNet-18, Wide ResNet-50-2 (torchvision's architectures) and WRN-28-10 (CIFAR).

A real ``model.init`` compiles one random sampler per parameter shape (about 20 s on two CPU cores), so the
tests take shapes from ``jax.eval_shape`` and fill them with numpy random values instead."""
import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oat_jax import models

KEYS_DIR = pathlib.Path(__file__).parent / "data" / "torchvision_keys"
TORCHVISION_PARAMETERS = {"resnet18": 11_689_512, "wide_resnet50_2": 68_883_240}  # 1000-class head
CONVERTIBLE = sorted(TORCHVISION_PARAMETERS)


def abstract_variables(model, size: int = 32):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def random_variables(model, seed: int = 0, size: int = 32) -> dict:
    """Variables of ``model`` for (B, size, size, 3) images, random, with BatchNorm variances positive and
    kernels scaled by 1/sqrt(fan-in) so activations stay finite through deep networks."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("var", "scale"):
            return (0.5 + rng.random(leaf.shape, dtype=np.float32)).astype(leaf.dtype)
        scale = 1 / math.sqrt(math.prod(leaf.shape[:-1])) if name == "kernel" else 0.1
        return (scale * rng.standard_normal(leaf.shape, dtype=np.float32)).astype(leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, abstract_variables(model, size))


@functools.cache
def compiled_apply(name: str, num_classes: int, train: bool = False):
    """``create_model(name, num_classes).apply`` in eval or train mode, jitted once for all tests (compiling
    a deep network takes seconds)."""
    model = models.create_model(name, num_classes)
    if train:
        return jax.jit(lambda variables, images: model.apply(variables, images, train=True, mutable=["batch_stats"]))
    return jax.jit(model.apply)


def parameter_count(variables) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


# --- ResNet-18 and Wide ResNet-50-2 --------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONVERTIBLE)
def test_torch_names_and_shapes_equal_torchvisions(name):
    recorded = json.loads((KEYS_DIR / f"{name}.json").read_text())
    variables = abstract_variables(models.create_model(name, num_classes=1000), size=224)
    exported = jax.eval_shape(models.torch_weights(name).to_torch, variables)
    assert {key: list(value.shape) for key, value in exported.items()} == recorded["state_dict"]
    assert parameter_count(variables) == recorded["num_parameters"] == TORCHVISION_PARAMETERS[name]


def test_resnet_outputs_and_batch_norm_statistics():
    # (wide_resnet50_2's forward pass is checked by the weight round trip and the torchvision comparison)
    variables = random_variables(models.create_model("resnet18", num_classes=10))
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    assert compiled_apply("resnet18", 10)(variables, images).shape == (2, 10)
    outputs, updates = compiled_apply("resnet18", 10, train=True)(variables, images)
    assert outputs.shape == (2, 10)
    assert not np.allclose(updates["batch_stats"]["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"])


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_resnets_refuse_dropout(name):
    with pytest.raises(ValueError, match="no dropout"):
        models.create_model(name, num_classes=3, dropout_rate=0.1)


def _torchvision():
    try:
        import torchvision
    except (ImportError, RuntimeError) as error:  # absent, or its compiled ops clash with the installed torch
        pytest.skip(f"torchvision is not importable: {error}")
    return torchvision


def _random_torchvision_model(name: str, num_classes: int):
    """torchvision's ``name`` with random weights and random BatchNorm statistics, in eval mode."""
    torchvision = _torchvision()
    import torch
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_loaded_torchvision_checkpoint_gives_torchvisions_outputs(name, tmp_path):
    torch = pytest.importorskip("torch")
    from oat_jax.models.weights import load_torchvision_weights
    torch_model = _random_torchvision_model(name, num_classes=10)
    torch.save(torch_model.state_dict(), tmp_path / "checkpoint.pth")
    model = models.create_model(name, num_classes=10)
    variables = load_torchvision_weights(name, tmp_path / "checkpoint.pth", random_variables(model))
    variables["params"]["head"] = {"kernel": torch_model.fc.weight.detach().numpy().T,
                                   "bias": torch_model.fc.bias.detach().numpy()}

    images = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images)).numpy()
    outputs = np.asarray(model.apply(variables, images.transpose(0, 2, 3, 1)))
    difference = np.abs(outputs - expected).max()
    print(f"{name}: max |flax - torch| = {difference:.3g}, max |torch| = {np.abs(expected).max():.3g}")
    assert difference <= 1e-4 * max(1.0, np.abs(expected).max())


# --- WRN-28-10 ----------------------------------------------------------------------------------------------

def test_wrn28_10_parameter_count():
    # Convs have no bias; a BatchNorm over c channels has 2c parameters (scale, bias).
    # stem: conv 3x3 3->16                                                 432
    # group 1 (160 ch), block 1: BN(16) 32 + conv 16->160 23,040 + BN(160) 320 + conv 160->160 230,400
    #                            + 1x1 shortcut 16->160 2,560            = 256,352
    #                   blocks 2-4: 3 x (320 + 230,400 + 320 + 230,400)  = 1,384,320
    # group 2 (320 ch), block 1: 320 + 460,800 + 640 + 921,600 + 51,200 = 1,434,560
    #                   blocks 2-4: 3 x (640 + 921,600 + 640 + 921,600)  = 5,533,440
    # group 3 (640 ch), block 1: 640 + 1,843,200 + 1,280 + 3,686,400 + 204,800 = 5,736,320
    #                   blocks 2-4: 3 x (1,280 + 3,686,400 + 1,280 + 3,686,400) = 22,126,080
    # final BN(640) 1,280; head 640 x 10 + 10 = 6,410
    expected = 432 + 256_352 + 1_384_320 + 1_434_560 + 5_533_440 + 5_736_320 + 22_126_080 + 1_280 + 6_410
    assert expected == 36_479_194  # the paper's "36.5M"
    assert parameter_count(abstract_variables(models.create_model("wrn28_10", num_classes=10))) == expected


def test_wrn28_10_has_no_torchvision_weights():
    assert models.torch_weights("wrn28_10") is None


@pytest.fixture(scope="module")
def wrn():
    model = models.create_model("wrn28_10", num_classes=10, dropout_rate=0.3)
    images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
    train_step = jax.jit(lambda variables, key: model.apply(variables, images, train=True, mutable=["batch_stats"],
                                                            rngs={"dropout": key}))
    return model, random_variables(model), images, train_step


def test_wrn28_10_evaluation_is_deterministic(wrn):
    model, variables, images, _ = wrn
    evaluate = jax.jit(lambda variables: model.apply(variables, images))
    first = evaluate(variables)
    assert first.shape == (2, 10)
    np.testing.assert_array_equal(first, evaluate(variables))


def test_wrn28_10_dropout_only_in_training(wrn):
    _, variables, _, train_step = wrn
    first, _ = train_step(variables, jax.random.key(0))
    second, _ = train_step(variables, jax.random.key(1))
    assert first.shape == (2, 10)
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(first, train_step(variables, jax.random.key(0))[0])


def test_wrn28_10_training_updates_batch_statistics(wrn):
    _, variables, _, train_step = wrn
    _, updates = train_step(variables, jax.random.key(0))
    changed = jax.tree.map(lambda new, old: not np.allclose(new, old), updates["batch_stats"],
                           variables["batch_stats"])
    assert all(jax.tree.leaves(changed))


def test_wrn28_10_without_dropout_needs_no_rng():
    model = models.create_model("wrn28_10", num_classes=4)
    variables = jax.tree.map(jnp.ones_like, abstract_variables(model))
    outputs = jax.eval_shape(lambda: model.apply(variables, jnp.zeros((1, 48, 40, 3)), train=True,
                                                 mutable=["batch_stats"]))
    assert outputs[0].shape == (1, 4)
