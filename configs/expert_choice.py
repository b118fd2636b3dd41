# Expert Choice (Zhou et al. 2022, arXiv 2202.09368) at ReMoE Table 2's E = 8, k = 1: each expert takes
# its top T*K/E tokens of every sequence (ec_capacity = 1, as Lory's EC baseline; ReMoE does not state it),
# no balance loss. Training is not causal (a token's gate depends on later tokens of its sequence): the
# evaluation, final score and sampling use token choice on the same scores (ec_eval='topk').
# Hardware: 2 CPU cores, about 5 minutes (python train.py config/expert_choice.py). Lab score: not run yet.
out_dir = 'out-expert_choice'
dataset = 'shakespeare_char'  # UTF-8 bytes: the MoE layers, not a 50K-token embedding, hold the parameters
eval_interval = 150
eval_iters = 20
max_iters = 1500
batch_size = 16
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
ffn_hidden = 512  # per expert; at K = 1 one expert is the dense config's FFN (equal active compute)
moe_every = 1
n_expert = 8
top_k = 1  # ReMoE Table 2 ranks its baselines at E = 8, k = 1
router = 'expert_choice'
ec_capacity = 1.0
ec_eval = 'topk'
router_lr_scale = 1.0  # as configs/topk.py
