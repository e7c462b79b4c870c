# WFC on tiny-shakespeare characters: the default research config. Same blocks and data as the GPT
# baseline (4 x 128, block 64, batch 12, 2000 iterations), pinned attention, rotary positions, two
# future slots refined by the weight-tied stack, an auxiliary next-token loss on the past stream.
# Chosen by the equal-iteration screen in RESULTS.md ("Research"): F = 2 beat F = 4 and F = 8, and
# every other lever (looping, warm starts, learned positions, uniform or steeper distance weights,
# no past loss) was worse. It is still behind the GPT at equal iterations and far behind at equal
# wall-clock: see RESULTS.md before building on it. One lead found last: with --n_layer=2 it comes
# within 0.01 of the 4-layer GPT at equal FLOPs (not yet the default: its controls are not run).
# 2-core AMD EPYC CPU (2026-11): about 3 minutes alone (2.1x the GPT's time per iteration);
# next-token val loss about 1.84 (the GPT with rotary positions: 1.80, with learned ones: 1.91).
#   python train.py config/train_shakespeare_char_wfc.py
include('train_shakespeare_char_gpt.py')
out_dir = 'out-shakespeare-char-wfc'
pos_emb = 'rope'
n_future = 2
attn = 'pinned'
dist_power = 1.0
past_loss = 1.0
