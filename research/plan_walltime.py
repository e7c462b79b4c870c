# The equal wall-clock comparison (issue: "does WFC beat GPT?"): compare.py's four variants (GPT,
# looped GPT, WFC bidirectional, WFC pinned: the default WFC config) plus the fair baselines with
# rotary positions (the WFC configs use them) and the cheaper pinned WFC that trains the future
# stream on half of the blocks per step.
#   python compare.py --plan=research/plan_walltime.py --budget=600 --jobs=2 --threads=1 \
#       --variants=gpt,gpt_rope,looped,looped_rope,wfc_bidirectional,wfc_pinned,wfc_pinned_frac50
VARIANTS = {
    'gpt_rope': ['config/train_shakespeare_char_gpt.py', '--pos_emb=rope'],
    'looped_rope': ['config/train_shakespeare_char_looped.py', '--pos_emb=rope'],
    'wfc_pinned_frac50': ['config/train_shakespeare_char_wfc.py', '--future_frac=0.5'],
}
