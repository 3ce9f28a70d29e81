"""ResNet-18, Wide ResNet-50-2 (torchvision's architectures) and WRN-28-10 (CIFAR).

A real ``model.init`` compiles one random sampler per parameter shape (about 20 s on two CPU cores), so the
tests take shapes from ``jax.eval_shape`` and fill them with numpy random values instead."""
import copy
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oat_jax import models
from oat_jax.models import resnet, weights
from conftest import abstract_variables, compiled_apply, random_variables

KEYS_DIR = pathlib.Path(__file__).parent / "data" / "torchvision_keys"
TORCHVISION_PARAMETERS = {"resnet18": 11_689_512, "wide_resnet50_2": 68_883_240}  # 1000-class head
CONVERTIBLE = sorted(TORCHVISION_PARAMETERS)


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
    # (the forward passes are checked against PyTorch references below)
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


# --- against an independent PyTorch reference (tests/torch_references.py) ------------------------------------

# Each case: the Flax model, the conversion of its torch-named tensors, and the same architecture in plain
# torch.nn. ResNet-18 is the registered model and conversion themselves. The full Wide ResNet-50-2 takes about
# 30 s to compile on two CPU cores, so its case keeps its bottleneck of doubled width but has blocks [2, 1, 1, 1]
# (a projection shortcut in every stage, and a block with an identity one); its conversion is the layer table
# the registered one is built from, and test_torch_reference_converts_to_the_registered_model covers full size.
SHORT_WIDE_BLOCKS = (2, 1, 1, 1)
REFERENCE_CASES = ["resnet18", "wide_resnet50_2_short"]
REFERENCE_IMAGES = (8, 3, 32, 32)  # NCHW; 8 images, so even the 1x1 maps of stage 4 give BN 8 values a channel


def _torch_references():
    pytest.importorskip("torch")
    import torch_references
    return torch_references


def _reference_case(case: str):
    """(torch reference with random weights and statistics in eval mode, Flax model, to_flax, its converted
    variables with the head) for a REFERENCE_CASES entry."""
    references = _torch_references()
    if case == "resnet18":
        reference = references.resnet18(num_classes=10)
        model, to_flax = models.create_model("resnet18", num_classes=10), models.torch_weights("resnet18").to_flax
    else:
        reference = references.ResNet(references.Bottleneck, SHORT_WIDE_BLOCKS, num_classes=10, width_per_group=128)
        model = resnet.ResNet(block=resnet.Bottleneck, stage_sizes=SHORT_WIDE_BLOCKS, num_classes=10,
                              width_per_group=128)
        layers = resnet.torch_layers(resnet.Bottleneck, SHORT_WIDE_BLOCKS)
        to_flax = functools.partial(weights.layers_to_flax, layers=layers)
    references.randomize(reference, seed=1)
    return reference, model, to_flax, _convert(to_flax, _numpy_state(reference))


def _numpy_state(reference) -> dict[str, np.ndarray]:
    return {key: value.numpy().copy() for key, value in reference.state_dict().items()}  # not torch's memory


def _convert(to_flax, tensors: dict[str, np.ndarray]) -> dict:
    """Flax variables of a torch ResNet's state dict: the body through ``to_flax``, the head ("fc") by hand."""
    tensors = dict(tensors)
    head = {"kernel": tensors.pop("fc.weight").T, "bias": tensors.pop("fc.bias")}
    variables = to_flax(tensors)
    assert not tensors, f"to_flax left tensors unused: {sorted(tensors)}"
    variables["params"]["head"] = head
    return variables


@pytest.fixture(scope="session", params=REFERENCE_CASES)
def reference_case(request):
    reference, model, to_flax, variables = _reference_case(request.param)
    images = np.random.default_rng(2).normal(size=REFERENCE_IMAGES).astype(np.float32)
    return request.param, reference, model, to_flax, variables, images


def _flax_images(images: np.ndarray) -> jax.Array:
    return jnp.asarray(images.transpose(0, 2, 3, 1))  # NCHW -> NHWC


