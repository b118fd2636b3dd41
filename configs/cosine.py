# CosineMoE (RMoE Table 1): top-2 over cos(x, w_e) / tau, L2-normalised expert embeddings, a learned
# temperature (X-MoE without the down-projection). Add recurrent_router=True for RMoE Table 2's GRU under it.
# Hardware: 2 CPU cores, about 5 minutes (python train.py config/cosine.py). Lab score: not run yet.
out_dir = 'out-cosine'
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
router = 'cosine'
aux_loss_coef = 0.01  # RMoE §4.1: the balance loss 0.01 for every router of Table 1
router_lr_scale = 1.0  # as configs/topk.py, so the logits are the only difference
router_renorm = True  # as configs/topk.py and RMoE's code
