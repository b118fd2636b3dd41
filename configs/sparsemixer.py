# SparseMixer-v2 (GRIN, Liu et al. 2024, arXiv 2409.12136) at ReMoE Table 2's E = 8, k = 1: a sampled
# expert in training with Heun's third-order gradient estimator, the argmax at evaluation.
# Hardware: 2 CPU cores, about 5 minutes (python train.py config/sparsemixer.py). Lab score: not run yet.
out_dir = 'out-sparsemixer'
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
router = 'sparsemixer'
sparsemixer_eps = 0.01  # PhiMoE's released value; ReMoE does not state its own
aux_loss_coef = 0.01  # ReMoE's MoE baselines: the balance loss 0.01
router_lr_scale = 1.0  # as configs/topk.py
