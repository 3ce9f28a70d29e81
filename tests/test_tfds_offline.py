"""Tests for the quick network check before a tensorflow-datasets download (tfds_source, network).

No test sends a packet beyond loopback: socket.create_connection is faked in
every test, and a guard fails any other non-loopback connect.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import sys
import threading
import time
import types

import pytest

from oat_jax.data import DatasetUnavailable, cifar10, fashion_mnist, load_dataset, network, tfds_source

# A builder's checksums file lists URLs like these; the hosts are never contacted.
URLS = {
    "cifar10": ["https://cifar.example.invalid/cifar-10-binary.tar.gz"],
    "fashion_mnist": [
        "http://fm.example.invalid/train-images-idx3-ubyte.gz",
        "http://fm.example.invalid/t10k-images-idx3-ubyte.gz",
    ],
}
ALTERNATIVES = {
    "cifar10": ["OAT_DATA_DIR", "data_dir", cifar10.ARCHIVE, cifar10.FOLDER],
    "fashion_mnist": ["OAT_DATA_DIR", "data_dir", "apt-get install dataset-fashion-mnist"],
}


@pytest.fixture(autouse=True)
def offline_machine(tmp_path, monkeypatch):
    """No local copy anywhere, TensorFlow 'installed', and no real connection possible."""
    monkeypatch.delenv("OAT_DATA_DIR", raising=False)
    monkeypatch.setattr(fashion_mnist, "DEFAULT_DIR", str(tmp_path / "no-debian-copy"))
    (tmp_path / "tfds-empty").mkdir()
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds-empty"))
    monkeypatch.setattr(tfds_source, "_tensorflow_available", lambda: True)
    monkeypatch.setattr(socket, "create_connection", refuse)
    real_connect = socket.socket.connect

    def loopback_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            pytest.fail(f"a test tried to connect to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def refuse(address, timeout=None, *args, **kwargs):
    raise OSError(101, "Network is unreachable")


class FakeBuilder:
    """A tfds builder whose data is not prepared; download_and_prepare fails the test unless replaced."""

    def __init__(self, name, urls):
        self.name = name
        self.urls = urls
        self.downloads = 0

    @property
    def url_infos(self):
        return None if self.urls is None else {url: object() for url in self.urls}

    def is_prepared(self):
        return False

    def download_and_prepare(self, **kwargs):
        pytest.fail("download_and_prepare ran although no download host answered")

    def as_data_source(self, split):
        raise RuntimeError("not prepared")


@pytest.fixture
def fake_tfds(monkeypatch):
    """A stand-in tensorflow_datasets module; returns the builders it made, by name."""
    builders = {}
    module = types.ModuleType("tensorflow_datasets")

    def builder(name, data_dir=None, file_format=None):
        return builders.setdefault(name, FakeBuilder(name, URLS.get(name)))

    module.builder = builder
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)
    return builders


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist"])
@pytest.mark.parametrize("error", [OSError(101, "Network is unreachable"), socket.timeout("timed out")])
def test_offline_fails_at_once_naming_dataset_and_alternatives(fake_tfds, monkeypatch, name, error):
    tried = []

    def fail(address, timeout=None, *args, **kwargs):
        tried.append(address)
        raise error

    monkeypatch.setattr(socket, "create_connection", fail)
    start = time.monotonic()
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset(name)
    assert time.monotonic() - start < 3
    message = str(err.value)
    assert "\n" not in message
    assert f"no network: tensorflow-datasets cannot download {name!r}" in message
    assert all(alternative in message for alternative in ALTERNATIVES[name]), message
    assert tried == network.addresses_of(URLS[name])  # the builder's own hosts, each once
    assert f"{tried[0][0]}:{tried[0][1]} ({error.strerror or error})" in message


def test_slow_hosts_are_tried_together_within_the_timeout(monkeypatch):
    timeouts = []

    def slow(address, timeout=None, *args, **kwargs):
        timeouts.append(timeout)
        time.sleep(0.3)
        raise socket.timeout("timed out")

    addresses = [(f"h{i}.example.invalid", 443) for i in range(network.MAX_HOSTS)]
    monkeypatch.setattr(socket, "create_connection", slow)
    start = time.monotonic()
    why = network.unreachable(addresses)
    elapsed = time.monotonic() - start
    assert 0.25 < elapsed < 0.25 * len(addresses)  # in parallel, not one after another
    assert timeouts == [network.CONNECT_TIMEOUT_S] * len(addresses)
    assert why.count("(timed out)") == len(addresses)
    # The real budget: a few seconds per host, well under 30 s for all of them.
    assert network.CONNECT_TIMEOUT_S <= 5 and network.CONNECT_TIMEOUT_S <= network.DEADLINE_S < 30


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist"])
def test_a_hung_lookup_is_abandoned_at_the_deadline(fake_tfds, monkeypatch, name):
    # Name lookups ignore the connect timeout; the overall deadline bounds them.
    release = threading.Event()
    monkeypatch.setattr(network, "DEADLINE_S", 0.3)

    def hang(address, timeout=None, *args, **kwargs):
        release.wait(5)
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "create_connection", hang)
    try:
        start = time.monotonic()
        with pytest.raises(DatasetUnavailable, match=r"no answer within 0\.3 s"):
            load_dataset(name)
        assert time.monotonic() - start < 2
    finally:
        release.set()


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist"])
def test_reachable_host_lets_the_download_run(fake_tfds, monkeypatch, name):
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None, *a, **k: contextlib.nullcontext())
    calls = []

    def broken_download(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("HTTP 503 from the mirror")

    fake_tfds[name] = FakeBuilder(name, URLS[name])
    fake_tfds[name].download_and_prepare = broken_download
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset(name)
    message = str(err.value)
    assert calls == [{"file_format": "array_record"}]
    assert f"tensorflow-datasets failed to download and prepare {name!r}" in message
    assert "RuntimeError: HTTP 503 from the mirror" in message and "no network" not in message
    assert all(alternative in message for alternative in ALTERNATIVES[name]), message


def test_one_answering_host_is_enough(monkeypatch):
    def only_second(address, timeout=None, *args, **kwargs):
        if address[0] != "b.example.invalid":
            raise OSError(111, "Connection refused")
        return contextlib.nullcontext()

    monkeypatch.setattr(socket, "create_connection", only_second)
    assert network.unreachable([("a.example.invalid", 443), ("b.example.invalid", 80)]) is None


@pytest.mark.parametrize("urls", [None, [], ["gs://bucket/file"], "raises"])
def test_unknown_urls_fall_back_to_tfds_hosts(monkeypatch, urls):
    tried = []

    def fail(address, timeout=None, *args, **kwargs):
        tried.append(address)
        raise OSError(101, "Network is unreachable")

    class NoUrls(FakeBuilder):
        @property
        def url_infos(self):
            if urls == "raises":  # as tfds does where importlib_resources is missing
                raise ModuleNotFoundError("No module named 'importlib_resources'")
            return None if urls is None else dict.fromkeys(urls)

    monkeypatch.setattr(socket, "create_connection", fail)
    with pytest.raises(DatasetUnavailable, match="no network: tensorflow-datasets cannot download 'toy'"):
        tfds_source.require_network("toy", NoUrls("toy", None))
    assert tried == tfds_source.FALLBACK_HOSTS


def test_addresses_of():
    urls = [
        "https://a.example.invalid/x",
        "https://a.example.invalid/y",  # same host: tried once
        "http://b.example.invalid:8080/z",
        "ftp://c.example.invalid/w",
        "gs://bucket/v",  # no known port: skipped
        "http://d.example.invalid:notaport/u",  # malformed: skipped
        "https://e.example.invalid/t",
        "https://f.example.invalid/s",
    ]
    assert network.addresses_of(urls) == [
        ("a.example.invalid", 443),
        ("b.example.invalid", 8080),
        ("c.example.invalid", 21),
        ("e.example.invalid", 443),  # f is beyond MAX_HOSTS
    ]


def test_real_tfds_builder_is_checked_against_its_own_hosts(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    tried = []

    def fail(address, timeout=None, *args, **kwargs):
        tried.append(address)
        raise OSError(101, "Network is unreachable")

    def must_not_run(self, *args, **kwargs):
        pytest.fail("download_and_prepare ran although no download host answered")

    monkeypatch.setattr(socket, "create_connection", fail)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", must_not_run)
    with pytest.raises(DatasetUnavailable, match="no network: tensorflow-datasets cannot download 'cifar10'"):
        load_dataset("cifar10")
    builder = tfds.builder("cifar10", file_format="array_record")
    hosts = network.addresses_of(tfds_source.download_urls(builder))
    assert hosts and tried == hosts and hosts != tfds_source.FALLBACK_HOSTS


def test_mock_data_needs_no_network():
    # tfds.testing.mock_data's download_and_prepare downloads nothing: no check, no failure offline.
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):
        ds = load_dataset("cifar10")
    assert ds.source == "tensorflow-datasets:cifar10" and ds.train_images.shape == (3, 32, 32, 3)

