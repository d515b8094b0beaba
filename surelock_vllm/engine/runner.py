"""The masked-diffusion model runner: one engine step = one denoising step.

All running requests live in one `DiffusionBatch` on the model's device (the
algorithm, plain torch: canvases, masks, locks, options and seeds as tensors
indexed by request slot). A step:
  1. drops finished/preempted requests, adds new ones (a slot each);
  2. plans the rows of every scheduled request at once (`DiffusionBatch.plan`);
  3. lays them out for the attention kernel (token ids, positions, KV slots,
     query offsets, block table), runs the model on them and the LM head on
     the rows the step reads;
  4. unmasks and locks for all requests at once (`DiffusionBatch.step`), on the
     device; only counters and the tokens of finished blocks come back;
  5. returns, per request, the tokens of blocks that became final this step.

The same class runs on CPU and CUDA (mixed into vLLM's CPU or GPU runner);
only the attention kernel behind the metadata builder differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.forward_context import set_forward_context
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from surelock_vllm.diffusion.batch import BatchPlan, DiffusionBatch
from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.engine.debug import StepTrace
from surelock_vllm.engine.request_options import RESOLVED_KEY
from surelock_vllm.engine.rows import StepLayout
from surelock_vllm.engine.settings import ServerSettings
from surelock_vllm.engine.special_tokens import special_tokens
from surelock_vllm.log import get_logger

logger = get_logger(__name__)


@dataclass
class DiffusionRunnerOutput(ModelRunnerOutput):
    """ModelRunnerOutput plus what the scheduler needs to plan the next step."""

    # rows each request will compute at its next step (its token-budget charge)
    next_num_rows: dict[str, int] = field(default_factory=dict)
    # per request, this step: rows, canvas_len, logit_rows, locked (ComputeLedger.add_step)
    step_stats: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class DiffusionRequestState:
    """The host side of one running request: its slot and KV blocks."""

    slot: int
    block_ids: list[int]


class DiffusionRunnerMixin:
    """Mixed into vLLM's CPUModelRunner / GPUModelRunner; replaces execute_model."""

    def _diffusion_state(self) -> dict[str, DiffusionRequestState]:
        states = getattr(self, "_diffusion_requests", None)
        if states is None:
            states = self._diffusion_requests = {}
        return states

    def diffusion_batch(self) -> DiffusionBatch:
        batch = getattr(self, "_diffusion_batch", None)
        if batch is None:
            tokens = special_tokens(self.model_config)
            batch = self._diffusion_batch = DiffusionBatch(
                max_requests=self.scheduler_config.max_num_seqs,
                max_canvas_len=self.model_config.max_model_len,
                mask_id=self.mask_token_id,
                device=self.device,
                eos_id=tokens.eos_id,
                eot_id=tokens.eot_id,
            )
        return batch

    def _step_trace(self) -> StepTrace | None:
        """The per-step trace (tests, debugging: `--additional-config surelock.trace`)."""
        if not hasattr(self, "_trace"):
            settings = ServerSettings.from_vllm_config(self.vllm_config)
            self._trace = StepTrace() if settings.trace else None
        return self._trace

    @property
    def mask_token_id(self) -> int:
        return self.model_config.hf_config.mask_token_id

    def _drop(self, req_id: str) -> None:
        state = self._diffusion_state().pop(req_id, None)
        if state is not None:
            self.diffusion_batch().remove(state.slot)

    def _update_diffusion_states(self, scheduler_output) -> None:
        states = self._diffusion_state()
        for req_id in scheduler_output.finished_req_ids:
            self._drop(req_id)
        for req_id in scheduler_output.preempted_req_ids or ():
            self._drop(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            resolved = new.sampling_params.extra_args[RESOLVED_KEY]
            slot = self.diffusion_batch().add(
                new.prompt_token_ids,
                DiffusionOptions(**resolved["options"]),
                resolved["seed"],
                SureLockOptions(**resolved["surelock"]),
            )
            states[new.req_id] = DiffusionRequestState(slot=slot, block_ids=list(new.block_ids[0]))
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, new_blocks in zip(cached.req_ids, cached.new_block_ids):
            if new_blocks is not None and req_id in states:
                states[req_id].block_ids.extend(new_blocks[0])

    @torch.inference_mode()
    def execute_model(self, scheduler_output, intermediate_tensors=None):
        self._update_diffusion_states(scheduler_output)
        if not scheduler_output.num_scheduled_tokens:
            return EMPTY_MODEL_RUNNER_OUTPUT
        states = self._diffusion_state()
        batch = self.diffusion_batch()
        req_ids = list(scheduler_output.num_scheduled_tokens)
        plan = batch.plan([states[r].slot for r in req_ids])
        for req_id, rows in zip(req_ids, plan.num_query_rows):
            scheduled = scheduler_output.num_scheduled_tokens[req_id]
            if scheduled != rows:
                raise RuntimeError(f"request {req_id}: scheduler charged {scheduled} rows, runner computes {rows}")
        # Every step of every request computes at least the block's masked
        # rows (steps <= gen_length: each step unmasks at least one position).
        hidden = self._run_rows(self._step_layout(plan, [states[r].block_ids for r in req_ids]))
        result = batch.step(plan, hidden, self.model.compute_logits)

        next_rows: dict[str, int] = {}
        step_stats: dict[str, dict[str, int]] = {}
        for b, req_id in enumerate(req_ids):
            info = batch.info[plan.slots[b]]
            step_stats[req_id] = dict(
                rows=plan.num_query_rows[b],
                canvas_len=info.canvas_len,
                logit_rows=result.logit_rows[b],
                locked=result.locked[b],
                sequences=2 if info.guided else 1,
            )
            if not result.finished[b]:
                next_rows[req_id] = result.next_rows[b]
        if (trace := self._step_trace()) is not None:
            trace.record(self, req_ids, plan, batch)
        for req_id, finished in zip(req_ids, result.finished):
            if finished:
                # The scheduler finishes it with this output: free its slot
                # now, not at the next step (the engine may idle).
                self._drop(req_id)
        return DiffusionRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[tokens or [] for tokens in result.block_tokens],
            next_num_rows=next_rows,
            step_stats=step_stats,
        )

    def _step_layout(self, plan: BatchPlan, block_ids: list[list[int]]) -> StepLayout:
        """The kernel's view of the step: flat rows on the device, offsets on the host.

        One sequence per scheduled request's canvas, then one per guided
        request's unconditional canvas, whose K/V live in the request's blocks
        after its canvas's (`request_options.guided_kv_tokens`)."""
        block_size = self.cache_config.block_size
        batch = self.diffusion_batch()
        canvas_lens = [batch.info[plan.slots[b]].canvas_len for b in plan.seq_b]
        num_requests = len(plan.slots)
        tables = [
            block_ids[b] if i < num_requests else block_ids[b][-(-canvas_lens[i] // block_size):]
            for i, b in enumerate(plan.seq_b)
        ]
        width = max(map(len, tables))
        table = torch.tensor([ids + [0] * (width - len(ids)) for ids in tables], dtype=torch.int32)
        table = table.to(self.device)
        pos = plan.query_pos
        query_start = [0]
        for rows in plan.seq_rows:
            query_start.append(query_start[-1] + rows)
        return StepLayout(
            input_ids=plan.query_ids,
            positions=pos,
            slot_mapping=table[plan.query_seq, pos // block_size].long() * block_size + pos % block_size,
            query_start_loc=torch.tensor(query_start, dtype=torch.int32),
            seq_lens=torch.tensor(canvas_lens, dtype=torch.int32),
            block_table=table,
            logit_rows=plan.read_rows,
            max_query_len=max(plan.seq_rows),
            max_seq_len=max(canvas_lens),
        )

    def _run_rows(self, layout: StepLayout) -> torch.Tensor:
        """Transformer over the step's rows; final hidden states of the logit rows (on the device)."""
        device = self.device
        slot_mapping = layout.slot_mapping.to(device)
        attn_metadata: dict = {}
        slot_mappings: dict = {}
        for groups in self.attn_groups:
            for group in groups:
                meta = group.get_metadata_builder().build_for_rows(layout, device)
                for layer_name in group.layer_names:
                    attn_metadata[layer_name] = meta
                    slot_mappings[layer_name] = slot_mapping
        with set_forward_context(
            attn_metadata,
            self.vllm_config,
            num_tokens=layout.num_rows,
            slot_mapping=slot_mappings,
        ):
            hidden_states = self.model(
                input_ids=layout.input_ids.to(device),
                positions=layout.positions.to(device),
            )
        return hidden_states[layout.logit_rows.to(device)]
