"""Build the training program's model at one parallel layout and evaluate checkpoints through the pipeline.

Run under torchrun with TP x PP processes:

    python -m torch.distributed.run --nproc-per-node N tests/_pipeline_driver.py OUT.pt \
        [--save-fresh DIR] [--compare-fresh DIR] [--checkpoint NAME=PATH ...] -- TRAINING_ARGV

``TRAINING_ARGV`` is a training command line (it sets the model and the layout). The driver
builds this rank's model chunks with the program's own ``build_model_chunks`` and then

- ``--save-fresh DIR``: saves the freshly built model with dist_checkpointing;
- ``--compare-fresh DIR``: loads DIR (a fresh model saved at any layout) into a zeroed copy and
  records which state-dict entries differ from this layout's fresh model in any bit;
- ``--checkpoint NAME=PATH``: loads the model tensors of the training checkpoint PATH (its
  latest iteration) and computes the logits of a fixed batch with megatron's pipeline schedule
  (forward only: each stage runs its own chunks, POET layers apply R, A0, P in turn).

The last pipeline stage's TP rank 0 saves ``{"tokens": (b, s), "logits": {NAME: (b, s, vocab) fp32}, "fresh_compared":
[entries], "fresh_mismatch": [entries]}`` to OUT.pt (logits gathered over TP, vocabulary padding trimmed;
the fresh model is compared on that rank's chunks).
"""
import argparse
import sys
import warnings

import torch

warnings.filterwarnings("ignore")

BATCH, MICRO_BATCHES = 2, 2  # the interleaved schedule needs a multiple of PP micro-batches


def _model_state(chunks) -> dict:
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _load(chunks, path: str) -> None:
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_model_state(chunks), path)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"model{i}"])


@torch.no_grad()
def _pipeline_logits(chunks, tokens: torch.Tensor, seq_length: int):
    """Logits ``(b, s, vocab / TP)`` on the last stage (``None`` elsewhere), micro-batch by micro-batch."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro = tokens.chunk(MICRO_BATCHES)

    def forward_step(iterator, model):
        batch = next(iterator)
        positions = torch.arange(batch.shape[1]).unsqueeze(0).expand_as(batch)
        return model(batch, positions, None), None  # no loss function: the schedule keeps the outputs

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1
        else iter(micro), model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=MICRO_BATCHES,
        seq_length=seq_length, micro_batch_size=micro[0].shape[0], forward_only=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(outputs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--save-fresh")
    parser.add_argument("--compare-fresh")
    parser.add_argument("--checkpoint", action="append", default=[])
    ours, argv = sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
    opts = parser.parse_args(ours)

    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

    from megatron_poet.data import build_tokenizer
    from megatron_poet.megatron.cpu_backend import destroy_distributed, initialize_distributed
    from megatron_poet.training.arguments import parse_args
    from megatron_poet.checkpoint import checkpoint_dir, latest_iteration
    from megatron_poet.training.model_provider import build_model_chunks, padded_vocab_size

    args = parse_args(argv)
    initialize_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.seed,
                           virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size)
    try:
        vocab = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size).vocab_size
        padded = padded_vocab_size(vocab, args)
        chunks = [chunk.eval() for chunk in build_model_chunks(args, padded)]
        result = {"logits": {}, "fresh_mismatch": [], "fresh_compared": []}
        if opts.save_fresh:
            dist_checkpointing.save(_model_state(chunks), opts.save_fresh)
        if opts.compare_fresh:
            loaded = build_model_chunks(args, padded)
            with torch.no_grad():
                for tensor in [t for chunk in loaded for t in (*chunk.parameters(), *chunk.buffers())]:
                    tensor.zero_()
            _load(loaded, opts.compare_fresh)
            for i, (ours_chunk, theirs) in enumerate(zip(chunks, loaded)):
                mine, other = ours_chunk.state_dict(), theirs.state_dict()
                result["fresh_compared"] += [f"chunk{i}.{k}" for k in mine]
                result["fresh_mismatch"] += [
                    f"chunk{i}.{k}" for k, v in mine.items()
                    if not (torch.equal(v, other[k]) if torch.is_tensor(v) else v == other[k])]
        tokens = torch.randint(0, vocab, (BATCH * MICRO_BATCHES, args.seq_length),
                               generator=torch.Generator().manual_seed(0))
        result["tokens"] = tokens
        for spec in opts.checkpoint:
            name, root = spec.split("=", 1)
            _load(chunks, checkpoint_dir(root, latest_iteration(root)))
            logits = _pipeline_logits(chunks, tokens, args.seq_length)
            if logits is not None:
                logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
                result["logits"][name] = logits[..., :vocab].float()
        if (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                and parallel_state.get_tensor_model_parallel_rank() == 0):
            torch.save(result, opts.out)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
