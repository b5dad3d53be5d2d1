"""The suite writes only into temporary folders: caches a test fills by default land in conftest's TEST_CACHES."""
import os
import tempfile

from conftest import TEST_CACHES


def _listing(path):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs) if os.path.isdir(path) else None


def test_default_caches_are_temporary():
    from qmilora.config import default_cache_dir

    home = os.path.expanduser("~")
    for path in (default_cache_dir(), os.environ["HF_HOME"], os.environ["HF_DATASETS_CACHE"], os.environ["MPLCONFIGDIR"]):
        assert path.startswith(TEST_CACHES + os.sep), path
    assert TEST_CACHES.startswith(os.path.realpath(tempfile.gettempdir())) or TEST_CACHES.startswith(tempfile.gettempdir())
    assert not TEST_CACHES.startswith(os.path.join(home, ".cache"))


def test_prepare_without_cache_dir_leaves_the_users_cache_alone(tiny_ckpt):
    """A preparation with every default writes its cache entry into the temporary cache, nothing under ~/.cache."""
    from qmilora import prepare_model

    user_cache = os.path.join(os.path.expanduser("~"), ".cache", "qmilora")
    before = _listing(user_cache)
    prepare_model(tiny_ckpt[0], rank=4)
    assert _listing(user_cache) == before
    assert any(f.endswith(".safetensors") for f in _listing(os.environ["QMILORA_CACHE"]) or [])
