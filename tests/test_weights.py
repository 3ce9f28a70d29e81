"""torchvision checkpoints <-> Flax variables: round trips through files, and every way a file can be wrong."""
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from conftest import compiled_apply, random_variables

from oat_jax import models
from oat_jax.models.weights import (
    WeightsError,
    export_torchvision_weights,
    load_torchvision_weights,
    read_tensors,
    resolve_weights_path,
)

IMAGES = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)


def _flat(variables):
    return traverse_util.flatten_dict(variables)


def _with_head(variables, head):
    return {**variables, "params": {**variables["params"], "head": head}}


def _needs_reader(suffix):
    """Skips a test of a file type whose optional package is not installed."""
    pytest.importorskip({".safetensors": "safetensors.numpy", ".pth": "torch"}.get(suffix, "numpy"))


@pytest.mark.parametrize("name, suffix", [("resnet18", ".safetensors"), ("resnet18", ".npz"),
                                          ("wide_resnet50_2", ".npz")])
def test_round_trip_keeps_every_tensor_and_the_new_head(name, suffix, tmp_path):
    _needs_reader(suffix)
    model = models.create_model(name, num_classes=10)
    original = random_variables(model, seed=0)
    export_torchvision_weights(name, original, tmp_path / f"weights{suffix}")

    fresh = random_variables(models.create_model(name, num_classes=7), seed=1)
    loaded = load_torchvision_weights(name, tmp_path / f"weights{suffix}", fresh)

    assert _flat(loaded).keys() == _flat(fresh).keys()
    for key, value in _flat(loaded).items():
        expected = fresh if key[1] == "head" else original
        np.testing.assert_array_equal(value, _flat(expected)[key], err_msg="/".join(key))
    # The loaded body with the original head computes the original outputs.
    apply = compiled_apply(name, 10)
    outputs = apply(_with_head(loaded, original["params"]["head"]), IMAGES)
    np.testing.assert_array_equal(outputs, apply(original, IMAGES))


@pytest.fixture(scope="session")
def resnet18_tensors(tmp_path_factory):
    """resnet18's torch-named tensors (10-class head) and a fresh 10-class initialisation to load them into."""
    model = models.create_model("resnet18", num_classes=10)
    path = tmp_path_factory.mktemp("weights") / "resnet18.npz"
    export_torchvision_weights("resnet18", random_variables(model, seed=0), path)
    return read_tensors(path), random_variables(model, seed=1)


def _load_changed(tmp_path, resnet18_tensors, change):
    tensors, fresh = resnet18_tensors
    tensors = dict(tensors)
    change(tensors)
    np.savez(tmp_path / "changed.npz", **tensors)
    return load_torchvision_weights("resnet18", tmp_path / "changed.npz", fresh)


def test_missing_tensor_is_named(tmp_path, resnet18_tensors):
    with pytest.raises(WeightsError, match=r"missing.*layer3\.1\.bn2\.running_var"):
        _load_changed(tmp_path, resnet18_tensors, lambda tensors: tensors.pop("layer3.1.bn2.running_var"))


def test_unexpected_tensor_is_named(tmp_path, resnet18_tensors):
    with pytest.raises(WeightsError, match=r"unexpected.*layer5\.0\.conv1\.weight"):
        _load_changed(tmp_path, resnet18_tensors,
                      lambda tensors: tensors.update({"layer5.0.conv1.weight": np.zeros((1, 1, 3, 3))}))


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path, resnet18_tensors):
    with pytest.raises(WeightsError, match=r"layer2\.0\.conv1\.weight has shape \(128, 64, 5, 5\).*"
                                           r"expects \(128, 64, 3, 3\)"):
        _load_changed(tmp_path, resnet18_tensors,
                      lambda tensors: tensors.update({"layer2.0.conv1.weight": np.zeros((128, 64, 5, 5))}))


def test_head_of_any_size_and_absent_batch_counters_are_accepted(tmp_path, resnet18_tensors):
    def change(tensors):
        tensors.update({"fc.weight": np.zeros((1000, 512)), "fc.bias": np.zeros(1000)})
        for key in [key for key in tensors if key.endswith("num_batches_tracked")]:
            del tensors[key]  # torchvision's older files have no step counters
    loaded = _load_changed(tmp_path, resnet18_tensors, change)
    assert loaded["params"]["head"]["kernel"].shape == (512, 10)


