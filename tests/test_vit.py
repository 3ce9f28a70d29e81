"""ViT-L/16 (oat_jax.models.vit): torchvision's names and shapes, the weight conversion, dropout, size checks,
and parity with a NumPy multi-head attention and, where torch imports, with a ViT in plain torch.nn
(tests/torch_references.py) whose weights go through the registered conversion and the .pth loader."""
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oat_jax import models
from oat_jax.models import vit

KEYS = pathlib.Path(__file__).parent / "data" / "torchvision_keys" / "vit_l_16.json"
# A tiny ViT of the same code; the keywords are also torchvision's VisionTransformer's.
TINY = dict(patch_size=8, hidden_dim=32, num_layers=2, num_heads=4, mlp_dim=64)


def _tiny(dropout_rate: float = 0.0) -> vit.VisionTransformer:
    return vit.VisionTransformer(num_classes=5, dropout_rate=dropout_rate, **TINY)


@pytest.fixture(scope="session")
def tiny():
    """(model, variables, images) of the tiny ViT on 32x32 images: 16 patches + the class token. The variables
    are random draws of init's shapes: a real init compiles a sampler per shape, which takes seconds."""
    model = _tiny()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), images)
    return model, jax.tree.map(lambda leaf: rng.normal(0, 0.2, leaf.shape).astype(leaf.dtype), abstract), images


def _with_head(tensors: dict) -> dict:
    """to_flax of a whole torch state dict; the head, which to_flax leaves out, converted here by hand."""
    tensors = dict(tensors)
    weight, bias = (tensors.pop(key) for key in vit.TORCH_WEIGHTS.head_keys)
    variables = vit.to_flax(tensors)
    assert not tensors, f"to_flax left tensors unused: {sorted(tensors)}"
    variables["params"]["head"] = {"kernel": weight.T, "bias": bias}
    return variables


def _assert_same_tree(actual, expected, **tolerance):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tolerance), actual, expected)


def test_vit_l16_has_torchvisions_names_shapes_and_size():
    record = json.loads(KEYS.read_text())
    model = models.create_model("vit_l16", num_classes=1000)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    tensors = jax.eval_shape(vit.to_torch, abstract)
    assert {name: list(tensor.shape) for name, tensor in tensors.items()} == record["state_dict"]
    assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract)) == record["num_parameters"] == 304_326_632
    assert jax.eval_shape(_with_head, tensors) == abstract


def test_vit_l16_is_registered_with_torchvisions_checkpoint():
    weights = models.torch_weights("vit_l16")
    assert weights.to_flax is vit.to_flax and weights.to_torch is vit.to_torch
    assert weights.head_keys == ("heads.head.weight", "heads.head.bias")
    assert weights.standard_file == "vit_l_16-852ce7e3.pth"
    model = models.create_model("vit_l16", num_classes=3, dropout_rate=0.1)
    assert (model.patch_size, model.hidden_dim, model.num_layers, model.num_heads, model.mlp_dim) == (16, 1024, 24, 16,
                                                                                                      4096)
    assert (model.num_classes, model.dropout_rate) == (3, 0.1)


def test_round_trip_gives_identical_variables_and_outputs(tiny):
    model, variables, images = tiny
    back = _with_head(vit.to_torch(variables))
    _assert_same_tree(back, variables, rtol=0, atol=0)
    np.testing.assert_array_equal(model.apply(back, images), model.apply(variables, images))


def test_missing_tensor_is_a_keyerror_naming_it(tiny):
    tensors = vit.to_torch(tiny[1])
    del tensors["encoder.layers.encoder_layer_1.mlp.3.bias"]
    with pytest.raises(KeyError, match=r"encoder\.layers\.encoder_layer_1\.mlp\.3\.bias"):
        _with_head(tensors)


def test_dropout_acts_only_in_training(tiny):
    plain, variables, images = tiny
    model = _tiny(dropout_rate=0.5)
    evaluation = model.apply(variables, images)
    np.testing.assert_array_equal(evaluation, plain.apply(variables, images))
    trained = [model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(seed)}) for seed in (0, 1)]
    assert not np.allclose(trained[0], evaluation)
    assert not np.allclose(trained[0], trained[1])
    # Rate 0 (torchvision's default) needs no dropout rng and changes nothing.
    np.testing.assert_array_equal(plain.apply(variables, images, train=True), evaluation)


@pytest.mark.parametrize("shape", [(1, 30, 32, 3), (1, 32, 36, 3), (1, 4, 4, 3)])
def test_sides_not_multiples_of_the_patch_are_refused(shape):
    with pytest.raises(ValueError, match="multiples of 8"):
        _tiny().init(jax.random.key(0), jnp.zeros(shape))


def test_images_of_another_size_than_at_init_are_refused(tiny):
    model, variables, _ = tiny
    with pytest.raises(ValueError, match="position embedding holds 16 patches but these images give 36"):
        model.apply(variables, jnp.zeros((1, 48, 48, 3)))


