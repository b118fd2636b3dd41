"""
Train a GPT with Mixture-of-Experts layers. nanoGPT's loop, knobs and names.

    python train.py                                 # defaults below: a small top-k MoE on Shakespeare
    python train.py config/remoe.py --max_iters=100 # a config file, then --key=value overrides
    torchrun --standalone --nproc_per_node=2 train.py config/topk.py
    torchrun --standalone --nproc_per_node=2 train.py config/remoe.py --ep_size=2 --compile=False

Config files and overrides: configurator.py. Checkpoints, resume, Ctrl-C: checkpoint.py.
"""

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

# Ctrl-C and SIGTERM are taken by a thread of their own (checkpoint.StopSignals), which every other
# thread leaves them to: threads inherit this mask, so it is set before torch starts any.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

import torch  # noqa: E402

import configurator  # noqa: E402
import data  # noqa: E402
import distributed  # noqa: E402
from checkpoint import (CheckpointError, Saver, StopSignals, check_out_dir, load_checkpoint,  # noqa: E402
                        model_from_checkpoint, restore_training, resume_path)
from evaluate import estimate_loss, score_split, score_variants  # noqa: E402
from model import GPT, GPTConfig, device_peak_flops  # noqa: E402
from sample import generate_text  # noqa: E402

# -----------------------------------------------------------------------------
# default config values: a top-k MoE on Shakespeare's bytes that trains on 2 CPU cores in ~5 minutes
# I/O
out_dir = 'out'
eval_interval = 150
log_interval = 10
eval_iters = 20
eval_only = False  # evaluate once, then exit
always_save_checkpoint = True  # else only when val loss improves
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
sample_tokens = 200  # at the end, print a sample this long (0 = none)
# data
dataset = 'shakespeare_char'  # 'shakespeare_char', 'shakespeare', 'multidomain', 'textfiles' or 'web'
tokenizer = ''  # '' = the dataset's own; 'bytes' or 'gpt2' for multidomain and textfiles
data_files = ''  # for dataset='textfiles': a file, a folder or a glob
data_dir = 'data'
hf_name = data.HF_NAME  # for dataset='web': a Hugging Face dataset (needs internet) or builder
hf_files = ''  # for dataset='web': local data files for the builder (e.g. hf_name='json')
hf_max_tokens = 2_000_000_000  # for dataset='web': tokens to prepare, val included
gradient_accumulation_steps = 1
batch_size = 16
block_size = 128
# model
n_layer = 4
n_head = 4
n_embd = 128
ffn_hidden = 0  # hidden width of the dense MLP or of one expert; 0 = 8/3 * n_embd
rope_theta = 10000.0
init_std = 0.02  # std of the normal init of the weight matrices
# mixture of experts
moe_every = 1  # every moe_every-th block is MoE; 0 = a dense model
n_expert = 8
top_k = 2
router = 'topk'  # 'topk', 'remoe' (ReLU + adaptive L1), 'prototype' (K groups, top-1 in each)
recurrent_router = False  # RMoE: router logits from a GRU shared across layers
rmoe_dim = 128  # RMoE: projector and GRU width
rmoe_flow = 'pass'  # RMoE Table 5: 'pass' (RMoE), 'detach' (no recurrent gradient), 'none' (NP: no state passed)
rmoe_init = 'normal'  # RMoE: 'normal' (init_std, no biases) or 'torch' (PyTorch's own init + biases, the paper's code)
expert_impl = 'auto'  # 'loop' (readable reference), 'grouped', 'triton' (CUDA), 'auto' (triton on CUDA, else grouped)
expert_granularity = 1  # G: E*G experts of hidden H/G with K*G active
n_shared_expert = 0  # always-on experts per MoE layer beside the routed ones (DeepSeekMoE)
capacity_factor = 0.0  # topk/prototype: expert capacity = cf * K * N / E; 0 = dropless
balance = 'aux'  # 'aux' (topk: Switch loss; remoe: eq. 10-11), 'bias' (topk: loss-free, 2408.15664), 'none'
aux_loss_coef = 0.01  # Switch load-balancing loss (topk, prototype with balance='aux')
bias_update_rate = 1e-3  # balance='bias': the bias step per optimizer step
z_loss_coef = 0.0  # router z-loss
router_renorm = False  # topk/prototype: renormalise the kept gates to sum to 1
score = 'softmax'  # topk/prototype: 'softmax' or 'sigmoid' (DeepSeek-V3: an independent sigmoid per expert)
route_scale = 1.0  # topk/prototype: multiplies the kept gates (DeepSeek-V3's routed_scaling_factor: 2.5)
seq_aux_coef = 0.0  # topk/prototype: DeepSeek-V3's sequence-wise balance loss α (1e-4 there), any balance
dense_grad = False  # topk: Default MoE's dense router gradient (arXiv 2504.12463): unchosen experts give an EMA
dense_grad_beta = 0.9  # dense_grad: the EMA's decay per optimizer step
dense_grad_forward = False  # dense_grad: the defaults in the output too (default: the router's gradient only)
remoe_lambda0 = 1e-8  # ReMoE: initial L1 coefficient
remoe_alpha = 1.2  # ReMoE: multiplicative step of the coefficient
remoe_lambda_floor = False  # ReMoE: λ never falls below remoe_lambda0 (not in the paper; configs/remoe.py)
lory_segment = 0  # lory: tokens a segment (0 = block_size / 4, as ReMoE's 256 of 1,024)
hash_table = 'mod'  # hash: expert = token id mod E (ReMoE's baseline), or 'random': Roller et al.'s seeded table
hash_seed = 0  # hash_table='random': the table's seed
router_hidden = 0  # mlp: hidden width (0 = as many parameters as RMoE's router); hyperrouter: hypernetwork's (0 = 256)
xmoe_dim = 16  # xmoe: the token's projection width before the cosine
ec_capacity = 1.0  # expert_choice: tokens per expert = ec_capacity * T * K / E (K experts a token on average)
ec_eval = 'topk'  # expert_choice at evaluation: 'topk' (causal token choice) or 'choice' (the training rule: leaky)
sparsemixer_eps = 0.01  # sparsemixer: the width of its mask, relative to the largest logit
aux_loss_reduction = 'sum'  # Switch (and z) loss over the MoE layers: 'sum' (Megatron) or 'mean' (RMoE)
remoe_l1_reduction = 'mean'  # ReMoE's L1 over the MoE layers: 'mean' (paper, eq. 10) or 'sum' (its code)
# AdamW optimizer
learning_rate = 2e-3
max_iters = 1500
weight_decay = 0.1
decay_router = True  # apply weight_decay to the router weights too (False: routers are not decayed)
router_lr_scale = 1.0  # the routers' learning rate is learning_rate times this
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 = no clipping
max_skipped_steps = 5  # a step with a NaN/inf gradient is skipped; this many in a row stop the run
# learning rate schedule: linear warm-up, then cosine decay to min_lr
decay_lr = True
warmup_iters = 30
lr_decay_iters = 0  # 0 = max_iters
min_lr = 2e-4
# system
device = ''  # '' = cuda if available, else cpu
dtype = ''  # '' = bfloat16 on a GPU that supports it, else float32
compile = True  # torch.compile the whole model (fullgraph)
seed = 1337
# several processes (torchrun)
ep_size = 1  # expert parallelism: this many ranks share the experts of each MoE layer (1 = none)
dist_timeout = 300.0  # seconds a collective may wait for a peer before the run stops (a dead rank)
# -----------------------------------------------------------------------------


