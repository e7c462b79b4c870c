# WFC on tiny-shakespeare characters at nanoGPT's GPU recipe size: the default research recipe
# (config/train_shakespeare_char_wfc.py: pinned attention, rotary positions, two future slots, past
# loss, a prelude / core / coda sandwich with one block each side, here a core of 4, contractive
# injection, rms bound, a uniform depth of 1..8 core passes per step with gradient on the last 2) on the
# blocks and batch of config/train_shakespeare_char_gpt_gpu.py (6 x 384, 6 heads, block 256, batch 64,
# dropout 0.2, lr 1e-3 -> 1e-4 over 5000 iterations), compiled (one pass: runtime.compile_passes),
# device and dtype picked automatically (cuda + bf16).
# Expected loss and time: not yet measured on a GPU (`python tools/gpu_check.py` measures this shape
# for a few hundred iterations; a step costs about 2x the GPT's on CPU at the small size).
#   python train.py config/train_shakespeare_char_wfc_gpu.py
include('train_shakespeare_char_wfc.py')
include('train_shakespeare_char_gpt_gpu.py')
out_dir = 'out-shakespeare-char-wfc-gpu'
