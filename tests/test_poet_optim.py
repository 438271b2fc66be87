"""Parameter groups, merge schedule with optimizer-state reset, and convert_model."""
import pytest
import torch
from torch import nn

from megatron_poet import MergeScheduler, POETLinear, convert_model, poet_modules, poet_param_groups


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16, bias=False)
        self.lm_head = nn.Linear(16, 32, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.lm_head(h + self.fc2(torch.relu(self.fc1(self.norm(h)))))


def test_param_groups_split_poet_decay_and_no_decay():
    model = convert_model(TinyMLP(), block_size=8)
    groups = poet_param_groups(model, lr=1e-2, poet_lr=2e-3, weight_decay=0.1)
    by_kind = {(g["poet"], g["weight_decay"]): g for g in groups}
    poet = by_kind[(True, 0.0)]
    assert poet["lr"] == 2e-3
    assert {id(p) for p in poet["params"]} == {id(p) for m in poet_modules(model) for p in m.poet_parameters()}
    decay = by_kind[(False, 0.1)]
    assert {id(p) for p in decay["params"]} == {id(model.embed.weight), id(model.lm_head.weight)}
    no_decay = by_kind[(False, 0.0)]
    assert {id(p) for p in no_decay["params"]} == {id(model.norm.weight), id(model.norm.bias), id(model.fc1.bias)}
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
    frozen = [p for n, p in model.named_parameters() if n.endswith("frozen_weight")]
    assert frozen and not any(p.requires_grad for p in frozen)  # A0: a parameter without gradient or group


def test_merge_scheduler_merges_on_interval_and_resets_adam_state():
    torch.manual_seed(0)
    model = convert_model(TinyMLP(), block_size=8)
    opt = torch.optim.AdamW(poet_param_groups(model, 1e-2, 1e-2, 0.0))
    sched = MergeScheduler(model, merge_interval=3, optimizer=opt, seed=7)
    tokens = torch.randint(0, 32, (4, 8))
    poet_params = [p for m in poet_modules(model) for p in m.poet_parameters()]
    merged_at = []
    for step in range(1, 7):
        opt.zero_grad()
        nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        opt.step()
        if step == 3:
            assert all(opt.state[p]["step"] == 3 for p in poet_params)
            x = torch.randint(0, 32, (2, 8))
            before = model(x)
            orth_err = sched.max_orthogonality_error()
        if sched.step():
            merged_at.append(step)
            assert all(p not in opt.state for p in poet_params)
            assert all(torch.count_nonzero(p) == 0 for p in poet_params)
            assert opt.state[model.embed.weight]["step"] == step  # non-POET state untouched
            if step == 3:
                # The merge folds the exact orthogonal factors nearest to the blocks: the function
                # moves by the Cayley–Neumann truncation error (test_poet_merge.py bounds it), not more.
                assert 0 < orth_err < 1e-2
                assert torch.allclose(model(x), before, atol=4 * orth_err * before.abs().max().item())
        if step == 4:
            # A fresh Adam step: step count 1 and first moment (1 - beta1) * grad.
            for p in poet_params:
                assert opt.state[p]["step"] == 1
                assert torch.allclose(opt.state[p]["exp_avg"], 0.1 * p.grad)
    assert merged_at == [3, 6]
    assert sched.state_dict() == {"steps_since_merge": 0, "merges_done": 2, "seed": 7}


def test_merge_permutations_are_reproducible_from_scheduler_state():
    def run():
        model = convert_model(TinyMLP(), block_size=8, generator=torch.Generator().manual_seed(1))
        sched = MergeScheduler(model, 1, reset_optimizer_state=lambda ps: None, seed=3)
        sched.step()
        sched.step()
        return [m.input_side.perm.clone() for m in poet_modules(model)]
    assert all(torch.equal(a, b) for a, b in zip(run(), run()))


def test_convert_model_validates_everything_before_replacing():
    model = TinyMLP()
    with pytest.raises(ValueError) as err:
        convert_model(model, block_size=12)
    message = str(err.value)
    assert "'fc1'" in message and "'fc2'" in message and "in_features=16 is not divisible by block_size=12" in message
    assert not poet_modules(model) and type(model.fc1) is nn.Linear  # untouched


def test_convert_model_excludes_and_keeps_weights():
    torch.manual_seed(0)
    model = TinyMLP()
    tokens = torch.randint(0, 32, (2, 8))
    expected = model(tokens)
    convert_model(model, block_size=8, keep_weights=True)
    assert isinstance(model.fc1, POETLinear) and isinstance(model.fc2, POETLinear)
    assert type(model.lm_head) is nn.Linear
    assert torch.allclose(model(tokens), expected, atol=1e-6)


def test_scheduler_rejects_bad_arguments():
    model = convert_model(TinyMLP(), block_size=8)
    with pytest.raises(ValueError, match="merge_interval must be a positive integer"):
        MergeScheduler(model, 0, reset_optimizer_state=lambda ps: None)
    with pytest.raises(ValueError, match="exactly one of"):
        MergeScheduler(model, 5)
