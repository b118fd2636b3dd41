# Lory (Zhong et al. 2024, arXiv 2405.03133) at ReMoE Table 2's E = 8, k = 1: the experts' weights merged per
# segment, routed from the previous segment's mean hidden state (the first segment: uniformly, so causal).
# Segments of 32 tokens of block_size 128: ReMoE's 256 of 1,024 scaled down (4 segments a sequence).
# ReMoE does not say whether it used Lory's dense warm-up or similarity batching; neither is here.
# Hardware: 2 CPU cores (python train.py config/lory.py). Lab score: not run yet.
out_dir = 'out-lory'
dataset = 'shakespeare_char'  # UTF-8 bytes: the MoE layers, not a 50K-token embedding, hold the parameters
eval_interval = 150
eval_iters = 20
max_iters = 1500
batch_size = 16
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
ffn_hidden = 512  # per expert; one merged FFN a token is the dense config's FFN (equal active compute)
moe_every = 1
n_expert = 8
top_k = 1  # ReMoE Table 2 ranks its baselines at E = 8, k = 1 (Lory merges: one FFN a token)
router = 'lory'
lory_segment = 32
router_lr_scale = 1.0  # as configs/topk.py
