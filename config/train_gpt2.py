# GPT-2 124M (12 layers x 768, 12 heads, block 1024) on OpenWebText: the baseline at the scale
# where GPT-2 results are known, nanoGPT's recipe. 8 GPUs on one node:
#   python data/openwebtext/prepare.py
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# Each iteration is 12 rows x 1024 tokens x 40 micro-steps = 491,520 tokens (5 micro-steps per GPU);
# 600,000 iterations = 295B tokens = 2.5e20 FLOPs (runtime.training_flops, attention included).
# Expected cost: nanoGPT reports about 4 days on 8 x A100 40GB (about 30% MFU at these FLOPs);
# 8 x H100 should be roughly twice as fast (an estimate from their bf16 peaks, not measured).
# Expected val loss: about 2.85 (nanoGPT's run; GPT-2's own checkpoint scores about 3.12 on
# OpenWebText before finetuning). Not run in this repo: no GPUs here.
out_dir = 'out-gpt2'
dataset = 'openwebtext'
wandb_log = True
wandb_project = 'wfc-gpt-owt'
wandb_run_name = 'gpt2-124M'

batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

learning_rate = 6e-4
max_iters = 600000
lr_decay_iters = 600000
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 1e-1
beta2 = 0.95

eval_interval = 1000
eval_iters = 200
log_interval = 10
compile = True
