"""model.py keeps its claims: weight tying across passes, who sees what in pinned / bidirectional
attention and the speculation window (one visibility rule, the fused causal kernel equal to it),
e_max, refine's stopping rule, GPT mode equal to a naive reference computation, nanoGPT checkpoints
loading, sane initial loss and one-batch overfitting."""

import math

import pytest
import torch

from conftest import tiny
from generation import engine
from modeling.layout import visibility
from modeling.solver import entropy_of_logits
from plumbing import checkpoint


def block_calls(model, run):
    calls = {}
    hooks = [b.register_forward_hook(lambda mod, i, o, k=k: calls.__setitem__(k, calls.get(k, 0) + 1))
             for k, b in enumerate(model.transformer.h)]
    run()
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize('n_future', [0, 4])
def test_parameters_do_not_change_with_n_loop_and_every_pass_reuses_them(n_future):
    models = [tiny(n_loop=k, n_future=n_future, pos_emb='rope') for k in (1, 2, 3)]
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in models]
    assert shapes[0] == shapes[1] == shapes[2]
    assert models[0].get_num_params() == models[2].get_num_params()
    idx = torch.randint(0, 13, (2, 16))
    calls = block_calls(models[2], lambda: models[2](idx, idx))
    streams = 1 if n_future == 0 else 2  # pinned WFC: the past's passes and the future's passes
    assert calls == {k: 3 * streams for k in range(2)}


def reference_gpt_logits(model, idx):
    """nanoGPT's computation written out by hand: naive softmax attention, per head."""
    sd, c = model.state_dict(), model.config
    T, hs = idx.size(1), c.n_embd // c.n_head

    def ln(x, name):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        y = (x - mu) / torch.sqrt(var + 1e-5) * sd[name + '.weight']
        return y + sd[name + '.bias'] if c.bias else y

    def linear(x, name):
        y = x @ sd[name + '.weight'].T
        return y + sd[name + '.bias'] if c.bias else y

    x = sd['transformer.wte.weight'][idx] + sd['transformer.wpe.weight'][:T]
    for _ in range(c.n_loop):
        for layer in range(c.n_layer):
            p = f'transformer.h.{layer}.'
            q, k, v = linear(ln(x, p + 'ln_1'), p + 'attn.c_attn').split(c.n_embd, dim=-1)
            heads = []
            for h in range(c.n_head):
                sl = slice(h * hs, (h + 1) * hs)
                scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(hs)
                future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
                heads.append(torch.softmax(scores.masked_fill(future, float('-inf')), -1) @ v[..., sl])
            x = x + linear(torch.cat(heads, -1), p + 'attn.c_proj')
            hidden = linear(ln(x, p + 'ln_2'), p + 'mlp.c_fc')
            x = x + linear(0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2))), p + 'mlp.c_proj')
    return ln(x, 'transformer.ln_f') @ sd['transformer.wte.weight'].T


@pytest.mark.parametrize('bias,n_loop', [(True, 1), (False, 1), (False, 2)])
def test_gpt_mode_matches_a_naive_reference(bias, n_loop):
    model = tiny(bias=bias, n_loop=n_loop).eval()
    for p in model.parameters():  # move away from the zero biases / unit norms of the init
        p.data += 0.05 * torch.randn_like(p)
    idx = torch.randint(0, 13, (3, 16))
    logits, _ = model(idx, idx)
    assert (logits - reference_gpt_logits(model, idx)).abs().max() < 1e-5


def test_nanogpt_checkpoint_loads_with_the_same_logits():
    """A checkpoint laid out as nanoGPT's train.py writes it: its parameter names (here with
    torch.compile's prefix), its causal-mask buffers, and only nanoGPT's model_args."""
    source = tiny(bias=True).eval()
    expected = {'transformer.wte.weight', 'transformer.wpe.weight', 'transformer.ln_f.weight', 'transformer.ln_f.bias',
                'lm_head.weight'} | {f'transformer.h.{i}.{n}' for i in range(2) for n in (
                    'ln_1.weight', 'ln_1.bias', 'attn.c_attn.weight', 'attn.c_attn.bias', 'attn.c_proj.weight',
                    'attn.c_proj.bias', 'ln_2.weight', 'ln_2.bias', 'mlp.c_fc.weight', 'mlp.c_fc.bias',
                    'mlp.c_proj.weight', 'mlp.c_proj.bias')}
    assert set(source.state_dict()) == expected
    state = {'_orig_mod.' + k: v.clone() for k, v in source.state_dict().items()}
    state.update({f'_orig_mod.transformer.h.{i}.attn.bias': torch.ones(1, 1, 16, 16).tril() for i in range(2)})
    nano_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=13, dropout=0.0)
    loaded = checkpoint.build_model({'model': state, 'model_args': nano_args}).eval()
    idx = torch.randint(0, 13, (2, 16))
    assert torch.equal(loaded(idx, idx)[0], source(idx, idx)[0])


