"""The engine's batched diffusion step around a plain-torch forward, SureLock vs no-lock (GPU path).

    python -m surelock_vllm.bench_step --shape llada-8b --layers 8 --device cuda \
        --dtype bfloat16 --gen-length 256 --batch-sizes 1 8 32 --out docs/bench/gpu_step.json

vLLM cannot be installed on the lent GPU machines, so this runs what of the
engine can run there: `DiffusionBatch` (`diffusion/batch.py`: plan, LLaDA's
transfer, the lock test and the posterior store, all requests as slot-indexed
tensors on the device: the code the engine's runner calls every step) around
the plain-torch LLaDA (`reference/modeling.py`) at a given shape. The forward
computes the plan's rows only: each row's K/V goes to its request's canvas
cache (one `[canvas, heads, head_dim]` per slot and layer, contiguous rather
than vLLM's paged blocks), and the rows attend non-causally over their whole
canvas, queries padded to the step's longest. Its final hidden states of the
rows the step reads go to `DiffusionBatch.step` with the LM head, as the
runner's do.

Each batch size runs twice on the same prompts: no-lock, then SureLock at
`--eps`; timed from the first step to the last, the device synchronised. The
FLOPs are the engine's formulas (`ComputeLedger`: dense + attention, and the
LM head over the rows read). Random weights, so the lock pattern is a random
model's (what `docs/bench/small-126k` measures on CPU), not LLaDA-8B's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from surelock_vllm.bench_rows import SHAPES, build_model
from surelock_vllm.diffusion.batch import BatchPlan, DiffusionBatch
from surelock_vllm.diffusion.flops import ComputeLedger, ModelShape
from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.engine.rows import padded_rows_layout
from surelock_vllm.reference.modeling import LLaDAReferenceLM, apply_rotary, rotary_cos_sin
from surelock_vllm.tools.make_checkpoint import LLADA_SPECIAL_IDS

LLADA_MASK_ID = LLADA_SPECIAL_IDS["<|mdm_mask|>"]
LLADA_EOS_ID = LLADA_SPECIAL_IDS["<|endoftext|>"]
LLADA_EOT_ID = LLADA_SPECIAL_IDS["<|eot_id|>"]


class RowsForward:
    """The transformer over a step's computed rows, with every slot's canvas K/V kept.

    `keys` / `values`: `[layers, slots, canvas, kv_heads, head_dim]`. A row's
    K/V are written where it sits in its request's canvas; rows not computed
    (locked) keep theirs from the step they last ran.
    """

    def __init__(self, model: LLaDAReferenceLM, max_requests: int, max_canvas_len: int):
        config = model.config
        weight = model.model.transformer.wte.weight
        shape = (config.n_layers, max_requests, max_canvas_len, config.n_kv_heads, config.head_dim)
        self.model = model
        self.keys = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.zeros_like(self.keys)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.transformer.ff_out(hidden)[:, : self.model.config.vocab_size]

    def __call__(self, plan: BatchPlan, canvas_lens: list[int]) -> torch.Tensor:
        """Final hidden states (after the last norm) of the plan's rows read, in order."""
        if len(plan.seq_b) != len(plan.slots):
            raise ValueError("bench_step runs no classifier-free guidance")
        transformer = self.model.model.transformer
        device = plan.query_pos.device
        seqs, rows, width = len(plan.seq_rows), plan.query_pos.shape[0], plan.width
        longest = max(plan.seq_rows)
        seq_slot = plan.slot_index  # one sequence per request
        row_slot, pos = seq_slot[plan.query_seq], plan.query_pos
        # padded and masked as the engine's CPU attention does (engine/attention_cpu.py)
        padded_row, key_mask = (
            None if t is None else t.to(device)
            for t in padded_rows_layout(torch.tensor([0, *plan.seq_rows]).cumsum(0), torch.tensor(canvas_lens), longest, width)
        )
        first = transformer.blocks[0]
        cos, sin = rotary_cos_sin(pos, first.head_dim, first.rope_theta)

        x = transformer.wte(plan.query_ids)
        for layer, block in enumerate(transformer.blocks):
            h = block.attn_norm(x)
            q = apply_rotary(block.q_proj(h).view(rows, block.n_heads, block.head_dim), cos, sin)
            k = apply_rotary(block.k_proj(h).view(rows, block.n_kv_heads, block.head_dim), cos, sin)
            self.keys[layer, row_slot, pos] = k
            self.values[layer, row_slot, pos] = block.v_proj(h).view(rows, block.n_kv_heads, block.head_dim)
            keys = self.keys[layer].index_select(0, seq_slot)[:, :width].transpose(1, 2)
            values = self.values[layer].index_select(0, seq_slot)[:, :width].transpose(1, 2)
            if padded_row is None:
                queries = q
            else:
                queries = q.new_zeros((seqs * longest, block.n_heads, block.head_dim))
                queries[padded_row] = q
            out = F.scaled_dot_product_attention(
                queries.view(seqs, longest, block.n_heads, block.head_dim).transpose(1, 2), keys, values,
                attn_mask=key_mask, enable_gqa=block.n_heads != block.n_kv_heads,
            )
            out = out.transpose(1, 2).reshape(seqs * longest, -1)
            if padded_row is not None:
                out = out[padded_row]
            x = x + block.attn_out(out)
            h = block.ff_norm(x)
            x = x + block.ff_out(F.silu(block.ff_proj(h)) * block.up_proj(h))
        return transformer.ln_f(x[plan.read_rows])


