"""Sparse attention (GPTConfig.attn_fn): entmax with alpha 1 is softmax; a masked key gets exactly
zero weight, so causal and pinned visibility hold bit for bit with entmax and adaptive entmax; the
adaptive alpha stays in (1, 2) and follows the row's entropy; gradients reach every parameter; both
train, evaluate and sample in GPT and WFC modes."""

import pytest
import torch

from conftest import tiny
from generation import engine
from generation.decoding import Settings
from generation.sampling import generate
from modeling.attention import sparse_attention_weights as attention_weights


def test_entmax_with_alpha_one_is_softmax():
    torch.manual_seed(0)
    soft = tiny(pos_emb='rope').eval()
    ent = tiny(pos_emb='rope', attn_fn='entmax', entmax_alpha=1.0).eval()
    ent.load_state_dict(soft.state_dict())
    idx = torch.randint(0, 13, (2, 16))
    assert torch.allclose(soft(idx, idx)[0], ent(idx, idx)[0], atol=1e-5)


@pytest.mark.parametrize('attn_fn', ['entmax', 'adaptive'])
def test_masked_keys_get_exactly_zero_weight(attn_fn):
    scores = torch.randn(2, 3, 5, 7)
    mask = torch.rand(5, 7) < 0.5
    mask[:, 0] = True  # every row sees something
    masked = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = attention_weights(masked, attn_fn, 1.5, torch.full((3,), 2.0), torch.full((3,), -1.0),
                                mask.sum(-1).float())
    assert torch.equal(weights[..., ~mask], torch.zeros_like(weights[..., ~mask]))
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 5), atol=1e-5)
    assert (weights == 0).float().mean() > (~mask).float().mean(), "entmax also zeroes some visible keys"


@pytest.mark.parametrize('attn_fn', ['entmax', 'adaptive'])
def test_causal_and_pinned_visibility_hold_exactly(attn_fn):
    gpt = tiny(attn_fn=attn_fn).eval()
    idx = torch.randint(0, 13, (1, 16))
    base = gpt(idx, idx)[0]
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % 13
    assert torch.equal(gpt(changed, idx)[0][:, :9], base[:, :9]), "a later token moved an earlier position"
    wfc = tiny(attn_fn=attn_fn, n_future=4, pos_emb='rope').eval()
    run = lambda i: wfc(i, idx, phase=torch.tensor([0]))[0][0]
    moved = (run(changed) - run(idx)).abs().amax(-1)
    starts = [max(b for b in (0, 4, 8, 12) if b <= j) for j in range(16)]
    assert all((moved[j] == 0) == (9 > starts[j]) for j in range(16)), "a future slot saw past its horizon"


def test_adaptive_alpha_is_bounded_and_follows_entropy():
    gain, bias = torch.full((1,), 4.0), torch.full((1,), -2.0)
    sure = torch.tensor([[[[8.0, 0.0, 0.0, 0.0]]]])  # low entropy row
    unsure = torch.zeros(1, 1, 1, 4)               # uniform row
    w_sure = attention_weights(sure, 'adaptive', None, gain, bias, torch.tensor([4.0]))
    w_unsure = attention_weights(unsure, 'adaptive', None, gain, bias, torch.tensor([4.0]))
    assert (w_sure == 0).sum() == 3 and torch.allclose(w_unsure, torch.full((1, 1, 1, 4), 0.25))


@pytest.mark.parametrize('overrides', [dict(), dict(n_future=2, pos_emb='rope', past_loss=1.0)])
@pytest.mark.parametrize('attn_fn', ['entmax', 'adaptive'])
def test_sparse_models_learn_evaluate_and_sample(attn_fn, overrides):
    model = tiny(attn_fn=attn_fn, **overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 13, (4, 16), generator=torch.Generator().manual_seed(1))
    tgt = torch.roll(idx, -1, 1)
    for step in range(40):
        _, loss = model(idx, tgt)
        first = loss.item() if step == 0 else first
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
            if attn_fn == 'adaptive':
                assert model.transformer.h[0].attn.alpha_gain.grad.abs().sum() > 0, "alpha learns"
        opt.step()
    assert loss.item() < 0.8 * first
    model.eval()
    out, _ = generate(model, idx[:1, :4], 20, Settings(temperature=1.0), torch.Generator().manual_seed(0))
    assert out.shape == (1, 20)
    if overrides:
        w, _ = engine.refine(model, engine.start(model, idx[:1]))
        assert torch.isfinite(w.stats['logits']).all()
