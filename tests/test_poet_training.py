"""A small model converted with convert_model trains on CPU across several merges."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example():
    spec = importlib.util.spec_from_file_location("train_tiny_poet", os.path.join(ROOT, "examples", "train_tiny_poet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_gpt_loss_falls_across_merges(capsys):
    example = load_example()
    text = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
    losses = example.main(["--text", text, "--steps", "120", "--seq-length", "32", "--poet-merge-interval", "30",
                           "--log-interval", "20"])
    out = capsys.readouterr().out
    assert "merges 4 (merged now)" in out  # merged at steps 30, 60, 90, 120
    # Uniform guessing over ~65 characters is ln(65) = 4.17; unigram statistics alone give ~3.3.
    assert losses[0] > 4.0 and losses[-1] < 2.9, losses
    assert "validation loss" in out
