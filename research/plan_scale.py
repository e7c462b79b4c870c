# The scale sweep: GPT (rotary, the best GPT recipe) against WFC (the one-pass recipe) at four model
# sizes, each pair at equal wall-clock and at equal training FLOPs (the GPT's), budgets growing with
# the size. One compare.py call per size (its budget), then research/scale_fit.py reads them all:
#   for size in 0.1 0.8 3.2 7.4; do python compare.py --plan=research/plan_scale.py --tables=time,flops \
#       --budget=$(python research/plan_scale.py $size) --jobs=2 --threads=1 --eval_windows=256 \
#       --variants=gpt_$size,wfc_$size --out_dir=runs/scale/$size; done
#   python research/scale_fit.py --runs=runs/scale --out=assets/scale.png
# Controls at 0.8M: a 2-layer GPT (the depth of one WFC stack pass at half the parameters), the WFC
# without its auxiliary past-stream loss; the long pair (2400 s) at 3.2M; the byte-level code corpus.
import sys

GPT = 'config/train_shakespeare_char_gpt.py'
WFC = 'config/train_shakespeare_char_wfc_onepass.py'  # the best WFC recipe at equal wall-clock (RESULTS.md)
# Budgets sized to fit one 2-core session (about 25 minutes for the four sizes, two runs at a time);
# with more machine, scale them up together (e.g. 90, 180, 360, 720 s).
SIZES = {  # name (parameters, M): (n_layer, n_head, n_embd, wall-clock budget per run in s)
    '0.1': (2, 2, 64, 45), '0.8': (4, 4, 128, 90), '3.2': (4, 4, 256, 150), '7.4': (6, 5, 320, 240)}
VARIANTS = {}
for name, (layers, heads, width, _) in SIZES.items():
    shape = [f'--n_layer={layers}', f'--n_head={heads}', f'--n_embd={width}']
    VARIANTS[f'gpt_{name}'] = [GPT, '--pos_emb=rope', *shape]
    VARIANTS[f'wfc_{name}'] = [WFC, *shape]
VARIANTS['gpt_0.8_L2'] = [GPT, '--pos_emb=rope', '--n_layer=2']      # control: the GPT at one WFC pass's depth
VARIANTS['wfc_0.8_L2'] = [WFC, '--n_layer=2']                         # ... and the WFC at that depth
VARIANTS['wfc_0.8_nopast'] = [WFC, '--past_loss=0.0']                 # control: WFC without its auxiliary loss
CODE = ['--dataset=python_code', '--block_size=128']                  # the second corpus (bytes); its own prepare script
VARIANTS['gpt_code'] = [GPT, '--pos_emb=rope', *CODE, '--n_layer=4', '--n_head=4', '--n_embd=256']
VARIANTS['wfc_code'] = [WFC, *CODE, '--n_layer=4', '--n_head=4', '--n_embd=256']

if __name__ == '__main__':  # python research/plan_scale.py SIZE prints that size's budget
    print(SIZES[sys.argv[1]][3] if sys.argv[1:2] != ['--help'] else f"usage: python research/plan_scale.py SIZE: that size's budget per run in s (SIZE: {', '.join(SIZES)})")