def _numpy_attention(x, in_weight, in_bias, out_weight, out_bias, num_heads):
    """torch.nn.MultiheadAttention's self-attention written out in NumPy; weights in torch's (out, in) layout."""
    batch, tokens, width = x.shape
    query, key, value = np.split(x @ in_weight.T + in_bias, 3, axis=-1)

    def heads(a):  # (B, T, D) -> (B, heads, T, D / heads)
        return a.reshape(batch, tokens, num_heads, width // num_heads).transpose(0, 2, 1, 3)

    scores = heads(query) @ heads(key).transpose(0, 1, 3, 2) / np.sqrt(width // num_heads)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    attended = (weights @ heads(value)).transpose(0, 2, 1, 3).reshape(batch, tokens, width)
    return attended @ out_weight.T + out_bias


def test_attention_matches_numpy_through_the_conversion(tiny):
    rng = np.random.default_rng(0)
    width, num_heads = TINY["hidden_dim"], TINY["num_heads"]
    prefix = "encoder.layers.encoder_layer_1.self_attention."
    shapes = {"in_proj_weight": (3 * width, width), "in_proj_bias": (3 * width,),
              "out_proj.weight": (width, width), "out_proj.bias": (width,)}
    torch_attention = {name: rng.normal(0, width ** -0.5, shape) for name, shape in shapes.items()}
    tensors = vit.to_torch(tiny[1])
    tensors.update({prefix + name: value.astype(np.float32) for name, value in torch_attention.items()})
    params = _with_head(tensors)["params"]["encoder"]["encoder_layer_1"]["self_attention"]
    x = rng.normal(size=(2, 7, width))
    ours = vit.SelfAttention(num_heads).apply({"params": params}, jnp.asarray(x, jnp.float32))
    expected = _numpy_attention(x, *torch_attention.values(), num_heads)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


# --- against an independent PyTorch reference (tests/torch_references.py) ------------------------------------

def _torch_references():
    pytest.importorskip("torch")
    import torch_references
    return torch_references


@pytest.fixture(scope="session")
def reference():
    """The tiny ViT's architecture in plain torch.nn with random weights, in eval mode, for 32x32 images."""
    references = _torch_references()
    return references.randomize(references.VisionTransformer(image_size=32, num_classes=5, **TINY))


def _registered_conversion(reference) -> dict:
    """The reference's state dict through vit_l16's registered to_flax (which reads the size from the names),
    the head converted by hand."""
    tensors = {name: tensor.numpy().copy() for name, tensor in reference.state_dict().items()}
    weight, bias = (tensors.pop(key) for key in models.torch_weights("vit_l16").head_keys)
    variables = models.torch_weights("vit_l16").to_flax(tensors)
    assert not tensors, f"to_flax left tensors unused: {sorted(tensors)}"
    variables["params"]["head"] = {"kernel": weight.T, "bias": bias}
    return variables


def _torch_outputs(reference, images: np.ndarray) -> np.ndarray:
    """The reference's outputs for NHWC ``images``."""
    import torch
    with torch.no_grad():
        return reference(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def test_torch_reference_converts_to_vit_l16():
    """At full size and without computing anything (torch's meta device, jax.eval_shape): the reference's state
    dict is torchvision's vit_l_16's, names, shapes and order, and the registered to_flax turns it into exactly
    vit_l16's variables (less the head)."""
    references, torch = _torch_references(), pytest.importorskip("torch")
    with torch.device("meta"):
        reference = references.VisionTransformer(image_size=224, num_classes=1000, **vit.VIT_L16)
    recorded = json.loads(KEYS.read_text())["state_dict"]
    assert [(name, list(tensor.shape)) for name, tensor in reference.state_dict().items()] == list(recorded.items())

    shapes = {name: jax.ShapeDtypeStruct(tuple(tensor.shape), jnp.float32)
              for name, tensor in reference.state_dict().items() if not name.startswith("heads.")}
    converted = jax.eval_shape(models.torch_weights("vit_l16").to_flax, shapes)
    expected = jax.eval_shape(models.create_model("vit_l16", num_classes=1000).init, jax.random.key(0),
                              jnp.zeros((1, 224, 224, 3)))
    del expected["params"]["head"]
    assert jax.tree.map(lambda leaf: leaf.shape, converted) == jax.tree.map(lambda leaf: leaf.shape, expected)


def test_converted_outputs_equal_the_torch_reference(tiny, reference):
    model, _, images = tiny
    expected = _torch_outputs(reference, images)
    ours = model.apply(_registered_conversion(reference), images)
    difference = np.abs(np.asarray(ours) - expected).max()
    print(f"tiny ViT: max |flax - torch| = {difference:.3g}, max |torch| = {np.abs(expected).max():.3g}")
    assert difference <= 1e-4 * max(1.0, np.abs(expected).max())


def test_pth_checkpoint_of_the_torch_reference_loads_as_its_conversion(tiny, reference, tmp_path):
    """The way pretrained weights come in: torch.save of the reference's state dict, read back by the project's
    loader (as vit_l16's, whose conversion takes any size) into fresh variables, gives exactly the conversion
    whose outputs the test above compares; the fresh head stays."""
    import torch
    from oat_jax.models.weights import load_torchvision_weights
    fresh = tiny[1]
    torch.save(reference.state_dict(), tmp_path / "vit.pth")
    loaded = load_torchvision_weights("vit_l16", tmp_path / "vit.pth", fresh)
    converted = _registered_conversion(reference)
    np.testing.assert_array_equal(loaded["params"]["head"]["kernel"], fresh["params"]["head"]["kernel"])
    loaded["params"]["head"] = converted["params"]["head"]
    _assert_same_tree(loaded, converted, rtol=0, atol=0)