def block_start(j, phase, F_):
    return 0 if j < phase else phase + (j - phase) // F_ * F_


@pytest.mark.parametrize('phase', [0, 3])
def test_pinned_future_slot_sees_exactly_its_past_and_its_block(phase):
    F_, T = 4, 16
    model = tiny(n_future=F_, pos_emb='rope', n_loop=2).eval()
    idx, tgt = torch.randint(0, 13, (1, T)), torch.randint(0, 13, (1, T))
    run = lambda i, t, pins=None: model(i, t, phase=torch.tensor([phase]), pins=pins)[0][0]
    base = run(idx, tgt)
    other = tgt.clone()
    other[0] = (tgt[0] + 1) % 13
    assert torch.equal(run(idx, other), base), "a future slot's logits changed with the targets: the answer leaks"
    for i in range(T):  # change the past token i: slot j may react only when i <= s(j)
        changed = idx.clone()
        changed[0, i] = (idx[0, i] + 5) % 13
        moved = (run(changed, tgt) - base).abs().amax(-1)
        for j in range(T):
            if i <= block_start(j, phase, F_):
                assert moved[j] > 1e-6, f"slot {j} ignores past token {i}"
            else:
                assert moved[j] == 0, f"slot {j} sees token {i}, after its past"
    for k in range(T):  # pin future slot k to two different tokens: only its block may react
        pins = torch.zeros(1, T, dtype=torch.bool)
        pins[0, k] = True
        moved = (run(idx, tgt, pins) - run(idx, other, pins)).abs().amax(-1)
        for j in range(T):
            if j != k:
                same = block_start(j, phase, F_) == block_start(k, phase, F_)
                assert (moved[j] > 1e-6) == same, f"slot {j} vs pinned slot {k}"


def test_speculation_window_hides_slots_further_ahead():
    F_, T = 4, 8
    idx, tgt = torch.randint(0, 13, (1, T)), torch.randint(0, 13, (1, T))
    other = (tgt + 1) % 13
    # the window is per attention layer: information travels window x n_layer x passes slots
    for window, passes, visible_ahead in ((0, 2, 0), (1, 1, 2), (1, 2, 4), (-1, 1, F_)):
        model = tiny(n_future=F_, pos_emb='rope', spec_window=window, n_loop=passes).eval()
        for k in range(1, F_):  # slot 0 is the first slot of its block (phase 0)
            pins = torch.zeros(1, T, dtype=torch.bool)
            pins[0, k] = True
            run = lambda t: model(idx, t, phase=torch.tensor([0]), pins=pins)[0][0, 0]
            reacts = (run(tgt) - run(other)).abs().max() > 1e-6
            assert reacts == (k <= visible_ahead), f"window {window}, {passes} passes: slot 0 vs slot {k}"


def causal_states(model, idx):
    pos = torch.arange(idx.size(1))
    return model.causal_stream(model.token_states(idx, pos), pos)[0]


def test_pinned_past_never_depends_on_later_tokens_or_the_future():
    model = tiny(n_future=4, pos_emb='rope', n_loop=2).eval()
    idx = torch.randint(0, 13, (1, 12))
    with torch.no_grad():
        states = causal_states(model, idx)
        for k in range(12):
            changed = idx.clone()
            changed[0, k] = (idx[0, k] + 3) % 13
            assert torch.equal(causal_states(model, changed)[:, :k], states[:, :k]), f"past output before {k} changed"
    window = engine.start(model, idx)
    cache_before = window.cache.buf[..., :window.cache.length, :].clone()
    window = engine.collapse(model, window, torch.tensor([[False, True, False, False]]), torch.tensor([[0, 7, 0, 0]]))
    window, _ = engine.refine(model, window, max_loop=3)
    assert torch.equal(window.cache.buf[..., :window.cache.length, :], cache_before)


