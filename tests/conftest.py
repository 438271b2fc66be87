import ctypes
import os
import sys

import pytest

# Tests import the checkout, not an installed copy elsewhere.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CORPUS = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> list[str]:
    """``--data-path/--tokenizer-model`` flags of tinyshakespeare, preprocessed once per session."""
    from megatron_poet.data import preprocess_corpus

    prefix = str(tmp_path_factory.mktemp("data") / "shakespeare")
    stats = preprocess_corpus(CORPUS, prefix, train_tokenizer_vocab_size=320, append_eod=True, progress=False)
    return ["--data-path", prefix, "--tokenizer-model", stats.tokenizer_path, "--data-cache-path",
            str(tmp_path_factory.mktemp("cache"))]


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """The suite leaves no process running: orphans of the tests' subprocesses are re-parented to
    this process (Linux child subreaper), so whatever is still running at the end is found here,
    killed, and reported as an error."""
    if not sys.platform.startswith("linux") or ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0):
        yield
        return
    yield
    import psutil

    left = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)  # an orphan that ended: reap it
                continue
            left.append(f"{child.pid}: {' '.join(child.cmdline())[:200]}")
            child.kill()
        except (psutil.NoSuchProcess, ChildProcessError):
            pass
    if left:
        pytest.fail("processes left running by the tests (now killed):\n  " + "\n  ".join(left))
