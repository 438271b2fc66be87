import os
import sys

import pytest

# Tests import the checkout, not an installed copy elsewhere.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CORPUS = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> list[str]:
    """``--data-path/--tokenizer-model`` flags of tinyshakespeare, preprocessed once per session."""
    from megatron_poet.data import preprocess_corpus

    prefix = str(tmp_path_factory.mktemp("data") / "shakespeare")
    stats = preprocess_corpus(CORPUS, prefix, train_tokenizer_vocab_size=320, append_eod=True, progress=False)
    return ["--data-path", prefix, "--tokenizer-model", stats.tokenizer_path, "--data-cache-path",
            str(tmp_path_factory.mktemp("cache"))]
