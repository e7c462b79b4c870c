# Round 2 at equal iterations: the F = 2 recipe (the best of the screen) with the levers the screen
# pointed at, plus the looped GPT with rotary positions (the fair looped baseline).
#   python compare.py --plan=research/plan_round2.py --tables=steps --steps=2000 --calibration_rounds=0
WFC = 'config/train_shakespeare_char_wfc_onepass.py'
VARIANTS = {
    'looped_rope': ['config/train_shakespeare_char_looped.py', '--pos_emb=rope'],
    'wfc_F2_past2': [WFC, '--n_future=2', '--past_loss=2.0'],
    'wfc_F2_past4': [WFC, '--n_future=2', '--past_loss=4.0'],
    'wfc_F2_spec0': [WFC, '--n_future=2', '--spec_window=0'],
    'wfc_F2_frac50': [WFC, '--n_future=2', '--future_frac=0.5'],
    'wfc_F16': [WFC, '--n_future=16'],
    'wfc_loop3': [WFC, '--n_loop=3', '--loop_law=uniform', '--supervise=2', '--max_loop=6'],
    'wfc_loop2_inject': [WFC, '--n_loop=2', '--loop_law=uniform', '--supervise=2', '--max_loop=4', '--inject=add'],
}
# round 3: train as you sample on the F = 2 recipe. With two slots, warm-start training's one
# earlier step is exactly all the refinement a slot gets in sampling; pins teach goal pinning.
VARIANTS.update({
    'wfc_F2': [WFC, '--n_future=2'],
    'wfc_F2_warm': [WFC, '--n_future=2', '--warm_prob=0.5'],
    'wfc_F2_warm_pin': [WFC, '--n_future=2', '--warm_prob=0.5', '--pin_prob=0.1'],
})
