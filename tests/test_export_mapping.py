"""Export mapping megatron-core GPTModel -> Hugging Face, checked against transformers (CPU, ~30 s).

Models are megatron-core's own GPTModel (local layer spec, random weights) at TP=1;
the reference is transformers' LlamaForCausalLM / GPT2LMHeadModel loading the export.
"""
import dataclasses
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from _export_utils import assert_hf_matches, free_port

warnings.filterwarnings("ignore", message="Transformer Engine and Apex")

from megatron_poet.export import ExportSpec, TokenizerInfo, UnsupportedModelError, export_gpt_model  # noqa: E402
from megatron_poet.export.fold import dense_state_dict  # noqa: E402
from megatron_poet.export.layout import split_qkv  # noqa: E402
from megatron_poet.poet.linear import POETLinear  # noqa: E402

VOCAB = 100  # true vocabulary; megatron's tables get PADDED rows
PADDED = 128


@pytest.fixture(scope="module", autouse=True)
def megatron_world():
    saved = dict(os.environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), RANK="0", WORLD_SIZE="1")
    from megatron_poet.megatron.cpu_backend import destroy_distributed, initialize_distributed

    initialize_distributed(seed=1234)
    yield
    destroy_distributed()
    os.environ.clear()  # later tests' subprocesses must not inherit this rendezvous
    os.environ.update(saved)