def die(msg):
    """Bad input ends the run with one line on stderr and exit code 2: no traceback."""
    if int(os.environ.get('RANK', 0)) == 0:  # under torchrun, one line from rank 0, not one per rank
        print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


stop = StopSignals(verbose=int(os.environ.get('RANK', 0)) == 0)  # see its docstring: Ctrl-C, SIGTERM
defaults = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
try:
    # parsed, type-checked, '' defaults resolved; to resume, the checkpoint's config with what may change
    config, resume_changes = configurator.configure(sys.argv[1:], defaults)
    if int(os.environ.get('RANK', 0)) == 0:  # the writer: before any work, not after it
        check_out_dir(config['out_dir'], config['init_from'])
except (configurator.ConfigError, CheckpointError) as e:
    die(str(e))
globals().update(config)  # the rest of the script reads plain names, as in nanoGPT
model_args = configurator.model_args(config)

# -----------------------------------------------------------------------------
# processes, devices, data
dist = distributed.init(device, ep_size, dist_timeout)
distributed.exit_on_lost_peer(dist)  # a dead peer: one line and exit, not a hang
device = dist.device
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
tokens_per_iter = gradient_accumulation_steps * dist.world_size * batch_size * block_size
log_path = os.path.join(out_dir, 'log.jsonl')
if dist.master:
    os.makedirs(out_dir, exist_ok=True)
    if init_from == 'scratch' and os.path.exists(log_path):
        os.remove(log_path)  # a new run, a new log; resume appends
    print(f"tokens per iteration: {tokens_per_iter:,}")
