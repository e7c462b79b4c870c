# The convergence screen: recipes that give the refinement a fixed point, against the one-pass
# recipe, at equal iterations (2000) and at equal wall-clock (600 s). Every recipe trains the
# one-pass WFC config with the changes listed (the shipped default is one of them, chosen by this
# screen). The evaluation runs up to 64 passes (exit at KL 1e-3) on the same 64 validation windows
# and reads the loss after exactly K passes on the way.
#   python compare.py --plan=research/plan_convergence.py --tables=steps --steps=2000 --jobs=2 --threads=1 \
#       --calibration_rounds=0 --eval_windows=64 --eval_max_loop=64 --depths=1,2,4,8,16,32,64 \
#       --convergence=True --out_dir=runs/convergence --variants=one_pass,free_uniform8,rms_uniform8,norm_uniform8,...
WFC = 'config/train_shakespeare_char_wfc_onepass.py'  # the default until the screen picked a converging one
DEEP = ['--train_depth=8', '--loop_law=uniform', '--bptt=2', '--supervise=2', '--max_loop=8']  # depth 1..8, gradient and loss on the last 2
ALL4 = ['--train_depth=4', '--loop_law=uniform', '--bptt=0', '--supervise=4', '--max_loop=8']  # depth 1..4, loss on every pass
VARIANTS = {
    'one_pass': [WFC],                                            # the one-pass recipe (the old default)
    'free_uniform8': [WFC, *DEEP],                                # random depth, no bound: drifts
    'rms_uniform8': [WFC, *DEEP, '--bound=rms'],                  # the throwaway prototype: rescaled to the embeddings' RMS
    'norm_uniform8': [WFC, *DEEP, '--bound=norm'],                # a learned LayerNorm after every pass
    'norm_adapter_uniform8': [WFC, *DEEP, '--bound=norm', '--inject=adapter'],  # + Huginn's adapter on [state, input]
    'decay_uniform8': [WFC, *DEEP, '--decay=0.5'],                # Parcae's learned decay a < 1, no norm
    'norm_poisson4': [WFC, '--train_depth=4', '--loop_law=poisson', '--bptt=2', '--supervise=2', '--max_loop=8', '--bound=norm'],
    'norm_uniform4_bptt1': [WFC, '--train_depth=4', '--loop_law=uniform', '--bptt=1', '--supervise=1', '--max_loop=8', '--bound=norm'],
    'norm_uniform8_warm': [WFC, *DEEP, '--bound=norm', '--warm_prob=0.5'],  # self-conditioning: start from the last step's state
    'norm_uniform8_full': [WFC, *DEEP, '--bound=norm', '--bptt=0'],  # gradient through every pass (no truncation)
    # round 2: a loss on every pass (progressive: each depth must be good), full backprop, depth 1..4
    'rms_uniform4_all': [WFC, *ALL4, '--bound=rms'],
    'norm_uniform4_all': [WFC, *ALL4, '--bound=norm'],
    'norm_uniform4_all_warm': [WFC, *ALL4, '--bound=norm', '--warm_prob=0.5'],
    'rms_uniform8_full': [WFC, *DEEP, '--bound=rms', '--bptt=0'],
}
