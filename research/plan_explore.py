# Screen of WFC levers at equal iterations (sample efficiency), for compare.py:
#   python compare.py --plan=research/plan_explore.py --tables=steps --steps=2000 --variants=...
# Each variant is the one-pass WFC config (the default when this screen ran) with one change.
WFC = 'config/train_shakespeare_char_wfc_onepass.py'
VARIANTS = {
    'gpt_rope': ['config/train_shakespeare_char_gpt.py', '--pos_emb=rope'],
    'wfc_F2': [WFC, '--n_future=2'],
    'wfc_F4': [WFC],
    'wfc_F8': [WFC, '--n_future=8'],
    'wfc_no_past_loss': [WFC, '--past_loss=0.0'],
    'wfc_past_self': [WFC, '--past_target=self'],
    'wfc_uniform_weights': [WFC, '--dist_power=0.0'],
    'wfc_dist_power2': [WFC, '--dist_power=2.0'],
    'wfc_spec_window0': [WFC, '--spec_window=0'],
    'wfc_learned_pos': [WFC, '--pos_emb=learned'],
    'wfc_loop2': [WFC, '--n_loop=2', '--loop_law=uniform', '--supervise=2', '--max_loop=4'],
    'wfc_loop2_warm': [WFC, '--n_loop=2', '--loop_law=uniform', '--supervise=2', '--max_loop=4', '--warm_prob=0.5'],
    'wfc_bidirectional': [WFC, '--attn=bidirectional', '--past_loss=0.0'],
    'wfc_frac50': [WFC, '--future_frac=0.5'],
    'wfc_frac25': [WFC, '--future_frac=0.25'],
}
