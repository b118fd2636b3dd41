# Hash routing (Roller et al. 2021, arXiv 2106.04426) as ReMoE Table 2 ran it: expert = token id mod 8,
# gate 1, no router parameters, no balance loss. On bytes, "id mod 8" sends each byte class to a fixed expert.
# Hardware: 2 CPU cores, about 5 minutes (python train.py config/hash.py). Lab score: not run yet.
out_dir = 'out-hash'
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
router = 'hash'
hash_table = 'mod'  # 'random': Roller et al.'s own seeded table (hash_seed)
