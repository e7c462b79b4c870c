# WFC on tiny-shakespeare characters: the default research config, the recipe whose refinement
# converges. The one-pass config's model (4 x 128, block 64, batch 12, 2000 iterations, pinned
# attention, rotary positions, two future slots, an auxiliary next-token loss on the past stream)
# with a recurrence that has a fixed point: after every pass the future state is rescaled to the
# token embeddings' RMS (bound='rms'), and each step trains a random depth of 1..8 passes
# (uniform), with gradient and loss on the last 2 (truncated backprop). Chosen by the convergence
# screen in RESULTS.md ("Convergence"): on 64 val windows its loss is 1.855 after 2 passes and
# 1.851 from 8 passes to 64 (the one-pass recipe: 1.810 after 1, 4.36 after 64), the KL early exit
# costs nothing, and a warm start from the last step's state is as good as a cold one. The price:
# its converged loss is 0.04 nats worse than one pass, and a step costs about 1.9x. For the best
# next-token loss at equal time, train config/train_shakespeare_char_wfc_onepass.py.
# 1500 iterations (the screens ran 2000, reaching 1.851 on eval.py's 64 windows) so that the README's
# first command fits 10 minutes: on a fresh clone of 2026-12-05 (2-core AMD EPYC, AVX2) prepare +
# train + sample took 6 min 3 s after a 52 s install (8 min 39 s beside other jobs); train.py's last
# val estimate 1.948 (20 batches).
#   python train.py config/train_shakespeare_char_wfc.py
include('train_shakespeare_char_wfc_onepass.py')
out_dir = 'out-shakespeare-char-wfc'
bound = 'rms'
train_depth = 8
loop_law = 'uniform'
bptt = 2
supervise = 2
max_loop = 8

max_iters = 1500       # 2000 reach 1.851 (RESULTS.md): 1500 keep the README's first command under 10 minutes
lr_decay_iters = 1500
