import numpy as np

from oat_jax import input_pipeline


def test_batches_cover_every_sample_once_and_mask_the_padding():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    labels = np.arange(10)
    order = np.array([3, 1, 4, 0, 5, 9, 2, 6, 8, 7])
    seen = []
    shapes = set()
    for batch_images, batch_labels, mask in input_pipeline.batches(images, labels, order, batch_size=4):
        shapes.add(batch_images.shape)
        seen.extend(batch_labels[mask].tolist())
        assert (batch_images[mask, 0, 0, 0] == batch_labels[mask]).all()
    assert shapes == {(4, 1, 1, 1)}  # fixed shape: one compilation
    assert seen == order.tolist()


def test_last_batch_mask_counts_only_real_rows():
    masks = [m for _, _, m in input_pipeline.batches(np.zeros((5, 2, 2, 1), np.uint8), np.zeros(5), np.arange(5), 3)]
    assert [m.tolist() for m in masks] == [[True] * 3, [True, True, False]]


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = input_pipeline.epoch_order(100, seed=3, epoch=7)
    assert (a == input_pipeline.epoch_order(100, seed=3, epoch=7)).all()
    assert sorted(a.tolist()) == list(range(100))
    assert not (a == input_pipeline.epoch_order(100, seed=3, epoch=8)).all()
    assert not (a == input_pipeline.epoch_order(100, seed=4, epoch=7)).all()


def test_eval_order_unshuffled_is_identity():
    assert input_pipeline.eval_order(6, seed=0, shuffle=False).tolist() == list(range(6))
    shuffled = input_pipeline.eval_order(50, seed=0, shuffle=True)
    assert sorted(shuffled.tolist()) == list(range(50)) and shuffled.tolist() != list(range(50))


def test_channel_statistics_match_numpy():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(9000, 4, 4, 3)).astype(np.uint8)
    mean, std = input_pipeline.channel_statistics(images)
    pixels = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-5)