torch.manual_seed(seed + dist.rank)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)

try:  # rank 0 prepares the dataset on first use, the others wait for it
    if dist.master:
        data.prepare(dataset, data_dir, files=data_files, hf_name=hf_name, hf_files=hf_files,
                     max_tokens=hf_max_tokens, tokenizer=tokenizer)
    folder = data.dataset_folder(dataset, data_dir, hf_name=hf_name, hf_files=hf_files, tokenizer=tokenizer)
    distributed.barrier(dist)
    batches = data.Batches(folder, batch_size, block_size, dist.rank, dist.world_size, device)
except data.DataError as e:
    die(str(e))
except OSError as e:  # a folder that cannot be created, written or read: the path, not a traceback
    die(f"data_dir={data_dir!r} cannot be used ({e.strerror}: {e.filename}): pass --data_dir=<a folder you can "
        f"write to, or one that holds the prepared dataset>")
# Training batches come from their own generator, saved in checkpoints: a resumed run sees the
# same batches it would have seen had it never stopped.
data_gen = torch.Generator().manual_seed(seed)
domains = batches.domains  # multidomain: evaluation reports a val loss per domain too
model_args['vocab_size'] = 64 * math.ceil(batches.meta['vocab_size'] / 64)  # a multiple of 64: faster matmuls


def log(record):
    """One JSON object per line in out_dir/log.jsonl: the run, then every logged step and evaluation."""
    with open(log_path, 'a') as f:
        f.write(json.dumps(record) + '\n')


# -----------------------------------------------------------------------------
# model and optimizer
iter_num, best_val_loss, ckpt = 0, float('inf'), None
if init_from == 'resume':
    try:
        ckpt = load_checkpoint(resume_path(out_dir), device)
    except CheckpointError as e:
        die(str(e))
    model = model_from_checkpoint(ckpt, expert_impl=expert_impl)  # the backend may change (e.g. CPU -> GPU)
    if model.config.vocab_size != model_args['vocab_size']:
        die(f"{out_dir}/ckpt.pt was trained on a vocabulary of {model.config.vocab_size}, but {folder} has "
            f"{model_args['vocab_size']}: resume with the dataset and tokenizer it was trained on")
    iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
else:
    model = GPT(GPTConfig(**model_args))
model.to(device)
raw_model = model  # the uncompiled, unwrapped module: its state_dict has no prefixes
is_moe = raw_model.config.n_moe_layers() > 0
if dist.master:
    print(f"parameters: {model.num_params() / 1e6:.2f}M total, {model.num_params(active=True) / 1e6:.2f}M active")
    # the log opens with what the run is, so that plots need nothing but log.jsonl
    log({'iter': iter_num, 'run': {
        **config, 'tokenizer': tokenizer, 'vocab_size': model.config.vocab_size, 'domains': domains,
        'params': model.num_params(), 'active_params': model.num_params(active=True),
        'tokens_per_iter': tokens_per_iter, 'world_size': dist.world_size},
        **({'resumed': {k: list(v) for k, v in resume_changes.items()}} if init_from == 'resume' else {})})
    if init_from == 'resume':
        print(f"resuming {out_dir} at iteration {iter_num}" + ''.join(
            f", {k} {old!r} -> {new!r}" for k, (old, new) in resume_changes.items()))
flops_per_token = raw_model.flops_per_token()  # of the full model, before EP keeps a slice here
distributed.apply_expert_parallel(raw_model, dist)  # ep_size > 1: this rank's experts only

optimizer = raw_model.configure_optimizer(learning_rate, weight_decay, (beta1, beta2),
                                          router_lr_scale=router_lr_scale, decay_router=decay_router)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
if ckpt is not None:
    restore_training(ckpt, raw_model, optimizer, scaler, dist, data_gen)
    ckpt = None  # free memory

if compile:
    if dist.master:
        print("compiling the model (takes a minute)...")
    model = torch.compile(model, fullgraph=True, dynamic=False)
