import os

# Tests never touch the network: without these, each missing-file lookup retries for ~23 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread beats two on a 2-core machine


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Unit tests never read or write the user's real cache."""
    if "POST_TEST_REAL_CACHE" not in os.environ:
        monkeypatch.setenv("POST_CACHE_DIR", str(tmp_path_factory.mktemp("post-cache")))