def megatron_gpt(style="llama", *, groups=2, tie=False, bias=False, qk_layernorm=False, seed=0):
    """A random megatron-core GPTModel (2 layers, hidden 64, 4 heads) in eval mode.

    Weights are drawn with std 0.2 and norm weights perturbed so every entry matters.
    """
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    llama = style == "llama"
    norm = "RMSNorm" if llama else "LayerNorm"
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=groups if llama else 4,
        ffn_hidden_size=96, normalization=norm, gated_linear_unit=llama,
        activation_func=F.silu if llama else F.gelu, add_bias_linear=bias, layernorm_epsilon=1e-5,
        init_method_std=0.2, hidden_dropout=0.0, attention_dropout=0.0, qk_layernorm=qk_layernorm,
        use_cpu_initialization=True, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    model = GPTModel(
        config, get_gpt_layer_local_spec(normalization=norm, qk_layernorm=qk_layernorm), vocab_size=PADDED,
        max_sequence_length=64, position_embedding_type="rope" if llama else "learned_absolute",
        share_embeddings_and_output_weights=tie, rotary_base=50000,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("style,groups,tie,bias", [
    ("llama", 2, False, False),  # GQA, the training program's default shape
    ("llama", 1, True, True),    # multi-query, tied embeddings, biases everywhere
    ("llama", 4, False, True),   # multi-head
    ("gpt2", 4, False, True),
    ("gpt2", 4, True, False),    # no megatron biases: GPT-2 gets zeros
])
def test_export_matches_transformers(tmp_path, style, groups, tie, bias):
    model = megatron_gpt(style, groups=groups, tie=tie, bias=bias)
    spec = export_gpt_model(model, str(tmp_path), tokenizer=TokenizerInfo(vocab_size=VOCAB))
    assert spec.architecture == style
    hf = assert_hf_matches(model, str(tmp_path), VOCAB)
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[style]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and config["tie_word_embeddings"] == tie
    if style == "llama":
        assert config["num_key_value_heads"] == groups and config["rope_theta"] == 50000.0
        assert config["rms_norm_eps"] == 1e-5 and config["max_position_embeddings"] == 64
    assert (tmp_path / "generation_config.json").is_file()


def test_split_qkv_per_group_against_explicit_layout():
    """Independent reference: build the fused tensor row by row from labelled heads."""
    spec = ExportSpec("llama", 1, 8, 8, num_attention_heads=6, num_query_groups=2, head_dim=2, vocab_size=4,
                      padded_vocab_size=4, max_position_embeddings=8, norm_eps=1e-5, rope_theta=1e4,
                      tie_word_embeddings=False, linear_bias=False, qkv_bias=False, activation="silu")
    q_heads = [torch.full((2, 8), 100.0 + h) for h in range(6)]
    k_heads = [torch.full((2, 8), 200.0 + g) for g in range(2)]
    v_heads = [torch.full((2, 8), 300.0 + g) for g in range(2)]
    fused = torch.cat([t for g in range(2) for t in (*q_heads[3 * g:3 * g + 3], k_heads[g], v_heads[g])])
    q, k, v = split_qkv(fused, spec)
    assert torch.equal(q, torch.cat(q_heads)) and torch.equal(k, torch.cat(k_heads)) and torch.equal(v, torch.cat(v_heads))


def test_sharded_bf16_export(tmp_path):
    model = megatron_gpt("llama")
    export_gpt_model(model, str(tmp_path), tokenizer=TokenizerInfo(vocab_size=VOCAB), dtype="bf16",
                     max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert all((tmp_path / s).is_file() for s in shards)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    ref = model.embedding.word_embeddings.weight[:VOCAB].to(torch.bfloat16)
    assert torch.equal(hf.model.embed_tokens.weight, ref)
    # Re-export unsharded into the same directory: the stale shards and index must go.
    export_gpt_model(model, str(tmp_path), tokenizer=TokenizerInfo(vocab_size=VOCAB))
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    # Ordinary permissions for everything written (safetensors itself creates files 0600).
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == \
        {p.name: oct(0o666 & ~umask) for p in tmp_path.iterdir()}


def test_unsupported_model_is_rejected_clearly():
    with pytest.raises(UnsupportedModelError, match="qk_layernorm"):
        ExportSpec.from_gpt_model(megatron_gpt("llama", qk_layernorm=True), VOCAB)
    with pytest.raises(UnsupportedModelError, match="vocab_size=500"):
        ExportSpec.from_gpt_model(megatron_gpt("llama"), 500)


def test_fold_replaces_poet_factors_by_dense_weight():
    """The folded weight reproduces the POET forward (which never forms P A0 R)."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(POETLinear(16, 8, block_size=4, generator=g), torch.nn.Linear(8, 8))
    with torch.no_grad():
        for side in (model[0].input_side, model[0].output_side):
            side.skew.normal_(0, 0.3, generator=g)
    dense = dense_state_dict(model)
    assert set(dense) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    x = torch.randn(5, 16, generator=g)
    reference = model[0](x)
    assert torch.allclose(F.linear(x, dense["0.weight"], dense["0.bias"]), reference, atol=1e-5)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_poet_megatron_model_matches_transformers(tmp_path, style):
    """megatron_poet's POET GPTModel: factors trained (random), merged, trained again, then exported."""
    from megatron_poet.megatron.model import build_gpt2_model, build_llama_model, gpt2_config, llama_config
    from megatron_poet.poet.config import POETConfig
    from megatron_poet.poet.linear import POETModule

    poet = POETConfig(block_size=16)
    common = dict(use_cpu_initialization=True, init_method_std=0.2, hidden_dropout=0.0, attention_dropout=0.0)
    if style == "llama":
        model = build_llama_model(llama_config(2, 64, 4, 2, 96, **common), poet, PADDED, 64, rotary_base=50000)
    else:
        model = build_gpt2_model(gpt2_config(2, 64, 4, **common), poet, PADDED, 64)
    layers = [m for m in model.modules() if isinstance(m, POETModule)]
    assert len(layers) == 8
    g = torch.Generator().manual_seed(1)

    def perturb():
        with torch.no_grad():
            for m in layers:
                for p in m.poet_parameters():
                    p.normal_(0, 0.05, generator=g)  # trained-size factors: the export refuses far-from-orthogonal ones

    perturb()
    for m in layers:
        m.merge_and_reset(g)
    perturb()
    model.eval()
    spec = export_gpt_model(model, str(tmp_path), tokenizer=TokenizerInfo(vocab_size=VOCAB))
    assert spec.architecture == style
    assert_hf_matches(model, str(tmp_path), VOCAB)


@pytest.mark.parametrize("form", ["directory", "tokenizer.json"])
def test_exported_tokenizer_round_trips(tmp_path, form):
    """The shipped tokenizer gives the training ids and decodes them back to the text."""
    from transformers import AutoTokenizer

    from megatron_poet.data import load_hf_tokenizer, train_byte_level_bpe

    texts = ["the quick brown fox jumps over the lazy dog", "lorem ipsum dolor sit amet"] * 50
    source = train_byte_level_bpe(texts, 300, str(tmp_path / "tok"))
    if form == "tokenizer.json":
        source = str(tmp_path / "tok" / "tokenizer.json")
    info = TokenizerInfo.from_path(source)
    training = load_hf_tokenizer(source)
    assert info.vocab_size == training.vocab_size and info.eos_token_id == training.eod
    model = megatron_gpt("llama")
    # The random model has VOCAB rows; the shipped files and special ids are the tokenizer's.
    export_gpt_model(model, str(tmp_path / "hf"), tokenizer=dataclasses.replace(info, vocab_size=VOCAB))
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "The lazy fox, 3 × dogs — ünïcödé!\n  indented"
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == training.tokenize(text)
    assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == training.eod
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == training.eod


def test_export_is_streamed_layer_by_layer(tmp_path, monkeypatch):
    """Shards are written while later layers are still unfolded (their A0 not yet released), so the export
    never holds the whole dense model; the result equals the unstreamed mapping."""
    from megatron_poet.export import hf_state_and_config, writer
    from megatron_poet.megatron.model import build_llama_model, llama_config
    from megatron_poet.poet.config import POETConfig
    from megatron_poet.poet.linear import POETModule

    common = dict(use_cpu_initialization=True, init_method_std=0.2, hidden_dropout=0.0, attention_dropout=0.0)
    model = build_llama_model(llama_config(4, 64, 4, 2, 96, **common), POETConfig(block_size=16), PADDED, 64).eval()
    _, _, whole = hf_state_and_config(model, TokenizerInfo(vocab_size=VOCAB))
    layers = [m for m in model.modules() if isinstance(m, POETModule)]
    released_at_save, save = [], writer._save

    def recording_save(tensors, path):
        released_at_save.append(sum(m.frozen_weight.numel() == 0 for m in layers))
        save(tensors, path)

    monkeypatch.setattr(writer, "_save", recording_save)
    # Shards of ~one layer (a layer's bf16 weights: 4 linears, ~50 KB).
    export_gpt_model(model, str(tmp_path), tokenizer=TokenizerInfo(vocab_size=VOCAB), dtype="bf16",
                     max_shard_size="60KB", release_model=True)
    assert len(released_at_save) >= 4 and released_at_save[0] < len(layers), released_at_save
    assert released_at_save == sorted(released_at_save)
    from safetensors.torch import load_file

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(whole)
    for shard in set(index["weight_map"].values()):
        for name, tensor in load_file(str(tmp_path / shard)).items():
            assert torch.equal(tensor, whole[name].to(torch.bfloat16)), name


def test_refused_export_leaves_the_directory_as_it_was(tmp_path):
    """A non-finite layer found midway (after earlier shards were staged) changes nothing in the output."""
    from megatron_poet.export.hf_export import UnsafeWeightsError

    model = megatron_gpt("llama")
    export_gpt_model(model, str(tmp_path), tokenizer=TokenizerInfo(vocab_size=VOCAB), max_shard_size="40KB")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.decoder.layers[1].mlp.linear_fc2.weight[0, 0] = float("nan")
    with pytest.raises(UnsafeWeightsError, match="decoder.layers.1|model.layers.1"):
        export_gpt_model(model, str(tmp_path), tokenizer=TokenizerInfo(vocab_size=VOCAB), max_shard_size="40KB")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # (no staging directory left either)
    with pytest.raises(UnsafeWeightsError):
        export_gpt_model(model, str(tmp_path / "fresh"), tokenizer=TokenizerInfo(vocab_size=VOCAB))
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(ValueError, match="cannot plan shards of '5 parsecs'"):
        export_gpt_model(model, str(tmp_path / "new"), max_shard_size="5 parsecs")
    assert not (tmp_path / "new").exists()
