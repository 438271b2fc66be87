"""Built-in training data for runs given no data: a generated corpus, tokenized on the fly.

The text comes from a small seeded grammar written for this project (no external text, no
network): short stories about villagers, arithmetic facts, counting and calendar sequences.
It mixes patterns a small model learns within minutes (sums, sequences, agreement) with free
choices it cannot memorise, so the validation perplexity of held-out documents falls and stays
well above 1. A byte-level BPE is trained on it and the corpus is written as megatron
.bin/.idx; both are cached, keyed by the generator version and parameters.
"""
import os
import random
import shutil
import tempfile
from typing import List, Tuple

from .preprocess import preprocess_corpus

# Bump when the generator changes, so stale caches are not reused.
CORPUS_VERSION = 1

_NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
            "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()
_DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
_MONTHS = ("january february march april may june july august september october november "
           "december").split()
_NAMES = ("Ada Bram Cora Dov Elin Finn Greta Hugo Iris Jonas Kira Lev Mara Nils Orla Pim "
          "Rosa Sami Tova Ulf Vera Wim").split()
_JOBS = "baker miller weaver smith fisher potter farmer carpenter shepherd tailor".split()
_ADJS = "old young quiet busy kind clever tired cheerful careful brave".split()
_PLACES = "market river mill forest harbor bridge orchard well square meadow".split()
_THINGS = ("apples", "loaves", "fish", "baskets", "candles", "nails", "pots", "eggs", "ropes")
_WEATHER = ("the sun was warm", "a cold wind blew", "rain fell all day", "the sky was grey",
            "fog covered the hills", "the air smelled of snow")
_VERBS = ("walked to the {p}", "went down to the {p}", "waited by the {p}",
          "looked for a friend at the {p}", "sold {t} at the {p}", "carried {t} to the {p}")
_ENDINGS = ("and went home before dark", "and sang on the way back", "and slept well that night",
            "and told the story to {n}", "and promised to return on {d}")


def _story(rng: random.Random) -> List[str]:
    name, job, day = rng.choice(_NAMES), rng.choice(_JOBS), rng.randrange(7)
    sentences = [f"On {_DAYS[day]}, {rng.choice(_WEATHER)}.",
                 f"{name} the {rng.choice(_ADJS)} {job} "
                 f"{rng.choice(_VERBS).format(p=rng.choice(_PLACES), t=rng.choice(_THINGS))}."]
    for _ in range(rng.randint(1, 4)):
        # a >= 2 keeps the plural nouns grammatical ("two fish", "gave ... three eggs").
        a, b = rng.randint(2, 9), rng.randint(1, 9)
        thing = rng.choice(_THINGS)
        if rng.random() < 0.5:
            sentences.append(f"{name} had {_NUMBERS[a]} {thing} and got {_NUMBERS[b]} more, "
                             f"so {name} had {_NUMBERS[a + b]} {thing}.")
        else:
            other = rng.choice(_NAMES)
            sentences.append(f"{other} the {rng.choice(_JOBS)} gave {name} {_NUMBERS[a]} "
                             f"{thing}.")
    ending = rng.choice(_ENDINGS).format(n=rng.choice(_NAMES), d=_DAYS[(day + 1) % 7])
    sentences.append(f"Then {name} smiled {ending}.")
    return sentences


def _facts(rng: random.Random) -> List[str]:
    sentences = []
    for _ in range(rng.randint(3, 8)):
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randint(0, 10), rng.randint(0, 10)
            sentences.append(f"{_NUMBERS[a]} plus {_NUMBERS[b]} is {_NUMBERS[a + b]}.")
        elif kind == 1:
            a = rng.randint(0, 20)
            b = rng.randint(0, a)
            sentences.append(f"{_NUMBERS[a]} minus {_NUMBERS[b]} is {_NUMBERS[a - b]}.")
        elif kind == 2:
            start = rng.randint(0, 14)
            sentences.append("Counting: " + ", ".join(_NUMBERS[start:start + 6]) + ".")
        else:
            seq, i = rng.choice((_DAYS, _MONTHS)), rng.randrange(7)
            sentences.append(f"After {seq[i]} comes {seq[(i + 1) % len(seq)]}.")
    return sentences


def generate_corpus(num_documents: int, seed: int = 0) -> List[str]:
    """`num_documents` generated documents (strings of a few sentences each), deterministic."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_documents):
        sentences = _story(rng) if rng.random() < 0.7 else _facts(rng)
        docs.append(" ".join(sentences))
    return docs


def default_cache_dir() -> str:
    """$MEGATRON_POET_CACHE, else $XDG_CACHE_HOME/megatron_poet, else ~/.cache/megatron_poet."""
    if os.environ.get("MEGATRON_POET_CACHE"):
        return os.environ["MEGATRON_POET_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron_poet")


def prepare_default_data(cache_dir: str = None, num_documents: int = 20000,
                         vocab_size: int = 1024, seed: int = 0) -> Tuple[str, str]:
    """Generate, tokenize and cache the built-in corpus; return (data_prefix, tokenizer_path).

    `data_prefix` is a megatron --data-path prefix (documents end with <|endoftext|>);
    `tokenizer_path` is a directory loadable by load_hf_tokenizer and transformers. The first
    call takes a few seconds; later calls with the same arguments return the cache. Safe when
    several processes call it at once: each builds in a private temporary directory that is
    renamed into place atomically, and a process that loses the race uses the winner's copy.

    Args:
        cache_dir: parent directory of the cache (default: default_cache_dir()).
        num_documents: documents generated (20000: about 4.5 MB of text, ~1M tokens).
        vocab_size: byte-level BPE vocabulary size (>= 257).
        seed: generator seed.
    """
    cache_dir = cache_dir or default_cache_dir()
    final = os.path.join(cache_dir,
                         f"default-corpus-v{CORPUS_VERSION}-n{num_documents}-v{vocab_size}-s{seed}")
    prefix, tokenizer = os.path.join(final, "corpus"), os.path.join(final, "corpus_tokenizer")
    if os.path.isdir(final):
        return prefix, tokenizer
    os.makedirs(cache_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".building-", dir=cache_dir)
    try:
        text_path = os.path.join(work, "corpus.txt")
        with open(text_path, "w", encoding="utf-8") as f:
            # One paragraph per document: preprocess's text format splits on blank lines.
            f.write("\n\n".join(generate_corpus(num_documents, seed)) + "\n")
        preprocess_corpus(text_path, os.path.join(work, "corpus"),
                          train_tokenizer_vocab_size=vocab_size, append_eod=True, progress=False)
        try:
            os.rename(work, final)
        except OSError:
            if not os.path.isdir(final):  # not a lost race: a real error
                raise
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work)
    return prefix, tokenizer
