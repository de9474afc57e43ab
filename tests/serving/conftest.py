"""Fixtures of the serving tests: one checkpoint and one set of images per session."""
import pytest

from .helpers import good_images, write_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serving") / "xxs.safetensors")


@pytest.fixture(scope="session")
def images():
    return good_images()
