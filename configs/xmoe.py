# XMoE (Chi et al. 2022, arXiv 2204.09179; RMoE Table 1): top-2 over the cosine of the token projected to
# 16 dimensions with the experts' embeddings, under a learned temperature. RMoE Table 2 adds the GRU
# router under it: python train.py config/xmoe.py --recurrent_router=True --rmoe_dim=64 --rmoe_init=torch
# Hardware: 2 CPU cores, about 5 minutes (python train.py config/xmoe.py). Lab score: not run yet.
out_dir = 'out-xmoe'
dataset = 'shakespeare_char'  # UTF-8 bytes: the MoE layers, not a 50K-token embedding, hold the parameters
eval_interval = 150
eval_iters = 20
max_iters = 1500
batch_size = 16
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
ffn_hidden = 256  # per expert; K * ffn_hidden = the dense config's 512
moe_every = 1
n_expert = 8
top_k = 2  # RMoE Table 1: top-2 (of 16 there)
router = 'xmoe'
xmoe_dim = 16  # RMoE's default (Table 2 also runs 8 and 32)
aux_loss_coef = 0.01  # RMoE §4.1: the balance loss 0.01 for every router of Table 1
router_lr_scale = 1.0  # as configs/topk.py, so the logits are the only difference
router_renorm = True  # as configs/topk.py and RMoE's code
