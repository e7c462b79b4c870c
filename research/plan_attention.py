# Sparse attention against softmax: the rotary GPT recipe with entmax (alpha 1.5 for every row) and
# with the adaptive alpha (per head and query, 1 + sigmoid of a learned affine map of the row's
# softmax entropy: sure rows go sparse, unsure ones stay dense), and the same three for the
# one-pass WFC; at equal iterations and at equal wall-clock. Then the sparsity of the trained models:
#   python compare.py --plan=research/plan_attention.py --tables=steps,time --steps=1000 --budget=120 \
#       --jobs=2 --threads=1 --calibration_rounds=1 --out_dir=runs/attention \
#       --variants=gpt_softmax,gpt_entmax,gpt_adaptive
#   python research/attention_sparsity.py --out_dir=runs/attention/steps/gpt_adaptive --out=assets/sparsity.png
GPT = ['config/train_shakespeare_char_gpt.py', '--pos_emb=rope']
WFC = ['config/train_shakespeare_char_wfc_onepass.py']
VARIANTS = {}
for family, base in (('gpt', GPT), ('wfc', WFC)):
    VARIANTS[f'{family}_softmax'] = base
    VARIANTS[f'{family}_entmax'] = [*base, '--attn_fn=entmax', '--entmax_alpha=1.5']
    VARIANTS[f'{family}_adaptive'] = [*base, '--attn_fn=adaptive']