def test_the_fused_causal_kernel_is_the_visibility_rule():
    """GPT mode passes 'causal' to SDPA's fused kernel; the same call with the mask that
    visibility() builds for queries whose horizon is their own position gives the same outputs."""
    model = tiny(pos_emb='rope').eval()
    idx = torch.randint(0, 13, (2, 16))
    pos = torch.arange(16)
    x = model.token_states(idx, pos)
    fused, _ = model.stack(x, pos, 'causal')
    explicit, _ = model.stack(x, pos, visibility(pos, None, None, pos))
    assert torch.allclose(fused, explicit, atol=1e-6)
    assert torch.equal(visibility(pos, None, None, pos), torch.ones(16, 16, dtype=torch.bool).tril())


def test_bidirectional_future_reaches_the_past():
    model = tiny(n_future=4, pos_emb='rope', attn='bidirectional').eval()
    idx = torch.randint(0, 13, (1, 8))
    plain, _ = engine.refine(model, engine.start(model, idx), max_loop=1)
    nudged = engine.collapse(model, engine.start(model, idx), torch.tensor([[False, False, True, False]]), torch.tensor([[0, 0, 7, 0]]))
    nudged, _ = engine.refine(model, nudged, max_loop=1)
    assert (plain.past_x - nudged.past_x).abs().max() > 1e-6


@pytest.mark.parametrize('n_future', [0, 4])
def test_initial_loss_is_near_ln_vocab(n_future):
    model = tiny(n_future=n_future, pos_emb='rope', vocab_size=65)
    idx = torch.randint(0, 65, (8, 16))
    _, loss = model(idx, torch.randint(0, 65, (8, 16)))
    assert abs(loss.item() - math.log(65)) < 0.1


@pytest.mark.parametrize('overrides', [dict(), dict(n_future=4, pos_emb='learned'),
                                       dict(n_future=4, pos_emb='rope', attn='bidirectional')])
def test_tiny_model_overfits_one_batch(overrides):
    model = tiny(**overrides)
    torch.manual_seed(1)
    idx = torch.randint(0, 13, (4, 16))
    tgt = torch.roll(idx, -1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    # bidirectional supervises one split per row: hold it fixed so the batch really is one batch
    fixed = {'split': torch.full((4,), 8)} if overrides.get('attn') == 'bidirectional' else {}
    for _ in range(150):
        _, loss = model(idx, tgt, **fixed)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first, (first, loss.item())


def test_e_max_is_uniform_at_init_and_tracks_the_embedding():
    model = tiny(n_future=4, vocab_size=65)
    V = model.config.vocab_size
    uniform = torch.full((V,), 1.0 / V)
    assert torch.allclose(uniform @ model.transformer.wte.weight, model.e_max(), atol=1e-6)
    assert entropy_of_logits(model.logits(model.e_max())).item() > 0.98 * math.log(V)
    with torch.no_grad():  # a random direction (a constant shift is what LayerNorm removes)
        model.transformer.wte.weight[3] += 5.0 * torch.randn(model.config.n_embd)
    assert torch.allclose(model.e_max(), model.transformer.wte.weight.mean(0))
    assert entropy_of_logits(model.logits(model.e_max())).item() < 0.9 * math.log(V)  # decodes toward token 3 now
    assert model.decode(model.e_max()).argmax().item() == 3


@pytest.mark.parametrize('attn', ['pinned', 'bidirectional'])
def test_refine_stops_when_the_state_stops_moving_and_never_exceeds_max_loop(attn):
    model = tiny(n_future=4, pos_emb='rope', attn=attn, max_loop=7, tol=1e-4).eval()
    idx = torch.randint(0, 13, (2, 8))
    _, used = engine.refine(model, engine.start(model, idx), tol=0.0)
    assert used == 7
    _, used = engine.refine(model, engine.start(model, idx), max_loop=3, tol=0.0)
    assert used == 3
    with torch.no_grad():  # residual branches that add nothing: the state cannot move
        for name, p in model.named_parameters():
            if name.endswith('c_proj.weight'):
                p.zero_()
    _, used = engine.refine(model, engine.start(model, idx))
    assert used == 1
    _, used = engine.refine(model, engine.start(model, idx), min_loop=2)
    assert used == 2


@pytest.mark.parametrize('power', [0.0, 1.0, 2.0])
def test_the_future_loss_weights_distance_d_by_d_to_the_minus_dist_power(power):
    model = tiny(n_future=4, pos_emb='rope', dist_power=power).eval()
    idx, tgt = torch.randint(0, 13, (3, 16)), torch.randint(0, 13, (3, 16))
    with torch.no_grad():
        out = model.wfc_forward(idx, tgt, depth=1, phase=torch.tensor([0, 1, 3]))
    weight = out.dist.float() ** -power * out.scored
    assert torch.allclose(out.loss, (out.ce * weight).sum() / weight.sum(), atol=1e-6)