@torch.inference_mode()  # as the runner's execute_model
def denoise(
    forward: RowsForward, batch: DiffusionBatch, prompts: list[list[int]], options: DiffusionOptions,
    surelock: SureLockOptions, shape: ModelShape, seed: int = 0,
) -> tuple[list[list[int]], list[ComputeLedger]]:
    """All prompts through the batched step until every request finishes: generated ids and each request's ledger."""
    slots = [batch.add(p, options, seed + i, surelock) for i, p in enumerate(prompts)]
    tokens: dict[int, list[int]] = {s: [] for s in slots}
    ledgers = {s: ComputeLedger(steps_fixed=options.steps) for s in slots}
    running = list(slots)
    while running:
        plan = batch.plan(running)
        canvas_lens = [batch.info[s].canvas_len for s in running]
        result = batch.step(plan, forward(plan, canvas_lens), forward.lm_head)
        for b, slot in enumerate(running):
            ledgers[slot].add_step(shape, plan.num_query_rows[b], canvas_lens[b], result.logit_rows[b], result.locked[b])
            if result.block_tokens[b]:
                tokens[slot] += result.block_tokens[b]
        for slot, finished in zip(list(running), result.finished):
            if finished:
                batch.remove(slot)
                running.remove(slot)
    return [tokens[s] for s in slots], [ledgers[s] for s in slots]


def random_prompts(batch: int, length: int, vocab: int, generator: torch.Generator) -> list[list[int]]:
    """Prompts of ordinary token ids (below every special id: LLaDA's, or a small vocabulary's last two)."""
    high = min(vocab - 2, LLADA_EOS_ID)
    return torch.randint(0, high, (batch, length), generator=generator).tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llada-8b")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (memory, time)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--eps", type=float, default=5e-3)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/gpu_step.json"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    model = build_model(args.shape, args.layers, device, getattr(torch, args.dtype))
    config = model.config
    shape = ModelShape.from_config(config)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mask_id = config.mask_token_id
    specials = dict(eos_id=LLADA_EOS_ID, eot_id=LLADA_EOT_ID) if mask_id == LLADA_MASK_ID else {}
    options = DiffusionOptions.resolve({"steps": args.gen_length, "block_length": args.block_length},
                                       max_tokens=args.gen_length, temperature=0.0)
    canvas = args.prompt_length + args.gen_length
    forward = RowsForward(model, max(args.batch_sizes), canvas)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, shape {args.shape}, layers {config.n_layers}, {args.dtype}, "
          f"gen_length {args.gen_length}, block {args.block_length}, prompt {args.prompt_length}, eps {args.eps:g}")
    header = {"device": name, "shape": args.shape, "layers": config.n_layers, "dtype": args.dtype,
              "gen_length": args.gen_length, "block_length": args.block_length,
              "prompt_length": args.prompt_length, "eps": args.eps,
              "command": "python -m surelock_vllm.bench_step " + " ".join(sys.argv[1:] if argv is None else argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = {"no-lock": SureLockOptions(), f"eps={args.eps:g}": SureLockOptions(enabled=True, eps=args.eps)}
    results = []
    for size in args.batch_sizes:
        prompts = random_prompts(size, args.prompt_length, config.vocab_size, torch.Generator().manual_seed(size))
        batch = DiffusionBatch(max_requests=size, max_canvas_len=canvas, mask_id=mask_id, device=device, **specials)
        short = DiffusionOptions.resolve({"steps": 4, "block_length": 4}, max_tokens=4, temperature=0.0)
        for lock in runs.values():  # warm-up: kernels, allocator
            denoise(forward, batch, prompts[:1], short, lock, shape)
        row = {"batch": size, "runs": {}}
        for label, lock in runs.items():
            sync()
            start = time.perf_counter()
            _, ledgers = denoise(forward, batch, prompts, options, lock, shape)
            sync()
            seconds = time.perf_counter() - start
            total = ComputeLedger()
            for ledger in ledgers:
                total.merge(ledger)
            row["runs"][label] = {
                "s": seconds, "s_per_step": seconds / (total.steps / size), "rows": total.rows,
                "flops": total.dense_flops + total.attention_flops, "lm_head_flops": total.lm_head_flops,
            }
        nolock, lock = row["runs"]["no-lock"], row["runs"][f"eps={args.eps:g}"]
        lock["speedup"] = nolock["s"] / lock["s"]
        lock["flops_ratio"] = lock["flops"] / nolock["flops"]
        lock["flops_ratio_with_lm_head"] = (lock["flops"] + lock["lm_head_flops"]) / (nolock["flops"] + nolock["lm_head_flops"])
        lock["efficiency"] = lock["speedup"] * lock["flops_ratio_with_lm_head"]
        lock["rows_ratio"] = lock["rows"] / nolock["rows"]
        results.append(row)
        print(f"batch {size:3d}: no-lock {nolock['s_per_step'] * 1e3:8.2f} ms/step  SureLock {lock['s_per_step'] * 1e3:8.2f} ms/step  "
              f"{lock['speedup']:.2f}x  rows {lock['rows_ratio']:.3f}  FLOPs {lock['flops_ratio']:.3f} "
              f"(+LM head {lock['flops_ratio_with_lm_head']:.3f})  efficiency {lock['efficiency']:.0%}", flush=True)
        # after every batch size: a run cut short by a time limit keeps what it measured
        args.out.write_text(json.dumps({**header, "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