def _assert_close(name: str, ours, expected, scale: float = 1e-4):
    """|ours - expected| <= scale * max(1, max |expected|): float32 rounding through a deep network."""
    ours, expected = np.asarray(ours), np.asarray(expected)
    difference, size = np.abs(ours - expected).max(), np.abs(expected).max()
    print(f"{name}: max |flax - torch| = {difference:.3g}, max |torch| = {size:.3g}")
    assert difference <= scale * max(1.0, size), name


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_torch_reference_converts_to_the_registered_model(name):
    """At full size and without computing anything (torch's meta device, jax.eval_shape): the reference's state
    dict is torchvision's, names, shapes and order, and the registered to_flax turns it into exactly the
    registered model's variables (less the head)."""
    references, torch = _torch_references(), pytest.importorskip("torch")
    with torch.device("meta"):
        reference = getattr(references, name)(num_classes=1000)
    recorded = json.loads((KEYS_DIR / f"{name}.json").read_text())["state_dict"]
    assert [(key, list(value.shape)) for key, value in reference.state_dict().items()] == list(recorded.items())

    shapes = {key: jax.ShapeDtypeStruct(tuple(value.shape), jnp.float32)
              for key, value in reference.state_dict().items() if not key.startswith("fc.")}
    converted = jax.eval_shape(models.torch_weights(name).to_flax, shapes)
    expected = abstract_variables(models.create_model(name, num_classes=1000))
    del expected["params"]["head"]
    assert jax.tree.map(lambda leaf: leaf.shape, converted) == jax.tree.map(lambda leaf: leaf.shape, expected)


def test_converted_outputs_equal_the_torch_references(reference_case):
    name, reference, model, _, variables, images = reference_case
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        expected = reference(torch.from_numpy(images)).numpy()
    _assert_close(f"{name} eval outputs", jax.jit(model.apply)(variables, _flax_images(images)), expected)


def test_pth_checkpoint_of_the_torch_reference_loads_as_its_conversion(tmp_path):
    """The way pretrained weights come in: torch.save of the reference's state dict, read back by the project's
    loader into fresh random variables, gives exactly the variables whose outputs the test above compares (the
    fresh head aside, which the loader keeps)."""
    torch = pytest.importorskip("torch")
    from oat_jax.models.weights import load_torchvision_weights
    reference, model, _, converted = _reference_case("resnet18")
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    fresh = random_variables(model, seed=3)
    loaded = load_torchvision_weights("resnet18", tmp_path / "resnet18.pth", fresh)
    np.testing.assert_array_equal(loaded["params"]["head"]["kernel"], fresh["params"]["head"]["kernel"])
    loaded["params"]["head"] = converted["params"]["head"]
    assert jax.tree.structure(loaded) == jax.tree.structure(converted)
    jax.tree.map(np.testing.assert_array_equal, loaded, converted)


def test_training_step_batch_norm_equals_the_torch_references(reference_case):
    """One training-mode forward pass in both: the outputs (normalised by the batch's statistics) and the updated
    running statistics. torch's momentum 0.1 is Flax's 0.9, so the running means agree. The running variances
    differ by design (oat_jax/models/resnet.py, ``_norm``): torch averages in the unbiased batch variance
    (divided by n - 1, n = batch x height x width values a channel), Flax the biased one (divided by n). The
    check takes torch's update with its batch term rescaled by (n - 1) / n: Flax's must equal that."""
    name, reference, model, to_flax, variables, images = reference_case
    torch = pytest.importorskip("torch")
    reference = copy.deepcopy(reference).train()
    values_per_channel = {}  # torch name of each BatchNorm -> n

    def count_values(name):
        def hook(module, inputs, output):
            values_per_channel[name] = inputs[0].numel() // inputs[0].shape[1]
        return hook

    for module_name, module in reference.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.momentum == 0.1
            module.register_forward_hook(count_values(module_name))
    before = _numpy_state(reference)
    with torch.no_grad():
        expected_outputs = reference(torch.from_numpy(images)).numpy()
    after = _numpy_state(reference)
    train = jax.jit(lambda variables, images: model.apply(variables, images, train=True, mutable=["batch_stats"]))
    outputs, updates = train(variables, _flax_images(images))
    _assert_close(f"{name} training outputs", outputs, expected_outputs)

    expected = dict(after)
    for key, n in values_per_channel.items():
        old, new = (state[f"{key}.running_var"].astype(np.float64) for state in (before, after))
        batch_term = new - 0.9 * old  # 0.1 x the unbiased batch variance
        expected[f"{key}.running_var"] = (0.9 * old + batch_term * (n - 1) / n).astype(np.float32)
    expected_stats = _convert(to_flax, expected)["batch_stats"]
    torch_stats = _convert(to_flax, after)["batch_stats"]
    for statistic in ("mean", "var"):
        pick = functools.partial(_leaves_named, statistic)
        _assert_close(f"{name} running {statistic}s", pick(updates["batch_stats"]), pick(expected_stats))
    deviation = np.abs(_leaves_named("var", updates["batch_stats"]) - _leaves_named("var", torch_stats)).max()
    print(f"{name}: max |flax - torch| of the running variances as they are (biased vs unbiased): {deviation:.3g}")


def _leaves_named(name: str, tree) -> np.ndarray:
    """All leaves called ``name`` (e.g. every BatchNorm's "var"), concatenated in a fixed order."""
    leaves = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if path[-1].key == name]
    return np.concatenate([np.ravel(leaf) for leaf in leaves])


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


@pytest.fixture(scope="session")
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
