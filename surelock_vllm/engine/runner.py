"""The masked-diffusion model runner: one engine step = one denoising step.

Each request keeps a `CanvasDenoiser` (the algorithm, plain torch). A step:
  1. drops finished/preempted requests, adds new ones;
  2. asks every scheduled request for its query rows and logit rows;
  3. lays the rows out (`rows.build_step_layout`), builds non-causal attention
     metadata for the platform's attention backend, runs the model on the rows;
  4. computes logits for the logit rows only, lets each denoiser unmask;
  5. returns, per request, the tokens of blocks that became final this step.

The same class runs on CPU and CUDA (mixed into vLLM's CPU or GPU runner);
only the attention kernel behind the metadata builder differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.forward_context import set_forward_context
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from surelock_vllm.diffusion.denoiser import CanvasDenoiser
from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.engine.debug import StepTrace
from surelock_vllm.engine.request_options import RESOLVED_KEY
from surelock_vllm.engine.rows import RequestRows, StepLayout, build_step_layout
from surelock_vllm.engine.settings import ServerSettings
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
    denoiser: CanvasDenoiser
    block_ids: list[int]


class DiffusionRunnerMixin:
    """Mixed into vLLM's CPUModelRunner / GPUModelRunner; replaces execute_model."""

    def _diffusion_state(self) -> dict[str, DiffusionRequestState]:
        states = getattr(self, "_diffusion_requests", None)
        if states is None:
            states = self._diffusion_requests = {}
        return states

    def _step_trace(self) -> StepTrace | None:
        """The per-step trace (tests, debugging: `--additional-config surelock.trace`)."""
        if not hasattr(self, "_trace"):
            settings = ServerSettings.from_vllm_config(self.vllm_config)
            self._trace = StepTrace() if settings.trace else None
        return self._trace

    @property
    def mask_token_id(self) -> int:
        return self.model_config.hf_config.mask_token_id

    def _update_diffusion_states(self, scheduler_output) -> None:
        states = self._diffusion_state()
        for req_id in scheduler_output.finished_req_ids:
            states.pop(req_id, None)
        for req_id in scheduler_output.preempted_req_ids or ():
            states.pop(req_id, None)
        for new in scheduler_output.scheduled_new_reqs:
            resolved = new.sampling_params.extra_args[RESOLVED_KEY]
            options = DiffusionOptions(**resolved["options"])
            surelock = SureLockOptions(**resolved["surelock"])
            states[new.req_id] = DiffusionRequestState(
                denoiser=CanvasDenoiser(
                    new.prompt_token_ids, options, self.mask_token_id, resolved["seed"], surelock
                ),
                block_ids=list(new.block_ids[0]),
            )
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
        req_ids = list(scheduler_output.num_scheduled_tokens)
        rows = []
        for req_id in req_ids:
            den = states[req_id].denoiser
            plan = den.plan()
            rows.append(
                RequestRows(
                    canvas=den.canvas,
                    query_positions=plan.query_positions,
                    logit_positions=plan.logit_positions,
                    block_ids=states[req_id].block_ids,
                )
            )
            scheduled = scheduler_output.num_scheduled_tokens[req_id]
            if scheduled != rows[-1].query_positions.shape[0]:
                raise RuntimeError(
                    f"request {req_id}: scheduler charged {scheduled} rows, "
                    f"runner computes {rows[-1].query_positions.shape[0]}"
                )
        # A request can have no row to compute: with SureLock, once its block
        # is fully unmasked and every position locked, the remaining steps of
        # the block (steps > positions) compute nothing. It still takes the step.
        computing = [i for i, r in enumerate(rows) if r.query_positions.numel()]
        logit_bounds = [(0, 0)] * len(rows)
        if computing:
            layout = build_step_layout([rows[i] for i in computing], self.cache_config.block_size)
            logits = self._run_rows(layout)
            for k, i in enumerate(computing):
                logit_bounds[i] = (layout.logit_start_loc[k], layout.logit_start_loc[k + 1])
        else:
            logits = torch.empty(0, self.model_config.get_vocab_size())
        # The lock test needs log-posteriors: one batched log_softmax per step.
        locking = any(states[r].denoiser.lock is not None for r in req_ids)
        logp = torch.log_softmax(logits, dim=-1) if locking else None

        sampled: list[list[int]] = []
        next_rows: dict[str, int] = {}
        step_stats: dict[str, dict[str, int]] = {}
        for i, req_id in enumerate(req_ids):
            den = states[req_id].denoiser
            lo, hi = logit_bounds[i]
            block_tokens = den.step(logits[lo:hi], None if logp is None else logp[lo:hi])
            sampled.append(block_tokens or [])
            locked = 0 if den.lock is None else den.lock.num_locked
            step_stats[req_id] = dict(
                rows=int(rows[i].query_positions.shape[0]),
                canvas_len=den.canvas_len,
                logit_rows=hi - lo,
                locked=locked,
            )
            if not den.finished:
                # plans the next step now; the runner reuses it then
                next_rows[req_id] = int(den.plan().query_positions.shape[0])
        if (trace := self._step_trace()) is not None:
            trace.record(self, req_ids, rows, states)
        for req_id in req_ids:
            if states[req_id].denoiser.finished:
                # The scheduler finishes it with this output: drop its canvas
                # and lock state now, not at the next step (the engine may idle).
                del states[req_id]
        return DiffusionRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            next_num_rows=next_rows,
            step_stats=step_stats,
        )

    def _run_rows(self, layout: StepLayout) -> torch.Tensor:
        """Transformer over the step's rows; logits (fp32, CPU) of the logit rows."""
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
        logits = self.model.compute_logits(hidden_states[layout.logit_rows.to(device)])
        return logits.float().cpu()