model = distributed.wrap(model, dist)
peak_flops = device_peak_flops(torch.device(device))
if dist.master:  # what one step costs, said before the first: a huge block_size or model shows here
    step_s = flops_per_token * tokens_per_iter / dist.world_size / peak_flops
    memory = raw_model.step_memory(batch_size, ptdtype.itemsize) / 1e9
    print(f"{'warning: ' if step_s > 60 else ''}one step: at least {step_s:,.2g} s at this device's peak FLOP/s, "
          f"about {memory:,.2g} GB of memory (rough)")
saver = Saver(out_dir, raw_model, optimizer, scaler, dist, data_gen, keep_best=not always_save_checkpoint,
              on_disk=iter_num if init_from == 'resume' else None, config=config, tokenizer=tokenizer,
              world_size=dist.world_size)


def get_lr(it):
    """Linear warm-up, then cosine decay from learning_rate to min_lr at lr_decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


skipped = 0  # steps in a row whose gradient was not finite
stop.training = True  # from here on, a first Ctrl-C / SIGTERM saves before stopping

# -----------------------------------------------------------------------------
# training loop
t0, timed_iters = time.time(), 0
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_scale']
    last = iter_num >= max_iters

    if stop.agreed(dist):  # every rank stops at the same step, whichever ranks got the signal
        saver.save(iter_num, best_val_loss, diverging=skipped > 0, stopping=True)
        break
    # the run's score, every val token once (evaluate.py says why); max_iters=0 only checks that a config starts
    final = (last and iter_num > 0) or eval_only
    variants = {}
    if iter_num % eval_interval == 0 or final:
        losses = estimate_loss(model, batches, eval_iters, ctx, dist)
        if final:
            losses.update(score_split(raw_model, batches, ctx, dist))
            variants = score_variants(raw_model, batches, ctx, dist)  # e.g. Expert Choice's teacher-forced score
        if dist.master:
            per_domain = {name: round(losses[f'val_{name}'], 5) for name in domains}
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                  + ''.join(f", {name} {loss:.4f}" for name, loss in per_domain.items())
                  + (f" (every val token: {losses['val_tokens']:,})" if final else '')
                  + ''.join(f", {name.removeprefix('val_loss_')} {loss:.4f}" for name, loss in variants.items()))
            log({'iter': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val'],
                 **({'val_loss_per_domain': per_domain} if domains else {}),
                 **({'final': True, 'val_tokens': losses['val_tokens'], **variants} if final else {})})
        improved = losses['val'] < best_val_loss
        saving = (improved or always_save_checkpoint) and (iter_num > 0 or last) and not eval_only
        if saving and math.isfinite(losses['val']):
            best_val_loss = min(best_val_loss, losses['val'])
            saver.save(iter_num, best_val_loss, diverging=skipped > 0)
        t0, timed_iters = time.time(), 0  # evaluation time is not training time
        distributed.take_a2a_stats(dist)  # nor are its all-to-alls: reset the counters
    if last or eval_only:
        break

    load = torch.zeros((), device=device)  # [L_moe, E] once added to: this step's expert loads
    expert_sum = expert_count = torch.zeros((), device=device)  # dense_grad: [L_moe, E, D], [L_moe, E]
    # A stop is answered within one micro-step, not at the end of a long accumulated step (a scheduler's
    # grace period is 30-120 s): the partial step is dropped, and the run is saved as it was when this
    # step began (weights, optimizer, λ untouched; the RNG and the data order rewound), so a resume
    # replays this step whole and trains exactly as an uninterrupted run.
    step_start_rng = (torch.get_rng_state(), data_gen.get_state())
    abandoned = False
    for micro_step in range(gradient_accumulation_steps):
        if micro_step > 0 and stop.agreed(dist):  # (micro-step 0: checked at the top of the loop)
            abandoned = True
            break
        if dist.world_size > 1:  # DDP: average gradients only after the last micro-step
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        X, Y, _ = batches.get('train', data_gen)
        with ctx:
            _, loss, info = model(X, Y)
            loss = loss / gradient_accumulation_steps
        scaler.scale(loss).backward()
        if is_moe:
            load = load + info['load'].float() / gradient_accumulation_steps
        if 'expert_sum' in info:  # Default MoE's EMA: pooled sums and counts, every micro-step
            expert_sum, expert_count = expert_sum + info['expert_sum'], expert_count + info['expert_count']
    if abandoned:
        optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(step_start_rng[0])
        data_gen.set_state(step_start_rng[1])
        if dist.master:
            print(f"stopped in the middle of iteration {iter_num} (micro-step {micro_step} of "
                  f"{gradient_accumulation_steps}): that step is dropped, the run is saved as it was before it")
        saver.save(iter_num, best_val_loss, diverging=skipped > 0, stopping=True)
        break
    distributed.sync_expert_grads(raw_model, dist)  # EP: expert grads to DDP's mean over ranks
    scaler.unscale_(optimizer)
    # the norm of the full gradient (EP-aware; grad_clip=0 only measures it), the same on every rank
    grad_norm = distributed.clip_grad_norm_(raw_model, grad_clip, dist).item()
    load = distributed.all_reduce_mean(load, dist)  # the global load: all micro-steps, all ranks
    if dense_grad:  # every rank's tokens: the same EMA everywhere
        expert_sum, expert_count = (distributed.all_reduce_sum(t, dist) for t in (expert_sum, expert_count))
    if math.isfinite(grad_norm) or scaler.is_enabled():  # float16: the scaler skips such steps itself
        skipped = 0
        scaler.step(optimizer)
        scaler.update()
        if is_moe:  # ReMoE eq. 7, the balancing bias: once per optimizer step, from this step only
            raw_model.update_routers(load, *((expert_sum, expert_count) if dense_grad else ()))
    else:  # one NaN/inf gradient: skip the step, as large trainers do; several in a row: diverged
        skipped += 1
        if dist.master:
            print(f"iter {iter_num}: skipped, gradient norm {grad_norm} ({skipped} in a row)")
        if skipped > max_skipped_steps:
            if dist.master:
                print(f"error: training diverged at iteration {iter_num}: {skipped} steps in a row with a "
                      f"NaN/inf gradient; the last good checkpoint is {out_dir}/ckpt.pt from {saver.on_disk_str()}: "
                      f"resume it with a lower --learning_rate or a --grad_clip", file=sys.stderr)
            distributed.destroy(dist)
            sys.exit(4)
    optimizer.zero_grad(set_to_none=True)
    timed_iters += 1

    if iter_num % log_interval == 0:
        a2a_bytes, a2a_seconds = distributed.take_a2a_stats(dist)  # rank 0's all-to-alls since the last log
        if dist.world_size > 1:  # logged numbers are global: means over ranks (of equally many tokens)
            loss = distributed.all_reduce_mean(loss.detach(), dist)
            info = {k: distributed.all_reduce_mean(v.float(), dist) for k, v in info.items()}
    if iter_num % log_interval == 0 and dist.master:
        t1 = time.time()
        dt, n_iters, t0, timed_iters = t1 - t0, timed_iters, t1, 0  # time per iteration since the last log
        tokens_per_sec = n_iters * tokens_per_iter / dt
        mfu = flops_per_token * tokens_per_sec / (peak_flops * dist.world_size)
        lossf = loss.item() * gradient_accumulation_steps
        record = {'iter': iter_num, 'loss': lossf, 'lm_loss': info['lm_loss'].item(), 'grad_norm': grad_norm,
                  'aux_loss': info['aux_loss'].item(), 'lr': lr, 'tokens_per_sec': round(tokens_per_sec),
                  'mfu': round(mfu, 4), **raw_model.routing_log(info)}
        if is_moe:  # ReMoE's controller saw this, measured on all micro-steps and ranks
            record.update(sparsity=round(1 - load.mean().item(), 5), sparsity_tokens=tokens_per_iter)
        if dist.ep_size > 1:  # forward + backward, per iteration
            record.update(a2a_ms=round(1000 * a2a_seconds / n_iters, 3), a2a_mb=round(a2a_bytes / n_iters / 1e6, 4))
        log(record)
        print(f"iter {iter_num}: loss {lossf:.4f}, {1000 * dt / n_iters:.0f}ms/iter, "
              f"{tokens_per_sec:,.0f} tok/s, mfu {100 * mfu:.1f}%"
              + (f", {raw_model.routers()[0].console(record)}" if is_moe else ''))  # what to watch for this router
    iter_num += 1

if sample_tokens > 0 and not stop.signum:
    sampler = distributed.full_model(raw_model, dist)  # rank 0 samples alone, with every expert
    if dist.master:
        print('-' * 40)
        print(generate_text(sampler, tokenizer, '\n', num_samples=1, max_new_tokens=sample_tokens, device=device)[0])
distributed.destroy(dist)
if stop.signum:
    sys.exit(128 + stop.signum)
