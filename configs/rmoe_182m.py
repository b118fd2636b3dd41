# Paper scale (ReMoE §4.1): the 182M model (152M active here: the output head is tied),
# d 768, 12 layers, 12 heads, SwiGLU 3072, every layer MoE with
# 8 experts, 1 active; The Pile (uncopyrighted) streamed through datasets.
# RMoE: top-1 of 8 with logits from a GRU (p = 128) shared across layers, Switch loss 0.01.
# Hardware: one node of 8 GPUs with 80 GB (A100/H100): torchrun --standalone --nproc_per_node=8
# train.py config/rmoe_182m.py. Time: the paper's 30B tokens (60k steps of 512 x 1024) take
# roughly 10 hours on 8 A100s at 40% MFU (an estimate from the FLOPs, not a measurement).
# Data: dataset='web' prepares 32B tokens (64 GB on disk) on first use; it needs internet access.
out_dir = 'out-rmoe-182m'
dataset = 'web'
hf_max_tokens = 32_000_000_000
eval_interval = 1000
eval_iters = 50
log_interval = 10
batch_size = 16  # per GPU; x 4 accumulation x 8 GPUs = 512 sequences of 1024 per step
gradient_accumulation_steps = 4
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
ffn_hidden = 3072
n_expert = 8
top_k = 1
router = 'topk'
recurrent_router = True
rmoe_dim = 128
aux_loss_coef = 0.01
learning_rate = 5e-4  # cosine to 5e-5 with 1% warm-up, AdamW (0.9, 0.999), wd 0.01, clip 1
min_lr = 5e-5
max_iters = 60000
warmup_iters = 600
weight_decay = 0.01
beta2 = 0.999
