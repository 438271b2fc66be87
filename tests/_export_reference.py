"""Train with the training program, then compute reference outputs of its last checkpoint.

Run under torchrun with as many processes as the run's tensor-parallel size:

    python -m torch.distributed.run --nproc-per-node TP tests/_export_reference.py OUT.pt -- ARGV

``ARGV`` is the training command line (with ``--save CKPT``); training runs first, in the
same processes (one launch instead of two). Then the model is built by the training program
(``parse_args`` + ``build_model``) at the run's own TP size, the tensors of the checkpoint
``--save`` now points to loaded with dist_checkpointing, and it is evaluated with POET layers computing ``P (A0 (R x))``, never
forming ``P A0 R``: independent of the export's folding, resharding and name mapping.
Rank 0 saves ``{"tokens", "logits" (fp32, vocabulary trimmed), "prompts", "greedy", "margins"}``
to OUT.pt (see ``_export_utils.greedy_with_margins``).
"""
import sys
import warnings

import torch

from _export_utils import greedy_with_margins

warnings.filterwarnings("ignore")

BATCH, SEQ, PROMPTS, PROMPT_LEN, NEW_TOKENS = 3, 24, 16, 6, 20


def main() -> None:
    out_path, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: OUT.pt -- TRAINING_ARGV"
    from megatron.core import dist_checkpointing, tensor_parallel

    from megatron_poet.checkpoint import checkpoint_dir, latest_iteration
    from megatron_poet.training.pretrain import main as pretrain

    from megatron_poet.data import build_tokenizer
    from megatron_poet.megatron.cpu_backend import destroy_distributed, initialize_distributed
    from megatron_poet.training.arguments import parse_args
    from megatron_poet.training.model_provider import build_model, padded_vocab_size

    from megatron_poet.megatron import cpu_backend

    # Keep the process group alive after training: torch cannot re-create it under torchrun's
    # store; initialize_distributed below then only rebuilds megatron's parallel state.
    cpu_backend.destroy_distributed = lambda: None
    status = pretrain(argv)
    cpu_backend.destroy_distributed = destroy_distributed
    if status:
        sys.exit(status)
    args = parse_args(argv)
    ckpt = checkpoint_dir(args.save, latest_iteration(args.save))
    initialize_distributed(args.tensor_model_parallel_size, 1, args.seed)
    try:
        vocab = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size).vocab_size
        model = build_model(args, padded_vocab_size(vocab, args)).eval()
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)
        model.load_state_dict(state["model"])

        @torch.no_grad()
        def logits(tokens):
            positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
            local = model(tokens, positions, None)  # (b, s, padded vocab / TP)
            return tensor_parallel.gather_from_tensor_model_parallel_region(local)[..., :vocab].float()

        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
        prompts = torch.randint(0, vocab, (PROMPTS, PROMPT_LEN), generator=g)
        greedy, margins = greedy_with_margins(logits, prompts, NEW_TOKENS)
        result = {"tokens": tokens, "logits": logits(tokens), "prompts": prompts, "greedy": greedy,
                  "margins": margins}
        if torch.distributed.get_rank() == 0:
            torch.save(result, out_path)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
