# WFC on tiny-shakespeare characters, one refinement pass: the best recipe at equal wall-clock and at
# equal iterations (RESULTS.md, "Convergence"). Same blocks and data as the GPT baseline (4 x 128,
# block 64, batch 12, 2000 iterations), pinned attention, rotary positions, two future slots, an
# auxiliary next-token loss on the past stream (the causal head the speculative sampler verifies
# with). It does not converge: every pass beyond the first moves the state further from what
# training saw (1.81 nats after 1 pass, 2.36 after 2, 4.37 after 64), so it samples with one pass.
# 2-core AMD EPYC CPU (2026-12): about 3.5 minutes alone; next-token val loss about 1.83.
#   python train.py config/train_shakespeare_char_wfc_onepass.py
include('train_shakespeare_char_gpt.py')
out_dir = 'out-shakespeare-char-wfc-onepass'
pos_emb = 'rope'
n_future = 2
attn = 'pinned'
dist_power = 1.0
past_loss = 1.0
