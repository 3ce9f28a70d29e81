"""Fine-tuning a real pretrained network through the project's state and steps: torchvision-named weights
in, BatchNorm statistics updated in training and used in evaluation, a new head."""
import jax
import numpy as np
import pytest

from oat_jax import state as state_lib
from oat_jax import steps
from oat_jax.config_schema import finetune_config
from oat_jax.models import weights

pytest.importorskip("safetensors")

SHAPE = (32, 32, 3)


def test_resnet18_state_starts_from_the_weights_file_and_trains_its_batchnorm(tmp_path):
    config = finetune_config("bar", "resnet18")
    model = state_lib.cached_model("resnet18", 6)
    # A "pretrained" file: another seed's network, written under torchvision's names with a 1000-class head.
    source = state_lib.create_train_state(state_lib.cached_model("resnet18", 1000), SHAPE, config, seed=7)
    source_variables = jax.device_get(source.variables())
    # Give the BatchNorm statistics values an initialisation never has, so that loading them is visible.
    rng = np.random.default_rng(0)
    source_variables["batch_stats"] = jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32),
                                                   source_variables["batch_stats"])
    path = tmp_path / "resnet18.safetensors"
    weights.export_torchvision_weights("resnet18", source_variables, path)

    state = state_lib.create_train_state(model, SHAPE, config, seed=0, pretrained=str(path))
    fresh = state_lib.create_train_state(model, SHAPE, config, seed=0)
    np.testing.assert_array_equal(state.params["conv1"]["kernel"], source_variables["params"]["conv1"]["kernel"])
    np.testing.assert_array_equal(state.batch_stats["bn1"]["var"], source_variables["batch_stats"]["bn1"]["var"])
    np.testing.assert_array_equal(state.params["head"]["kernel"], fresh.params["head"]["kernel"])  # new head
    assert state.params["head"]["kernel"].shape == (512, 6)

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4,) + SHAPE, dtype=np.uint8)
    labels = np.array([0, 1, 2, 5], np.int32)
    mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
    loaded_var = np.asarray(state.batch_stats["bn1"]["var"])
    before = np.asarray(state.apply_fn(state.variables(), steps.normalise(images, mean, std), train=False))
    trained, loss, _ = steps.train_step(state, (images, labels, np.ones(4, bool)), mean, std, objective="oat")
    assert np.isfinite(loss)
    assert not np.allclose(trained.batch_stats["bn1"]["var"], loaded_var)  # running statistics moved
    assert not np.allclose(trained.params["conv1"]["kernel"], source_variables["params"]["conv1"]["kernel"])
    # Evaluation uses the running statistics, so one sample's output does not depend on its batch.
    alone = trained.apply_fn(trained.variables(), steps.normalise(images[:1], mean, std), train=False)
    batch = trained.apply_fn(trained.variables(), steps.normalise(images, mean, std), train=False)
    np.testing.assert_allclose(alone[0], batch[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(before, batch)
