# DeepSeek-V3's router on Shakespeare (bytes): 8 experts, 2 active per token, every block MoE.
# Hardware: 2 CPU cores, about 5 minutes (python train.py config/deepseek.py).
# In the router lab (multidomain bytes, 3 seeds): 1.5141 ± 0.0053 against top-k's 1.5099 (results/modern).
# configs/topk.py's model, data and schedule; only the router differs: sigmoid scores, the bias
# balancing the load, a tiny sequence-wise loss (DeepSeek-V3, arXiv 2412.19437, §2.1.2).
out_dir = 'out-deepseek'
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
top_k = 2
router = 'topk'
router_lr_scale = 1.0  # as configs/topk.py
score = 'sigmoid'  # DeepSeek-V3 eq. 15: each expert scored on its own, s = sigmoid(u . e_i)
router_renorm = True  # eq. 13: the 2 chosen scores renormalised to sum to 1
# DeepSeek-V3 scales its gates by 2.5 with 8 of 256 fine-grained experts beside a shared expert; here
# 2 of 8 experts and no shared one. 1.0 keeps the MoE output's scale of configs/topk.py (gates summing to
# 1), so the comparison is about scoring and balancing only, not a larger residual update.
route_scale = 1.0
balance = 'bias'  # auxiliary-loss-free balancing: the bias chooses, the scores weigh (u = 1e-3, DeepSeek-V3's γ)
# DeepSeek-V3's α: only a guard against extreme single sequences, the bias does the balancing
seq_aux_coef = 1e-4
