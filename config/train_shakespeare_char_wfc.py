# WFC on tiny-shakespeare characters: the default research config, the best recipe whose refinement
# converges. The one-pass config's model (4 x 128, block 64, batch 12, pinned attention, rotary
# positions, two future slots, an auxiliary next-token loss on the past stream) as a sandwich:
# block 1 is a prelude run once on a slot's input, blocks 2-3 the looped core, block 4 a coda that
# decodes (the causal stream runs all four once). The core re-injects the prelude's output
# contractively (x <- a x + (1 - a) x0, a learned in (0, 1)), the future state is rescaled to the
# token embeddings' RMS after every pass (bound='rms'), and each step trains a random depth of 1..8
# core passes (uniform), with gradient and loss on the last 2 (truncated backprop).
# Chosen by the refinement screen in RESULTS.md ("Refinement levers"): at 2000 iterations on 64 val
# windows 1.830 after 1 pass, 1.826 from 4 passes to 64, the KL exit after about 4 passes; the
# non-sandwich recipe of the last round reached 1.851 in 17 passes at 1.2x this step's time. Its
# fixed point is still no better than one pass (1.810, train_shakespeare_char_wfc_onepass.py) or
# than the rotary GPT (1.771): see RESULTS.md.
# 1500 iterations (the screen ran 2000) so that the README's first command fits 10 minutes: on
# 2026-12-06 (2-core AMD EPYC, AVX2) the README's whole first line took 3 min 27 s on a fresh clone
# after a 36 s install (4 min 28 s earlier that day), train.py's last val estimate 1.890 (1.912 when
# it became the default).
#   python train.py config/train_shakespeare_char_wfc.py
include('train_shakespeare_char_wfc_onepass.py')
out_dir = 'out-shakespeare-char-wfc'
n_prelude = 1
n_coda = 1
inject = 'contract'
bound = 'rms'
train_depth = 8
loop_law = 'uniform'
bptt = 2
supervise = 2
max_loop = 8

max_iters = 1500       # 2000 reach 1.826 (RESULTS.md): 1500 keep the README's first command under 10 minutes
lr_decay_iters = 1500