def test_to_flax_raises_key_error_naming_the_missing_tensor(resnet18_tensors):
    tensors = {key: value for key, value in resnet18_tensors[0].items() if key != "layer1.0.conv2.weight"}
    with pytest.raises(KeyError, match="layer1.0.conv2.weight"):
        models.torch_weights("resnet18").to_flax(tensors)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pth"])
def test_corrupt_file_is_named(suffix, tmp_path):
    _needs_reader(suffix)
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"these are not weights" * 10)
    with pytest.raises(WeightsError, match=f"broken{suffix}"):
        read_tensors(path)


def test_unknown_extension_and_missing_file_are_named(tmp_path):
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"weights\.h5.*\.h5.*\.safetensors"):
        read_tensors(tmp_path / "weights.h5")
    with pytest.raises(WeightsError, match=r"absent\.npz does not exist"):
        read_tensors(tmp_path / "absent.npz")
    with pytest.raises(WeightsError, match=r"\.pkl"):
        export_torchvision_weights("resnet18", {}, tmp_path / "weights.pkl")


def test_model_without_conversion_names_those_with_one(tmp_path):
    for call in (lambda: load_torchvision_weights("wrn28_10", tmp_path / "any.npz", {}),
                 lambda: resolve_weights_path("torchvision:wrn28_10")):
        with pytest.raises(WeightsError, match=r"wrn28_10.*resnet18.*wide_resnet50_2"):
            call()


def test_pytorch_checkpoints_are_read_also_when_nested(tmp_path):
    torch = pytest.importorskip("torch")
    weights = {"conv.weight": torch.arange(6.0).reshape(1, 2, 3), "half": torch.ones(2, dtype=torch.bfloat16)}
    torch.save({"epoch": 3, "state_dict": weights}, tmp_path / "checkpoint.pth")
    tensors = read_tensors(tmp_path / "checkpoint.pth")
    np.testing.assert_array_equal(tensors["conv.weight"], np.arange(6.0).reshape(1, 2, 3))
    assert tensors["half"].dtype == np.float32


@pytest.mark.parametrize("module, suffix", [("torch", ".pth"), ("safetensors.numpy", ".safetensors")])
def test_missing_optional_package_says_what_to_install(module, suffix, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    (tmp_path / f"weights{suffix}").write_bytes(b"")
    with pytest.raises(WeightsError, match=f"pip install {module.split('.')[0]}"):
        read_tensors(tmp_path / f"weights{suffix}")


@pytest.fixture
def weight_dirs(tmp_path, monkeypatch):
    """Empty $OAT_WEIGHTS_DIR, $TORCH_HOME/hub/checkpoints and ~/.cache/torch/hub/checkpoints (HOME moved)."""
    dirs = [tmp_path / "oat", tmp_path / "torch_home" / "hub" / "checkpoints",
            tmp_path / "home" / ".cache" / "torch" / "hub" / "checkpoints"]
    for folder in dirs:
        folder.mkdir(parents=True)
    monkeypatch.setenv("OAT_WEIGHTS_DIR", str(dirs[0]))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return dirs


def test_standard_file_is_found_in_order(weight_dirs):
    for folder in reversed(weight_dirs):  # each new copy is in a folder searched earlier
        (folder / "resnet18-f37072fd.pth").write_bytes(b"")
        assert resolve_weights_path("torchvision:resnet18") == str(folder / "resnet18-f37072fd.pth")


def test_standard_file_not_found_says_where_it_looked(weight_dirs):
    with pytest.raises(WeightsError) as error:
        resolve_weights_path("torchvision:wide_resnet50_2")
    message = str(error.value)
    assert "wide_resnet50_2-95faca4d.pth" in message and "ImageNet" in message
    assert all(str(folder) in message for folder in weight_dirs)


def test_plain_path_is_checked(tmp_path):
    (tmp_path / "mine.npz").write_bytes(b"")
    assert resolve_weights_path(str(tmp_path / "mine.npz")) == str(tmp_path / "mine.npz")
    with pytest.raises(WeightsError, match="other.npz"):
        resolve_weights_path(str(tmp_path / "other.npz"))


def test_exported_file_loads_into_torch_names_and_dtypes(tmp_path, resnet18_tensors):
    tensors, _ = resnet18_tensors
    assert tensors["bn1.num_batches_tracked"].dtype == np.int64 and tensors["bn1.num_batches_tracked"].shape == ()
    assert tensors["conv1.weight"].shape == (64, 3, 7, 7) and tensors["fc.weight"].shape == (10, 512)
    assert jnp.asarray(tensors["conv1.weight"]).dtype == jnp.float32
