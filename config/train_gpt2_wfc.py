# The WFC counterpart of config/train_gpt2.py at matched compute: the same 124M-parameter blocks,
# data, batch (491,520 tokens per iteration) and schedule shape, as a pinned WFC model with 4 future
# slots and rotary positions (the shakespeare_char screen preferred F = 2 at 64 tokens of
# context, see RESULTS.md; with 1024 tokens F is an open question, and F barely changes the cost).
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_wfc.py
# Cost: runtime.training_flops counts what a pinned WFC step computes (a clean stream and a future
# stream over the same tokens, attention over 2T keys, past_loss decodes): 22.40 TFLOPs per
# 12 x 1024 micro-batch against GPT's 10.50, a ratio of 2.13. So max_iters = 600,000 / 2.13 =
# 281,000 iterations spend GPT's 2.5e20 FLOPs: about the same 4 days on 8 x A100 at equal MFU,
# having seen 138B tokens (an estimate: the pinned block mask may run slower attention kernels).
# tests/test_ecosystem.py checks this ratio against model.py.
# One refinement pass, as the one-pass shakespeare_char recipe: the converging recipe (bound='rms',
# train_depth=8, loop_law='uniform', bptt=2, supervise=2) costs about 1.9x per step and was 0.04
# nats worse at equal iterations there (RESULTS.md, "Convergence").
# Micro-batches of 6 rows x 80 micro-steps keep the tokens per iteration while the future stream
# doubles the activations. Expected loss: unknown, this is the experiment. Not run in this repo:
# no GPUs here.
include('train_gpt2.py')
out_dir = 'out-gpt2-wfc'
wandb_run_name = 'gpt2-124M-wfc'

batch_size = 6
gradient_accumulation_steps = 10 * 8

pos_emb = 'rope'
n_future = 4
attn = 'pinned'
dist_power = 1.0
past_loss = 1.0

max_iters = 281000
lr_decay_iters = 281000
